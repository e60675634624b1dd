"""At-initialization pruning criteria, each against an independent hand computation.

SNIP against a closed-form numpy gradient, GraSP against the full Hessian, SynFlow against
the hand-derived path-norm gradient and its conservation law, the NTK saliency against the
exact Jacobian (with tolerances set by the estimator's own variance), and the dispatcher.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from ntk_tickets.config import ModelConfig
from ntk_tickets.criteria import (
    AT_INIT_CRITERIA,
    at_init_scores,
    grasp_scores,
    magnitude_scores,
    ntk_saliency_scores,
    ntk_trace_estimate,
    snip_scores,
    synflow_scores,
)
from ntk_tickets.models import build_model
from ntk_tickets.optimizers import LOSSES

INPUT_SHAPE = (2,)
N_OUT = 2

# Jitted versions (static: functions and shapes) keep the file fast; params are arguments.
at_init_scores_jit = jax.jit(at_init_scores, static_argnums=(0, 1, 5, 8))
snip_jit = jax.jit(snip_scores, static_argnums=(0, 4))
synflow_jit = jax.jit(synflow_scores, static_argnums=(0, 2))
ntk_saliency_jit = jax.jit(ntk_saliency_scores, static_argnums=(0, 4))


def _stax_net(depth=1, activation="relu", b_std=0.05, input_shape=INPUT_SHAPE, seed=0):
    """A width-3 stax MLP and its params: [(), (W1, b1), (), ..., (W, b)]."""
    model = build_model(ModelConfig(depth=depth, activation=activation, b_std=b_std), 3,
                        input_shape, N_OUT)
    return model, model.init(jax.random.PRNGKey(seed))


def _data(loss, n=5, seed=1):
    kx, ky = jax.random.split(jax.random.PRNGKey(seed))
    x = jax.random.normal(kx, (n, *INPUT_SHAPE))
    if loss == "mse":
        return x, jax.random.normal(ky, (n, N_OUT))
    return x, jax.random.randint(ky, (n,), 0, N_OUT)


def _all_args():
    """Every argument of ``at_init_scores`` after ``method`` for the depth-1 stax net."""
    model, params = _stax_net()
    x, y = _data("mse")
    x_probe = jax.random.normal(jax.random.PRNGKey(7), (4, *INPUT_SHAPE))
    return (model.apply_fn, params, x, y, LOSSES["mse"], jax.random.PRNGKey(3), x_probe,
            INPUT_SHAPE)


def _tols(x64):
    return {"rtol": 1e-12, "atol": 1e-14} if x64 else {"rtol": 2e-5, "atol": 1e-6}


# --- structure -------------------------------------------------------------------------


@pytest.mark.parametrize("method", AT_INIT_CRITERIA)
def test_scores_have_the_structure_shapes_and_dtype_of_params(x64, method):
    args = _all_args()
    params = args[1]
    scores = at_init_scores_jit(method, *args)
    assert jax.tree_util.tree_structure(scores) == jax.tree_util.tree_structure(params)
    assert scores[0] == () and scores[2] == ()  # Flatten and Relu stay empty tuples
    for s, p in zip(jax.tree_util.tree_leaves(scores), jax.tree_util.tree_leaves(params),
                    strict=True):
        assert s.shape == p.shape and s.dtype == p.dtype
        assert np.all(np.isfinite(s))


def test_magnitude_is_the_absolute_value():
    params = _all_args()[1]
    for s, p in zip(jax.tree_util.tree_leaves(magnitude_scores(params)),
                    jax.tree_util.tree_leaves(params), strict=True):
        np.testing.assert_array_equal(s, np.abs(p))


# --- SNIP ------------------------------------------------------------------------------


def _two_layer(params, x):
    """f(x) = relu(x W1 + b1) W2 + b2, params [(W1, b1), (W2, b2)]."""
    (w1, b1), (w2, b2) = params
    return jax.nn.relu(x @ w1 + b1) @ w2 + b2


def _two_layer_grad_numpy(params, x, y, loss):
    """∂L/∂θ of :func:`_two_layer` by hand (backpropagation written out), in numpy."""
    (w1, b1), (w2, b2) = [[np.asarray(a) for a in layer] for layer in params]
    x, y = np.asarray(x), np.asarray(y)
    pre = x @ w1 + b1
    h = np.maximum(pre, 0)
    f = h @ w2 + b2
    n, k = f.shape
    if loss == "mse":  # L = ½·mean((f − y)²) over n·k entries
        df = (f - y) / (n * k)
    else:  # L = mean softmax cross-entropy: ∂L/∂f = (softmax(f) − onehot(y)) / n
        p = np.exp(f - f.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        df = (p - np.eye(k)[y]) / n
    dh = (df @ w2.T) * (pre > 0)
    return [(x.T @ dh, dh.sum(axis=0)), (h.T @ df, df.sum(axis=0))]


def _two_layer_params(d=2, h=3, k=N_OUT, seed=2):
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(seed), 4)
    return [(jax.random.normal(k1, (d, h)), 0.1 * jax.random.normal(k2, (h,))),
            (jax.random.normal(k3, (h, k)), 0.1 * jax.random.normal(k4, (k,)))]


@pytest.mark.parametrize("loss", ["mse", "xent"])
def test_snip_equals_hand_gradient_times_weights(x64, loss):
    params = _two_layer_params()
    x, y = _data(loss)
    scores = snip_jit(_two_layer, params, x, y, LOSSES[loss])
    grads = _two_layer_grad_numpy(params, x, y, loss)
    expected = jax.tree_util.tree_map(lambda g, t: np.abs(g * np.asarray(t)), grads, params)
    for s, e in zip(jax.tree_util.tree_leaves(scores), jax.tree_util.tree_leaves(expected),
                    strict=True):
        np.testing.assert_allclose(s, e, **_tols(x64))


# --- GraSP -----------------------------------------------------------------------------


@pytest.mark.parametrize(("loss", "activation"), [("mse", "relu"), ("xent", "erf")])
def test_grasp_equals_weights_times_full_hessian_times_gradient(x64, loss, activation):
    model, params = _stax_net(activation=activation)
    x, y = _data(loss)
    flat, unravel = ravel_pytree(params)

    def loss_of_flat(v):
        return LOSSES[loss](model.apply_fn(unravel(v), x), y)

    hessian = jax.jit(jax.hessian(loss_of_flat))(flat)
    expected = flat * (hessian @ jax.jit(jax.grad(loss_of_flat))(flat))
    scores, _ = ravel_pytree(jax.jit(grasp_scores, static_argnums=(0, 4))(
        model.apply_fn, params, x, y, LOSSES[loss]))
    scale = np.max(np.abs(expected))
    np.testing.assert_allclose(scores, expected, rtol=_tols(x64)["rtol"],
                               atol=(1e-13 if x64 else 1e-5) * scale)


# --- SynFlow ---------------------------------------------------------------------------


def _bias_free_two_layer(params, x):
    """f(x) = relu(x W1) W2; SynFlow calls it with |W1|, |W2|."""
    w1, w2 = params
    return jax.nn.relu(x @ w1) @ w2


@pytest.mark.parametrize("signs", ["positive", "mixed"])
def test_synflow_equals_hand_path_norm_gradient(x64, signs):
    k1, k2 = jax.random.split(jax.random.PRNGKey(4))
    params = [jax.random.normal(k1, (4, 3)), jax.random.normal(k2, (3, 2))]
    if signs == "positive":
        params = [jnp.abs(w) for w in params]
    a1, a2 = (np.abs(np.asarray(w)) for w in params)
    # R = 1ᵀ|W2|ᵀ relu(|W1|ᵀ 1) = Σ_{i,j,c} |W1|ij |W2|jc: every path's product of weights.
    # ∂R/∂W1[i, j] = Σ_c |W2|[j, c] and ∂R/∂W2[j, c] = Σ_i |W1|[i, j].
    expected = [a1 * a2.sum(axis=1)[None, :], a2 * a1.sum(axis=0)[:, None]]
    scores = synflow_jit(_bias_free_two_layer, params, (4,))
    for s, e in zip(scores, expected, strict=True):
        np.testing.assert_allclose(s, e, **_tols(x64))
    r = a1.sum(axis=0) @ a2.sum(axis=1)
    for s in scores:  # conservation: every layer's scores sum to R
        np.testing.assert_allclose(np.sum(s), r, **_tols(x64))


def test_synflow_conserves_flow_through_every_layer_of_a_bias_free_stax_net(x64):
    # b_std = 0 under the NTK parameterization multiplies every bias by 0: a bias-free ReLU
    # net, positively homogeneous of degree 1 in each layer's weights, so by Euler's theorem
    # Σ θ_l ⊙ ∂R/∂θ_l = R for every layer l (Tanaka et al. 2020, Theorem 1).
    model, params = _stax_net(depth=2, b_std=0.0, input_shape=(2, 2))
    scores = synflow_jit(model.apply_fn, params, (2, 2))
    abs_params = jax.tree_util.tree_map(jnp.abs, params)
    r = jnp.sum(model.apply_fn(abs_params, jnp.ones((1, 2, 2), abs_params[1][0].dtype)))
    dense = [layer for layer in scores if layer]
    assert len(dense) == 3
    for w_scores, b_scores in dense:
        np.testing.assert_allclose(np.sum(w_scores), r, rtol=_tols(x64)["rtol"])
        np.testing.assert_array_equal(b_scores, 0.0)
    assert all(leaf.dtype == abs_params[1][0].dtype for leaf in jax.tree_util.tree_leaves(scores))


def test_synflow_scores_are_non_negative_with_biases():
    model, params = _stax_net(depth=2)
    scores = synflow_jit(model.apply_fn, params, INPUT_SHAPE)
    leaves = jax.tree_util.tree_leaves(scores)
    assert all(np.all(leaf >= 0) for leaf in leaves)
    assert sum(np.sum(leaf) for leaf in leaves) > 0


# --- NTK saliency ----------------------------------------------------------------------


def _ntk_setup():
    model, params = _stax_net()
    x_probe = jax.random.normal(jax.random.PRNGKey(7), (4, *INPUT_SHAPE))
    flat, unravel = ravel_pytree(params)

    def jacobian(v):  # (m·k, P), the Jacobian of the flattened outputs
        return jax.jacrev(lambda w: model.apply_fn(unravel(w), x_probe).ravel())(v)

    return model, params, x_probe, flat, unravel, jacobian


def test_ntk_trace_estimate_matches_exact_frobenius_norm(x64):
    model, params, x_probe, flat, _, jacobian = _ntk_setup()
    n_samples = 4000
    j = jax.jit(jacobian)(flat)
    kernel = j @ j.T
    exact = jnp.trace(kernel)  # ‖J‖_F²
    estimate = jax.jit(ntk_trace_estimate, static_argnums=(0, 4))(
        model.apply_fn, params, x_probe, jax.random.PRNGKey(0), n_samples)
    # Var ‖J u‖² = 2 ‖J Jᵀ‖_F² for u ~ N(0, I): the relative standard error of the mean.
    rel_se = np.sqrt(2 * np.sum(kernel**2) / n_samples) / exact
    rel_err = abs(estimate - exact) / exact
    assert rel_se < 0.05 / 2.5  # 5 % is at least 2.5 standard errors
    assert rel_err < 0.05, (rel_err, rel_se)


def test_ntk_saliency_matches_exact_saliency(x64):
    model, params, x_probe, flat, unravel, jacobian = _ntk_setup()
    n_samples = 4000

    def gram(v):  # JᵀJ, (P, P): T = Tr(JᵀJ), and one sample of the estimate is uᵀ JᵀJ u
        j = jacobian(v)
        return j.T @ j

    exact_signed = flat * jax.jit(jax.grad(lambda v: jnp.trace(gram(v))))(flat)
    estimate, _ = ravel_pytree(ntk_saliency_jit(model.apply_fn, params, x_probe,
                                                jax.random.PRNGKey(0), n_samples))
    # The signed per-sample saliency is uᵀ (θ_p ∂_p JᵀJ) u, of variance 2 θ_p² ‖∂_p JᵀJ‖_F²,
    # so the mean of S samples has expected squared error Σ_p 2 θ_p² ‖∂_p JᵀJ‖_F² / S; taking
    # absolute values is 1-Lipschitz and cannot increase it.
    d_gram = jax.jit(jax.jacfwd(gram))(flat)  # (P, P, P), last axis p
    var = 2 * flat**2 * jnp.sum(d_gram**2, axis=(0, 1))
    norm = np.linalg.norm(exact_signed)
    rel_se = np.sqrt(np.sum(var) / n_samples) / norm
    rel_err = np.linalg.norm(estimate - np.abs(exact_signed)) / norm
    assert rel_se < 0.10 / 3  # 10 % is at least 3 standard errors
    assert rel_err < 0.10, (rel_err, rel_se)


def test_ntk_saliency_is_deterministic_for_a_fixed_key():
    model, params, x_probe, *_ = _ntk_setup()
    first, second, other = (
        ravel_pytree(ntk_saliency_jit(model.apply_fn, params, x_probe,
                                      jax.random.PRNGKey(seed)))[0]
        for seed in (5, 5, 6))
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, other)


# --- dispatcher ------------------------------------------------------------------------


def test_dispatcher_rejects_an_unknown_method():
    with pytest.raises(ValueError, match="'bogus'.*'magnitude_init'.*'ntk_saliency'"):
        at_init_scores("bogus", *_all_args())


def test_dispatcher_routes_each_name_eagerly_and_under_jit():
    apply_fn, params, x, y, loss_fn, key, x_probe, input_shape = args = _all_args()
    direct = {
        "magnitude_init": magnitude_scores(params),
        "snip": snip_scores(apply_fn, params, x, y, loss_fn),
        "grasp": grasp_scores(apply_fn, params, x, y, loss_fn),
        "synflow": synflow_scores(apply_fn, params, input_shape),
        "ntk_saliency": ntk_saliency_scores(apply_fn, params, x_probe, key),
    }
    assert tuple(direct) == AT_INIT_CRITERIA
    for method, expected in direct.items():
        expected = ravel_pytree(expected)[0]
        np.testing.assert_array_equal(ravel_pytree(at_init_scores(method, *args))[0],
                                      expected, err_msg=method)
        # params are jit arguments (nothing closed over): same scores up to float32 rounding.
        np.testing.assert_allclose(ravel_pytree(at_init_scores_jit(method, *args))[0],
                                   expected, rtol=1e-4, atol=1e-6 * np.max(np.abs(expected)),
                                   err_msg=method)


def test_ntk_saliency_memory_does_not_grow_with_the_samples():
    """The compiled estimator's temporary memory is the same for S = 64 and S = 4096, and
    below what one (S, P) array of directions would take: the directions are drawn and
    differentiated PROBE_CHUNK at a time (XLA's own memory analysis of the program)."""
    model, params, x_probe, flat, *_ = _ntk_setup()

    def temp_bytes(n_samples):
        compiled = ntk_saliency_jit.lower(model.apply_fn, params, x_probe,
                                          jax.random.PRNGKey(0), n_samples).compile()
        analysis = compiled.memory_analysis()
        if analysis is None:
            pytest.skip("this backend gives no memory analysis")
        return analysis.temp_size_in_bytes

    assert temp_bytes(4096) == temp_bytes(64) < 4096 * flat.size * flat.dtype.itemsize
