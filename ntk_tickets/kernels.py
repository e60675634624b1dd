"""Empirical and infinite-width kernels, and the closed-form predictors built on them.

* :func:`empirical_ntk`: the finite-width NTK Θ̂(x1, x2) = J(θ, x1) J(θ, x2)ᵀ (Jacot et al.
  2018, arXiv 1806.07572), estimated in memory first and computed in blocks when it would not
  fit (:func:`ntk_memory_bytes`).
* :func:`ntk_init_error` and :func:`ntk_change`: the two kernel metrics of the project
  (``ntk_init_error``, ``ntk_change``; DESIGN.md §4), relative Frobenius distances on a probe
  set.
* :func:`empirical_ntk_predictions`: the closed-form trajectory of the *linearized* network
  under full-batch gradient flow, through the full empirical NTK at θ0 (Lee et al. 2019,
  arXiv 1902.06720, eq. 9–11).
* :func:`infinite_width_predictions`: the infinite ensemble of infinite-width networks, mean
  and variance, trained with the analytic NTK or the NNGP (Lee et al. 2019, eq. 12–16).

Conventions (the same everywhere in ntk_tickets):

* **Loss and time.** The MSE loss is L = ½·mean((f − y)²), the mean over *all* n·k entries of
  ``y`` (n points, k outputs). neural-tangents' ``gradient_descent_mse(K, y,
  learning_rate=η)`` at time t is exactly the gradient flow of that loss,
  f(t) = y + exp(−η t Θ / (n·k)) (f(0) − y), so t steps of discrete gradient descent with step
  size η correspond to t = steps (pinned in ``tests/test_nt_canary.py``). Here ``steps`` are
  passed as t and ``learning_rate`` as η. Discrete GD differs from the flow by O(η·λ_max/(n·k))
  relative to f(0) − y, λ_max the largest eigenvalue of the kernel.
* **Traced kernels average.** A traced NTK (``trace=True``) has shape ``(n1, n2)`` and is the
  *average* over the k outputs, (1/k) Σ_c J_c J_cᵀ, as neural-tangents computes it; it is what
  the analytic ``kernel_fn(x1, x2, "ntk")`` approximates. A full NTK (``trace=False``) has shape
  ``(n1, n2, k, k)`` and keeps the couplings between outputs.
* **Ridge and infinite time.** ``diag_reg`` = λ adds λ·mean(diag K)·I to the train-train
  kernel K (neural-tangents' ``diag_reg`` with ``diag_reg_absolute_scale=False``); at t → ∞
  (``steps=None``, neural-tangents' ``t=None``, a linear solve) the test outputs are kernel
  ridge regression, K_*·(K + λ·mean(diag K)·I)⁻¹·y. Training outputs are those of the
  trained model, i.e. the test formula at the training inputs, so with λ > 0 they do not
  interpolate.
* **Output scale and centring.** The trained function of a model with output scale α is
  g(θ, x) = α·f(θ, x), or α·(f(θ, x) − f(θ0, x)) when centred, trained at learning rate
  η/α². Its kernel is α²Θ, so the function-space dynamics at η/α² are those of Θ at η: the
  kernel and η stay, and only the initial outputs change, g(θ0, ·) = α·f(θ0, ·), or 0 when
  centred (Chizat, Oyallon & Bach 2019, arXiv 1812.07956). Over initializations the
  infinite-width mean is unchanged (f(θ0) has mean 0) and the covariance, which comes from
  f(θ0) alone, is multiplied by α², or vanishes when centred.
* **Only MSE has a closed form.** Cross-entropy training has none, by design; the linear path
  (``ntk_tickets.linear``, trained with the optimizer) covers it.
* **Parameters are jit arguments**, never closed over (DESIGN.md §3): the jitted empirical-NTK
  function is built once per ``(apply_fn, trace, implementation)`` and takes ``params``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, MutableMapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from ntk_tickets import regimes
from ntk_tickets._nt import check_ntk_implementation, nt
from ntk_tickets.errors import UserInputError
from ntk_tickets.models import parameter_count

NTK_MAX_BYTES = 2**31  # default budget of one empirical-NTK computation (bytes)

PyTree = Any


def ntk_memory_bytes(n1: int, n2: int, n_out: int, n_params: int, itemsize: int,
                     trace: bool = True) -> int:
    """Estimates the peak bytes of a Jacobian-contraction empirical NTK.

    Args:
      n1, n2: numbers of inputs on each side.
      n_out: outputs per input (k).
      n_params: number of scalar parameters (P).
      itemsize: bytes per scalar (4 for float32, 8 for float64).
      trace: ``True`` for the ``(n1, n2)`` traced kernel, ``False`` for the full
        ``(n1, n2, k, k)`` one.

    Returns:
      ``(n1 + n2)·k·P·itemsize`` for the two Jacobians plus the kernel's own size,
      ``n1·n2·itemsize`` traced or ``(n1·k)·(n2·k)·itemsize`` full.
    """
    jacobians = (n1 + n2) * n_out * n_params
    kernel = n1 * n2 if trace else (n1 * n_out) * (n2 * n_out)
    return (jacobians + kernel) * itemsize


def _compiled(cache: MutableMapping | None, key: tuple, build: Callable[[], Callable]) -> Callable:
    """``build()``, kept in ``cache`` under ``key`` (a model's :attr:`Model.cache`) so that a
    model's programs are traced once; built anew without a cache."""
    if cache is None:
        return build()
    if key not in cache:
        cache[key] = build()
    return cache[key]


def _jitted_ntk_fn(apply_fn: Callable, trace: bool, implementation: str,
                   cache: MutableMapping | None) -> Callable:
    """``jit(ntk_fn)(x1, x2, params)``, one per model, trace mode and implementation."""
    def build() -> Callable:
        return jax.jit(nt.empirical_ntk_fn(
            apply_fn, trace_axes=(-1,) if trace else (), vmap_axes=0,
            implementation=check_ntk_implementation(implementation)))
    return _compiled(cache, ("empirical_ntk", trace, implementation), build)


def _largest_block(n1: int, n2: int, fits: Callable[[int, int], bool]) -> int:
    """The largest b ≥ 1 with ``fits(min(b, n1), min(b, n2))``, or 0 if none (bisection)."""
    lo, hi = 0, max(n1, n2)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(min(mid, n1), min(mid, n2)):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _pad_rows(x: jax.Array, block: int) -> jax.Array:
    """Repeats the last row of ``x`` so that its length is a multiple of ``block``."""
    pad = -x.shape[0] % block
    return jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), mode="edge")


def _blocked_ntk(ntk_fn: Callable, params: PyTree, x1: jax.Array, x2: jax.Array,
                 block: int) -> jax.Array:
    """The kernel assembled from ``block × block`` tiles of equal shape (one compilation)."""
    n1, n2 = x1.shape[0], x2.shape[0]
    b1, b2 = min(block, n1), min(block, n2)
    x1p, x2p = _pad_rows(x1, b1), _pad_rows(x2, b2)
    rows = [
        jnp.concatenate([ntk_fn(x1p[i:i + b1], x2p[j:j + b2], params)
                         for j in range(0, x2p.shape[0], b2)], axis=1)
        for i in range(0, x1p.shape[0], b1)
    ]
    return jnp.concatenate(rows, axis=0)[:n1, :n2]


def empirical_ntk(apply_fn: Callable, params: PyTree, x1: jax.Array,
                  x2: jax.Array | None = None, *, trace: bool = True,
                  implementation: str = "ntk_vector_products",
                  max_bytes: int = NTK_MAX_BYTES, cache: MutableMapping | None = None) -> jax.Array:
    """The empirical NTK Θ̂(x1, x2) = J(θ, x1) J(θ, x2)ᵀ at ``params``.

    Args:
      apply_fn: ``(params, x) -> (n, k)`` outputs.
      params: the parameters θ at which the Jacobians are taken.
      x1: inputs, shape ``(n1, ...)``.
      x2: inputs, shape ``(n2, ...)``; ``None`` means ``x1``.
      trace: ``True``: shape ``(n1, n2)``, the average over the k outputs; ``False``: shape
        ``(n1, n2, k, k)``.
      implementation: ``"jacobian_contraction"`` or ``"ntk_vector_products"``.
      max_bytes: budget for one computation, estimated by :func:`ntk_memory_bytes` (Jacobian
        contraction). Above it the kernel is computed in square tiles of rows of ``x1`` and
        ``x2`` that each fit; the assembled result itself is not counted.
      cache: where the compiled kernel function is kept between calls, e.g.
        ``model.cache`` (:class:`~ntk_tickets.models.Model`); None compiles it anew.

    Returns:
      The kernel, in the dtype of ``apply_fn``'s outputs.

    Raises:
      UserInputError: if not even a one-row tile fits in ``max_bytes``.
    """
    out = jax.eval_shape(apply_fn, params, x1[:1])
    n_out, itemsize = math.prod(out.shape[1:]), out.dtype.itemsize
    n_params = parameter_count(params)
    n2 = x1.shape[0] if x2 is None else x2.shape[0]
    ntk_fn = _jitted_ntk_fn(apply_fn, trace, implementation, cache)

    def fits(m1: int, m2: int) -> bool:
        return ntk_memory_bytes(m1, m2, n_out, n_params, itemsize, trace) <= max_bytes

    if fits(x1.shape[0], n2):
        return ntk_fn(x1, x2, params)
    block = _largest_block(x1.shape[0], n2, fits)
    if block == 0:
        needed = ntk_memory_bytes(1, 1, n_out, n_params, itemsize, trace)
        raise UserInputError(
            f"the empirical NTK needs about {needed / 2**20:.1f} MiB even for one pair of "
            f"inputs ({n_params} parameters, {n_out} outputs), above the limit of "
            f"{max_bytes / 2**20:.1f} MiB: lower probe_size (or the number of points), the "
            f"width, or raise the memory limit"
        )
    return _blocked_ntk(ntk_fn, params, x1, x1 if x2 is None else x2, block)


def probe_ntk(apply_fn: Callable, params: PyTree, x_probe: jax.Array) -> jax.Array:
    """The traced empirical NTK on a small probe set, in memory linear in the parameters.

    Row i is (1/k) Σ_o J_o(x_probe) · ∇θ f_o(x_i): the k gradients of one probe output are
    taken by reverse mode, then pushed through all probe inputs by forward mode, one probe
    point after another (``lax.map``). Peak memory is about k parameter vectors, against
    m·k for Jacobian contraction, so it runs inside a seed-vmapped training scan at any
    width. Equal to ``empirical_ntk(apply_fn, params, x_probe)``, and faster than both of
    its implementations on a probe set: measured on 2 CPU cores for 8 probe points, 10
    outputs, 2 vmapped seeds and a 2-hidden-layer MLP, 0.19 s against 0.28 s (NTK-vector
    products) and 2.0 s (Jacobian contraction) at width 1024; 2.7 s against 8.7 s at 4096.

    Args:
      apply_fn: ``(params, x) -> (n, k)`` outputs.
      params: θ.
      x_probe: ``(m, ...)`` probe inputs.

    Returns:
      ``(m, m)``, the kernel averaged over the k outputs.
    """

    def f(p: PyTree) -> jax.Array:
        return apply_fn(p, x_probe)

    def row(x_i: jax.Array) -> jax.Array:
        grads = jax.jacrev(lambda p: apply_fn(p, x_i[None])[0])(params)  # k × θ
        n_out = jax.tree_util.tree_leaves(grads)[0].shape[0]
        pushed = jax.vmap(lambda t: jax.jvp(f, (params,), (t,))[1])(grads)  # (k, m, k)
        return jnp.trace(pushed, axis1=0, axis2=2) / n_out  # Σ_o over matching outputs

    return jax.lax.map(row, x_probe)


def relative_frobenius(a: jax.Array, b: jax.Array) -> jax.Array:
    """‖a − b‖_F / ‖b‖_F over all entries (any equal shapes)."""
    return jnp.linalg.norm((a - b).ravel()) / jnp.linalg.norm(b.ravel())


def ntk_init_error(apply_fn: Callable, kernel_fn: Callable, params0: PyTree,
                   x_probe: jax.Array, *, max_bytes: int = NTK_MAX_BYTES,
                   cache: MutableMapping | None = None) -> jax.Array:
    """Metric ``ntk_init_error``: distance of the empirical NTK at θ0 from the analytic one.

    Args:
      apply_fn: ``(params, x) -> (n, k)`` outputs.
      kernel_fn: the analytic ``kernel_fn(x1, x2, get)`` of the same architecture.
      params0: θ0.
      x_probe: probe inputs, shape ``(n_probe, ...)``.
      max_bytes, cache: see :func:`empirical_ntk`.

    Returns:
      Scalar ‖Θ̂_θ0 − Θ‖_F / ‖Θ‖_F, both ``(n_probe, n_probe)`` and traced (Θ̂ averaged over
      outputs); O(1/√width) for a random θ0 (Jacot et al. 2018; Hanin & Nica 2019).
    """
    empirical = empirical_ntk(apply_fn, params0, x_probe, max_bytes=max_bytes, cache=cache)
    return relative_frobenius(empirical, kernel_fn(x_probe, None, "ntk"))


def ntk_change(apply_fn: Callable, params: PyTree, params0: PyTree, x_probe: jax.Array, *,
               max_bytes: int = NTK_MAX_BYTES) -> jax.Array:
    """Metric ``ntk_change``: ‖Θ̂_θ − Θ̂_θ0‖_F / ‖Θ̂_θ0‖_F on the probe set (traced kernels).

    Args:
      apply_fn: ``(params, x) -> (n, k)`` outputs.
      params: θ, e.g. after training.
      params0: θ0.
      x_probe: probe inputs, shape ``(n_probe, ...)``.
      max_bytes: see :func:`empirical_ntk`.

    Returns:
      A scalar; exactly 0 at ``params = params0``.
    """
    k0 = empirical_ntk(apply_fn, params0, x_probe, max_bytes=max_bytes)
    return relative_frobenius(empirical_ntk(apply_fn, params, x_probe, max_bytes=max_bytes), k0)


def _times(steps: jax.Array | None) -> jax.Array | None:
    """neural-tangents' t: the steps as an array, or None for t → ∞."""
    return None if steps is None else jnp.asarray(steps)


def _with_time_axis(outputs: jax.Array, steps: jax.Array | None) -> jax.Array:
    """``outputs`` with the leading time axis that neural-tangents omits for t = None."""
    return outputs[None] if steps is None else outputs


def empirical_ntk_predictions(apply_fn: Callable, params0: PyTree, x_train: jax.Array,
                              y_train: jax.Array, x_test: jax.Array, learning_rate: float,
                              steps: jax.Array | None, *, diag_reg: float = 0.0,
                              output_scale: float = 1.0, center: bool = False,
                              max_bytes: int = NTK_MAX_BYTES, cache: MutableMapping | None = None
                              ) -> tuple[jax.Array, jax.Array]:
    """Closed-form outputs of the linearized network under full-batch gradient flow on MSE.

    With Θ̂ the full ``(n·k) × (n·k)`` empirical NTK at θ0 (``trace=False``, so couplings
    between outputs are exact), K = Θ̂ + λ·mean(diag Θ̂)·I with λ = ``diag_reg``, g0 the
    initial outputs of the trained function (α·f(θ0, ·), or 0 when centred;
    :func:`ntk_tickets.regimes.scaled_function`) and L = ½·mean((f − y)²) over all n·k
    entries (Lee et al. 2019, eq. 9–11, with their η/n replaced by η/(n·k)):

      f_test(t)  = g0(x_test) + Θ̂_test,train K⁻¹ (exp(−η t K / (n·k)) − I) (g0(x_train) − y)
      f_train(t) = y + exp(−η t Θ̂ / (n·k)) (g0(x_train) − y)        (λ = 0)
      f_train(t) = f_test(t) evaluated at x_train                    (λ > 0),

    computed by ``nt.predict.gradient_descent_mse(..., trace_axes=())``. ``t = steps``
    approximates ``steps`` steps of discrete full-batch GD with step size η on the linearized
    model; ``steps = None`` is t → ∞, where f_test = g0(x_test) + Θ̂_test,train K⁻¹ (y −
    g0(x_train)) (kernel ridge regression on the residual). Cross-entropy has no closed
    form, by design: use the linear path.

    Args:
      apply_fn: ``(params, x) -> (n, k)`` outputs f.
      params0: θ0, the point of linearization and the start of training.
      x_train: training inputs, shape ``(n_train, ...)``.
      y_train: targets, shape ``(n_train, k)``.
      x_test: test inputs, shape ``(n_test, ...)``.
      learning_rate: η (the model's output scale α trains at η/α²; see the module docstring).
      steps: 1-D array of (possibly fractional) step counts, or None for t → ∞.
      diag_reg: λ, the ridge relative to the mean diagonal of Θ̂ (0: plain gradient flow).
      output_scale: α.
      center: whether the trained function is α·(f(θ) − f(θ0)) (so g0 = 0).
      max_bytes, cache: see :func:`empirical_ntk`.

    Returns:
      ``(f_train, f_test)`` of shapes ``(r, n_train, k)`` and ``(r, n_test, k)``, r =
      ``len(steps)``, or 1 for ``steps = None``.
    """
    ntk = functools.partial(empirical_ntk, apply_fn, params0, trace=False, max_bytes=max_bytes,
                            cache=cache)
    k_train = ntk(x_train)
    predict_fn = nt.predict.gradient_descent_mse(k_train, y_train, learning_rate=learning_rate,
                                                 diag_reg=diag_reg, trace_axes=())
    apply = _compiled(cache, ("apply",), lambda: jax.jit(apply_fn))
    trained = regimes.scaled_function(lambda p, p0, x: apply(p, x), output_scale, center)
    g0_train, g0_test = (trained(params0, params0, x) for x in (x_train, x_test))
    t = _times(steps)
    f_train, f_test = predict_fn(t, g0_train, g0_test, ntk(x_test, x_train))
    if diag_reg:  # the trained model's outputs, not the regularized ODE's (which fit y)
        _, f_train = predict_fn(t, g0_train, g0_train, k_train)
    return _with_time_axis(f_train, steps), _with_time_axis(f_test, steps)


def infinite_width_predictions(
    kernel_fn: Callable, x_train: jax.Array, y_train: jax.Array, x_test: jax.Array,
    learning_rate: float, steps: jax.Array | None, get: Sequence[str] = ("ntk", "nngp"),
    diag_reg: float = 0.0, output_scale: float = 1.0, center: bool = False,
) -> dict[str, tuple[jax.Array, jax.Array, jax.Array]]:
    """The infinite ensemble of infinite-width networks trained by gradient flow on MSE.

    The outputs at time t are Gaussian over initializations (Lee et al. 2019, eq. 12–16);
    ``nt.predict.gradient_descent_mse_ensemble`` gives their mean and covariance, with the
    same time convention as :func:`empirical_ntk_predictions` (t = steps, η =
    ``learning_rate``, loss ½·mean over all n·k entries; ``steps = None`` is t → ∞).

    * ``"ntk"``: networks trained with the analytic NTK Θ (the infinite-width limit of the
      exact and linear paths): mean Θ_*Θ⁻¹(I − e^{−ηtΘ/(n·k)}) y.
    * ``"nngp"``: gradient flow with the NNGP kernel K in place of Θ (only the readout
      trained); at t → ∞ the exact Bayesian GP posterior mean K_*K⁻¹ y and variance.

    With ``diag_reg`` = λ and λ' = λ·mean(diag) of the train kernel, the means use Θ + λ'I
    (or K + λ'I) in place of the train kernel; the ``"nngp"`` variance is then the GP
    posterior variance with observation noise λ', K_** − K_*(K + λ'I)⁻¹K_*ᵀ at t → ∞, and the
    ``"ntk"`` variance is that of the regularized flow over random initial functions
    (neural-tangents' formulas; checked by hand in ``tests/test_kernels.py``).

    With output scale α the variance is α² times that of α = 1, and 0 when centred: it comes
    from the random initial function alone, and the mean does not depend on α (module
    docstring). Cross-entropy has no closed form, by design: use the linear path.

    Args:
      kernel_fn: the analytic ``kernel_fn(x1, x2, get)``.
      x_train: training inputs, shape ``(n_train, ...)``.
      y_train: targets, shape ``(n_train, k)``.
      x_test: test inputs, shape ``(n_test, ...)``.
      learning_rate: η.
      steps: 1-D array of (possibly fractional) step counts, or None for t → ∞.
      get: the regimes to compute, a subset of ``("ntk", "nngp")``.
      diag_reg: ridge added to the train-train kernel, relative to its mean diagonal
        (neural-tangents' convention); 0 for plain gradient flow.
      output_scale: α.
      center: whether the trained function is α·(f(θ) − f(θ0)).

    Returns:
      ``{regime: (mean_train, mean_test, var_test)}``: ensemble means of shapes
      ``(r, n_train, k)`` and ``(r, n_test, k)`` (0 at step 0), and the per-point test
      variance (the same for every output) of shape ``(r, n_test)``; r = ``len(steps)``, or 1
      for ``steps = None``. ``mean_train`` is evaluated as a test set at ``x_train``, so it
      includes ``diag_reg``.
    """
    get = tuple(get)
    predict_fn = nt.predict.gradient_descent_mse_ensemble(
        kernel_fn, x_train, y_train, learning_rate=learning_rate, diag_reg=diag_reg)
    t = _times(steps)
    train = predict_fn(t, x_train, get)
    # At t = None neural-tangents 0.6.5 computes only the train-train kernels named in
    # ``get``, but the NTK covariance needs the NNGP one as well: ask for both.
    test = predict_fn(t, x_test, tuple(dict.fromkeys(("nngp", *get))), compute_cov=True)
    variance_scale = 0.0 if center else output_scale**2
    return {
        g: tuple(_with_time_axis(a, steps) for a in (
            getattr(train, g), getattr(test, g).mean,
            variance_scale * jnp.diagonal(getattr(test, g).covariance, axis1=-2, axis2=-1)))
        for g in get
    }
