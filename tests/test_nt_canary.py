"""Canaries: neural-tangents on current JAX against independent pure-JAX references.

If a JAX upgrade breaks the compatibility layer in ``ntk_tickets._nt``, these fail loudly.
All comparisons run in float64, where the references are exact up to round-off.
"""

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


def test_import_does_not_load_tensorflow():
    code = ("import sys, ntk_tickets, ntk_tickets._nt; "
            "print(any(m.split('.')[0] in ('tensorflow', 'tf2jax') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"
