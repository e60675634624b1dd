"""Pruning-at-initialization criteria: one score per parameter, before any training.

Every criterion maps ``params`` (a stax PyTree: nested lists/tuples of arrays, with empty
tuples for parameter-free layers) to a PyTree of float scores with exactly the same structure,
shapes and dtype. **Convention: the weights with the smallest score are pruned first**, so
every criterion is oriented so that a small score means an unimportant weight. The caller
masks (globally or per layer) and, for SynFlow, iterates; the functions here are pure and
jit-compatible, taking ``params`` as an argument (never closing over it).

* :func:`magnitude_scores`: |θ| at initialization.
* :func:`snip_scores`: connection sensitivity |g ⊙ θ|, g = ∇_θ L (Lee et al. 2019, SNIP,
  arXiv 1810.02340).
* :func:`grasp_scores`: gradient-signal preservation θ ⊙ Hg (Wang et al. 2020, GraSP,
  arXiv 2002.07376).
* :func:`synflow_scores`: one iteration of data-free synaptic flow (Tanaka et al. 2020,
  SynFlow, arXiv 2006.05467).
* :func:`ntk_saliency_scores`: saliency of the empirical-NTK trace, a tangent-space
  criterion in the spirit of NTK-SAP (Wang et al. 2023, arXiv 2304.02840); the trace itself
  is estimated by :func:`ntk_trace_estimate`.
* :func:`at_init_scores`: dispatch through the registry entries of
  :data:`ntk_tickets.ticket_methods.TICKET_METHODS`.

Shapes: ``apply_fn(params, x) -> (n, k)`` for inputs ``x`` of shape ``(n, *input_shape)``;
``loss_fn(f, y) -> scalar``, e.g. ``ntk_tickets.training.LOSSES["mse"]``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from ntk_tickets.ticket_methods import TICKET_METHODS, ScoreInputs, at_init_methods

PyTree = Any
ApplyFn = Callable[[PyTree, jax.Array], jax.Array]
LossFn = Callable[[jax.Array, jax.Array], jax.Array]

#: The ticket methods that score weights at initialization (entries of
#: :data:`ntk_tickets.ticket_methods.TICKET_METHODS`).
AT_INIT_CRITERIA = at_init_methods()


def _loss_of_params(apply_fn: ApplyFn, x: jax.Array, y: jax.Array,
                    loss_fn: LossFn) -> Callable[[PyTree], jax.Array]:
    """θ ↦ loss_fn(apply_fn(θ, x), y)."""
    return lambda params: loss_fn(apply_fn(params, x), y)


def magnitude_scores(params: PyTree) -> PyTree:
    """Weight magnitude |θ|.

    Args:
      params: the parameters θ.

    Returns:
      |θ|, a PyTree shaped like ``params``.
    """
    return jax.tree_util.tree_map(jnp.abs, params)


def snip_scores(apply_fn: ApplyFn, params: PyTree, x: jax.Array, y: jax.Array,
                loss_fn: LossFn) -> PyTree:
    """SNIP connection sensitivity |g ⊙ θ|, g = ∇_θ loss_fn(apply_fn(θ, x), y).

    The first-order change of the loss when a weight is removed (Lee et al. 2019, "SNIP:
    Single-shot Network Pruning based on Connection Sensitivity", arXiv 1810.02340, eq. 6,
    up to the normalization, which does not change the ranking).

    Args:
      apply_fn: ``(params, x) -> (n, k)`` outputs.
      params: the parameters θ.
      x: inputs, shape ``(n, *input_shape)``.
      y: targets accepted by ``loss_fn``, e.g. ``(n, k)`` for MSE or int ``(n,)`` labels.
      loss_fn: ``(f, y) -> scalar``.

    Returns:
      |g ⊙ θ|, a PyTree shaped like ``params``.
    """
    g = jax.grad(_loss_of_params(apply_fn, x, y, loss_fn))(params)
    return jax.tree_util.tree_map(lambda g_, theta: jnp.abs(g_ * theta), g, params)


def grasp_scores(apply_fn: ApplyFn, params: PyTree, x: jax.Array, y: jax.Array,
                 loss_fn: LossFn) -> PyTree:
    """GraSP scores θ ⊙ Hg, H the Hessian and g the gradient of the loss at θ.

    GraSP (Wang et al. 2020, "Picking Winning Tickets Before Training by Preserving Gradient
    Flow", arXiv 2002.07376, eq. 8) removes the weights with the *largest* −θ ⊙ Hg, those
    whose removal reduces the gradient norm ‖g‖² the least; returning θ ⊙ Hg puts them first
    under the smallest-pruned-first convention. The scores are signed. g is a constant
    vector (not differentiated through), and Hg is one Hessian-vector product, a ``jvp`` of
    the gradient, never the full Hessian. The paper's softmax temperature, if wanted, belongs
    in ``loss_fn``.

    Args:
      apply_fn: ``(params, x) -> (n, k)`` outputs.
      params: the parameters θ.
      x: inputs, shape ``(n, *input_shape)``.
      y: targets accepted by ``loss_fn``.
      loss_fn: ``(f, y) -> scalar``.

    Returns:
      θ ⊙ Hg, a PyTree shaped like ``params``.
    """
    g, hvp = jax.linearize(jax.grad(_loss_of_params(apply_fn, x, y, loss_fn)), params)
    return jax.tree_util.tree_map(jnp.multiply, params, hvp(g))


def synflow_scores(apply_fn: ApplyFn, params: PyTree, input_shape: Sequence[int]) -> PyTree:
    """One SynFlow iteration: |∂R/∂θ' ⊙ θ'| at θ' = |θ|, R(θ') = 1ᵀ apply_fn(θ', 1).

    R is the synaptic-flow objective of Tanaka et al. 2020 ("Pruning neural networks without
    any data by iteratively conserving synaptic flow", arXiv 2006.05467, Algorithm 1): the
    summed output of the network with all weights replaced by their magnitudes on one
    all-ones input. It needs no data. For a bias-free ReLU network the scores of every layer
    sum to R (the conservation law, Theorem 1). The caller masks θ before calling (passes
    θ ⊙ m) and runs the iterative schedule; this is a single iteration.

    R is a product of the layers' magnitudes and grows geometrically with depth; it is
    computed in the dtype of ``params`` and can overflow float32 for very deep or wide
    networks (the reference implementation uses float64), so use float64 there.

    Args:
      apply_fn: ``(params, x) -> (n, k)`` outputs.
      params: the (masked) parameters θ.
      input_shape: one input's shape, without the batch axis; static under ``jit``.

    Returns:
      Non-negative scores, a PyTree shaped like ``params``.
    """
    abs_params = jax.tree_util.tree_map(jnp.abs, params)
    dtype = jnp.result_type(*jax.tree_util.tree_leaves(params))
    ones = jnp.ones((1, *input_shape), dtype)
    dr = jax.grad(lambda p: jnp.sum(apply_fn(p, ones)))(abs_params)
    return jax.tree_util.tree_map(lambda d, theta: jnp.abs(d * theta), dr, abs_params)


#: Probe directions drawn and differentiated at once by the NTK-trace estimators: memory
#: grows with this, not with the number of samples S.
PROBE_CHUNK = 8


def _probe_mean(value_fn: Callable[[jax.Array], PyTree], key: jax.Array, n_params: int,
                n_samples: int, dtype: Any) -> PyTree:
    """(1/S) Σ_s value_fn(u_s) over S Gaussian directions u_s ~ N(0, I_P), u_s drawn from
    ``fold_in(key, s)``, :data:`PROBE_CHUNK` of them vmapped at a time: memory
    ∝ PROBE_CHUNK·P whatever S."""
    chunk = min(PROBE_CHUNK, n_samples)
    n_chunks = -(-n_samples // chunk)

    def chunk_sum(c, total):
        ids = c * chunk + jnp.arange(chunk)
        u = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), (n_params,),
                                                 dtype))(ids)
        values = jax.vmap(value_fn)(u)
        weight = (ids < n_samples).astype(dtype)  # the last chunk may run past S
        return jax.tree_util.tree_map(
            lambda t, v: t + jnp.tensordot(weight, v, axes=1), total, values)

    zero = jax.tree_util.tree_map(jnp.zeros_like,
                                  jax.eval_shape(value_fn, jnp.zeros(n_params, dtype)))
    total = jax.lax.fori_loop(0, n_chunks, chunk_sum, zero)
    return jax.tree_util.tree_map(lambda t: t / n_samples, total)


def _sq_norm_jvp(apply_fn: ApplyFn, params: PyTree, x_probe: jax.Array,
                 u_flat: jax.Array) -> jax.Array:
    """‖J u‖² for one flat direction u: one ``jvp``."""
    _, unravel = ravel_pytree(params)
    _, ju = jax.jvp(lambda p: apply_fn(p, x_probe), (params,), (unravel(u_flat),))
    return jnp.sum(ju**2)


def ntk_trace_estimate(apply_fn: ApplyFn, params: PyTree, x_probe: jax.Array,
                       key: jax.Array, n_samples: int = 16) -> jax.Array:
    """Hutchinson estimate of the empirical-NTK trace T(θ) = Tr(J Jᵀ) = ‖J‖_F².

    J = ∂ vec(apply_fn(θ, x_probe)) / ∂θ, of shape ``(m·k, P)``. With u_s ~ N(0, I_P),
    E‖J u_s‖² = Tr(J E[u uᵀ] Jᵀ) = Tr(J Jᵀ), so T̂ = (1/S) Σ_s ‖J u_s‖² is unbiased; each
    J u_s is one ``jvp``, :data:`PROBE_CHUNK` of them vmapped at a time (memory independent
    of S). T is k times the trace of the project's output-averaged traced NTK
    (``ntk_tickets.kernels``).

    Args:
      apply_fn: ``(params, x) -> (m, k)`` outputs.
      params: the parameters θ.
      x_probe: probe inputs, shape ``(m, *input_shape)``.
      key: PRNG key for the u_s.
      n_samples: S; static under ``jit``.

    Returns:
      The scalar T̂, differentiable in ``params`` (the u_s are constants).
    """
    flat, _ = ravel_pytree(params)
    return _probe_mean(lambda u: _sq_norm_jvp(apply_fn, params, x_probe, u), key, flat.size,
                       n_samples, flat.dtype)


def ntk_saliency_scores(apply_fn: ApplyFn, params: PyTree, x_probe: jax.Array,
                        key: jax.Array, n_samples: int = 16) -> PyTree:
    """Saliency |θ ⊙ ∂T/∂θ| of the empirical-NTK trace T(θ) = ‖J(θ, x_probe)‖_F².

    A tangent-space criterion in the spirit of NTK-SAP (Wang et al. 2023, "NTK-SAP: Improving
    Neural Network Pruning by Aligning Training Dynamics", arXiv 2304.02840): a weight
    matters as much as the first-order change of the NTK's trace (the sum of its
    eigenvalues, which sets the speed of training in the tangent space) when it is removed.
    T is replaced by the Gaussian estimate of :func:`ntk_trace_estimate` and that estimate is
    differentiated with the u_s held fixed. Since T̂ is unbiased and linear in the u_s u_sᵀ,
    θ ⊙ ∂T̂/∂θ is an unbiased estimate of the exact signed saliency θ ⊙ ∂T/∂θ; its standard
    error falls as 1/√S, and so does the (non-negative) bias that the absolute value adds.
    The gradients of the S terms are summed :data:`PROBE_CHUNK` at a time, so memory does
    not grow with S (an (S, P) array of directions was about 1 GB at width 4096).

    Args:
      apply_fn: ``(params, x) -> (m, k)`` outputs.
      params: the parameters θ.
      x_probe: probe inputs, shape ``(m, *input_shape)``.
      key: PRNG key for the Gaussian probe vectors; a fixed key gives fixed scores.
      n_samples: S, the number of probe vectors (one ``jvp`` each); static under ``jit``.

    Returns:
      Non-negative scores, a PyTree shaped like ``params``.
    """
    flat, _ = ravel_pytree(params)
    dt = _probe_mean(lambda u: jax.grad(_sq_norm_jvp, argnums=1)(apply_fn, params, x_probe, u),
                     key, flat.size, n_samples, flat.dtype)
    return jax.tree_util.tree_map(lambda d, theta: jnp.abs(d * theta), dt, params)


def at_init_scores(method: str, apply_fn: ApplyFn, params: PyTree, x: jax.Array,
                   y: jax.Array, loss_fn: LossFn, key: jax.Array, x_probe: jax.Array,
                   input_shape: Sequence[int], n_samples: int = 16) -> PyTree:
    """The scores of one at-initialization criterion, by name (smallest pruned first).

    Args:
      method: one of :data:`AT_INIT_CRITERIA`: ``magnitude_init``, ``snip``, ``grasp``,
        ``synflow`` (a single iteration at ``params``) or ``ntk_saliency``.
      apply_fn: ``(params, x) -> (n, k)`` outputs.
      params: the parameters θ.
      x: inputs for the loss-based criteria (SNIP, GraSP), shape ``(n, *input_shape)``.
      y: their targets, accepted by ``loss_fn``.
      loss_fn: ``(f, y) -> scalar``.
      key: PRNG key (``ntk_saliency``).
      x_probe: probe inputs (``ntk_saliency``), shape ``(m, *input_shape)``.
      input_shape: one input's shape, without the batch axis (``synflow``).
      n_samples: Gaussian probe vectors (``ntk_saliency``).

    Returns:
      A PyTree of scores shaped like ``params``.

    Raises:
      ValueError: if ``method`` is not one of :data:`AT_INIT_CRITERIA`.
    """
    if method not in AT_INIT_CRITERIA:
        raise ValueError(
            f"unknown at-initialization criterion {method!r}; choose one of "
            f"{', '.join(map(repr, AT_INIT_CRITERIA))}"
        )
    inputs = ScoreInputs(apply_fn, params, x, y, loss_fn, key, x_probe, input_shape, n_samples)
    return TICKET_METHODS[method].score(sys.modules[__name__], inputs)
