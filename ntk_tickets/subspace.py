"""Subspace training: θ = θ_k + P·z with a fixed P (D × d), only z ∈ R^d trained.

How many directions does training need, and does it matter which? Li, Farkhoor, Liu &
Yosinski 2018 ("Measuring the Intrinsic Dimension of Objective Landscapes", arXiv
1804.08838) train in random subspaces and report the smallest d reaching 90 % of the dense
network's accuracy, d_int90 (≈ 750 for MNIST MLPs, nearly constant in width); Larsen,
Fort, Becker & Ganguli 2022 ("How many degrees of freedom do we need to train deep
networks", arXiv 2107.05802) compare random subspaces with the top principal directions of
a training trajectory ("lottery subspaces"). Kinds (``subspace.kinds``):

* ``gaussian``: P is a stack of Fastfood transforms (Le, Sarlós & Smola 2013, as in Li et
  al.): per block of n = 2^⌈log2 d_max⌉ coordinates, V = H·G·Π·H·B with H the orthonormal
  Walsh–Hadamard transform, B random signs, Π a random permutation and G Gaussian; the
  ⌈D/n⌉ blocks are stacked, cut to D and scaled by 1/√(blocks), so every column has unit
  norm in expectation. Applying P costs O(D log d) and 3·D numbers of storage: the D × d
  matrix is never formed;
* ``axis_random``: P = d columns of the identity, drawn among the prunable entries (the
  weights; biases too with ``tickets.prune_biases``); the other entries stay at θ_k;
* ``axis_imp``: the d coordinates an IMP ticket keeps: entries ranked by the number of
  ``[tickets]`` rounds whose mask keeps them, ties by the dense run's |θ_T|, so d equal to
  a round's kept count is exactly that round's mask;
* ``lottery``: the top-d left singular vectors of the dense run's trajectory from θ_k,
  ``subspace.snapshots`` evenly spaced snapshots θ_t − θ_k (uncentred).

The axis kinds are masked training from θ_k (the cell's own programs, the mask an
argument). The others train the pair (z, anchor) through one :class:`TrainingProgram` per
kind and path whose anchor (θ_k and P's numbers, per seed) is frozen by the update mask
and cut from the gradient, so every d shares one compile: z has the largest dimension and
its entries beyond d are frozen at 0. The ``linear`` path is the linearization in z
around z = 0, i.e. f(θ_k) + J(θ_k)·P·z; under MSE it fits the n·k training targets exactly
only when d ≥ n·k.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from ntk_tickets import masks, regimes
from ntk_tickets.config import StudyConfig
from ntk_tickets.data import Dataset
from ntk_tickets.errors import UserInputError
from ntk_tickets.linear import linearize
from ntk_tickets.training import TrainingProgram, Trajectory

PyTree = Any
#: PRNG roles folded into each seed's mask key (the ticket and stability modules use 0-16).
_AXIS, _FASTFOOD = 17, 18
#: Records kept for subspace runs: z's trajectory has no per-layer weight change or kernel.
SUBSPACE_METRICS = ("loss", "accuracy", "function_gap")


def hadamard(x: jax.Array) -> jax.Array:
    """The orthonormal Walsh–Hadamard transform (Sylvester order) over the last axis,
    whose length must be a power of two; O(n log n)."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"the Hadamard transform needs a power-of-two length, got {n}")
    lead, h = x.shape[:-1], 1
    while h < n:
        pairs = x.reshape(*lead, n // (2 * h), 2, h)
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        x = jnp.stack([a + b, a - b], axis=-2).reshape(*lead, n)
        h *= 2
    return x / math.sqrt(n)


def fastfood_basis(key: jax.Array, n_params: int, dim: int) -> dict[str, jax.Array]:
    """The numbers of a Fastfood projection R^n → R^D, n = 2^⌈log2 dim⌉ (module docstring).

    Returns:
      ``signs``, ``perm`` (the permutation as floats, so that the basis can ride along
      with trained parameters) and ``gauss``, each (blocks, n).
    """
    n = 1 << max(dim - 1, 0).bit_length()
    blocks = -(-n_params // n)
    k_sign, k_perm, k_gauss = jax.random.split(key, 3)
    signs = jax.random.rademacher(k_sign, (blocks, n)).astype(float)
    perm = jax.vmap(lambda k: jax.random.permutation(k, n))(jax.random.split(k_perm, blocks))
    return {"signs": signs, "perm": perm.astype(float),
            "gauss": jax.random.normal(k_gauss, (blocks, n))}


def fastfood_project(basis: Mapping[str, jax.Array], z: jax.Array) -> jax.Array:
    """P·z for a :func:`fastfood_basis`: ``z`` (n,) → (blocks·n,), cut to D by the caller."""
    x = hadamard(basis["signs"] * z)
    x = jnp.take_along_axis(x, basis["perm"].astype(jnp.int32), axis=-1)
    x = hadamard(basis["gauss"] * x)
    return x.reshape(-1) / math.sqrt(x.shape[0])


def matrix_project(basis: jax.Array, z: jax.Array) -> jax.Array:
    """P·z for an explicit basis (D, d) (the lottery subspace)."""
    return basis @ z


def lottery_basis(snapshots: np.ndarray, dim: int) -> np.ndarray:
    """The top-``dim`` left singular vectors (D, dim) of a trajectory's displacements.

    Args:
      snapshots: (S + 1, D) the flattened parameters at S + 1 steps, the first the start.
      dim: how many directions (at most S).
    """
    displacements = np.asarray(snapshots[1:] - snapshots[:1], dtype=float)
    _, _, vt = np.linalg.svd(displacements, full_matrices=False)
    return vt[:dim].T


def subspace_apply(apply_fn: Callable, unravel: Callable,
                   project: Callable[[Any, jax.Array], jax.Array]) -> Callable:
    """``(params, x) -> f(θ_k + P·z, x)`` for ``params = (z, (θ_k flat, basis))``.

    The anchor is cut from the gradient (it is frozen anyway), so only z's gradient is
    computed.
    """
    def apply(params, x):
        z, anchor = params
        theta, basis = jax.lax.stop_gradient(anchor)
        step = project(basis, z)[: theta.shape[0]]
        return apply_fn(unravel(theta + step), x)

    return apply


def axis_scores(kind: str, theta_k: PyTree, key: jax.Array,
                imp: Mapping[str, Any] | None) -> PyTree:
    """Scores whose top d entries are the axis subspace of dimension d (one seed).

    ``axis_random``: uniform random scores. ``axis_imp``: the number of ``imp["masks"]``
    (rounds) that keep an entry, plus its dense |θ_T| (``imp["final"]``) scaled below 1.
    """
    leaves, treedef = jax.tree_util.tree_flatten(theta_k)
    if kind == "axis_random":
        keys = jax.random.split(key, len(leaves))
        return treedef.unflatten([np.asarray(jax.random.uniform(k, leaf.shape))
                                  for k, leaf in zip(keys, leaves, strict=True)])
    final = [np.abs(np.asarray(a)) for a in jax.tree_util.tree_leaves(imp["final"])]
    top = max(float(a.max()) for a in final) or 1.0
    kept = [sum(np.asarray(a, dtype=float) for a in parts) for parts in
            zip(*(jax.tree_util.tree_leaves(m) for m in imp["masks"]), strict=True)]
    return treedef.unflatten([k + 0.5 * f / top for k, f in zip(kept, final, strict=True)])


def top_entries(scores: PyTree, prunable: PyTree, dim: int) -> PyTree:
    """A mask with True on the ``dim`` prunable entries of largest score (lower flat
    index first among ties)."""
    flat_scores, unravel = ravel_pytree(jax.tree_util.tree_map(
        lambda s, p: np.where(p, np.asarray(s, dtype=float), -np.inf), scores, prunable))
    order = np.argsort(-np.asarray(flat_scores), kind="stable")[:dim]
    chosen = np.zeros(flat_scores.shape[0], dtype=bool)
    chosen[order] = True
    return jax.tree_util.tree_map(lambda a: np.asarray(a) > 0.5,
                                  unravel(jnp.asarray(chosen, dtype=float)))


@dataclasses.dataclass
class _Anchored:
    """The programs and start of a kind trained as (z, anchor), per path."""

    programs: dict[str, TrainingProgram]
    anchor: tuple[jax.Array, Any]
    z_dim: int


def _anchored(kind: str, cfg: StudyConfig, cell: Any, theta_k: PyTree,
              d_max: int) -> _Anchored:
    """The gaussian or lottery subspace of every seed and its training programs."""
    setup = cell.setup
    flat = jax.vmap(lambda t: ravel_pytree(t)[0])(theta_k)  # (s, D)
    _, unravel = ravel_pytree(jax.tree_util.tree_map(lambda a: a[0], theta_k))
    n_params = flat.shape[1]
    if kind == "gaussian":
        keys = jax.vmap(lambda k: jax.random.fold_in(k, _FASTFOOD))(setup.mask_keys)
        basis = jax.vmap(lambda k: fastfood_basis(k, n_params, d_max))(keys)
        basis = jax.tree_util.tree_map(lambda a: a.astype(flat.dtype), basis)
        project, z_dim = fastfood_project, basis["signs"].shape[-1]
    else:
        snapshots = _snapshots(cfg, cell, theta_k)
        basis = jnp.asarray(np.stack([lottery_basis(s, d_max) for s in snapshots]),
                            dtype=flat.dtype)
        project, z_dim = matrix_project, d_max
    apply = subspace_apply(setup.model.apply_fn, unravel, project)
    fns = {"exact": lambda p, p0, x: apply(p, x), "linear": linearize(apply)}
    factor = (regimes.output_scale_lr_factor(cfg.model.output_scale, cfg.train.optimizer)
              * lr_ratio(cfg))
    lr = None if factor == 1.0 else (factor, jax.tree_util.tree_map(lambda _: factor,
                                                                    (flat, basis)))
    programs = {path: TrainingProgram(
        regimes.scaled_function(fns[path], cfg.model.output_scale, cfg.model.center),
        cfg.train, setup.steps, lr_factors=lr) for path in cell.programs}
    cell.extra_programs += programs.values()
    return _Anchored(programs, (flat, basis), z_dim)


def _snapshots(cfg: StudyConfig, cell: Any, theta_k: PyTree) -> np.ndarray:
    """(s, S + 1, D) the flattened parameters of the dense run from θ_k (step k to the
    end) at S + 1 evenly spaced steps (its own program, compiled once, with the cell's
    exact function)."""
    setup, path = cell.setup, ("exact" if "exact" in cell.programs else "linear")
    dense = cell.programs[path]
    k = cfg.subspace.start_step
    steps = np.unique(np.linspace(k, cfg.train.steps, cfg.subspace.snapshots + 1).round()
                      ).astype(np.int64)
    program = TrainingProgram(dense.fn, cfg.train, steps, lr_factors=dense.lr_factors,
                              snapshot_fn=lambda p: ravel_pytree(p)[0])
    cell.extra_programs.append(program)
    traj = program(theta_k, setup.data, setup.batches, masks.ones_like(setup.params0), k,
                   start_step=k)
    return np.asarray(traj.snapshots)


def lr_ratio(cfg: StudyConfig) -> float:
    """``subspace.learning_rate`` over ``train.learning_rate`` (1 when it is unset): the
    factor on z's updates (for every optimizer, the update is proportional to the rate)."""
    rate = cfg.subspace.learning_rate
    return rate / cfg.train.learning_rate if rate and cfg.train.learning_rate else 1.0


def _check_dims(cfg: StudyConfig, n_prunable: int, n_params: int) -> None:
    """Refuses dimensions beyond what a kind can span, naming the limit."""
    s = cfg.subspace
    for kind in s.kinds:
        limit = n_prunable if kind.startswith("axis") else n_params
        if max(s.dims) > limit:
            what = "prunable entries" if kind.startswith("axis") else "parameters"
            raise UserInputError(f"subspace.dims reaches {max(s.dims)}, but the {kind} "
                                 f"subspace of this network has at most {limit} ({what}): "
                                 "lower the dims or widen the network")


def train_subspaces(cfg: StudyConfig, cell: Any,
                    imp: Mapping[str, Any] | None = None) -> list[tuple[str, int, str,
                                                                        Trajectory]]:
    """Every (kind, d, path) run of ``[subspace]``, trained from θ_k (k =
    ``subspace.start_step``).

    Args:
      cfg: the study config.
      cell: the :class:`~ntk_tickets.experiments.DenseCell`.
      imp: for ``axis_imp``: ``{"masks": [round masks, stacked over seeds],
        "final": the dense run's θ_T}``.

    Returns:
      ``(kind, d, path, trajectory)`` per run, exact before linear.
    """
    s, setup = cfg.subspace, cell.setup
    anchor_path = "exact" if "exact" in cell.programs else "linear"
    theta_k = cell.rewind_point(anchor_path, s.start_step)
    one = jax.tree_util.tree_map(lambda a: a[0], theta_k)
    prune_biases = cfg.tickets.prune_biases if cfg.tickets is not None else False
    prunable = masks.prunable_leaves(one, prune_biases)
    _check_dims(cfg, sum(a.size for a, p in zip(jax.tree_util.tree_leaves(one),
                                                jax.tree_util.tree_leaves(prunable),
                                                strict=True) if p),
                ravel_pytree(one)[0].shape[0])
    paths = sorted(cell.programs, key=("exact", "linear").index)
    n_seeds, d_max = len(setup.seeds), max(s.dims)
    runs = []
    for kind in s.kinds:
        if kind.startswith("axis"):
            keys = jax.vmap(lambda k: jax.random.fold_in(k, _AXIS))(setup.mask_keys)
            scores = [axis_scores(kind, jax.tree_util.tree_map(lambda a, i=i: a[i], theta_k),
                                  keys[i], imp and _seed(imp, i)) for i in range(n_seeds)]
            for d in s.dims:
                mask = jax.tree_util.tree_map(lambda *a: np.stack(a) * lr_ratio(cfg), *[
                    top_entries(sc, prunable, d) for sc in scores])
                runs += [(kind, d, path, cell.programs[path](
                    theta_k, setup.data, setup.batches, mask, s.start_step,
                    start_step=s.start_step)) for path in paths]
            continue
        anchored = _anchored(kind, cfg, cell, theta_k, d_max)
        dtype = anchored.anchor[0].dtype
        start = (jnp.zeros((n_seeds, anchored.z_dim), dtype), anchored.anchor)
        for d in s.dims:
            active = jnp.broadcast_to(jnp.arange(anchored.z_dim) < d,
                                      (n_seeds, anchored.z_dim))
            frozen = jax.tree_util.tree_map(jnp.zeros_like, anchored.anchor)
            runs += [(kind, d, path, anchored.programs[path](
                start, setup.data, setup.batches, (active, frozen), 0,
                start_step=s.start_step)) for path in paths]
    return runs


def _seed(imp: Mapping[str, Any], i: int) -> dict[str, Any]:
    def pick(tree):
        return jax.tree_util.tree_map(lambda a: np.asarray(a[i]), tree)
    return {"masks": [pick(m) for m in imp["masks"]], "final": pick(imp["final"])}


def run_subspace(cfg: StudyConfig, cell: Any, data: Dataset,
                 imp: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """The records of :func:`train_subspaces`: :data:`SUBSPACE_METRICS` of every run, with
    columns ``subspace`` (the kind), ``dim`` (d), ``rewind_step`` (k) and experiment
    ``subspace``; the linear run's ``function_gap`` is to the exact run of the same kind
    and d."""
    from ntk_tickets.experiments import trajectory_rows

    metrics = tuple(m for m in SUBSPACE_METRICS if m in cfg.metrics) or ("loss",)
    sub_cfg = dataclasses.replace(cfg, metrics=metrics)
    rows, f_test_exact = [], {}
    for kind, d, path, traj in train_subspaces(cfg, cell, imp):
        runs = trajectory_rows(path, cell.setup, traj, data, sub_cfg,
                               f_test_exact.get((kind, d)))
        for row in runs:
            row.update(subspace=kind, dim=d, rewind_step=cfg.subspace.start_step,
                       experiment="subspace")
        rows += runs
        if path == "exact":
            f_test_exact[kind, d] = np.asarray(traj.f_test)
    return rows
