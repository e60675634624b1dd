"""ntk_tickets.kernels against independent references, with explicit tolerances.

References: J Jᵀ from ``jax.jacrev``; discrete gradient descent on the linearized model
(``ntk_tickets.linear``); kernel regression with a dense linear solve.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntk_tickets.config import ModelConfig
from ntk_tickets.errors import UserInputError
from ntk_tickets.kernels import (
    empirical_ntk,
    empirical_ntk_predictions,
    infinite_width_predictions,
    ntk_change,
    ntk_init_error,
    ntk_memory_bytes,
    probe_ntk,
    relative_frobenius,
)
from ntk_tickets.linear import linearize
from ntk_tickets.models import build_model, parameter_count


@functools.partial(jax.jit, static_argnums=0)
def _jacobian_ntk(apply_fn, params, x1, x2):
    """J(x1) J(x2)ᵀ from ``jax.jacrev``, shape (n1, n2, k, k)."""

    def flat_jacobian(x):
        leaves = jax.tree_util.tree_leaves(jax.jacrev(lambda p: apply_fn(p, x))(params))
        n, k = leaves[0].shape[:2]
        return jnp.concatenate([leaf.reshape(n, k, -1) for leaf in leaves], axis=-1)

    return jnp.einsum("ikp,jlp->ijkl", flat_jacobian(x1), flat_jacobian(x2))


@functools.cache  # one apply_fn per architecture, so compiled functions are reused
def _small_mlp(width=12, n_out=3, depth=2, activation="erf", input_dim=5):
    return build_model(ModelConfig(arch="mlp", depth=depth, activation=activation), width,
                       (input_dim,), n_out)


def _inputs(key, n, dim=5):
    return jax.random.normal(jax.random.PRNGKey(key), (n, dim))


def test_ntk_memory_bytes_hand_computed():
    # Jacobians (3 + 2)·4·100 = 2000 scalars; kernel 3·2 traced, (3·4)·(2·4) = 96 full.
    assert ntk_memory_bytes(3, 2, 4, 100, 8) == (2000 + 6) * 8
    assert ntk_memory_bytes(3, 2, 4, 100, 4, trace=False) == (2000 + 96) * 4


@pytest.mark.parametrize("implementation", ["jacobian_contraction", "ntk_vector_products"])
@pytest.mark.parametrize("trace", [True, False], ids=["traced", "full"])
def test_empirical_ntk_matches_jacobian_product_also_when_chunked(float64, trace,
                                                                  implementation):
    model = _small_mlp()
    params = model.init(jax.random.PRNGKey(0))
    x1, x2 = _inputs(1, 5), _inputs(2, 3)
    reference = _jacobian_ntk(model.apply_fn, params, x1, x2)
    reference_sym = _jacobian_ntk(model.apply_fn, params, x1, x1)
    if trace:  # neural-tangents averages (not sums) over traced outputs
        reference = jnp.einsum("ijkk->ij", reference) / 3
        reference_sym = jnp.einsum("ijkk->ij", reference_sym) / 3
    # Tiles of 2 rows: 5 and 3 rows are padded to 6 and 4, then cut back.
    tile = ntk_memory_bytes(2, 2, 3, parameter_count(params), 8, trace)
    for max_bytes in (2**31, tile):
        kwargs = dict(trace=trace, implementation=implementation, max_bytes=max_bytes)
        ntk = empirical_ntk(model.apply_fn, params, x1, x2, **kwargs)
        ntk_sym = empirical_ntk(model.apply_fn, params, x1, **kwargs)
        assert ntk.shape == reference.shape and ntk_sym.shape == reference_sym.shape
        np.testing.assert_allclose(ntk, reference, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(ntk_sym, reference_sym, rtol=1e-10, atol=1e-12)


def test_probe_ntk_matches_jacobian_product_and_vmaps_over_seeds(x64):
    model = _small_mlp()
    params = jax.vmap(model.init)(jax.random.split(jax.random.PRNGKey(0), 2))
    x_probe = _inputs(3, 4)
    kernels = jax.jit(jax.vmap(lambda p: probe_ntk(model.apply_fn, p, x_probe)))(params)
    assert kernels.shape == (2, 4, 4)
    for seed in range(2):
        theta = jax.tree_util.tree_map(lambda a, s=seed: a[s], params)
        full = _jacobian_ntk(model.apply_fn, theta, x_probe, x_probe)
        reference = jnp.einsum("ijkk->ij", full) / 3  # averaged over the 3 outputs
        tol = 1e-12 if x64 else 1e-5
        np.testing.assert_allclose(kernels[seed], reference, rtol=tol, atol=tol)


def test_empirical_ntk_refuses_when_one_row_does_not_fit():
    model = _small_mlp()
    params = model.init(jax.random.PRNGKey(0))
    one_pair = ntk_memory_bytes(1, 1, 3, parameter_count(params), 4)
    with pytest.raises(UserInputError, match="probe_size"):
        empirical_ntk(model.apply_fn, params, _inputs(1, 4), max_bytes=one_pair - 1)


def test_relative_frobenius():
    b = jnp.array([[3.0, 0.0], [0.0, 4.0]])
    a = b + jnp.array([[0.0, 1.0], [0.0, 0.0]])
    assert float(relative_frobenius(a, b)) == pytest.approx(0.2, rel=1e-6)


def test_ntk_init_error_shrinks_with_width():
    """Θ̂_θ0 → Θ at rate O(1/√width) (Jacot et al. 2018; Hanin & Nica 2019).

    Depth-2 NTK-parameterized ReLU MLP, 8 probe points, 3 seeds. Measured mean errors: 0.71
    at width 16, 0.053 at width 1024 (ratio 0.074; the 1/√width rate predicts 0.125). The
    bound 0.25 leaves a 2× margin over the predicted ratio.
    """
    x = _inputs(1, 8)

    def mean_error(width):
        model = _small_mlp(width=width, n_out=2, activation="relu")
        return np.mean([float(ntk_init_error(model.apply_fn, model.kernel_fn,
                                             model.init(jax.random.PRNGKey(s)), x))
                        for s in range(3)])

    narrow, wide = mean_error(16), mean_error(1024)
    assert wide < 0.25 * narrow, (narrow, wide)
    assert wide < 0.15, wide


def test_ntk_init_error_is_zero_against_itself_and_ntk_change_detects_motion():
    model = _small_mlp(activation="relu")
    theta0 = model.init(jax.random.PRNGKey(0))
    x = _inputs(1, 6)

    def own_kernel_fn(x1, x2, get):
        assert get == "ntk"
        return empirical_ntk(model.apply_fn, theta0, x1, x2)

    assert float(ntk_init_error(model.apply_fn, own_kernel_fn, theta0, x)) < 1e-6
    assert float(ntk_change(model.apply_fn, theta0, theta0, x)) == 0.0
    direction = model.init(jax.random.PRNGKey(1))
    theta = jax.tree_util.tree_map(lambda a, b: a + 0.1 * b, theta0, direction)
    assert float(ntk_change(model.apply_fn, theta, theta0, x)) > 1e-3


def _linear_gradient_descent(apply_fn, theta0, x_train, y_train, x_test, eta, n_steps):
    """Discrete full-batch GD on ½·mean((f_lin − y)²); outputs after 0..n_steps steps."""
    f_lin = linearize(apply_fn)

    @jax.jit
    def run(theta0, x_train, y_train, x_test):
        def loss(theta):
            return 0.5 * jnp.mean((f_lin(theta, theta0, x_train) - y_train) ** 2)

        def step(theta, _):
            outputs = (f_lin(theta, theta0, x_train), f_lin(theta, theta0, x_test))
            theta = jax.tree_util.tree_map(lambda p, g: p - eta * g, theta, jax.grad(loss)(theta))
            return theta, outputs

        return jax.lax.scan(step, theta0, None, length=n_steps + 1)[1]

    return run(theta0, x_train, y_train, x_test)


def _regression(n_out=3, width=32):
    model = _small_mlp(width=width, n_out=n_out, activation="relu", input_dim=4)
    x_train, x_test = _inputs(1, 8, 4), _inputs(2, 5, 4)
    y_train = jax.random.normal(jax.random.PRNGKey(3), (8, n_out))
    return model, x_train, y_train, x_test


def test_empirical_ntk_predictions_match_gradient_descent_on_the_linear_model(x64):
    """Closed-form gradient flow vs discrete GD on f_lin with step size η.

    Per kernel eigenmode (eigenvalue λ, a = ηλ/(n·k)) GD gives (1 − a)^s and the flow
    e^{−as}; their gap is ≈ s·a²·e^{−as}/2, first order in η at fixed ηs. Width-32 ReLU MLP,
    8 points, 3 outputs (full kernel, so output couplings matter), η = 0.25, up to 1600
    steps (the train loss falls from ~1 to ~1e-2 in float32, ~1e-7 in float64). Measured
    largest absolute gap over steps 0, 100, 400, 1600: 2.4e-3 (float64), 4.5e-3 (float32,
    whose random draws differ), against outputs that move by O(1); halving η halves it (next
    test). Tolerance 1e-2, while the traced kernel in place of the full one gives gaps of
    0.28–1.7 and a time scale 10 % off gives 0.04–0.2.
    """
    model, x_train, y_train, x_test = _regression()
    theta0 = model.init(jax.random.PRNGKey(0))
    eta, steps = 0.25, np.array([0, 100, 400, 1600])
    f_train, f_test = empirical_ntk_predictions(model.apply_fn, theta0, x_train, y_train,
                                                x_test, eta, steps)
    assert f_train.shape == (4, 8, 3) and f_test.shape == (4, 5, 3)
    atol0 = 1e-12 if x64 else 1e-6
    np.testing.assert_allclose(f_train[0], model.apply_fn(theta0, x_train), atol=atol0)
    np.testing.assert_allclose(f_test[0], model.apply_fn(theta0, x_test), atol=atol0)
    gd_train, gd_test = _linear_gradient_descent(model.apply_fn, theta0, x_train, y_train,
                                                 x_test, eta, int(steps[-1]))
    np.testing.assert_allclose(f_train, gd_train[steps], atol=1e-2, rtol=0)
    np.testing.assert_allclose(f_test, gd_test[steps], atol=1e-2, rtol=0)
    assert float(jnp.max(jnp.abs(f_test[-1] - f_test[0]))) > 0.1  # the comparison is not idle


def test_empirical_ntk_prediction_gap_to_gradient_descent_is_first_order_in_eta(float64):
    """At fixed ηs the GD-vs-flow gap halves when η halves: it is discretization error.

    Measured ratios 1.98–2.01 (train and test, η = 1 vs 0.5); bounds 1.8–2.2.
    """
    model, x_train, y_train, x_test = _regression()
    theta0 = model.init(jax.random.PRNGKey(0))

    def gap(eta, n_steps):
        steps = np.array([0, 1, 4, 16]) * (n_steps // 16)
        f_train, f_test = empirical_ntk_predictions(model.apply_fn, theta0, x_train, y_train,
                                                    x_test, eta, steps)
        gd_train, gd_test = _linear_gradient_descent(model.apply_fn, theta0, x_train, y_train,
                                                     x_test, eta, n_steps)
        return np.array([float(jnp.max(jnp.abs(f_train - gd_train[steps]))),
                         float(jnp.max(jnp.abs(f_test - gd_test[steps])))])

    ratios = gap(1.0, 400) / gap(0.5, 800)
    assert np.all((1.8 < ratios) & (ratios < 2.2)), ratios


def test_infinite_width_predictions_converge_to_kernel_regression(float64):
    """At t → ∞ the ensemble mean is K_*K⁻¹y (NTK and NNGP), the NNGP variance the GP
    posterior variance; at t = 0 the mean is 0 and the variance is the NNGP prior."""
    model, x_train, y_train, x_test = _regression(n_out=2)
    steps = np.array([0.0, 10.0, 1e12])
    out = infinite_width_predictions(model.kernel_fn, x_train, y_train, x_test, 0.5, steps)
    assert set(out) == {"ntk", "nngp"}
    prior = jnp.diagonal(model.kernel_fn(x_test, None, "nngp"))
    for get, (mean_train, mean_test, var_test) in out.items():
        assert mean_train.shape == (3, 8, 2) and mean_test.shape == (3, 5, 2)
        assert var_test.shape == (3, 5)
        k_dd = np.asarray(model.kernel_fn(x_train, None, get))
        k_td = np.asarray(model.kernel_fn(x_test, x_train, get))
        np.testing.assert_allclose(mean_test[-1], k_td @ np.linalg.solve(k_dd, y_train),
                                   rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(mean_train[-1], y_train, rtol=1e-7, atol=1e-9)
        np.testing.assert_array_equal(mean_train[0], 0.0)
        np.testing.assert_array_equal(mean_test[0], 0.0)
        np.testing.assert_allclose(var_test[0], prior, rtol=1e-10)
        assert float(jnp.min(var_test)) >= -1e-10
        if get == "nngp":
            k_tt = np.asarray(model.kernel_fn(x_test, None, "nngp"))
            posterior = k_tt - k_td @ np.linalg.solve(k_dd, k_td.T)
            np.testing.assert_allclose(var_test[-1], np.diagonal(posterior), rtol=1e-6,
                                       atol=1e-9)


def test_infinite_width_predictions_with_diag_reg_are_ridge_regression(float64):
    """``diag_reg`` is relative to the mean diagonal of the train kernel (neural-tangents)."""
    model, x_train, y_train, x_test = _regression(n_out=2)
    out = infinite_width_predictions(model.kernel_fn, x_train, y_train, x_test, 1.0,
                                     np.array([1e12]), get=("nngp",), diag_reg=0.1)
    k_dd = np.asarray(model.kernel_fn(x_train, None, "nngp"))
    k_td = np.asarray(model.kernel_fn(x_test, x_train, "nngp"))
    ridge = k_dd + 0.1 * np.mean(np.diagonal(k_dd)) * np.eye(len(k_dd))
    mean_train, mean_test, _ = out["nngp"]
    np.testing.assert_allclose(mean_test[0], k_td @ np.linalg.solve(ridge, y_train), rtol=1e-7)
    np.testing.assert_allclose(mean_train[0], k_dd @ np.linalg.solve(ridge, y_train), rtol=1e-7)


# ---------------------------------------------------------------- ridge, t → ∞, output scale


def _flat(kernel):
    """A full kernel (n1, n2, k, k) as the (n1·k, n2·k) matrix of flattened (point, output)."""
    n1, n2, k, _ = kernel.shape
    return np.asarray(kernel).transpose(0, 2, 1, 3).reshape(n1 * k, n2 * k)


def _hand_flow(k_dd, k_td, g0_train, g0_test, y, eta, t, ridge):
    """Gradient flow on ½·mean((f − y)²) with the kernel K = k_dd + ridge·mean(diag k_dd)·I,
    evaluated at test inputs through k_td (numpy, by eigendecomposition; Lee et al. 2019
    eq. 9–11): g0_test + k_td K⁻¹ (e^{−ηtK/N} − I)(g0_train − y), N = y.size; at t = None
    the limit g0_test + k_td K⁻¹ (y − g0_train). Outputs are flattened like ``y.ravel()``
    when the kernels are flat full kernels, or (n, k) with one kernel per output."""
    k_reg = k_dd + ridge * np.mean(np.diagonal(k_dd)) * np.eye(len(k_dd))
    evals, evecs = np.linalg.eigh(k_reg)
    factor = -1 / evals if t is None else np.expm1(-eta * t * evals / y.size) / evals
    residual = (g0_train - y).reshape(len(k_dd), -1)
    return g0_test.reshape(len(k_td), -1) + k_td @ (evecs * factor) @ evecs.T @ residual


@pytest.mark.parametrize("ridge", [0.0, 0.1])
@pytest.mark.parametrize("t", [None, 30.0])
def test_empirical_ntk_predictions_are_hand_computed_ridge_flow(x64, t, ridge):
    """entk against numpy with the full J Jᵀ from ``jax.jacrev``: test outputs
    f0_* + Θ_*(Θ + λ·mean diag Θ)⁻¹(e^{−ηtK/N} − I)(f0 − y) (at t = ∞ kernel ridge regression
    on the residual y − f0), training outputs the same formula at the training inputs.

    Measured largest deviation: 2e-14 (float64), 8e-6 (float32, outputs up to 7, kernel
    condition number 1.5e3); the tolerances are 1e-9 and 1e-4·max|f|.
    """
    model, x_train, y_train, x_test = _regression()
    theta0 = model.init(jax.random.PRNGKey(0))
    eta = 0.5
    f_train, f_test = empirical_ntk_predictions(
        model.apply_fn, theta0, x_train, y_train, x_test, eta,
        None if t is None else np.array([t]), diag_reg=ridge)
    assert f_train.shape == (1, 8, 3) and f_test.shape == (1, 5, 3)
    k_dd = _flat(_jacobian_ntk(model.apply_fn, theta0, x_train, x_train))
    k_td = _flat(_jacobian_ntk(model.apply_fn, theta0, x_test, x_train))
    f0_train, f0_test = (np.asarray(model.apply_fn(theta0, x)).ravel()
                         for x in (x_train, x_test))
    y = np.asarray(y_train).ravel()
    want_test = _hand_flow(k_dd, k_td, f0_train, f0_test, y, eta, t, ridge).reshape(5, 3)
    want_train = _hand_flow(k_dd, k_dd, f0_train, f0_train, y, eta, t, ridge).reshape(8, 3)
    tol = 1e-9 if x64 else 1e-4 * float(np.max(np.abs(want_test)))
    np.testing.assert_allclose(f_test[0], want_test, atol=tol, rtol=0)
    np.testing.assert_allclose(f_train[0], want_train, atol=tol, rtol=0)
    if t is None and ridge == 0:
        np.testing.assert_allclose(f_train[0], y_train, atol=tol)  # interpolates
    if ridge > 0:  # and with a ridge it does not
        assert float(np.max(np.abs(f_train[0] - y_train))) > 0.01


def _ntk_posterior(theta_dd, theta_td, k_dd, k_td, k_tt, ridge):
    """The t → ∞ covariance of the ensemble trained with the NTK Θ (Lee et al. 2019,
    eq. 16), Θ regularized as in :func:`_hand_flow`; K the NNGP kernels (numpy)."""
    theta_reg = theta_dd + ridge * np.mean(np.diagonal(theta_dd)) * np.eye(len(theta_dd))
    a = theta_td @ np.linalg.inv(theta_reg)
    cross = a @ k_td.T
    return k_tt + a @ k_dd @ a.T - cross - cross.T


@pytest.mark.parametrize("ridge", [0.0, 0.1])
def test_infinite_width_predictions_at_infinite_time_are_hand_computed(float64, ridge):
    """ntk and nngp at t = ∞ (``steps=None``) against numpy kernel ridge regression
    K_*(K + λ'I)⁻¹y, λ' = λ·mean diag K; the NNGP variance is the GP posterior variance
    with observation noise λ', K_** − K_*(K + λ'I)⁻¹K_*ᵀ, the NTK variance that of the
    ensemble (Lee et al. 2019, eq. 16) with Θ + λ'I in place of Θ; with α the variance is α²
    as large, centred it is 0, and the mean never changes. Measured deviations ≤ 1e-14;
    tolerance 1e-9."""
    model, x_train, y_train, x_test = _regression(n_out=2)
    y = np.asarray(y_train)
    kernels = {get: [np.asarray(model.kernel_fn(a, b, get)) for a, b in
                     ((x_train, None), (x_test, x_train), (x_test, None))]
               for get in ("ntk", "nngp")}
    k_dd, k_td, k_tt = kernels["nngp"]
    k_noisy = k_dd + ridge * np.mean(np.diagonal(k_dd)) * np.eye(8)
    variances = {
        "nngp": np.diagonal(k_tt - k_td @ np.linalg.solve(k_noisy, k_td.T)),
        "ntk": np.diagonal(_ntk_posterior(*kernels["ntk"][:2], k_dd, k_td, k_tt, ridge))}
    for alpha, center in ((1.0, False), (3.0, False), (3.0, True)):
        out = infinite_width_predictions(model.kernel_fn, x_train, y_train, x_test, 0.5, None,
                                         diag_reg=ridge, output_scale=alpha, center=center)
        for get, (mean_train, mean_test, var_test) in out.items():
            theta_dd, theta_td, _ = kernels[get]
            zeros_train, zeros_test = np.zeros((8, 2)), np.zeros((5, 2))
            np.testing.assert_allclose(mean_test[0], _hand_flow(
                theta_dd, theta_td, zeros_train, zeros_test, y, 0.5, None, ridge), atol=1e-9)
            np.testing.assert_allclose(mean_train[0], _hand_flow(
                theta_dd, theta_dd, zeros_train, zeros_train, y, 0.5, None, ridge), atol=1e-9)
            scale = 0.0 if center else alpha**2
            np.testing.assert_allclose(var_test[0], scale * variances[get], atol=1e-9, rtol=0)


def test_output_scale_and_centring_change_only_the_initial_outputs_of_entk(x64):
    """The trained function α·f (α·(f − f0) when centred) at learning rate η/α² has kernel
    α²Θ̂ and so the closed form of Θ̂ at η, started from α·f0 (or 0).

    Checked two ways: against the hand-computed flow of Θ̂ from g0 = α·f0 or 0 (tolerances
    as in the plain test above), and against discrete gradient descent on the linearization
    of g itself at η/α². GD and flow differ by O(ηλ_max/(n·k))·|g0 − y| (module docstring of
    ``ntk_tickets.kernels``): measured largest gaps 1.2e-3 to 1.7e-3 × max|g0 − y| (which is
    11.5 uncentred, 2.0 centred), tolerance 1e-2 × max|g0 − y|. A centred model's
    predictions do not depend on α.
    """
    model, x_train, y_train, x_test = _regression()
    theta0 = model.init(jax.random.PRNGKey(0))
    eta, alpha, steps = 0.25, 4.0, np.array([0, 100, 400])
    k_dd = _flat(_jacobian_ntk(model.apply_fn, theta0, x_train, x_train))
    k_td = _flat(_jacobian_ntk(model.apply_fn, theta0, x_test, x_train))
    f0_train, f0_test = (np.asarray(model.apply_fn(theta0, x)) for x in (x_train, x_test))
    y = np.asarray(y_train).ravel()
    centred = {}
    for center in (False, True):
        g0_train, g0_test = ((0 * f if center else alpha * f).ravel()
                             for f in (f0_train, f0_test))
        f_train, f_test = empirical_ntk_predictions(
            model.apply_fn, theta0, x_train, y_train, x_test, eta, steps, output_scale=alpha,
            center=center)
        for i, t in enumerate(steps):
            want = _hand_flow(k_dd, k_td, g0_train, g0_test, y, eta, t, 0.0).reshape(5, 3)
            tol = 1e-9 if x64 else 1e-4 * float(np.max(np.abs(want)))
            np.testing.assert_allclose(f_test[i], want, atol=tol, rtol=0)

        def g(params, x, center=center):
            out = alpha * model.apply_fn(params, x)
            return out - alpha * model.apply_fn(theta0, x) if center else out

        gd_train, gd_test = _linear_gradient_descent(g, theta0, x_train, y_train, x_test,
                                                     eta / alpha**2, int(steps[-1]))
        scale = float(np.max(np.abs(g0_train - y)))  # the gap is relative to g0 − y
        np.testing.assert_allclose(f_train, gd_train[steps], atol=1e-2 * scale, rtol=0)
        np.testing.assert_allclose(f_test, gd_test[steps], atol=1e-2 * scale, rtol=0)
        if center:
            centred[alpha] = f_test
    _, f_test_one = empirical_ntk_predictions(model.apply_fn, theta0, x_train, y_train,
                                              x_test, eta, steps, center=True)
    np.testing.assert_allclose(f_test_one, centred[alpha], atol=1e-9 if x64 else 1e-5)


def test_infinite_width_variance_scales_with_the_output_scale_at_every_time(x64):
    """Over initializations the mean does not depend on α and the variance is α²·(α = 1),
    0 when centred, at every t (the randomness is the initial function's)."""
    model, x_train, y_train, x_test = _regression(n_out=2)
    steps = np.array([0.0, 10.0, 100.0])
    plain = infinite_width_predictions(model.kernel_fn, x_train, y_train, x_test, 0.5, steps)
    for alpha, center in ((0.5, False), (3.0, False), (3.0, True)):
        scaled = infinite_width_predictions(model.kernel_fn, x_train, y_train, x_test, 0.5,
                                            steps, output_scale=alpha, center=center)
        for get in ("ntk", "nngp"):
            for a, b in zip(plain[get][:2], scaled[get][:2], strict=True):
                np.testing.assert_array_equal(a, b)
            want = 0.0 if center else alpha**2 * np.asarray(plain[get][2])
            np.testing.assert_allclose(scaled[get][2], want, rtol=1e-6, atol=0)
    assert float(np.min(plain["nngp"][2][0])) > 0.1  # the prior variance is not idle
