"""The shared training loop: exact vs linear, seeds, optimizers, batches, closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntk_tickets import DataConfig, ModelConfig, TrainConfig, build_model, linearize, load_dataset
from ntk_tickets.kernels import empirical_ntk_predictions
from ntk_tickets.training import (
    batch_order,
    log_spaced_steps,
    make_train_fn,
    mse_loss,
    run_training,
)


def _setup(width=32, seeds=(0, 1), loss="mse", n_train=40, data_name="teacher"):
    data = load_dataset(DataConfig(name=data_name, n_train=n_train, n_test=20, input_dim=4),
                        loss)
    model = build_model(ModelConfig(depth=1, activation="erf"), width, data.input_shape,
                        data.n_out)
    params0 = jax.vmap(model.init)(jax.vmap(jax.random.PRNGKey)(jnp.asarray(seeds)))
    arrays = tuple(jnp.asarray(a) for a in (data.x_train, data.y_train, data.x_test))
    return data, model, params0, arrays


def _exact(model):
    return lambda p, p0, x: model.apply_fn(p, x)


def _no_batches(n_seeds):
    return jnp.zeros((n_seeds, 0, 0), dtype=jnp.int32)


def test_log_spaced_steps_cover_both_ends_and_increase():
    steps = log_spaced_steps(1000, 20)
    assert steps[0] == 0 and steps[-1] == 1000
    assert np.all(np.diff(steps) > 0)
    assert log_spaced_steps(1, 5).tolist() == [0, 1]


def test_batch_order_is_a_permutation_per_epoch_and_seeded():
    order = batch_order(jax.random.PRNGKey(0), 10, 5, 6)
    assert order.shape == (6, 5)
    for epoch in range(3):
        assert sorted(np.asarray(order[2 * epoch: 2 * epoch + 2]).ravel()) == list(range(10))
    np.testing.assert_array_equal(order, batch_order(jax.random.PRNGKey(0), 10, 5, 6))
    assert not np.array_equal(order, batch_order(jax.random.PRNGKey(1), 10, 5, 6))


def test_vmapped_seeds_equal_sequential_runs(x64):
    cfg = TrainConfig(steps=30, learning_rate=0.5, optimizer="momentum", seeds=(0, 1, 2))
    _, model, params0, (x_train, y_train, x_test) = _setup(seeds=cfg.seeds)
    steps = log_spaced_steps(cfg.steps, 5)
    train_fn = make_train_fn(linearize(model.apply_fn), cfg, steps)
    together, _, _ = run_training(train_fn, steps, params0, x_train, y_train, x_test,
                                  _no_batches(3))
    for i in range(3):
        alone_params0 = jax.tree_util.tree_map(lambda a, i=i: a[i: i + 1], params0)
        alone, _, _ = run_training(train_fn, steps, alone_params0, x_train, y_train, x_test,
                                   _no_batches(1))
        np.testing.assert_allclose(together.f_test[i], alone.f_test[0],
                                   rtol=1e-5 if not x64 else 1e-12, atol=1e-6)


def test_linear_path_starts_at_the_exact_network_and_both_learn():
    cfg = TrainConfig(steps=200, learning_rate=1.0)
    _, model, params0, (x_train, y_train, x_test) = _setup()
    steps = log_spaced_steps(cfg.steps, 4)
    results = {}
    for name, fn in (("exact", _exact(model)), ("linear", linearize(model.apply_fn))):
        results[name], _, _ = run_training(make_train_fn(fn, cfg, steps), steps, params0,
                                           x_train, y_train, x_test, _no_batches(2))
    np.testing.assert_allclose(results["exact"].f_test[:, 0], results["linear"].f_test[:, 0],
                               rtol=1e-6, atol=1e-6)
    for traj in results.values():
        first, last = (mse_loss(traj.f_train[0, j], y_train) for j in (0, -1))
        assert last < 0.5 * first
        assert float(traj.sq_change[0, 0].sum()) == 0.0


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
def test_every_optimizer_reduces_the_loss_with_minibatches(optimizer):
    lr = {"sgd": 1.0, "momentum": 0.2, "adam": 0.01}[optimizer]
    cfg = TrainConfig(steps=100, learning_rate=lr, optimizer=optimizer, batch_size=10,
                      schedule="warmup_cosine")
    _, model, params0, (x_train, y_train, x_test) = _setup()
    steps = log_spaced_steps(cfg.steps, 3)
    batches = jax.vmap(batch_order, in_axes=(0, None, None, None))(
        jax.random.split(jax.random.PRNGKey(9), 2), 40, 10, cfg.steps)
    traj, _, _ = run_training(make_train_fn(_exact(model), cfg, steps), steps, params0,
                              x_train, y_train, x_test, batches)
    assert mse_loss(traj.f_train[1, -1], y_train) < 0.7 * mse_loss(traj.f_train[1, 0], y_train)


def test_cross_entropy_path_trains_above_chance():
    cfg = TrainConfig(steps=150, learning_rate=2.0, loss="xent")
    data, model, params0, (x_train, y_train, x_test) = _setup(
        width=64, loss="xent", n_train=100, data_name="digits")
    steps = log_spaced_steps(cfg.steps, 3)
    traj, _, _ = run_training(make_train_fn(linearize(model.apply_fn), cfg, steps), steps,
                              params0, x_train, y_train, x_test, _no_batches(2))
    accuracy = np.mean(np.asarray(traj.f_test[:, -1]).argmax(-1) == data.y_test, axis=-1)
    assert np.all(accuracy > 0.6), accuracy  # chance is 0.1


def test_closed_form_matches_small_step_linear_training(x64):
    """Full-batch GD with step η on ½·mean((f−y)²) ≈ gradient flow at t = steps.

    The discretization error of GD against the flow is O(η·t·λ²) for kernel eigenvalues λ of
    the normalized kernel; with η = 0.05 and 200 steps the measured relative error is
    about 0.3 %; 2 % tolerance.
    """
    cfg = TrainConfig(steps=200, learning_rate=0.05)
    _, model, params0, (x_train, y_train, x_test) = _setup(width=64, seeds=(0,))
    steps = log_spaced_steps(cfg.steps, 4)
    traj, _, _ = run_training(make_train_fn(linearize(model.apply_fn), cfg, steps), steps,
                              params0, x_train, y_train, x_test, _no_batches(1))
    theta0 = jax.tree_util.tree_map(lambda a: a[0], params0)
    _, f_test = empirical_ntk_predictions(model.apply_fn, theta0, x_train, y_train, x_test,
                                          cfg.learning_rate, steps)
    moved = np.asarray(traj.f_test[0]) - np.asarray(traj.f_test[0, :1])
    moved_cf = np.asarray(f_test) - np.asarray(f_test[:1])
    assert np.linalg.norm(moved[-1]) > 0.1  # the outputs did move
    rel = np.linalg.norm(moved - moved_cf) / np.linalg.norm(moved)
    assert rel < 0.02, rel
