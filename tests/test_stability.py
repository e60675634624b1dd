"""Linear mode connectivity (ntk_tickets.stability) against closed forms and the convexity
of the linearized network's MSE loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntk_tickets import ModelConfig, build_model, linearize
from ntk_tickets.stability import along_line, instability, interpolation_grid, loss_barrier


def test_barrier_and_instability_of_hand_made_curves():
    """A parabola bump above the chord has its closed-form height; a straight line has none;
    the max-minus-mean instability is half the endpoint gap on a monotone line."""
    alphas = interpolation_grid(11)
    chord = 1.0 + 2.0 * alphas
    bump = chord + 4 * 0.3 * alphas * (1 - alphas)   # height 0.3 at α = ½
    assert loss_barrier(bump, alphas) == pytest.approx(0.3)
    assert loss_barrier(chord, alphas) == pytest.approx(0.0, abs=1e-15)
    assert instability(chord) == pytest.approx(1.0)  # max 3 − mean(1, 3)
    np.testing.assert_allclose(loss_barrier(np.stack([bump, chord]), alphas), [0.3, 0.0],
                               atol=1e-15)
    with pytest.raises(ValueError, match="n_interp"):
        interpolation_grid(1)


def test_along_line_interpolates_every_leaf():
    theta_1 = {"w": jnp.zeros(3), "b": jnp.ones(())}
    theta_2 = {"w": jnp.full(3, 2.0), "b": jnp.zeros(())}
    out = along_line(lambda p: jnp.sum(p["w"]) + p["b"], theta_1, theta_2,
                     interpolation_grid(3))
    np.testing.assert_allclose(out, [1.0, 3.5, 6.0])


def test_the_linearized_networks_mse_has_no_barrier(float64):
    """The linearized network is linear in θ, so its MSE is convex along any line: the barrier
    is ≤ 0 up to rounding (here ≥ −(a few ulp)·loss). The max-minus-mean barrier of the same
    curve is positive when the endpoint losses differ: that definition cannot pass this test."""
    model = build_model(ModelConfig(depth=2, activation="tanh"), 32, (4,), 2)
    theta0 = model.init(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    x, y = jnp.asarray(rng.standard_normal((40, 4))), jnp.asarray(rng.standard_normal((40, 2)))
    ends = [jax.tree_util.tree_map(lambda a, s=s: a + 0.8 * jnp.asarray(
        np.random.default_rng(s).standard_normal(a.shape)), theta0) for s in (1, 2)]
    alphas = interpolation_grid(21)
    f_lin = linearize(model.apply_fn)

    def mse(f):
        return 0.5 * jnp.mean((f - y) ** 2)

    linear = np.asarray(along_line(lambda p: mse(f_lin(p, theta0, x)), *ends, alphas))
    assert loss_barrier(linear, alphas) <= 1e-12 * linear.max()
    assert linear[0] != pytest.approx(linear[-1])
    max_minus_mean = linear.max() - 0.5 * (linear[0] + linear[-1])
    assert max_minus_mean > 0
    chord = (1 - alphas) * linear[0] + alphas * linear[-1]
    assert np.all(linear[1:-1] < chord[1:-1])  # strictly: f_lin moves along the line


# ----------------------------------------------------------------------------- the study

def _study(*overrides):
    from ntk_tickets import StudyConfig, with_overrides

    return with_overrides(StudyConfig(), [
        "data.name='teacher'", "data.n_train=32", "data.n_test=32", "data.input_dim=4",
        "train.steps=40", "train.batch_size=8", "train.learning_rate=0.5",
        "train.log_points=3", "train.seeds=[0, 1]", "paths=['exact','linear']",
        "probe_size=4", "metrics=['loss','function_gap']", "stability.spawn_steps=[0, 8]",
        "stability.n_interp=7", *overrides])


@pytest.mark.parametrize("x64", [False, True])
def test_linear_children_have_no_loss_barrier_under_mse(x64):
    """The linearized network's MSE is convex in θ, so the loss along the line between its
    children never rises above the chord: loss_barrier = 0 up to rounding, for the dense
    network at every spawn step (θ_k tangent space) and for every ticket; the exact path's
    barrier is a float ≥ 0 (the chord touches the line at its ends)."""
    from ntk_tickets import load_dataset, records_frame
    from ntk_tickets.cells import run_width

    cfg = _study("tickets.rounds=1", "tickets.prune_fraction=0.5",
                 "tickets.controls=['random']", "tickets.rewind_step=8")
    with jax.enable_x64(x64):
        data = load_dataset(cfg.data, cfg.train.loss)
        frame = records_frame([{**r, "width": 24} for r in run_width(cfg, data, 24).rows])
    barrier = frame[frame.metric == "loss_barrier"]
    assert set(barrier["mask"]) == {"dense", "imp", "random"}
    assert set(barrier.loc[barrier["mask"] == "dense", "spawn_step"]) == {0, 8}
    assert set(barrier.loc[barrier["mask"] != "dense", "spawn_step"]) == {8}
    linear = barrier[barrier.path == "linear"]["value"]
    scale = frame[(frame.metric == "loss") & (frame.split == "train")]["value"].max()
    assert len(linear) == 2 * (2 + 2) and linear.abs().max() <= (1e-12 if x64 else 1e-6) * scale
    assert (barrier[barrier.path == "exact"]["value"] >= 0).all()
    assert (frame.loc[frame.metric == "instability", "value"] >= 0).all()
    spawn = frame[frame.experiment == "spawn"]
    assert set(spawn["spawn_step"]) == {0, 8} and (spawn["mask"] == "dense").all()
    assert (spawn[spawn.metric == "function_gap"].path == "linear").all()


def test_line_metrics_match_a_hand_evaluation():
    """Connectivity.rows against a loop over α that evaluates the network itself: the two
    children are the program's runs with the cell's and the second minibatch order."""
    from ntk_tickets import load_dataset
    from ntk_tickets.experiments import run_dense
    from ntk_tickets.masks import ones_like
    from ntk_tickets.stability import Connectivity

    cfg = _study("data.name='digits'", "train.loss='xent'", "metrics=['loss','accuracy']")
    data = load_dataset(cfg.data, cfg.train.loss)
    cell = run_dense(cfg, data, 16)
    conn = Connectivity(cfg, cell, data)
    ones = ones_like(cell.setup.params0)
    first = cell.trajectories["exact"]
    rows = conn.rows("exact", first, cell.setup.params0, ones, 0)
    second = conn.second_child("exact", cell.setup.params0, ones, 0)
    assert not np.array_equal(np.asarray(conn.order), np.asarray(cell.setup.batches))
    apply = cell.setup.model.apply_fn
    for i, seed in enumerate(cell.setup.seeds):
        t1, t2 = (jax.tree_util.tree_map(lambda a, i=i: a[i], p)
                  for p in (first.params, second.params))
        losses, errors = [], []
        for a in conn.alphas:
            theta = jax.tree_util.tree_map(lambda x, y, a=a: (1 - a) * x + a * y, t1, t2)
            logits = np.asarray(apply(theta, data.x_train), dtype=float)
            logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(
                1, keepdims=True)) - logits.max(1, keepdims=True)
            losses.append(-np.mean(logp[np.arange(len(data.y_train)), data.y_train]))
            test = np.asarray(apply(theta, data.x_test)).argmax(1)
            errors.append(np.mean(test != data.y_test))
        got = {r["metric"]: r["value"] for r in rows if r["seed"] == seed}
        assert got["loss_barrier"] == pytest.approx(
            loss_barrier(np.array(losses), conn.alphas), abs=1e-5)
        assert got["instability"] == pytest.approx(instability(np.array(errors)), abs=1e-9)
