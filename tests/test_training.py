"""The shared training loop: exact vs linear, seeds, optimizers, batches, closed forms,
masked updates, rewinding and the in-loop probe kernel."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntk_tickets import (
    DataConfig,
    ModelConfig,
    TrainConfig,
    build_model,
    linearize,
    load_dataset,
    masks,
)
from ntk_tickets.kernels import empirical_ntk, empirical_ntk_predictions
from ntk_tickets.optimizers import mse_loss
from ntk_tickets.training import TrainingProgram, batch_order, log_spaced_steps


def _setup(width=32, seeds=(0, 1), loss="mse", n_train=40, data_name="teacher"):
    data = load_dataset(DataConfig(name=data_name, n_train=n_train, n_test=20, input_dim=4),
                        loss)
    model = build_model(ModelConfig(depth=1, activation="erf"), width, data.input_shape,
                        data.n_out)
    params0 = jax.vmap(model.init)(jax.vmap(jax.random.PRNGKey)(jnp.asarray(seeds)))
    arrays = {"x_train": jnp.asarray(data.x_train), "y_train": jnp.asarray(data.y_train),
              "x_test": jnp.asarray(data.x_test)}
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
    _, model, params0, data = _setup(seeds=cfg.seeds)
    program = TrainingProgram(linearize(model.apply_fn), cfg, log_spaced_steps(cfg.steps, 5))
    together = program(params0, data, _no_batches(3))
    for i in range(3):
        alone_params0 = jax.tree_util.tree_map(lambda a, i=i: a[i: i + 1], params0)
        alone = program(alone_params0, data, _no_batches(1))
        np.testing.assert_allclose(together.f_test[i], alone.f_test[0],
                                   rtol=1e-5 if not x64 else 1e-12, atol=1e-6)


def test_linear_path_starts_at_the_exact_network_and_both_learn():
    cfg = TrainConfig(steps=200, learning_rate=1.0)
    _, model, params0, data = _setup()
    y_train = data["y_train"]
    steps = log_spaced_steps(cfg.steps, 4)
    results = {}
    for name, fn in (("exact", _exact(model)), ("linear", linearize(model.apply_fn))):
        results[name] = TrainingProgram(fn, cfg, steps)(params0, data, _no_batches(2))
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
    _, model, params0, data = _setup()
    y_train = data["y_train"]
    batches = jax.vmap(batch_order, in_axes=(0, None, None, None))(
        jax.random.split(jax.random.PRNGKey(9), 2), 40, 10, cfg.steps)
    traj = TrainingProgram(_exact(model), cfg, log_spaced_steps(cfg.steps, 3))(
        params0, data, batches)
    assert mse_loss(traj.f_train[1, -1], y_train) < 0.7 * mse_loss(traj.f_train[1, 0], y_train)


def test_cross_entropy_path_trains_above_chance():
    cfg = TrainConfig(steps=150, learning_rate=2.0, loss="xent")
    data, model, params0, arrays = _setup(
        width=64, loss="xent", n_train=100, data_name="digits")
    traj = TrainingProgram(linearize(model.apply_fn), cfg, log_spaced_steps(cfg.steps, 3))(
        params0, arrays, _no_batches(2))
    accuracy = np.mean(np.asarray(traj.f_test[:, -1]).argmax(-1) == data.y_test, axis=-1)
    assert np.all(accuracy > 0.6), accuracy  # chance is 0.1


def test_closed_form_matches_small_step_linear_training(x64):
    """Full-batch GD with step η on ½·mean((f−y)²) ≈ gradient flow at t = steps.

    The discretization error of GD against the flow is O(η·t·λ²) for kernel eigenvalues λ of
    the normalized kernel; with η = 0.05 and 200 steps the measured relative error is
    about 0.3 %; 2 % tolerance.
    """
    cfg = TrainConfig(steps=200, learning_rate=0.05)
    _, model, params0, data = _setup(width=64, seeds=(0,))
    steps = log_spaced_steps(cfg.steps, 4)
    traj = TrainingProgram(linearize(model.apply_fn), cfg, steps)(params0, data,
                                                                  _no_batches(1))
    theta0 = jax.tree_util.tree_map(lambda a: a[0], params0)
    _, f_test = empirical_ntk_predictions(model.apply_fn, theta0, data["x_train"],
                                          data["y_train"], data["x_test"],
                                          cfg.learning_rate, steps)
    moved = np.asarray(traj.f_test[0]) - np.asarray(traj.f_test[0, :1])
    moved_cf = np.asarray(f_test) - np.asarray(f_test[:1])
    assert np.linalg.norm(moved[-1]) > 0.1  # the outputs did move
    rel = np.linalg.norm(moved - moved_cf) / np.linalg.norm(moved)
    assert rel < 0.02, rel


def _half_mask(params0, seed=3):
    """A random mask keeping about half of every weight matrix (biases kept), seed axis."""
    def draw(path, p):
        keep = jax.random.bernoulli(jax.random.PRNGKey(seed + p.size), 0.5, p.shape)
        return keep | (path[-1].idx == 1)
    return jax.tree_util.tree_map_with_path(draw, params0)


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
@pytest.mark.parametrize("path", ["exact", "linear"])
def test_pruned_weights_stay_exactly_zero_under_every_optimizer(optimizer, path):
    """Momentum and Adam state and weight decay must not revive a pruned weight."""
    lr = {"sgd": 1.0, "momentum": 0.2, "adam": 0.01}[optimizer]
    cfg = TrainConfig(steps=40, learning_rate=lr, optimizer=optimizer, weight_decay=0.1,
                      batch_size=10)
    _, model, params0, data = _setup()
    mask = _half_mask(params0)
    start = masks.apply_mask(params0, mask)
    fn = _exact(model) if path == "exact" else linearize(model.apply_fn)
    batches = jax.vmap(batch_order, in_axes=(0, None, None, None))(
        jax.random.split(jax.random.PRNGKey(9), 2), 40, 10, cfg.steps)
    traj = TrainingProgram(fn, cfg, log_spaced_steps(cfg.steps, 3))(start, data, batches, mask)
    moved = 0.0
    for p, p0, m in zip(*(jax.tree_util.tree_leaves(t) for t in (traj.params, start, mask)),
                        strict=True):
        p, p0, m = np.asarray(p), np.asarray(p0), np.asarray(m)
        assert np.all(p[~m] == 0.0)  # exactly, not approximately
        moved += float(np.abs(p - p0)[m].sum())
    assert moved > 0.1  # the kept weights did train


def test_masked_linear_path_is_the_linearization_of_the_masked_network(x64):
    """Training θ from θ0 ⊙ m with masked updates on f_lin equals training the unmasked
    linearization of g(θ) = f(θ ⊙ m) around θ0 ⊙ m (SGD: identical trajectories)."""
    cfg = TrainConfig(steps=30, learning_rate=0.5)
    _, model, params0, data = _setup()
    mask = _half_mask(params0)
    start = masks.apply_mask(params0, mask)
    steps = log_spaced_steps(cfg.steps, 3)
    ours = TrainingProgram(linearize(model.apply_fn), cfg, steps)(start, data, _no_batches(2),
                                                                  mask)

    def reference(params, params0, x):  # the mask is data here: one per seed, via vmap
        masked = masks.apply_mask(params, params0["mask"])
        f0, df = jax.jvp(lambda p: model.apply_fn(p, x), (params0["theta"],),
                         (jax.tree_util.tree_map(jnp.subtract, masked, params0["theta"]),))
        return f0 + df

    for i in range(2):
        one = jax.tree_util.tree_map(lambda a, i=i: a[i], (start, mask))
        ref_params0 = {"theta": one[0], "mask": one[1]}

        def train(fn_params, ref_params0=ref_params0):
            loss = jax.grad(lambda p: mse_loss(reference(p, ref_params0, data["x_train"]),
                                               data["y_train"]))
            for _ in range(cfg.steps):
                fn_params = jax.tree_util.tree_map(lambda p, g: p - cfg.learning_rate * g,
                                                   fn_params, loss(fn_params))
            return reference(fn_params, ref_params0, data["x_test"])

        np.testing.assert_allclose(ours.f_test[i, -1], train(one[0]),
                                   rtol=1e-4 if not x64 else 1e-10, atol=1e-5)


def test_rewind_step_returns_the_parameters_of_that_step():
    cfg = TrainConfig(steps=20, learning_rate=0.5, optimizer="momentum")
    _, model, params0, data = _setup()
    steps = np.union1d(log_spaced_steps(cfg.steps, 3), [7])
    traj = TrainingProgram(_exact(model), cfg, steps)(params0, data, _no_batches(2),
                                                      rewind_step=7)
    short = TrainingProgram(_exact(model), dataclasses.replace(cfg, steps=7),
                            log_spaced_steps(7, 2))(params0, data, _no_batches(2))
    for a, b in zip(jax.tree_util.tree_leaves(traj.params_rewind),
                    jax.tree_util.tree_leaves(short.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    at_zero = TrainingProgram(_exact(model), cfg, steps)(params0, data, _no_batches(2))
    for a, b in zip(jax.tree_util.tree_leaves(at_zero.params_rewind),
                    jax.tree_util.tree_leaves(params0), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="not a recorded step"):
        TrainingProgram(_exact(model), cfg, steps)(params0, data, _no_batches(2),
                                                   rewind_step=8)


def test_probe_kernel_is_recorded_at_every_step_and_starts_at_the_init_ntk():
    cfg = TrainConfig(steps=50, learning_rate=1.0)
    _, model, params0, data = _setup(width=16)
    data = {**data, "x_probe": data["x_train"][:5]}
    probe = functools.partial(empirical_ntk, model.apply_fn)
    steps = log_spaced_steps(cfg.steps, 4)
    program = TrainingProgram(_exact(model), cfg, steps, probe_kernel_fn=probe)
    traj = program(params0, data, _no_batches(2))
    assert traj.probe_kernel.shape == (2, len(steps), 5, 5)
    theta0 = jax.tree_util.tree_map(lambda a: a[1], params0)
    np.testing.assert_allclose(traj.probe_kernel[1, 0],
                               empirical_ntk(model.apply_fn, theta0, data["x_probe"]),
                               rtol=1e-5, atol=1e-6)
    final = jax.tree_util.tree_map(lambda a: a[1], traj.params)
    np.testing.assert_allclose(traj.probe_kernel[1, -1],
                               empirical_ntk(model.apply_fn, final, data["x_probe"]),
                               rtol=1e-4, atol=1e-5)
    assert not np.allclose(traj.probe_kernel[1, -1], traj.probe_kernel[1, 0])
    program(params0, data, _no_batches(2))  # a second call reuses the compiled program
    assert len(program._compiled) == 1


@pytest.mark.parametrize("path", ["exact", "linear"])
def test_stepwise_loop_records_what_the_fused_loop_records(path, x64):
    """The host loop over single steps (chosen for CNNs on the CPU) against the program with
    the loop inside: same trajectory, with minibatches, a mask, a rewind step, a late start,
    feature change and the probe kernel."""
    data = load_dataset(DataConfig(name="mnist1d", n_train=24, n_test=12), "mse")
    model = build_model(ModelConfig(arch="cnn1d", depth=2, kernel_size=3), 6,
                        data.input_shape, data.n_out)
    params0 = jax.vmap(model.init)(jax.vmap(jax.random.PRNGKey)(jnp.arange(2)))
    arrays = {"x_train": jnp.asarray(data.x_train), "y_train": jnp.asarray(data.y_train),
              "x_test": jnp.asarray(data.x_test), "x_probe": jnp.asarray(data.x_train[:4])}
    cfg = TrainConfig(steps=12, learning_rate=0.3, optimizer="momentum", batch_size=8)
    batches = jax.vmap(lambda k: batch_order(k, 24, 8, cfg.steps))(
        jax.random.split(jax.random.PRNGKey(3), 2))
    fn = _exact(model) if path == "exact" else linearize(model.apply_fn)
    mask = jax.tree_util.tree_map(
        lambda p: jax.random.bernoulli(jax.random.PRNGKey(4), 0.7, p.shape), params0)
    steps = log_spaced_steps(cfg.steps, 4)
    options = {"probe_kernel_fn": lambda p, x: empirical_ntk(model.apply_fn, p, x),
               "feature_fn": lambda p, p0, x: model.feature_fn(p, x)}
    runs = {}
    for loop in ("fused", "stepwise", "auto"):
        program = TrainingProgram(fn, cfg, steps, loop=loop, **options)
        runs[loop] = program(params0, arrays, batches, update_mask=mask,
                             rewind_step=int(steps[2]), start_step=2)
        assert program.loop == ("stepwise" if loop == "auto" else loop)
    tol = {"rtol": 1e-10, "atol": 1e-12} if x64 else {"rtol": 2e-4, "atol": 2e-5}
    fused = runs["fused"]
    for run in (runs["stepwise"], runs["auto"]):
        for field in ("f_train", "f_test", "sq_change", "sq_norm0", "params", "params_rewind",
                      "probe_kernel", "feature_sq_change", "feature_sq_norm0"):
            jax.tree_util.tree_map(functools.partial(np.testing.assert_allclose, **tol),
                                   getattr(run, field), getattr(fused, field))
    assert not np.allclose(fused.f_test[:, -1], fused.f_test[:, 0])  # it trained


def test_unknown_loop_is_refused():
    with pytest.raises(ValueError, match="loop 'inline'"):
        TrainingProgram(lambda p, p0, x: x, TrainConfig(), np.array([0, 1]), loop="inline")
