"""Fair controls: a masked network trained as its own NTK-parameterized network
(tickets.rescaled_start), against a Monte-Carlo estimate of the pre-activation variance and
against the reparameterized network f((c ⊙ θ') ⊙ m) trained in θ' by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ntk_tickets import ModelConfig, StudyConfig, TrainConfig, build_model, with_overrides
from ntk_tickets.config import TicketsConfig
from ntk_tickets.masks import apply_mask, ntk_rescaling, prunable_leaves
from ntk_tickets.tickets import _control_masks, rescaled_start
from ntk_tickets.training import TrainingProgram


def _stack(trees):
    return jax.tree_util.tree_map(lambda *a: jnp.stack([jnp.asarray(x) for x in a]), *trees)


def _random_masks(params, density, seed=0):
    """Random masks keeping a fraction ``density`` of every weight matrix (biases kept), one
    per seed of the stacked ``params``, drawn by NumPy at once."""
    n_seeds = jax.tree_util.tree_leaves(params)[0].shape[0]
    prunable = prunable_leaves(jax.tree_util.tree_map(lambda p: p[0], params), False)
    rng = np.random.default_rng(seed)

    def thin(p, ok):
        shape = p.shape[1:]
        if not ok:
            return np.ones((n_seeds, *shape), bool)
        size = int(np.prod(shape))
        ranks = rng.random((n_seeds, size)).argsort(axis=1)  # a random permutation per seed
        return (ranks < round(density * size)).reshape(n_seeds, *shape)

    return jax.tree_util.tree_map(thin, params, prunable)


def test_ntk_rescaling_is_one_over_root_density_on_pruned_weights():
    mask = [(), (np.array([[1, 0], [0, 0]], bool), np.ones(2, bool)),
            (np.ones((2, 1), bool), np.zeros(1, bool))]
    scale = ntk_rescaling(mask, prune_biases=False)
    np.testing.assert_allclose(scale[1][0], 2.0)  # density 1/4
    np.testing.assert_allclose(scale[1][1], 1.0)  # a bias: not prunable
    np.testing.assert_allclose(scale[2][0], 1.0)  # density 1
    np.testing.assert_allclose(scale[2][1], 1.0)


def test_rescaled_masks_keep_the_preactivation_variance(float64):
    """Monte-Carlo over 4000 initializations and masks: the second layer's pre-activations
    of a depth-2 ReLU MLP with random masks keeping ρ = 1/8 of each weight matrix have ρ²
    of the dense variance as they are, and the dense variance once rescaled (± 10 %, about
    three standard errors of a variance estimated from 4000 heavy-tailed draws)."""
    density, n = 0.125, 64
    model = build_model(ModelConfig(depth=2, activation="relu", b_std=0.0), n, (16,), 1)
    seeds = np.arange(4000)
    params = jax.vmap(model.init)(jax.vmap(jax.random.PRNGKey)(seeds))
    mask = _random_masks(params, density)  # a fresh mask with every initialization
    x = jnp.asarray(np.random.default_rng(1).standard_normal((1, 16)))
    cfg = with_overrides(StudyConfig(tickets=TicketsConfig()), ["train.optimizer='sgd'"])
    rescaled, _ = rescaled_start(params, mask, cfg)

    def preactivation(p):
        """Layer 2's pre-activations, σ_w = √2 and no biases, written out by hand."""
        (w1, _), (w2, _) = p[1], p[3]
        z1 = np.sqrt(2.0) / np.sqrt(16) * x @ w1
        z2 = np.sqrt(2.0) / np.sqrt(n) * jax.nn.relu(z1) @ w2
        return z2

    dense = jax.vmap(preactivation)(params)
    plain = jax.vmap(preactivation)(apply_mask(params, mask))
    fair = jax.vmap(preactivation)(rescaled)
    var = {k: float(jnp.var(v)) for k, v in (("dense", dense), ("plain", plain),
                                              ("fair", fair))}
    assert var["fair"] == pytest.approx(var["dense"], rel=0.1)
    assert var["plain"] == pytest.approx(density ** 2 * var["dense"], rel=0.1)


@pytest.mark.parametrize("optimizer,lr,rtol", [("sgd", 0.5, 1e-10), ("momentum", 0.2, 1e-10),
                                               ("adam", 0.01, 1e-4)])
def test_rescaled_training_is_the_reparameterized_network(float64, optimizer, lr, rtol):
    """Training θ from c ⊙ θ0 ⊙ m with updates × m·c^p (one training program, update scales
    as its mask) gives θ_t = c ⊙ θ'_t, θ' trained by optax on f((c ⊙ θ') ⊙ m) from θ0 ⊙ m.
    Adam matches up to its ε: its denominators differ by ε·(c − 1), relative ε/√v̂ ≲ 1e-4."""
    model = build_model(ModelConfig(depth=2, activation="tanh"), 16, (5,), 2)
    params0 = _stack([model.init(jax.random.PRNGKey(s)) for s in (0, 1)])
    mask = _random_masks(params0, 0.25)
    rng = np.random.default_rng(3)
    data = {"x_train": jnp.asarray(rng.standard_normal((20, 5))),
            "y_train": jnp.asarray(rng.standard_normal((20, 2))),
            "x_test": jnp.asarray(rng.standard_normal((4, 5)))}
    steps = 25
    train = TrainConfig(optimizer=optimizer, learning_rate=lr, steps=steps)
    cfg = StudyConfig(train=train, tickets=TicketsConfig())
    start, update = rescaled_start(params0, mask, cfg)
    program = TrainingProgram(lambda p, p0, x: model.apply_fn(p, x), train,
                              np.array([0, steps]))
    trained = program(start, data, jnp.zeros((2, 0, 0), jnp.int32), update).params

    opt = {"sgd": optax.sgd(lr), "momentum": optax.sgd(lr, momentum=0.9),
           "adam": optax.adam(lr)}[optimizer]
    for s in (0, 1):
        m = jax.tree_util.tree_map(lambda a, s=s: a[s], mask)
        c = ntk_rescaling(m, prune_biases=False)

        def loss(theta, c=c, m=m):
            effective = jax.tree_util.tree_map(lambda t, ci, mi: t * ci * mi, theta, c, m)
            f = model.apply_fn(effective, data["x_train"])
            return 0.5 * jnp.mean((f - data["y_train"]) ** 2)

        theta = apply_mask(jax.tree_util.tree_map(lambda a, s=s: a[s], params0), m)
        state = opt.init(theta)
        for _ in range(steps):
            updates, state = opt.update(jax.grad(loss)(theta), state, theta)
            updates = jax.tree_util.tree_map(lambda u, mi: u * mi, updates, m)
            theta = optax.apply_updates(theta, updates)
        expected = jax.tree_util.tree_map(lambda t, ci: t * ci, theta, c)
        got = jax.tree_util.tree_map(lambda a, s=s: a[s], trained)
        for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(expected),
                        strict=True):
            np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol)


def test_init_only_rescaling_scales_the_start_not_the_steps(float64):
    model = build_model(ModelConfig(depth=1), 8, (3,), 1)
    params = _stack([model.init(jax.random.PRNGKey(0))])
    mask = _random_masks(params, 0.5)
    cfg = StudyConfig(tickets=TicketsConfig())
    start, update = rescaled_start(params, mask, cfg, steps=False)
    full_start, full_update = rescaled_start(params, mask, cfg)
    for a, b in zip(jax.tree_util.tree_leaves(start), jax.tree_util.tree_leaves(full_start),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    for u, m in zip(jax.tree_util.tree_leaves(update), jax.tree_util.tree_leaves(mask),
                    strict=True):
        np.testing.assert_array_equal(u, m)
    assert max(float(jnp.max(u)) for u in jax.tree_util.tree_leaves(full_update)) == (
        pytest.approx(2.0))  # c² = 1/density under sgd


def test_rescaled_variants_share_the_random_mask_and_leave_it_unchanged():
    """Asking for random_rescaled draws the same random mask as `random` does, with or
    without `random` itself, so the comparison is paired and older studies keep theirs."""
    params = [(), (np.ones((2, 6, 4), bool), np.ones((2, 4), bool))]
    mask = jax.tree_util.tree_map(lambda m: m, params)
    mask[1] = (np.stack([np.arange(24).reshape(6, 4) % 3 == 0] * 2), mask[1][1])
    keys = np.array([[0, 1], [0, 2]], np.uint32)
    plain = _control_masks(mask, TicketsConfig(controls=("random",)), keys, 1)
    both = _control_masks(mask, TicketsConfig(controls=("random", "random_rescaled")), keys, 1)
    alone = _control_masks(mask, TicketsConfig(controls=("random_init_rescaled",)), keys, 1)
    for other in (both, alone):
        np.testing.assert_array_equal(other["random"][1][0], plain["random"][1][0])
