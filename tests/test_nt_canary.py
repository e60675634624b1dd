"""Canaries: neural-tangents on current JAX against independent pure-JAX references.

If a JAX upgrade breaks the compatibility layer in ``ntk_tickets._nt``, these fail loudly.
Comparisons run in float64, where the references are exact up to round-off, and also in
float32 (the ``x64`` fixture) where a repair concerns numerics or tracing.
"""

import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from ntk_tickets._nt import check_ntk_implementation, nt
from ntk_tickets.config import ModelConfig
from ntk_tickets.linear import linearize
from ntk_tickets.models import build_model


def _jacobian_ntk(apply_fn, params, x1, x2):
    """J(x1) J(x2)ᵀ from ``jax.jacrev``, shape (n1, n2, k, k)."""

    def flat_jacobian(x):
        jac = jax.jacrev(lambda p: apply_fn(p, x))(params)
        leaves = jax.tree_util.tree_leaves(jac)
        n, k = leaves[0].shape[:2]
        return jnp.concatenate([leaf.reshape(n, k, -1) for leaf in leaves], axis=-1)

    return jnp.einsum("ikp,jlp->ijkl", flat_jacobian(x1), flat_jacobian(x2))


def _small_models():
    mlp = build_model(ModelConfig(arch="mlp", depth=2, activation="erf"), 12, (5,), 3)
    cnn = build_model(ModelConfig(arch="cnn1d", depth=1, activation="relu"), 4, (7, 2), 3)
    return {"mlp": (mlp, (5,)), "cnn1d": (cnn, (7, 2))}


@pytest.mark.parametrize("arch", ["mlp", "cnn1d"])
@pytest.mark.parametrize("implementation", ["jacobian_contraction", "ntk_vector_products"])
@pytest.mark.parametrize("trace_axes", [(), (-1,)], ids=["full", "traced"])
def test_empirical_ntk_matches_jacobian_product(float64, arch, implementation, trace_axes):
    model, shape = _small_models()[arch]
    params = model.init(jax.random.PRNGKey(0))
    x1 = jax.random.normal(jax.random.PRNGKey(1), (4, *shape))
    x2 = jax.random.normal(jax.random.PRNGKey(2), (3, *shape))
    ntk_fn = nt.empirical_ntk_fn(model.apply_fn, trace_axes=trace_axes, vmap_axes=0,
                                 implementation=check_ntk_implementation(implementation))
    ntk = ntk_fn(x1, x2, params)
    reference = _jacobian_ntk(model.apply_fn, params, x1, x2)
    if trace_axes:  # neural-tangents averages (not sums) over traced output axes
        reference = jnp.einsum("ijkk->ij", reference) / reference.shape[-1]
    assert ntk.shape == reference.shape
    np.testing.assert_allclose(ntk, reference, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["structured_derivatives", "auto", "STRUCTURED_DERIVATIVES"])
def test_broken_ntk_implementations_are_refused(name):
    with pytest.raises(ValueError, match="jacobian_contraction"):
        check_ntk_implementation(name)


def test_unknown_ntk_implementation_is_refused():
    with pytest.raises(ValueError, match="unknown NTK implementation"):
        check_ntk_implementation("fastest")


def test_linearize_matches_neural_tangents(float64):
    model = build_model(ModelConfig(arch="resmlp", depth=2, activation="gelu"), 16, (5,), 2)
    theta0 = model.init(jax.random.PRNGKey(0))
    direction = model.init(jax.random.PRNGKey(1))
    theta = jax.tree_util.tree_map(lambda a, b: a + 0.3 * b, theta0, direction)
    x = jax.random.normal(jax.random.PRNGKey(2), (6, 5))
    ours = jax.jit(linearize(model.apply_fn))(theta, theta0, x)
    theirs = nt.linearize(model.apply_fn, theta0)(theta, x)
    np.testing.assert_allclose(ours, theirs, rtol=1e-11, atol=1e-12)


def test_linearization_is_exact_at_theta0_and_first_order_nearby(x64):
    model = build_model(ModelConfig(arch="mlp", depth=2, activation="tanh"), 32, (4,), 2)
    theta0 = model.init(jax.random.PRNGKey(0))
    direction = model.init(jax.random.PRNGKey(1))
    x = jax.random.normal(jax.random.PRNGKey(2), (8, 4))
    f_lin = jax.jit(linearize(model.apply_fn))
    np.testing.assert_array_equal(f_lin(theta0, theta0, x), jax.jit(model.apply_fn)(theta0, x))

    def gap(eps):
        theta = jax.tree_util.tree_map(lambda a, b: a + eps * b, theta0, direction)
        return float(jnp.max(jnp.abs(model.apply_fn(theta, x) - f_lin(theta, theta0, x))))

    # f − f_lin = O(ε²): halving ε divides the gap by about 4 (2 would mean first-order error).
    ratios = [gap(eps) / gap(eps / 2) for eps in (0.1, 0.05)]
    assert all(3.5 < r < 4.5 for r in ratios), ratios


def _monte_carlo_nngp(model, x, n_samples):
    """Average over draws of f(x) f(x)ᵀ / n_out: each output unit is one NNGP sample."""

    @jax.jit
    def nngp(key):
        fx = model.apply_fn(model.init(key), x)
        return fx @ fx.T / fx.shape[1]

    return sum(nngp(k) for k in jax.random.split(jax.random.PRNGKey(7), n_samples)) / n_samples


def _monte_carlo_ntk(model, x, n_samples):
    """Average over draws of J Jᵀ (traced over outputs, divided by n_out)."""

    @jax.jit
    def ntk(key):
        full = _jacobian_ntk(model.apply_fn, model.init(key), x, x)
        return jnp.einsum("ijkk->ij", full) / full.shape[-1]

    return sum(ntk(k) for k in jax.random.split(jax.random.PRNGKey(8), n_samples)) / n_samples


def test_analytic_kernels_match_monte_carlo_at_width_1024(float64):
    """The analytic NNGP/NTK agree with finite-width Monte-Carlo averages.

    Tolerance: at width n one draw of the empirical kernel deviates from its limit by a
    relative O(1/√n) fluctuation plus an O(1/n) bias (Hanin & Nica 2019); the NNGP estimate
    f fᵀ / n_out adds a readout-sampling error of about √(2 / (n_out·S)) ≈ 1.6 % for
    n_out = 512 and S = 16 draws. Measured on two input draws: 1.4–2.5 % relative Frobenius
    error for both kernels. 6 % leaves a 2.4× margin, while a wrong scaling (W_std off by
    √2) gives 87 %.
    """
    x = jax.random.normal(jax.random.PRNGKey(3), (5, 6))
    cfg = ModelConfig(arch="mlp", depth=2, activation="relu", w_std=1.5, b_std=0.2)
    nngp_mc = _monte_carlo_nngp(build_model(cfg, 1024, (6,), 512), x, 16)
    ntk_mc = _monte_carlo_ntk(build_model(cfg, 1024, (6,), 1), x, 16)
    analytic = build_model(cfg, 1024, (6,), 1).kernel_fn(x, x, ("nngp", "ntk"))
    for name, mc, exact in (("nngp", nngp_mc, analytic.nngp), ("ntk", ntk_mc, analytic.ntk)):
        rel = jnp.linalg.norm(mc - exact) / jnp.linalg.norm(exact)
        assert rel < 0.06, (name, float(rel))


def _regression_problem():
    key_train, key_test, key_y = jax.random.split(jax.random.PRNGKey(4), 3)
    model = build_model(ModelConfig(activation="erf"), 64, (3,), 2)
    x_train = jax.random.normal(key_train, (10, 3))
    x_test = jax.random.normal(key_test, (4, 3))
    y_train = jax.random.normal(key_y, (10, 2))
    k = model.kernel_fn(x_train, None, "ntk")
    k_test_train = model.kernel_fn(x_test, x_train, "ntk")
    return x_train, y_train, k, k_test_train


def test_gradient_descent_mse_at_infinite_time_is_kernel_regression(float64):
    _, y_train, k_train_train, k_test_train = _regression_problem()
    predict_fn = nt.predict.gradient_descent_mse(k_train_train, y_train)
    fx_train, fx_test = predict_fn(None, jnp.zeros_like(y_train), jnp.zeros((4, 2)),
                                   k_test_train)
    reference = k_test_train @ np.linalg.solve(k_train_train, y_train)
    np.testing.assert_allclose(fx_test, reference, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(fx_train, y_train, rtol=1e-8, atol=1e-10)


def test_gradient_descent_mse_time_scale_is_gradient_flow_on_half_mean_squared_error(float64):
    """Pins neural-tangents' time and loss convention with a matrix exponential.

    ``gradient_descent_mse(K, y, learning_rate=η)`` at time t solves the gradient flow of
    L = ½ Σᵢₖ (f(xᵢ)ₖ − yᵢₖ)² / (n·k), half the mean over all n·k entries of y:
    df/dt = −(η/(n·k)) K (f − y), so f(t) = y + exp(−η t K / (n·k))(f₀ − y). Discrete GD
    with step size η on that loss after s steps corresponds to t = s.
    """
    _, y_train, k_train_train, _ = _regression_problem()
    n = y_train.size
    eta, t = 0.7, 3.0
    f0 = jnp.full_like(y_train, 0.25)
    predict_fn = nt.predict.gradient_descent_mse(k_train_train, y_train, learning_rate=eta)
    reference = y_train + scipy.linalg.expm(-eta * t * np.asarray(k_train_train) / n) @ (
        f0 - y_train)
    np.testing.assert_allclose(predict_fn(t, f0), reference, rtol=1e-8, atol=1e-10)


def _random_full_ntk(key, n, k):
    """A random PSD kernel of shape (n, n, k, k), neural-tangents' ``trace_axes=()`` layout."""
    a = jax.random.normal(key, (n * k, n * k + 3))
    return (a @ a.T / a.shape[1]).reshape(n, k, n, k).transpose(0, 2, 1, 3)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("layout", ["traced", "full"])
def test_max_learning_rate_is_the_edge_of_contraction(x64, layout, momentum):
    """``max_learning_rate`` = 2 (1 + μ) N / λ_max(K), N = y_train.size.

    neural-tangents' documented convention: GD on ½ |f − y|² / N contracts iff
    I − η K / N does, i.e. η < 2 N / λ_max; heavy-ball momentum μ widens it by 1 + μ
    (Goh 2017, "Why Momentum Really Works"). Reference: float64 numpy eigenvalues.
    """
    n, k = 6, 2
    if layout == "traced":  # K of shape (n, n), interpreted as K ⊗ I_k: N must be given
        _, y_train, kernel, _ = _regression_problem()
        matrix, size = np.asarray(kernel, np.float64), y_train.size
        lr_fn = functools.partial(nt.predict.max_learning_rate, y_train_size=size,
                                  momentum=momentum)
    else:  # K of shape (n, n, k, k): N = n·k is inferred from it
        kernel = _random_full_ntk(jax.random.PRNGKey(5), n, k)
        matrix = np.asarray(kernel, np.float64).transpose(0, 2, 1, 3).reshape(n * k, n * k)
        size = n * k
        lr_fn = functools.partial(nt.predict.max_learning_rate, momentum=momentum)
    lam = np.linalg.eigvalsh(matrix)
    rtol = 1e-10 if x64 else 1e-5
    lr = lr_fn(kernel)
    np.testing.assert_allclose(lr, 2 * (1 + momentum) * size / lam[-1], rtol=rtol)
    # At η = lr / (1 + μ) the plain-GD iteration matrix I − η K / N has spectral radius 1.
    radius = np.max(np.abs(1 - lr / (1 + momentum) * lam / size))
    np.testing.assert_allclose(radius, 1.0, rtol=rtol)
    np.testing.assert_allclose(jax.jit(lr_fn)(kernel), lr, rtol=rtol)


def _per_seed_problem(key, x_train, x_test, width=32, k=2):
    """Random-feature kernels and initial outputs of one seed.

    Returns:
      ``(k_train_train, k_test_train, fx_train_0, fx_test_0)`` of shapes (n, n), (m, n),
      (n, k), (m, k): features tanh(x W), W of shape (d, width) drawn from ``key``.
    """
    key_w, key_v = jax.random.split(key)
    w = jax.random.normal(key_w, (x_train.shape[1], width))
    v = jax.random.normal(key_v, (width, k)) / np.sqrt(width)
    phi_train, phi_test = jnp.tanh(x_train @ w), jnp.tanh(x_test @ w)
    return (phi_train @ phi_train.T / width, phi_test @ phi_train.T / width,
            phi_train @ v, phi_test @ v)


def _gradient_flow_reference(k_train_train, k_test_train, y, f0_train, f0_test, eta, ts):
    """Gradient flow on ½ |f − y|² / N, N = y.size, in float64 numpy (t = None: t → ∞).

    f_train(t) = y + E(t) (f0 − y) and f_test(t) = f0_test + K_* K⁻¹ (E(t) − I) (f0 − y) with
    E(t) = exp(−η t K / N) (Lee et al. 2019, eq. 9–11; E(∞) = 0 for K positive definite).
    Shapes: (T, n, k) and (T, m, k), or (n, k) and (m, k) for t = None.
    """
    k_tt, k_st, y, f0, f0_s = (np.asarray(a, np.float64)
                               for a in (k_train_train, k_test_train, y, f0_train, f0_test))
    decays = [np.zeros_like(k_tt)] if ts is None else [
        scipy.linalg.expm(-eta * t * k_tt / y.size) for t in ts]
    train = np.stack([y + e @ (f0 - y) for e in decays])
    test = np.stack([f0_s + k_st @ np.linalg.solve(k_tt, (e - np.eye(len(y))) @ (f0 - y))
                     for e in decays])
    return (train[0], test[0]) if ts is None else (train, test)


@pytest.mark.parametrize("ts", [(0.5, 4.0), None], ids=["finite", "infinite"])
def test_gradient_descent_mse_vmaps_over_seeds(x64, ts):
    """``gradient_descent_mse`` vmapped over seeds equals a Python loop and the closed form.

    The kernel is built inside the mapped function, as in upstream's
    ``testNTKMeanCovPrediction0``; ``jit`` of one seed is checked the same way.
    """
    key_train, key_test, key_y = jax.random.split(jax.random.PRNGKey(11), 3)
    x_train = jax.random.normal(key_train, (8, 8))  # 8-d inputs: cond(K) < 40 at width 32
    x_test = jax.random.normal(key_test, (5, 8))
    y_train = jax.random.normal(key_y, (8, 2))
    eta = 0.5

    def predict(key):
        k_tt, k_st, f0_train, f0_test = _per_seed_problem(key, x_train, x_test)
        predict_fn = nt.predict.gradient_descent_mse(k_tt, y_train, learning_rate=eta)
        return predict_fn(None if ts is None else jnp.asarray(ts), f0_train, f0_test, k_st)

    keys = jax.random.split(jax.random.PRNGKey(12), 3)
    mapped = jax.vmap(predict)(keys)
    jitted = jax.jit(predict)(keys[0])
    atol = 1e-5 if x64 else 1e-3
    for i, key in enumerate(keys):
        k_tt, k_st, f0_train, f0_test = _per_seed_problem(key, x_train, x_test)
        reference = _gradient_flow_reference(k_tt, k_st, y_train, f0_train, f0_test, eta, ts)
        for ours, loop, ref in zip((m[i] for m in mapped), predict(key), reference,
                                   strict=True):
            np.testing.assert_allclose(ours, loop, rtol=1e-6 if x64 else 1e-4, atol=atol / 100)
            np.testing.assert_allclose(ours, ref, rtol=0, atol=atol)
    for ours, loop in zip(jitted, predict(keys[0]), strict=True):
        np.testing.assert_allclose(ours, loop, rtol=1e-6 if x64 else 1e-4, atol=atol / 100)


def test_import_does_not_load_tensorflow():
    code = ("import sys, ntk_tickets, ntk_tickets._nt; "
            "print(any(m.split('.')[0] in ('tensorflow', 'tf2jax') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"
