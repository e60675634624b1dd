"""Hessian spectra and function-preserving embeddings (ntk_tickets.hessian), each checked
against something independent: finite differences of the gradient, Hessians derived by hand,
the exact spectrum, the narrow network's outputs and a critical point found by BFGS."""

import functools
import math

import jax
import jax.numpy as jnp
import jax.scipy.optimize
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from ntk_tickets import ModelConfig, build_model
from ntk_tickets.hessian import (
    add_inactive_neuron,
    hessian_eigenvalues,
    hessian_matrix,
    hessian_vector_product,
    lanczos_eigenvalues,
    smallest_eigenvalue,
    split_neuron,
)

MUS = [-0.5, 0.0, 0.3, 1.0, 1.7]


@functools.cache
def _mlp(width, d, k, **cfg):
    """A one-hidden-layer tanh MLP (smooth, so Hessians are well defined everywhere); one
    object per shape, so that its jitted programs are reused between tests."""
    return build_model(ModelConfig(arch="mlp", depth=1, activation="tanh", **cfg), width,
                       (d,), k)


@functools.cache
def _mse(model):
    """½·mean((f − y)²), written out here rather than taken from the package; one function
    per model, the static argument of the jitted Hessian programs."""
    return lambda params, x, y: 0.5 * jnp.mean((model.apply_fn(params, x) - y) ** 2)


def _normal(seed, shape):
    """N(0, 1) draws in the default float (float32 unless x64 is on), made by NumPy so that
    no JAX program is compiled for them."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.zeros(()).dtype)


def _init(model, seed):
    """Parameters of ``model`` drawn as stax's ntk initialization draws them, W, b ~ N(0, 1),
    by NumPy (cheaper in tests than compiling ``model.init`` for every shape)."""
    shapes = jax.eval_shape(model.init, jax.ShapeDtypeStruct((2,), jnp.uint32))
    rng = np.random.default_rng([seed, 1])  # a stream apart from _normal(seed)'s
    return jax.tree_util.tree_map(
        lambda leaf: jnp.asarray(rng.standard_normal(leaf.shape), jnp.zeros(()).dtype), shapes)


def _spectral_norm(eigenvalues):
    return float(jnp.max(jnp.abs(eigenvalues)))


# --- Exact Hessian ------------------------------------------------------------------------

def test_exact_hessian_matches_central_differences_of_the_gradient(float64):
    model = _mlp(2, d=2, k=1)
    params, x, y = _init(model, 0), _normal(1, (5, 2)), _normal(2, (5, 1))
    loss = _mse(model)
    hess = hessian_matrix(loss, params, (x, y))
    assert hess.shape == (9, 9)  # (2·2 + 2) + (2·1 + 1)

    flat, unravel = ravel_pytree(params)
    grad = jax.jit(lambda theta: ravel_pytree(jax.grad(loss)(unravel(theta), x, y))[0])
    h = 1e-5
    columns = [(grad(flat + h * e) - grad(flat - h * e)) / (2 * h) for e in np.eye(flat.size)]
    finite_differences = jnp.stack(columns, axis=1)
    # Central differences err by h²/6·|∂⁴L| (~1e-11 here) plus ε·|∇L|/h (~1e-11): 1e-8
    # relative to the largest entry leaves a factor of 1000.
    scale = float(jnp.max(jnp.abs(hess)))
    np.testing.assert_allclose(hess, finite_differences, rtol=0, atol=1e-8 * scale)
    np.testing.assert_allclose(hess, hess.T, rtol=0, atol=1e-14 * scale)


def test_exact_hessian_of_a_linear_model_is_the_gram_matrix(x64):
    n_points, d = 7, 3
    x, y = _normal(0, (n_points, d)), _normal(1, (n_points,))
    params = {"b": jnp.array(0.3), "w": _normal(2, (d,))}  # ravel order: b, then w

    def loss(p, x, y):
        return 0.5 * jnp.mean((x @ p["w"] + p["b"] - y) ** 2)

    # L = ½·mean((Z θ − y)²) with Z = [1, x], θ = (b, w): H = Zᵀ Z / N, whatever θ is.
    z = np.concatenate([np.ones((n_points, 1)), np.asarray(x, np.float64)], axis=1)
    gram = z.T @ z / n_points
    rtol = 1e-12 if x64 else 1e-5  # a few roundings of ε = 2e-16 / 1e-7
    np.testing.assert_allclose(hessian_matrix(loss, params, (x, y)), gram, rtol=0,
                               atol=rtol * np.abs(gram).max())
    eigenvalues = hessian_eigenvalues(loss, params, (x, y))
    np.testing.assert_allclose(eigenvalues, np.linalg.eigvalsh(gram), rtol=0,
                               atol=rtol * np.abs(gram).max())
    assert np.all(np.diff(eigenvalues) >= 0)


def test_exact_hessian_at_zero_loss_is_the_gauss_newton_matrix(float64):
    # With residual r = 0, H = Jᵀ J / (N·k) exactly (the ∑ r·∇²f term vanishes); J from
    # jax.jacobian of the network outputs, independent of any second derivative.
    model = _mlp(4, d=3, k=2)
    params, x = _init(model, 0), _normal(1, (6, 3))
    y, loss = model.apply_fn(params, x), _mse(model)
    flat, unravel = ravel_pytree(params)
    jac = jax.jit(jax.jacobian(lambda theta: model.apply_fn(unravel(theta), x)))(flat)
    jac = jac.reshape(12, -1)
    gauss_newton = jac.T @ jac / 12
    hess = hessian_matrix(loss, params, (x, y))
    scale = float(jnp.max(jnp.abs(gauss_newton)))
    np.testing.assert_allclose(hess, gauss_newton, rtol=0, atol=1e-12 * scale)
    # Positive semidefinite, of rank at most N·k = 12 out of P = 26.
    eigenvalues = hessian_eigenvalues(loss, params, (x, y))
    assert eigenvalues[0] >= -1e-12 * scale
    assert int(jnp.sum(eigenvalues > 1e-10 * scale)) <= 12


def test_exact_hessian_refuses_large_parameter_counts_and_bad_arguments():
    model = _mlp(4, d=3, k=2)
    params, x = _init(model, 0), _normal(1, (6, 3))
    args = (x, model.apply_fn(params, x))
    with pytest.raises(ValueError, match="26 parameters.*use lanczos_eigenvalues"):
        hessian_matrix(_mse(model), params, args, max_params=25)
    with pytest.raises(ValueError, match="needs a PRNG key"):
        smallest_eigenvalue(_mse(model), params, args, method="lanczos")
    with pytest.raises(ValueError, match="choose 'exact' or 'lanczos'"):
        smallest_eigenvalue(_mse(model), params, args, method="power")
    with pytest.raises(ValueError, match=r"must lie in \[1, 26\]"):
        lanczos_eigenvalues(_mse(model), params, jax.random.PRNGKey(0), 27, args)


# --- Lanczos ------------------------------------------------------------------------------

def test_lanczos_extremes_match_the_exact_spectrum(x64):
    model = _mlp(20, d=5, k=1)  # P = 5·20 + 20 + 20 + 1 = 141
    params = _init(model, 0)
    x, y = _normal(1, (30, 5)), _normal(2, (30, 1))
    loss = _mse(model)
    exact = np.linalg.eigvalsh(np.asarray(hessian_matrix(loss, params, (x, y)), np.float64))
    assert exact[0] < 0 < exact[-1]  # an indefinite Hessian away from a minimum
    ritz = lanczos_eigenvalues(loss, params, jax.random.PRNGKey(3), 70, (x, y))
    assert ritz.shape == (70,) and ritz.dtype == params[1][0].dtype
    ritz = np.asarray(ritz)
    assert np.all(np.diff(ritz) >= 0)
    # The extremes are outliers of this spectrum and converge to roundoff within 70 steps
    # (measured: 1e-16 in float64, 5e-8 in float32, relative to ‖H‖).
    tol = (1e-10 if x64 else 1e-5) * _spectral_norm(exact)
    np.testing.assert_allclose(ritz[[0, -1]], exact[[0, -1]], rtol=0, atol=tol)
    # Interlacing: every Ritz value lies in [λ_min, λ_max]; the smallest bounds λ_min above.
    assert exact[0] - tol <= ritz[0] and ritz[-1] <= exact[-1] + tol
    np.testing.assert_allclose(
        smallest_eigenvalue(loss, params, (x, y), method="lanczos",
                            key=jax.random.PRNGKey(3), num_iters=70),
        smallest_eigenvalue(loss, params, (x, y)), rtol=0, atol=tol)


def _quadratic(params, diagonal):
    """½ Σ_i d_i θ_i², whose Hessian is diag(d)."""
    return 0.5 * jnp.sum(diagonal * params ** 2)


@pytest.mark.parametrize("diagonal", [
    np.linspace(-2.0, 3.0, 30),                    # distinct: at m = P, every eigenvalue
    np.repeat([-1.0, 0.5, 2.0], [5, 15, 10]),      # 3 distinct: Krylov space exhausted at 3
    np.full(30, 2.0),                              # H = 2·I: Hv − αv is exactly 0
], ids=["distinct", "three-distinct", "identity"])
def test_lanczos_on_known_diagonal_hessians(x64, diagonal):
    diagonal = jnp.asarray(diagonal, jnp.zeros(()).dtype)
    params = _normal(0, (30,))
    ritz = np.asarray(lanczos_eigenvalues(_quadratic, params, jax.random.PRNGKey(1), 30,
                                          (diagonal,)))
    tol = 1e-12 if x64 else 1e-5  # ‖H‖ ≤ 3: a few roundings of ε
    assert np.all(np.isfinite(ritz))
    # All Ritz values lie in the spectrum's range; the extremes are found.
    assert diagonal.min() - tol <= ritz[0] and ritz[-1] <= diagonal.max() + tol
    np.testing.assert_allclose(ritz[[0, -1]], [diagonal.min(), diagonal.max()], rtol=0,
                               atol=tol)
    if diagonal.size == np.unique(diagonal).size:
        np.testing.assert_allclose(ritz, np.sort(diagonal), rtol=0, atol=tol)
    else:  # every Ritz value is (close to) an eigenvalue
        distance = np.min(np.abs(ritz[:, None] - np.unique(diagonal)), axis=1)
        assert distance.max() <= 1e3 * tol


def test_lanczos_is_jittable_and_vmappable_over_points_data_and_keys(float64):
    # Batched over keys, points and data (the diagonal), restarts (H = 2·I) included.
    keys = jax.random.split(jax.random.PRNGKey(3), 3)
    points = _normal(0, (3, 20))
    diagonals = jnp.stack([jnp.linspace(-1.0, 1.0, 20), jnp.full(20, 2.0),
                           jnp.repeat(jnp.array([0.0, 1.0]), 10)])
    eager = jnp.stack([lanczos_eigenvalues(_quadratic, p, key, 12, (diagonal,))
                       for p, key, diagonal in zip(points, keys, diagonals, strict=True)])
    batched = jax.jit(jax.vmap(
        lambda p, key, diagonal: lanczos_eigenvalues(_quadratic, p, key, 12, (diagonal,))))
    np.testing.assert_allclose(batched(points, keys, diagonals), eager, rtol=0, atol=1e-12)


def test_hessian_vector_product_matches_the_matrix(float64):
    model = _mlp(3, d=2, k=2)
    params, x, y = _init(model, 0), _normal(1, (5, 2)), _normal(2, (5, 2))
    flat, unravel = ravel_pytree(params)
    v, loss = _normal(3, flat.shape), _mse(model)
    product = jax.jit(hessian_vector_product, static_argnums=0)(loss, params, unravel(v),
                                                                (x, y))
    np.testing.assert_allclose(ravel_pytree(product)[0],
                               hessian_matrix(loss, params, (x, y)) @ v, rtol=1e-12,
                               atol=1e-14)


# --- Function-preserving embeddings -------------------------------------------------------

def _relative_change(f_new, f_old):
    return float(jnp.max(jnp.abs(f_new - f_old)) / jnp.max(jnp.abs(f_old)))


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("mu", MUS)
def test_split_neuron_preserves_the_function(x64, mu, k):
    d, n = 3, 4
    narrow, wide = _mlp(n, d, k), _mlp(n + 1, d, k)
    params = _init(narrow, k)
    x, y = _normal(1, (25, d)), _normal(2, (25, k))
    split = split_neuron(params, 2, mu)
    (w1, b1), (w2, b2) = split[1], split[3]
    assert (w1.shape, b1.shape, w2.shape, b2.shape) == ((d, n + 1), (1, n + 1), (n + 1, k),
                                                        (1, k))
    assert w1.dtype == params[1][0].dtype
    np.testing.assert_array_equal(w1[:, n], params[1][0][:, 2])
    np.testing.assert_array_equal(b1[:, n], params[1][1][:, 2])
    c = math.sqrt((n + 1) / n)
    np.testing.assert_allclose(w2[2] + w2[n], c * params[3][0][2], rtol=1e-6)
    tol = 1e-12 if x64 else 1e-6  # ε·(a few terms): 2e-16 / 1e-7
    f = narrow.apply_fn(params, x)
    assert _relative_change(wide.apply_fn(split, x), f) <= tol
    assert _relative_change(narrow.apply_fn(split, x), f) <= tol  # stax ntk reads the fan-in
    assert abs(_mse(wide)(split, x, y) / _mse(narrow)(params, x, y) - 1) <= tol


@pytest.mark.parametrize("k", [1, 3])
def test_add_inactive_neuron_preserves_the_function(x64, k):
    d, n = 3, 4
    narrow, wide = _mlp(n, d, k), _mlp(n + 1, d, k)
    params = _init(narrow, k)
    x, y = _normal(1, (25, d)), _normal(2, (25, k))
    added = add_inactive_neuron(params, jax.random.PRNGKey(7))
    (w1, b1), (w2, _) = added[1], added[3]
    assert (w1.shape, b1.shape, w2.shape) == ((d, n + 1), (1, n + 1), (n + 1, k))
    np.testing.assert_array_equal(w2[n], 0)
    assert jnp.all(w1[:, n] != 0) and b1[0, n] != 0  # a fresh draw, not a copy or zeros
    tol = 1e-12 if x64 else 1e-6
    f = narrow.apply_fn(params, x)
    assert _relative_change(wide.apply_fn(added, x), f) <= tol
    assert abs(_mse(wide)(added, x, y) / _mse(narrow)(params, x, y) - 1) <= tol


@pytest.mark.parametrize("mu", [-0.5, 1.7])
def test_embeddings_preserve_the_function_under_mup_and_flat_biases(float64, mu):
    d, n, k = 3, 4, 2
    cfg = {"parameterization": "mup", "base_width": 3}
    narrow, wide = _mlp(n, d, k, **cfg), _mlp(n + 1, d, k, **cfg)
    params = _init(narrow, 0)
    x = _normal(1, (25, d))
    f = narrow.apply_fn(params, x)
    for embedded in (split_neuron(params, 0, mu, parameterization="mup"),
                     add_inactive_neuron(params, jax.random.PRNGKey(5), parameterization="mup")):
        assert _relative_change(wide.apply_fn(embedded, x), f) <= 1e-12
    # A hidden bias of shape (n,) instead of stax's (1, n) keeps its shape.
    flat_bias = [(), (params[1][0], params[1][1][0]), (), params[3]]
    split = split_neuron(flat_bias, 1, mu, parameterization="mup")
    assert split[1][1].shape == (n + 1,)
    assert _relative_change(wide.apply_fn(split, x), f) <= 1e-12


def test_split_neuron_is_traceable_in_unit_and_share(float64):
    model = _mlp(4, d=3, k=2)
    params = _init(model, 0)
    mus = jnp.array(MUS)
    batched = jax.jit(jax.vmap(split_neuron, in_axes=(None, None, 0)))(params, jnp.array(3), mus)
    for i, mu in enumerate(MUS):
        eager = split_neuron(params, 3, mu)
        for a, b in zip(jax.tree_util.tree_leaves(eager),
                        jax.tree_util.tree_leaves(batched), strict=True):
            np.testing.assert_allclose(b[i], a, rtol=1e-15)


def test_embeddings_refuse_other_networks_and_units():
    params = _init(_mlp(4, d=3, k=2), 0)
    deep = _init(build_model(ModelConfig(arch="mlp", depth=2), 4, (3,), 2), 0)
    with pytest.raises(ValueError, match="one-hidden-layer MLP"):
        split_neuron(deep, 0, 0.5)
    with pytest.raises(ValueError, match="one-hidden-layer MLP"):
        add_inactive_neuron(deep, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="'standard'"):
        split_neuron(params, 0, 0.5, parameterization="standard")
    with pytest.raises(IndexError, match="j = 4"):
        split_neuron(params, 4, 0.5)


# --- Embeddings of a critical point ----------------------------------------------------------

@pytest.fixture(scope="module")
def critical_point():
    """A student of width 2 fitted by BFGS to a width-4 teacher: a critical point at
    non-zero loss, gradient norm ≤ 1e-10 (float64 numpy arrays)."""
    d, n, k = 2, 2, 1
    with jax.enable_x64(True):
        teacher, student = _mlp(4, d, k), _mlp(n, d, k)
        x = _normal(1, (20, d))
        y = teacher.apply_fn(_init(teacher, 2), x)
        flat, unravel = ravel_pytree(_init(student, 11))
        loss = jax.jit(lambda theta: _mse(student)(unravel(theta), x, y))
        theta = jax.scipy.optimize.minimize(loss, flat, method="BFGS",
                                            options={"gtol": 1e-12, "maxiter": 2000}).x
        assert float(jnp.linalg.norm(jax.grad(loss)(theta))) <= 1e-10
        assert float(loss(theta)) > 1e-6  # the student cannot fit the teacher
        return jax.tree_util.tree_map(np.asarray, (unravel(theta), x, y))


@functools.cache
def _jitted_grad(loss):
    return jax.jit(jax.grad(loss))


def _grad_norm(loss, params, x, y):
    return float(jnp.linalg.norm(ravel_pytree(_jitted_grad(loss)(params, x, y))[0]))


@pytest.mark.parametrize("mu", MUS)
def test_split_of_a_critical_point_is_critical_with_a_flat_direction(float64, critical_point,
                                                                     mu):
    params, x, y = critical_point
    wide_loss = _mse(_mlp(3, 2, 1))
    split = split_neuron(params, 1, mu)
    assert abs(wide_loss(split, x, y) / _mse(_mlp(2, 2, 1))(params, x, y) - 1) <= 1e-12
    # Each copy's gradient is μ or 1 − μ times unit 1's, scaled: ≤ 1e-10 · O(1).
    assert _grad_norm(wide_loss, split, x, y) <= 1e-9
    # The split line μ ↦ split_neuron(params, 1, μ) consists of critical points, so its
    # direction v is a null vector of the Hessian: ‖H v‖ ≈ 0 relative to ‖H‖·‖v‖.
    _, direction = jax.jvp(lambda m: split_neuron(params, 1, m), (mu,), (1.0,))
    v = ravel_pytree(direction)[0]
    hess = hessian_matrix(wide_loss, split, (x, y))
    hess_norm = _spectral_norm(jnp.linalg.eigvalsh(hess))
    assert float(jnp.linalg.norm(hess @ v)) <= 1e-8 * hess_norm * float(jnp.linalg.norm(v))


def test_inactive_neuron_at_a_critical_point(float64, critical_point):
    params, x, y = critical_point
    n, d = 2, 2
    wide = _mlp(n + 1, d, 1)
    added = add_inactive_neuron(params, jax.random.PRNGKey(4))
    grads = _jitted_grad(_mse(wide))(added, x, y)
    (gw1, gb1), (gw2, gb2) = grads[1], grads[3]
    # Zero (≤ 1e-9) everywhere but the new unit's outgoing weight...
    rest = jnp.concatenate([gw1.ravel(), gb1.ravel(), gw2[:n].ravel(), gb2.ravel()])
    assert float(jnp.linalg.norm(rest)) <= 1e-9
    # ...whose gradient is (σ_w/√(n+1))·mean_x h(x)·r(x), written out by hand (σ_w = √2,
    # σ_b = 0.05: ModelConfig's defaults), and not zero at this non-zero loss.
    (w1, b1), _ = added[1], added[3]
    h = jnp.tanh(math.sqrt(2) / math.sqrt(d) * x @ w1[:, n] + 0.05 * b1[0, n])
    residual = wide.apply_fn(added, x)[:, 0] - y[:, 0]
    expected = math.sqrt(2) / math.sqrt(n + 1) * jnp.mean(h * residual)
    np.testing.assert_allclose(gw2[n, 0], expected, rtol=1e-10)
    assert abs(float(expected)) > 1e-6
    # At zero loss (the student is its own teacher) the whole gradient vanishes.
    y_exact = _mlp(n, d, 1).apply_fn(params, x)
    assert _grad_norm(_mse(wide), added, x, y_exact) <= 1e-14
