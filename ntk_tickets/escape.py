"""The escape-dimensions study: a teacher–student census of one-hidden-layer students, the
escape test of their stuck minima, and the lottery prediction measured beside it.

One cell is one student width ``n`` with all seeds vmapped (:func:`run_escape_width`):

1. **Census.** Each seed's student is trained in float64 on :func:`relative_loss` (the
   training MSE over the target variance): ``train.optimizer`` for ``train.steps``, then
   Levenberg–Marquardt (:func:`levenberg_marquardt`) until the gradient norm, the loss or
   ``escape.polish_steps`` stops it. :func:`classify` sorts the endpoint into ``success``
   (loss < ``tolerance``), ``stuck`` (gradient < ``grad_tolerance`` and
   λ_min ≥ −``eig_tolerance``·λ_max: a local minimum), ``saddle`` (a critical point with a
   negative eigenvalue) or ``unconverged``.
2. **Escape test.** Each stuck minimum is embedded into width ``n + k`` (k = 1…
   ``add_neurons``) by splitting the k units whose split matrix (:func:`split_matrix`) is
   largest, at each share μ of ``split_mu`` (:func:`ntk_tickets.hessian.split_neuron`), or
   by adding k silent units (:func:`ntk_tickets.hessian.add_inactive_neuron`). At the
   embedded point: the relative loss change, the gradient norm, λ_min; then it is retrained
   from there plus N(0, ``noise``²) and counts as ``escaped`` when its loss falls below half
   the stuck loss.
3. **Lottery.** ``subnetworks`` random r*-unit subnetworks of each seed's θ0 (r* =
   ``data.teacher_width``) are trained alone as width-r* students (``subnet_success``). For
   each successful student wider than r*, the r* units of largest |a_i|·‖w_i‖ at the
   solution are retrained alone from θ0 (``ticket_success``) and in place, with the other
   units set to ε·ξ and trained too (experiment ``perturb``, ``escape.perturb_eps``); the
   solution's distinct units are counted (:func:`distinct_units`, Expand-and-Cluster).
   :func:`lottery_table` sets P(success) beside the independent-tickets prediction
   1 − (1 − p)^C(n, r*) and the disjoint-subnetworks bound 1 − (1 − p)^⌊n/r*⌋, p the
   census's P(success) at width r*, all with Wilson 95 % intervals (:func:`wilson_interval`).

Parameters are those of ``build_model(ModelConfig(arch="mlp", depth=1), n, (d,), 1)``:
``[(), (W1 (d, n), b1 (1, n)), (), (W2 (n, 1), b2 (1, 1))]``. In the ntk parameterization
every raw weight of θ0 is N(0, 1), so any r units of θ0 are a width-r student's θ0.

References: Martinelli, Brea & Gerstner 2026 (escape dimensions); Safran & Shamir 2018,
"Spurious Local Minima are Common in Two-Layer ReLU Neural Networks"; Fukumizu & Amari 2000
and Şimşek et al. 2021 (arXiv 2105.12221) (neuron splitting); Martinelli et al. 2024,
"Expand-and-Cluster" (arXiv 2304.12794); Frankle & Carbin 2019 (lottery tickets); Wilson
1927; Moré 1978 (Levenberg–Marquardt).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.flatten_util import ravel_pytree

from ntk_tickets.config import EscapeConfig, StudyConfig
from ntk_tickets.hessian import (
    add_inactive_neuron,
    hessian_eigenvalues,
    lanczos_eigenvalues,
    split_neuron,
)

PyTree = Any
ApplyFn = Callable[[PyTree, jax.Array], jax.Array]

#: A retrained embedding ``escaped`` when its loss falls below this fraction of the stuck one.
ESCAPE_FACTOR = 0.5
#: Units whose |a_i|·‖w_i‖ is below this fraction of the largest are silent (not counted).
SILENT_FRACTION = 1e-3
#: z of the two-sided 95 % normal quantile.
Z95 = 1.959963984540054


# ----------------------------------------------------------------------------- training


def residuals(apply_fn: ApplyFn, params: PyTree, x: jax.Array, y: jax.Array) -> jax.Array:
    """``(f(x) − y) / √(N·Var y)`` flattened to (N,), N = y.size: its squared norm is
    :func:`relative_loss`."""
    scale = jnp.sqrt(y.size * jnp.mean((y - jnp.mean(y, axis=0)) ** 2))
    return ((apply_fn(params, x) - y) / scale).ravel()


def relative_loss(apply_fn: ApplyFn, params: PyTree, x: jax.Array, y: jax.Array) -> jax.Array:
    """``mean((f(x) − y)²) / mean((y − ȳ)²)``: 0 when the teacher is reproduced, 1 for the
    best constant. x (N, d), y (N, k)."""
    r = residuals(apply_fn, params, x, y)
    return r @ r


def grad_norm(apply_fn: ApplyFn, params: PyTree, x: jax.Array, y: jax.Array) -> jax.Array:
    """‖∇_θ relative_loss‖₂ over all parameters."""
    g = jax.grad(relative_loss, argnums=1)(apply_fn, params, x, y)
    return jnp.linalg.norm(ravel_pytree(g)[0])


def levenberg_marquardt(apply_fn: ApplyFn, params: PyTree, x: jax.Array, y: jax.Array, *,
                        max_steps: int, grad_tolerance: float,
                        loss_floor: float) -> PyTree:
    """Minimizes :func:`relative_loss` by Levenberg–Marquardt (Moré 1978).

    Each step solves ``(JᵀJ + λI) δ = −Jᵀr`` (J the (N, P) Jacobian of :func:`residuals`),
    takes it if the loss falls (then λ ← λ/3) and otherwise keeps θ (λ ← 2λ). It stops after
    ``max_steps``, when ‖∇L‖ = 2‖Jᵀr‖ < ``grad_tolerance``, when L < ``loss_floor`` or when λ
    exceeds 1e12 (no descent left). Its fixed points are the critical points of L, saddles
    included. Memory grows as N·P: meant for small students. Under ``vmap`` the loop runs
    until the last seed stops; the others keep their stopped values.
    """
    flat, unravel = ravel_pytree(params)

    def at(theta):
        r = residuals(apply_fn, unravel(theta), x, y)
        jac = jax.jacfwd(lambda t: residuals(apply_fn, unravel(t), x, y))(theta)
        return r @ r, jac.T @ r, jac.T @ jac

    def step(carry):
        i, theta, damping, (loss, g, gn) = carry
        trial = theta + jnp.linalg.solve(gn + damping * jnp.eye(theta.size, dtype=gn.dtype),
                                         -g)
        new = at(trial)
        better = new[0] < loss

        def pick(a, b):
            return jnp.where(better, a, b)

        return (i + 1, pick(trial, theta), pick(damping / 3, 2 * damping),
                jax.tree_util.tree_map(pick, new, (loss, g, gn)))

    def running(carry):
        i, _, damping, (loss, g, _) = carry
        return ((i < max_steps) & (2 * jnp.linalg.norm(g) > grad_tolerance)
                & (loss > loss_floor) & (damping < 1e12))

    start = at(flat)
    damping = 1e-3 * jnp.trace(start[2]) / flat.size
    _, theta, _, _ = lax.while_loop(running, step, (0, flat, damping, start))
    return unravel(theta)


def fit(apply_fn: ApplyFn, optimizer: Any, params: PyTree, x: jax.Array, y: jax.Array, *,
        steps: int, polish_steps: int, grad_tolerance: float, loss_floor: float) -> PyTree:
    """``steps`` of the optax ``optimizer`` on :func:`relative_loss`, then at most
    ``polish_steps`` of :func:`levenberg_marquardt`. One seed; vmap over seeds."""
    def step(carry, _):
        p, state = carry
        g = jax.grad(relative_loss, argnums=1)(apply_fn, p, x, y)
        updates, state = optimizer.update(g, state, p)
        return (jax.tree_util.tree_map(jnp.add, p, updates), state), None

    (params, _), _ = lax.scan(step, (params, optimizer.init(params)), None, length=steps)
    if polish_steps == 0:
        return params
    return levenberg_marquardt(apply_fn, params, x, y, max_steps=polish_steps,
                               grad_tolerance=grad_tolerance, loss_floor=loss_floor)


def spectrum_edges(apply_fn: ApplyFn, params: PyTree, x: jax.Array, y: jax.Array, *,
                   method: str, key: jax.Array, lanczos_iters: int) -> jax.Array:
    """(λ_min, λ_max) of the Hessian of :func:`relative_loss`: exact (``eigh``) or the
    extreme Ritz values of ``lanczos_iters`` Lanczos steps (inner bounds that tighten with
    the steps)."""
    def loss(p, x, y):
        return relative_loss(apply_fn, p, x, y)

    if method == "exact":
        eig = hessian_eigenvalues(loss, params, (x, y))
    else:
        size = ravel_pytree(params)[0].size
        eig = lanczos_eigenvalues(loss, params, key, min(lanczos_iters, size), (x, y))
    return jnp.stack([eig[0], eig[-1]])


def classify(loss: np.ndarray, grad: np.ndarray, eig_min: np.ndarray, eig_max: np.ndarray,
             esc: EscapeConfig) -> dict[str, np.ndarray]:
    """Each run as exactly one of ``success``, ``stuck``, ``saddle`` or ``unconverged``
    (1/0 arrays of the inputs' shape; module docstring)."""
    success = loss < esc.tolerance
    critical = ~success & (grad < esc.grad_tolerance)
    minimum = eig_min >= -esc.eig_tolerance * np.abs(eig_max)
    return {"success": success, "stuck": critical & minimum, "saddle": critical & ~minimum,
            "unconverged": ~success & ~critical}


# ----------------------------------------------------------------------------- units


def _layers(params: Sequence[PyTree]) -> tuple[tuple, tuple]:
    (w1, b1), (w2, b2) = [p for p in params if jax.tree_util.tree_leaves(p)]
    return (w1, b1), (w2, b2)


def _rebuild(params: Sequence[PyTree], hidden: tuple, readout: tuple) -> list:
    out, new = [], iter((hidden, readout))
    for p in params:
        out.append(next(new) if jax.tree_util.tree_leaves(p) else p)
    return out


def unit_strengths(params: Sequence[PyTree]) -> jax.Array:
    """|a_i|·‖w_i‖ per hidden unit (n,): outgoing weight norm times incoming weight norm."""
    (w1, _), (w2, _) = _layers(params)
    return jnp.linalg.norm(w2, axis=1) * jnp.linalg.norm(w1, axis=0)


def units_of(params: Sequence[PyTree], idx: jax.Array) -> list:
    """The student made of hidden units ``idx`` (r,) alone, with their raw weights (a
    width-r student's parameters; the readout bias is kept)."""
    (w1, b1), (w2, b2) = _layers(params)
    return _rebuild(params, (w1[:, idx], b1[..., idx]), (w2[idx], b2))


def perturbed_around(params0: Sequence[PyTree], xi: Sequence[PyTree], idx: jax.Array,
                     eps: jax.Array) -> list:
    """θ0 on units ``idx`` (r,), ε·ξ on every other unit's incoming, bias and outgoing
    weights; the readout bias from θ0 (the perturbation test of a unit ticket)."""
    (w1, b1), (w2, b2) = _layers(params0)
    (v1, c1), (v2, _) = _layers(xi)
    keep = jnp.zeros(w1.shape[1], bool).at[idx].set(True)
    return _rebuild(params0, (jnp.where(keep, w1, eps * v1), jnp.where(keep, b1, eps * c1)),
                    (jnp.where(keep[:, None], w2, eps * v2), b2))


def split_matrix(apply_fn: ApplyFn, params: Sequence[PyTree], j: int | jax.Array,
                 x: jax.Array, y: jax.Array) -> jax.Array:
    """The (d + 1) × (d + 1) matrix of unit j that decides the split line's curvature.

    ``B_j = ∂²/∂u² Σ_x e(x)·f(x; u)`` at u = (w_j, b_j), with e = ∂L/∂f held fixed (L the
    relative loss): the residual-weighted second derivative of unit j's contribution,
    a_j·Σ_x e(x)·φ''(z_j(x))·∂z_j ∂z_jᵀ. Splitting unit j with share μ moves the Hessian in
    the direction that pulls the two copies apart by μ(1 − μ)·B_j (up to a positive factor),
    so at a minimum with B_j positive definite the points with μ outside [0, 1] are saddles,
    and with B_j negative definite those with μ in (0, 1) are (Fukumizu & Amari 2000).
    """
    e = jax.grad(lambda f: jnp.sum((f - y) ** 2) / jnp.sum((y - jnp.mean(y, 0)) ** 2))(
        apply_fn(params, x))
    (w1, b1), readout = _layers(params)

    def contribution(u):
        hidden = (w1.at[:, j].set(u[:-1]), b1.at[..., j].set(u[-1]))
        return jnp.sum(e * apply_fn(_rebuild(params, hidden, readout), x))

    u = jnp.concatenate([w1[:, j], b1[..., j].ravel()])
    return jax.hessian(contribution)(u)


def distinct_units(params: Sequence[PyTree], tolerance: float) -> int:
    """How many distinct units a solution has (Expand-and-Cluster, Martinelli et al. 2024):
    units with |a_i|·‖w_i‖ ≥ SILENT_FRACTION × the largest, their incoming vectors (w_i,
    b_i) grouped by single linkage at 1 − |cos| < ``tolerance`` (|cos|: an odd activation
    makes (w, b, a) and (−w, −b, −a) one unit)."""
    from scipy.cluster.hierarchy import fcluster, linkage

    (w1, b1), _ = _layers(params)
    strength = np.asarray(unit_strengths(params))
    active = strength >= SILENT_FRACTION * strength.max()
    u = np.concatenate([np.asarray(w1), np.asarray(b1).reshape(1, -1)], axis=0)[:, active].T
    if len(u) < 2:
        return int(len(u))
    u = u / np.linalg.norm(u, axis=1, keepdims=True)
    distance = 1.0 - np.abs(u @ u.T)
    condensed = np.clip(distance[np.triu_indices(len(u), 1)], 0.0, None)
    return int(fcluster(linkage(condensed, "single"), tolerance, "distance").max())


# ----------------------------------------------------------------------------- intervals


def wilson_interval(successes: np.ndarray | int, trials: np.ndarray | int,
                    z: float = Z95) -> tuple[np.ndarray, np.ndarray]:
    """The Wilson score interval of a binomial proportion (Wilson 1927):
    (p̂ + z²/2n ± z·√(p̂(1 − p̂)/n + z²/4n²)) / (1 + z²/n). NaN where ``trials`` is 0."""
    k, n = np.asarray(successes, float), np.asarray(trials, float)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = k / n
        centre = (p + z ** 2 / (2 * n)) / (1 + z ** 2 / n)
        half = z * np.sqrt(p * (1 - p) / n + z ** 2 / (4 * n ** 2)) / (1 + z ** 2 / n)
    return centre - half, centre + half


def lottery_prediction(p: np.ndarray | float, width: int, teacher_width: int,
                       kind: str) -> np.ndarray:
    """P(success) at ``width`` if a student succeeded whenever one of its subnetworks of
    ``teacher_width`` units would, each an independent draw of success probability ``p``:
    ``"independent"`` counts all C(n, r*) of them, ``"disjoint"`` only ⌊n/r*⌋ disjoint ones
    (which are independent). Monotone in p, so it maps an interval of p to one of the
    prediction."""
    count = {"independent": math.comb(width, teacher_width),
             "disjoint": width // teacher_width}[kind]
    return 1.0 - (1.0 - np.asarray(p, float)) ** count


# ----------------------------------------------------------------------------- the cell


class _Programs:
    """The compiled programs of one study, one per student width and batch size (DESIGN.md
    §3: parameters, starts and data are arguments; the batches hold all seeds, the escape
    test's stuck minima excepted, so mostly the width is the shape that changes)."""

    def __init__(self, cfg: StudyConfig, data: Any):
        from ntk_tickets.models import build_model
        from ntk_tickets.optimizers import make_optimizer

        self.cfg, self.esc = cfg, cfg.escape
        self.x, self.y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
        self._model = functools.cache(
            lambda w: build_model(cfg.model, w, data.input_shape, data.n_out))
        self._optimizer = make_optimizer(cfg.train)

    def model(self, width: int) -> Any:
        return self._model(width)

    @functools.cache  # noqa: B019 (one _Programs per study, kept in _CACHE)
    def _fit(self, width: int) -> Callable:
        one = functools.partial(
            fit, self.model(width).apply_fn, self._optimizer, steps=self.cfg.train.steps,
            polish_steps=self.esc.polish_steps, grad_tolerance=self.esc.grad_tolerance,
            loss_floor=self.esc.tolerance / 100)
        return jax.jit(jax.vmap(one, in_axes=(0, None, None)))

    def fit(self, params: PyTree) -> PyTree:
        """Trains a batch of students (leading axis) of one width."""
        return self._fit(_width(params))(params, self.x, self.y)

    @functools.cache  # noqa: B019
    def _measure(self, width: int) -> Callable:
        apply_fn = self.model(width).apply_fn

        def one(params, key, x, y):
            edges = spectrum_edges(apply_fn, params, x, y, method=self.esc.hessian, key=key,
                                   lanczos_iters=self.esc.lanczos_iters)
            return {"loss": relative_loss(apply_fn, params, x, y),
                    "grad": grad_norm(apply_fn, params, x, y),
                    "eig_min": edges[0], "eig_max": edges[1],
                    "max_weight": jnp.max(jnp.abs(ravel_pytree(params)[0]))}

        return jax.jit(jax.vmap(one, in_axes=(0, 0, None, None)))

    def measure(self, params: PyTree, keys: jax.Array) -> dict[str, np.ndarray]:
        """Loss, gradient norm, Hessian edges and max |θ| of a batch of students."""
        out = self._measure(_width(params))(params, keys, self.x, self.y)
        return {k: np.asarray(v) for k, v in out.items()}

    @functools.cache  # noqa: B019
    def _split_matrices(self, width: int) -> Callable:
        apply_fn = self.model(width).apply_fn

        def per_unit(params, x, y):
            return jax.vmap(lambda j: jnp.linalg.eigvalsh(split_matrix(apply_fn, params, j,
                                                                      x, y)))(
                jnp.arange(width))

        return jax.jit(jax.vmap(per_unit, in_axes=(0, None, None)))

    def split_spectra(self, params: PyTree) -> np.ndarray:
        """Eigenvalues of every unit's split matrix, (batch, n, d + 1), ascending."""
        return np.asarray(self._split_matrices(_width(params))(params, self.x, self.y))


_CACHE: dict[tuple, _Programs] = {}


def _programs(cfg: StudyConfig, data: Any) -> _Programs:
    """The :class:`_Programs` of a study, shared by its cells (the width-r* programs of
    p_sub and the tickets compile once per study, not once per cell)."""
    key = (cfg, data.fingerprint)
    if key not in _CACHE:
        _CACHE.clear()  # one study at a time: free the last study's programs
        _CACHE[key] = _Programs(cfg, data)
    return _CACHE[key]


def _width(params: PyTree) -> int:
    (w1, _), _ = _layers(params)
    return int(w1.shape[-1])


def _take(tree: PyTree, idx: Sequence[int] | np.ndarray) -> PyTree:
    return jax.tree_util.tree_map(lambda a: a[np.asarray(idx)], tree)


def _jitter(params: PyTree, keys: jax.Array, scale: float, salt: int) -> PyTree:
    """``params`` (batch, ...) plus N(0, scale²) noise drawn from each member's key."""
    def one(p, key):
        leaves, tree = jax.tree_util.tree_flatten(p)
        draws = jax.random.split(jax.random.fold_in(key, salt), len(leaves))
        return jax.tree_util.tree_unflatten(tree, [
            a + scale * jax.random.normal(k, a.shape, a.dtype)
            for a, k in zip(leaves, draws, strict=True)])

    return jax.vmap(one)(params, keys)


def _seed_keys(seeds: Sequence[int]) -> dict[str, jax.Array]:
    """Per-seed PRNG keys (s, 2), one role each: init, lanczos, noise, subnetworks, xi."""
    roles = ("init", "lanczos", "noise", "subnetworks", "xi")
    keys = jax.vmap(lambda s: jax.random.split(jax.random.PRNGKey(s), len(roles)))(
        jnp.asarray(seeds))
    return {role: keys[:, i] for i, role in enumerate(roles)}


class _Rows:
    """Record rows of one cell: path ``exact``, split ``train``, the last first-phase step."""

    def __init__(self, width: int, step: int):
        self.width, self.step, self.rows = width, step, []

    def add(self, seeds: Sequence[int], values: dict[str, np.ndarray], **columns: Any) -> None:
        for metric, per_seed in values.items():
            for seed, value in zip(seeds, np.asarray(per_seed, float), strict=True):
                self.rows.append({"width": self.width, "seed": int(seed), "path": "exact",
                                  "step": self.step, "split": "train", "metric": metric,
                                  "value": float(value), **columns})


def _census(programs: _Programs, width: int, seeds: Sequence[int], keys: dict,
            rows: _Rows) -> tuple[PyTree, PyTree, dict[str, np.ndarray], dict]:
    """Trains every seed's width-n student and classifies the endpoints."""
    params0 = jax.vmap(programs.model(width).init)(keys["init"])
    params = programs.fit(params0)
    m = programs.measure(params, keys["lanczos"])
    classes = classify(m["loss"], m["grad"], m["eig_min"], m["eig_max"], programs.esc)
    rows.add(seeds, {**classes, "final_loss": m["loss"], "grad_norm": m["grad"],
                     "hessian_min_eig": m["eig_min"], "hessian_max_eig": m["eig_max"],
                     "max_weight": m["max_weight"]}, experiment="census")
    return params0, params, classes, m


def _embeddings(programs: _Programs, stuck: PyTree, units: np.ndarray, k: int,
                keys: jax.Array) -> list[tuple[dict[str, Any], PyTree]]:
    """``(columns, params)`` of every embedding of the stuck minima with k added units:
    the k units of largest split matrix (``units`` (s, ≥1), reused in turn when fewer)
    split at each μ, and k silent units."""
    split = jax.vmap(functools.partial(split_neuron,
                                       parameterization=programs.cfg.model.parameterization),
                     in_axes=(0, 0, None))
    silent = jax.vmap(functools.partial(add_inactive_neuron,
                                        parameterization=programs.cfg.model.parameterization))
    out = []
    for mu in programs.esc.split_mu:
        params = stuck
        for i in range(k):
            params = split(params, jnp.asarray(units[:, i % units.shape[1]]), mu)
        out.append(({"embedding": "split", "added": k, "mu": mu}, params))
    params = stuck
    for i in range(k):
        params = silent(params, jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, i))
    out.append(({"embedding": "inactive", "added": k}, params))
    return out


def _escape_test(programs: _Programs, width: int, seeds: np.ndarray, params: PyTree,
                 before: dict[str, np.ndarray], keys: dict, rows: _Rows) -> dict[str, Any]:
    """The escape test of the stuck minima ``params`` (batch of ``seeds``); returns the
    Hessian spectra of the first one before and after one split (``split_mu[0]``)."""
    esc = programs.esc
    spectra = programs.split_spectra(params)  # (s, n, d + 1)
    size = np.abs(spectra).max(axis=-1)
    units = np.argsort(-size, axis=1)[:, :esc.add_neurons]
    top = np.take_along_axis(spectra, units[:, :1, None], axis=1)[:, 0]
    rows.add(seeds, {"split_matrix_min_eig": top[:, 0], "split_matrix_max_eig": top[:, -1]},
             experiment="escape", embedding="split", added=1)
    for k in range(1, esc.add_neurons + 1):
        for columns, embedded in _embeddings(programs, params, units, k, keys["noise"]):
            m = programs.measure(embedded, keys["lanczos"])
            trained = programs.fit(_jitter(embedded, keys["noise"], esc.noise, salt=k))
            loss = programs.measure(trained, keys["lanczos"])["loss"]
            rows.add(seeds, {"embed_loss_change": np.abs(m["loss"] - before["loss"])
                             / before["loss"],
                             "grad_norm": m["grad"], "hessian_min_eig": m["eig_min"],
                             "final_loss": loss, "success": loss < esc.tolerance,
                             "escaped": loss < ESCAPE_FACTOR * before["loss"]},
                     experiment="escape", **columns)
    if esc.hessian != "exact":
        return {}
    first = _take(params, [0])
    after = _embeddings(programs, first, units[:1], 1, keys["noise"][:1])[0][1]
    return {"hessian_before": _spectrum(programs, _take(first, 0)),
            "hessian_after": _spectrum(programs, _take(after, 0)),
            "hessian_seed": np.asarray(seeds[0]), "hessian_mu": np.asarray(esc.split_mu[0])}


def _spectrum(programs: _Programs, params: PyTree) -> np.ndarray:
    """The exact Hessian spectrum of one student's relative loss."""
    loss_fn = functools.partial(relative_loss, programs.model(_width(params)).apply_fn)
    return np.asarray(hessian_eigenvalues(loss_fn, params, (programs.x, programs.y)))
def _subnetworks(programs: _Programs, width: int, seeds: Sequence[int], params0: PyTree,
                 keys: dict, rows: _Rows) -> None:
    """p_sub: ``escape.subnetworks`` random r*-unit subnetworks of each θ0, trained alone."""
    r_star, count = programs.cfg.data.teacher_width, programs.esc.subnetworks
    draws = jax.vmap(lambda key: jax.random.split(key, count))(keys["subnetworks"])
    idx = jax.vmap(jax.vmap(lambda key: jax.random.permutation(key, width)[:r_star]))(draws)
    subnets = jax.vmap(jax.vmap(units_of, in_axes=(None, 0)))(params0, idx)
    flat = jax.tree_util.tree_map(lambda a: a.reshape(-1, *a.shape[2:]), subnets)
    trained = programs.fit(flat)
    loss = programs.measure(trained, jnp.repeat(keys["lanczos"], count, axis=0))["loss"]
    wins = (loss < programs.esc.tolerance).reshape(len(seeds), count)
    rows.add(seeds, {"subnet_success": wins.mean(axis=1),
                     "subnet_trials": np.full(len(seeds), count)}, experiment="subnetwork")


def _tickets(programs: _Programs, width: int, seeds: np.ndarray, params0: PyTree,
             params: PyTree, keys: dict, won: np.ndarray, rows: _Rows) -> None:
    """The ticket check of the successful students (``won``, indices into ``seeds``).

    Every seed is trained, so that the programs are the census's (one compile for the batch
    of all seeds); only the successful ones are recorded."""
    esc, r_star = programs.esc, programs.cfg.data.teacher_width
    idx = jnp.argsort(-jax.vmap(unit_strengths)(params), axis=1)[:, :r_star]
    alone = programs.fit(jax.vmap(units_of)(params0, idx))
    loss = programs.measure(alone, keys["lanczos"])["loss"][won]
    distinct = [distinct_units(_take(params, i), esc.cluster_tolerance) for i in won]
    rows.add(seeds[won], {"ticket_success": loss < esc.tolerance, "ticket_loss": loss,
                          "distinct_neurons": np.asarray(distinct)}, experiment="ticket")
    xi = jax.vmap(programs.model(width).init)(keys["xi"])
    for eps in esc.perturb_eps:
        start = jax.vmap(perturbed_around, in_axes=(0, 0, 0, None))(params0, xi, idx, eps)
        loss = programs.measure(programs.fit(start), keys["lanczos"])["loss"][won]
        rows.add(seeds[won], {"success": loss < esc.tolerance, "final_loss": loss},
                 experiment="perturb", eps=eps)


def run_escape_width(cfg: StudyConfig, data: Any, width: int) -> Any:
    """One cell of the escape study (module docstring): census, escape test of the stuck
    minima, p_sub and the ticket check, all seeds vmapped.

    Args:
      cfg: a study config with an ``[escape]`` section (float64: ``train.x64``).
      data: the teacher dataset.
      width: the students' hidden units.

    Returns:
      A :class:`~ntk_tickets.experiments.CellResult`; its arrays hold the exact Hessian
      spectrum of the first stuck minimum before and after one split, when there is one.
      Compile time is not separated: it is part of ``run_s`` (``compile_s`` is 0).
    """
    from ntk_tickets.experiments import CellResult

    start = time.perf_counter()
    programs = _programs(cfg, data)
    seeds = np.asarray(cfg.train.seeds)
    keys = _seed_keys(seeds)
    rows = _Rows(width, cfg.train.steps)
    params0, params, classes, before = _census(programs, width, seeds, keys, rows)
    arrays = {}
    stuck = np.flatnonzero(classes["stuck"])
    if len(stuck):
        arrays = _escape_test(programs, width, seeds[stuck], _take(params, stuck),
                              {k: v[stuck] for k, v in before.items()}, _take(keys, stuck),
                              rows)
    r_star = cfg.data.teacher_width
    if width > r_star and cfg.escape.subnetworks:
        _subnetworks(programs, width, seeds, params0, keys, rows)
    won = np.flatnonzero(classes["success"])
    if width > r_star and cfg.escape.tickets and len(won):
        _tickets(programs, width, seeds, params0, params, keys, won, rows)
    info = {"parameters": int(ravel_pytree(_take(params0, 0))[0].size),
            "stuck": int(len(stuck)), "diverged_step": {}}
    return CellResult(rows.rows, "done", 0.0, time.perf_counter() - start, info, arrays)


# ----------------------------------------------------------------------------- tables


def _per_seed(records: Any, experiment: str, metric: str, **columns: Any) -> Any:
    rows = records[(records["experiment"] == experiment) & (records["metric"] == metric)]
    for column, value in columns.items():
        rows = rows[rows[column] == value]
    return rows


def lottery_table(records: Any, teacher_width: int) -> Any:
    """Per width: the census's P(success) and its outcome shares, the lottery predictions
    from p = P(success) at ``teacher_width`` (:func:`lottery_prediction`), the measured p_sub
    and the ticket check, all proportions with Wilson 95 % intervals (``_lo``, ``_hi``; the
    predictions' intervals are p's interval mapped through the prediction).

    Args:
      records: tidy records of an escape study (:func:`ntk_tickets.results.load_records`).
      teacher_width: r*, ``data.teacher_width`` of the study.

    Returns:
      A DataFrame, one row per width; NaN where a quantity was not measured (predictions
      when the study has no width r*; p_sub and tickets at widths ≤ r*). Ticket columns
      (means over the successful students): ``ticket_success``, ``distinct_neurons`` and
      ``perturb_eps<ε>``, the success of the ticket kept at θ0 with the rest at ε·ξ.
    """
    import pandas as pd

    census = _per_seed(records, "census", "success")
    counts = census.groupby("width")["value"].agg(["sum", "count"])
    table = pd.DataFrame({"seeds": counts["count"].astype(int)})
    table["P(success)"] = counts["sum"] / counts["count"]
    table["P_lo"], table["P_hi"] = wilson_interval(counts["sum"], counts["count"])
    for outcome in ("stuck", "saddle", "unconverged"):
        table[outcome] = _per_seed(records, "census", outcome).groupby("width")["value"].mean()
    base = (table.loc[teacher_width, ["P(success)", "P_lo", "P_hi"]].to_numpy()
            if teacher_width in table.index else np.full(3, np.nan))
    for kind in ("independent", "disjoint"):
        for suffix, p in zip(("", "_lo", "_hi"), base, strict=True):
            table[kind + suffix] = [lottery_prediction(p, n, teacher_width, kind)
                                    if n >= teacher_width else np.nan for n in table.index]
    wins = _per_seed(records, "subnetwork", "subnet_success").set_index(["width", "seed"])
    trials = _per_seed(records, "subnetwork", "subnet_trials").set_index(["width", "seed"])
    if len(wins):
        won = (wins["value"] * trials["value"]).groupby("width").sum().round()
        tried = trials["value"].groupby("width").sum()
        table["p_sub"] = won / tried
        table["p_sub_lo"], table["p_sub_hi"] = (pd.Series(v, tried.index) for v in
                                                wilson_interval(won, tried))
    for metric in ("ticket_success", "distinct_neurons"):
        rows = _per_seed(records, "ticket", metric)
        if len(rows):
            table[metric] = rows.groupby("width")["value"].mean()
    perturbed = _per_seed(records, "perturb", "success")
    for eps, rows in perturbed.groupby("eps"):
        table[f"perturb_eps{eps:g}"] = rows.groupby("width")["value"].mean()
    return table.rename_axis("width").reset_index()


def escape_table(records: Any, eig_tolerance: float = EscapeConfig().eig_tolerance) -> Any:
    """Per stuck width, embedding, added units k and share μ: how many stuck minima, the
    largest relative loss change and gradient norm at the embedded point, the share of
    embedded points that are saddles (λ_min < −``eig_tolerance``·λ_max, λ_max the stuck
    minimum's, as :func:`classify` decides), and the shares that escaped and that reached
    success on retraining, with the Wilson 95 % interval of the escaped share.

    Returns:
      A DataFrame (empty when the census found no stuck minimum).
    """
    import pandas as pd

    rows = records[(records["experiment"] == "escape") & (records["metric"].isin(
        ["embed_loss_change", "grad_norm", "hessian_min_eig", "escaped", "success"]))]
    if rows.empty:
        return pd.DataFrame()
    keys = ["width", "embedding", "added", "mu"]
    wide = rows.set_index([*keys, "seed", "metric"])["value"].unstack("metric").reset_index()
    eig_max = _per_seed(records, "census", "hessian_max_eig").set_index(["width", "seed"])
    wide["saddle"] = (wide["hessian_min_eig"].to_numpy() < -eig_tolerance * np.abs(
        eig_max["value"].reindex(pd.MultiIndex.from_frame(wide[["width", "seed"]]))
        .to_numpy()))
    groups = wide.groupby(keys, dropna=False)
    table = pd.DataFrame({
        "minima": groups["seed"].count(),
        "max_loss_change": groups["embed_loss_change"].max(),
        "max_grad": groups["grad_norm"].max(),
        "saddle": groups["saddle"].mean(),
        "escaped": groups["escaped"].mean(),
        "success": groups["success"].mean()})
    table["escaped_lo"], table["escaped_hi"] = wilson_interval(
        groups["escaped"].sum(), table["minima"])
    return table.reset_index()


def _with_intervals(table: Any, columns: dict[str, tuple[str, str, str]]) -> Any:
    """``table`` with each ``name: (value, lo, hi)`` shown as one text column
    ``"0.73 [0.62, 0.83]"`` in place of the three."""
    out = table.copy()
    for name, (value, lo, hi) in columns.items():
        if value in out:
            out[name] = [f"{v:.3g} [{a:.3g}, {b:.3g}]" if v == v else "–"
                         for v, a, b in zip(out[value], out[lo], out[hi], strict=True)]
            out = out.drop(columns=[c for c in (value, lo, hi) if c != name])
    return out


def escape_summary(records: Any, teacher_width: int,
                   eig_tolerance: float = EscapeConfig().eig_tolerance) -> str:
    """The text of :func:`lottery_table` and :func:`escape_table`, as ``run`` and
    ``summarize`` print them (proportions as ``value [95 % interval]``)."""
    fmt = {"float_format": lambda v: f"{v:.3g}", "index": False, "na_rep": "–"}
    lottery = _with_intervals(lottery_table(records, teacher_width), {
        "P(success)": ("P(success)", "P_lo", "P_hi"),
        "independent": ("independent", "independent_lo", "independent_hi"),
        "disjoint": ("disjoint", "disjoint_lo", "disjoint_hi"),
        "p_sub": ("p_sub", "p_sub_lo", "p_sub_hi")})
    text = ("census: P(success) per width beside the lottery predictions from p = "
            f"P(success) at r* = {teacher_width} (95 % Wilson intervals):\n"
            + lottery.to_string(**fmt))
    escape = escape_table(records, eig_tolerance)
    if escape.empty:
        return text + "\n\nno stuck minimum: the escape test had nothing to embed"
    escape = _with_intervals(escape, {"escaped": ("escaped", "escaped_lo", "escaped_hi")})
    return (text + "\n\nescape test of the stuck minima (embedded into width + added; "
            f"escaped: loss below {ESCAPE_FACTOR:g} × the stuck loss on retraining):\n"
            + escape.to_string(**fmt))
