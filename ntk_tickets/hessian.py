"""Hessian spectra of a training loss, and function-preserving embeddings of one-hidden-layer
MLPs into wider ones.

Spectra. ``loss_fn(params, *args) -> scalar`` of a PyTree of parameters, flattened with
``jax.flatten_util.ravel_pytree`` into a vector of ``P`` entries:

* :func:`hessian_matrix` / :func:`hessian_eigenvalues`: the exact ``(P, P)`` Hessian
  (``jax.hessian``) and its spectrum, for small ``P`` (memory grows as ``P²``, and as ``P``
  times the activations while ``jax.hessian`` runs ``P`` products at once).
* :func:`lanczos_eigenvalues`: Ritz values from Lanczos iterations on Hessian-vector
  products (:func:`hessian_vector_product`, forward-over-reverse, Pearlmutter 1994), for
  large ``P`` (memory grows as ``num_iters · P``).
* :func:`smallest_eigenvalue`: λ_min by either method; a negative value marks a saddle.

Data enter through ``args``, never through a closure, so that a jitted program compiled once
serves every dataset and parameter value of one shape (DESIGN.md §3).

Embeddings. The parameters of ``build_model(ModelConfig(arch="mlp", depth=1, ...), n, (d,),
k)`` are ``[(), (W1 (d, n), b1 (1, n)), (), (W2 (n, k), b2 (1, k))]`` (Flatten, Dense,
activation, Dense) and the network is, in the ntk parameterization (W, b ~ N(0, 1) trained),

    f(x) = (σ_w / √n) · φ((σ_w / √d) · x W1 + σ_b · b1) W2 + σ_b · b2.

:func:`split_neuron` (duplicate a hidden unit, split its outgoing weights) and
:func:`add_inactive_neuron` (a new unit with zero outgoing weights) return width-``(n + 1)``
parameters computing the same ``f``; critical points of the narrow net map to critical
points of the wide one (Fukumizu & Amari 2000; Şimşek et al. 2021, arXiv 2105.12221).

References: Pearlmutter 1994, "Fast exact multiplication by the Hessian"; Lanczos 1950;
Paige 1972; Golub & Van Loan, "Matrix Computations" (4th ed.), §10.1 (Lanczos) and §10.3
(practical Lanczos, complete reorthogonalization); Ghorbani, Krishnan & Xiao 2019, "An
Investigation into Neural Net Optimization via Hessian Eigenvalue Density" (arXiv
1901.10159).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.flatten_util import ravel_pytree

PyTree = Any
LossFn = Callable[..., jax.Array]

#: Above this many parameters :func:`hessian_matrix` refuses (4000² float64 = 128 MB).
MAX_EXACT_PARAMS = 4000


def hessian_vector_product(loss_fn: LossFn, params: PyTree, v: PyTree,
                           args: Sequence[Any] = ()) -> PyTree:
    """``H v``, ``H`` the Hessian of ``loss_fn(·, *args)`` at ``params``.

    Forward-over-reverse: one ``jax.jvp`` of ``jax.grad`` (Pearlmutter 1994), about the cost
    of two gradients, without forming ``H``.

    Args:
      loss_fn: ``(params, *args) -> scalar``.
      params: the point, a PyTree.
      v: the direction, a PyTree shaped like ``params``.
      args: further arguments of ``loss_fn`` (data).

    Returns:
      ``H v``, a PyTree shaped like ``params``.
    """
    return jax.jvp(lambda p: jax.grad(loss_fn)(p, *args), (params,), (v,))[1]


@functools.partial(jax.jit, static_argnames=("loss_fn", "max_params"))
def hessian_matrix(loss_fn: LossFn, params: PyTree, args: Sequence[Any] = (), *,
                   max_params: int = MAX_EXACT_PARAMS) -> jax.Array:
    """The exact Hessian of ``loss_fn(·, *args)`` at ``params``, in ``ravel_pytree`` order.

    ``jax.hessian`` (forward-over-reverse), jitted with ``loss_fn`` static: pass the same
    ``loss_fn`` object and the data through ``args`` to reuse one compiled program.

    Args:
      loss_fn: ``(params, *args) -> scalar``.
      params: the point, a PyTree of ``P`` scalars in all.
      args: further arguments of ``loss_fn`` (data).
      max_params: refuse above this ``P``.

    Returns:
      ``(P, P)``; entry ``(a, b)`` is ∂²L/∂θ_a∂θ_b with ``θ = ravel_pytree(params)[0]``.

    Raises:
      ValueError: if ``P > max_params``.
    """
    flat, unravel = ravel_pytree(params)
    if flat.size > max_params:
        raise ValueError(
            f"the exact Hessian of {flat.size} parameters is a {flat.size}² matrix, above "
            f"max_params={max_params}: use lanczos_eigenvalues (method='lanczos') instead")
    return jax.hessian(lambda theta: loss_fn(unravel(theta), *args))(flat)


def hessian_eigenvalues(loss_fn: LossFn, params: PyTree, args: Sequence[Any] = (), *,
                        max_params: int = MAX_EXACT_PARAMS) -> jax.Array:
    """All ``P`` eigenvalues of :func:`hessian_matrix`, ascending.

    ``jnp.linalg.eigvalsh`` symmetrizes its input first, so the roundoff asymmetry of the
    autodiff Hessian does not matter.

    Raises:
      ValueError: if ``P > max_params``.
    """
    return jnp.linalg.eigvalsh(hessian_matrix(loss_fn, params, args, max_params=max_params))


def _orthogonalize(w: jax.Array, basis: jax.Array) -> jax.Array:
    """``w`` minus its projection on the rows of ``basis`` (orthonormal or zero), applied
    twice: classical Gram–Schmidt twice is orthogonal to working precision ("twice is
    enough", Giraud et al. 2005)."""
    for _ in range(2):
        w = w - basis.T @ (basis @ w)
    return w


@functools.partial(jax.jit, static_argnames=("loss_fn", "num_iters"))
def lanczos_eigenvalues(loss_fn: LossFn, params: PyTree, key: jax.Array, num_iters: int,
                        args: Sequence[Any] = ()) -> jax.Array:
    """Ritz values of the Hessian of ``loss_fn(·, *args)`` at ``params``, by Lanczos.

    ``num_iters`` Hessian-vector products build an orthonormal basis ``V`` (``num_iters × P``)
    of the Krylov space of a random unit start vector, with full reorthogonalization of every
    new vector against all previous ones, and the Ritz values are the eigenvalues of the
    tridiagonal ``T = V H Vᵀ``.

    What this guarantees (Golub & Van Loan §10.1; Kaniel–Paige–Saad bounds):

    * every Ritz value lies in ``[λ_min, λ_max]`` (Cauchy interlacing), so the smallest Ritz
      value is an *upper* bound on λ_min: a negative one certifies a negative eigenvalue (a
      saddle), a non-negative one does not certify a minimum;
    * the extreme Ritz values converge first, fastest for eigenvalues well separated from
      the rest of the spectrum; interior Ritz values need not approximate anything;
    * one start vector sees one copy of each eigenvalue: multiplicities (e.g. from symmetric
      units) are invisible, and an eigenvector orthogonal to the start vector is never
      found (probability zero for a random start);
    * with ``num_iters = P`` the Ritz values are all eigenvalues, up to roundoff.

    If the Krylov space is exhausted early (a Hessian with fewer than ``num_iters`` distinct
    eigenvalues), its Ritz values are already every distinct eigenvalue the start vector
    touches, all of them for a random start. The iteration then goes on from the coordinate
    axis least represented in ``span(V)``, orthogonalized against ``V`` (what is left has
    norm² ≥ 1/P while ``V`` has fewer than ``P`` rows), with a zero off-diagonal entry in
    ``T``; that only adds further copies of eigenvalues, and the Ritz values stay those of
    ``V H Vᵀ``.

    Jitted with ``loss_fn`` and ``num_iters`` static: pass the same ``loss_fn`` object and
    the data through ``args`` to reuse one compiled program. Memory: ``num_iters · P``
    floats for ``V``; time: ``num_iters`` Hessian-vector products plus ``O(num_iters² P)``.

    Args:
      loss_fn: ``(params, *args) -> scalar``.
      params: the point, a PyTree of ``P`` scalars in all.
      key: PRNG key of the random start vector.
      num_iters: Lanczos steps ``m``, ``1 ≤ m ≤ P``.
      args: further arguments of ``loss_fn`` (data).

    Returns:
      ``(num_iters,)`` Ritz values, ascending, in the parameters' dtype.

    Raises:
      ValueError: if ``num_iters`` is not in ``[1, P]``.
    """
    flat, unravel = ravel_pytree(params)
    size, dtype = flat.size, flat.dtype
    if not 1 <= num_iters <= size:
        raise ValueError(f"num_iters = {num_iters} must lie in [1, {size}] (the parameter "
                         "count); at num_iters = P Lanczos already returns every eigenvalue")

    def matvec(v: jax.Array) -> jax.Array:
        return ravel_pytree(hessian_vector_product(loss_fn, params, unravel(v), args))[0]

    def restart(basis: jax.Array) -> jax.Array:
        """A unit vector orthogonal to the rows of ``basis``, from the coordinate axis they
        cover least."""
        axis = jnp.argmin(jnp.sum(basis ** 2, axis=0))
        q = _orthogonalize(jnp.zeros(size, dtype).at[axis].set(1), basis)
        return q / jnp.linalg.norm(q)

    def step(i, carry):
        basis, alphas, betas, v = carry
        basis = basis.at[i].set(v)
        hv = matvec(v)
        alpha = jnp.vdot(v, hv)
        w = _orthogonalize(hv, basis)
        beta = jnp.linalg.norm(w)
        # Breakdown: what is left of Hv lies in span(V) to working precision.
        exhausted = beta <= jnp.finfo(dtype).eps * jnp.linalg.norm(hv)
        v, beta = lax.cond(exhausted, lambda: (restart(basis), jnp.zeros_like(beta)),
                           lambda: (w / beta, beta))
        return basis, alphas.at[i].set(alpha), betas.at[i].set(beta), v

    start = jax.random.normal(key, (size,), dtype)
    init = (jnp.zeros((num_iters, size), dtype), jnp.zeros(num_iters, dtype),
            jnp.zeros(num_iters, dtype), start / jnp.linalg.norm(start))
    _, alphas, betas, _ = lax.fori_loop(0, num_iters, step, init)
    off = betas[:-1]
    return jnp.linalg.eigvalsh(jnp.diag(alphas) + jnp.diag(off, 1) + jnp.diag(off, -1))


def smallest_eigenvalue(loss_fn: LossFn, params: PyTree, args: Sequence[Any] = (), *,
                        method: str = "exact", key: jax.Array | None = None,
                        num_iters: int = 100,
                        max_params: int = MAX_EXACT_PARAMS) -> jax.Array:
    """λ_min of the Hessian of ``loss_fn(·, *args)`` at ``params``.

    Args:
      loss_fn: ``(params, *args) -> scalar``.
      params: the point, a PyTree.
      args: further arguments of ``loss_fn`` (data).
      method: ``"exact"`` (:func:`hessian_eigenvalues`, refused above ``max_params``) or
        ``"lanczos"`` (the smallest Ritz value of :func:`lanczos_eigenvalues`: an upper
        bound on λ_min that tightens with ``num_iters``).
      key: PRNG key of the Lanczos start vector; required for ``"lanczos"``.
      num_iters: Lanczos steps, capped at the parameter count (where Lanczos is exact).
      max_params: the parameter-count limit of ``"exact"``.

    Returns:
      A scalar.

    Raises:
      ValueError: for an unknown method, a missing key, or ``"exact"`` above ``max_params``.
    """
    if method == "exact":
        return hessian_eigenvalues(loss_fn, params, args, max_params=max_params)[0]
    if method == "lanczos":
        if key is None:
            raise ValueError("method='lanczos' needs a PRNG key for its start vector")
        size = sum(jnp.size(leaf) for leaf in jax.tree_util.tree_leaves(params))
        return lanczos_eigenvalues(loss_fn, params, key, min(num_iters, size), args)[0]
    raise ValueError(f"method = {method!r}: choose 'exact' or 'lanczos'")


# --- Function-preserving embeddings of a one-hidden-layer MLP ------------------------------

#: The readout's multiplier falls as width^(−e) with the width n: σ_w/√n in the ntk
#: parameterization; σ_w·√(n_base/n)/√n under µP (:func:`ntk_tickets.regimes.readout_w_std`).
_READOUT_EXPONENT = {"ntk": 0.5, "mup": 1.0}


def _readout_rescale(n: int, parameterization: str) -> float:
    """The factor ``((n + 1) / n)^e`` that keeps ``multiplier · W2`` fixed from width n to
    n + 1 (see :data:`_READOUT_EXPONENT`)."""
    if parameterization not in _READOUT_EXPONENT:
        raise ValueError(
            f"parameterization = {parameterization!r}: the embeddings know "
            f"{sorted(_READOUT_EXPONENT)} (standard-parameterized weights carry their "
            "initial scales, which the parameters alone do not reveal)")
    return ((n + 1) / n) ** _READOUT_EXPONENT[parameterization]


def _dense_layers(params: Sequence[PyTree]) -> tuple[int, int]:
    """The positions of the hidden and readout ``(W, b)`` pairs of a one-hidden-layer MLP."""
    held = [i for i, p in enumerate(params) if jax.tree_util.tree_leaves(p)]
    if len(held) == 2:
        (w1, b1), (w2, _) = params[held[0]], params[held[1]]
        if w1.ndim == w2.ndim == 2 and w1.shape[1] == w2.shape[0] == b1.shape[-1]:
            return held[0], held[1]
    raise ValueError(
        "expected the parameters of a one-hidden-layer MLP, [(), (W1 (d, n), b1 (1, n)), (), "
        "(W2 (n, k), b2)], as build_model(ModelConfig(arch='mlp', depth=1), ...) makes; got "
        f"shapes {jax.tree_util.tree_map(jnp.shape, params)}")


def _with_layers(params: Sequence[PyTree], hidden: int, readout: int, hidden_params: tuple,
                 readout_params: tuple) -> Sequence[PyTree]:
    out = list(params)
    out[hidden], out[readout] = hidden_params, readout_params
    return type(params)(out)


def split_neuron(params: Sequence[PyTree], j: int | jax.Array, mu: float | jax.Array, *,
                 parameterization: str = "ntk") -> Sequence[PyTree]:
    """Width ``n + 1`` parameters computing the same function, hidden unit ``j`` split in two.

    Unit ``j`` is duplicated (the copy, with the same incoming weights ``W1[:, j]`` and bias
    ``b1[..., j]``, is appended as unit ``n``) and its outgoing row ``a_j = W2[j]`` is shared
    as ``μ·a_j`` (unit ``j``) and ``(1 − μ)·a_j`` (unit ``n``); the two units have the same
    activation ``h_j(x)``, so ``μ·h_j·a_j + (1 − μ)·h_j·a_j = h_j·a_j``. The readout's
    multiplier falls from ``σ_w/√n`` to ``σ_w/√(n + 1)`` with the width, so every row of
    ``W2`` is multiplied by ``c = √((n + 1)/n)`` (``(n + 1)/n`` under µP):

        W1' = [W1, W1[:, j]],   b1' = [b1, b1[..., j]],   b2' = b2,
        W2' = c · [W2 with row j → μ·a_j;  (1 − μ)·a_j].

    Every ``μ ∈ ℝ`` preserves the function, so ``μ ↦ split_neuron(params, j, μ)`` is an
    affine line of equal loss. If ``params`` is a critical point of the loss, every point of
    the line is critical (the gradients of the two copies are ``μ`` and ``1 − μ`` times the
    gradient of unit ``j``, scaled), and the line's direction is a null vector of the
    Hessian. From a strict local minimum of a one-output net, the points with μ in (0, 1)
    and those with μ outside [0, 1] are saddles or not according to the sign of a
    ``(d + 1) × (d + 1)`` matrix of unit ``j``: definite, one of the two sets is saddles;
    indefinite, both are (Fukumizu & Amari 2000, "Local minima and plateaus in hierarchical
    structures of multilayer perceptrons"; Şimşek et al. 2021, "Geometry of the Loss
    Landscape in Overparameterized Neural Networks", arXiv 2105.12221).

    Evaluate the result with an ntk model of either width (stax reads the fan-in from its
    input); under µP the readout's σ_w depends on the width, so use the width-``n + 1`` model.

    Args:
      params: one-hidden-layer MLP parameters ``[(), (W1 (d, n), b1 (1, n) or (n,)), (),
        (W2 (n, k), b2)]``.
      j: the unit to split, in ``[0, n)``; may be traced, but a traced ``j`` is not
        checked (out of range, JAX's gathers clamp it and its scatters drop it).
      mu: the share of ``a_j`` kept by unit ``j``; any real (may be traced).
      parameterization: ``"ntk"`` or ``"mup"`` (``ModelConfig.parameterization``).

    Returns:
      Parameters of the same structure at width ``n + 1``.

    Raises:
      ValueError: if ``params`` is not a one-hidden-layer MLP, or for another
        parameterization.
      IndexError: if a concrete ``j`` lies outside ``[0, n)``.
    """
    def copy_of_j(w1, b1, w2):
        n = w1.shape[1]
        if isinstance(j, int | np.integer) and not 0 <= j < n:
            raise IndexError(f"unit j = {j} does not exist at width {n}")
        return w1[:, j, None], b1[..., j, None], (1 - mu) * w2[j, None], w2.at[j].multiply(mu)

    return _with_new_unit(params, parameterization, copy_of_j)


def add_inactive_neuron(params: Sequence[PyTree], key: jax.Array, *,
                        parameterization: str = "ntk") -> Sequence[PyTree]:
    """Width ``n + 1`` parameters computing the same function, with a new, silent unit.

    The new unit (appended as unit ``n``) has incoming weights and bias drawn from N(0, 1),
    as stax's ntk initialization draws them, and outgoing weights 0; as in
    :func:`split_neuron`, the rows of ``W2`` are multiplied by ``c = √((n + 1)/n)``
    (``(n + 1)/n`` under µP) for the readout's width-dependent multiplier:

        W1' = [W1, w],   b1' = [b1, β],   W2' = c · [W2; 0],   b2' = b2,   w, β ~ N(0, 1).

    At a critical point of the narrow net the gradient of the wide loss vanishes in every
    coordinate but the new unit's outgoing weights, where it is ``(σ_w/√(n + 1))·Σ_x h(x)
    ∂L/∂f(x)``, ``h`` the new unit's activation: it vanishes at zero loss (∂L/∂f = 0), and
    otherwise in general not (Şimşek et al. 2021).

    Args:
      params: one-hidden-layer MLP parameters ``[(), (W1 (d, n), b1 (1, n) or (n,)), (),
        (W2 (n, k), b2)]``.
      key: PRNG key of the new unit's incoming weights and bias.
      parameterization: ``"ntk"`` or ``"mup"`` (``ModelConfig.parameterization``).

    Returns:
      Parameters of the same structure at width ``n + 1``.

    Raises:
      ValueError: if ``params`` is not a one-hidden-layer MLP, or for another
        parameterization.
    """
    key_w, key_b = jax.random.split(key)

    def silent(w1, b1, w2):
        return (jax.random.normal(key_w, (w1.shape[0], 1), w1.dtype),
                jax.random.normal(key_b, (*b1.shape[:-1], 1), b1.dtype),
                jnp.zeros((1, w2.shape[1]), w2.dtype), w2)

    return _with_new_unit(params, parameterization, silent)


def _with_new_unit(params: Sequence[PyTree], parameterization: str,
                   new_unit: Callable[..., tuple[jax.Array, ...]]) -> Sequence[PyTree]:
    """Width ``n + 1`` parameters: ``new_unit(W1, b1, W2)`` gives the appended unit's
    incoming weights (d, 1), bias (..., 1) and outgoing weights (1, k), and the old units'
    outgoing weights (n, k); every outgoing row is then rescaled for the readout's
    width-dependent multiplier (:func:`_readout_rescale`)."""
    hidden, readout = _dense_layers(params)
    (w1, b1), (w2, b2) = jax.tree_util.tree_map(jnp.asarray, (params[hidden], params[readout]))
    c = _readout_rescale(w1.shape[1], parameterization)
    w_in, b_in, a_out, w2 = new_unit(w1, b1, w2)
    return _with_layers(params, hidden, readout,
                        (jnp.concatenate([w1, w_in], axis=1), jnp.concatenate([b1, b_in], axis=-1)),
                        (c * jnp.concatenate([w2, a_out], axis=0), b2))
