"""One network against the infinite ensemble: expected loss, seed ensembles, closed-form time.

SCIENCE.md, "Comparing one network with an infinite ensemble": the ntk path gives the mean
over initializations and a variance, so the mean over seeds of a finite network's loss must
match the ntk path's ``expected_loss``, and the loss of the seed-averaged prediction
(``ensemble_loss``) the ntk mean's ``loss``. Checked here by Monte Carlo over many seeds of
wide linearized networks, and by hand from :func:`infinite_width_predictions`.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from ntk_tickets.config import DataConfig, ModelConfig
from ntk_tickets.data import load_dataset
from ntk_tickets.experiments import closed_form_steps, run_dense
from ntk_tickets.kernels import empirical_ntk_predictions, infinite_width_predictions
from ntk_tickets.metrics import ENSEMBLE_SEED, PathOutputs, path_values
from ntk_tickets.models import build_model
from ntk_tickets.preset_files import resolve_config


def _mse(f, y):
    """The project's MSE: ½·mean over the n·k entries, per leading index (numpy)."""
    return 0.5 * np.mean((f - y) ** 2, axis=(-2, -1))


def _infinite_outputs(path, prediction, y_train, y_test):
    """:class:`PathOutputs` of one infinite-width prediction (r, ...) as a single 'seed'."""
    mean_train, mean_test, variance = (np.asarray(a, np.float64)[None] for a in prediction)
    return PathOutputs(path, mean_train, mean_test, y_train, y_test, _mse, 0,
                       test_variance=variance)


@functools.cache
def _teacher():
    return load_dataset(DataConfig(name="teacher", n_train=16, n_test=16, input_dim=4))


def test_expected_loss_is_the_loss_of_the_mean_plus_half_the_mean_variance(x64):
    """expected_loss = ½·mean_{i,c}(μ − y)² + ½·mean_i σ²_i (the variance is per point, the
    same for every one of the k = 3 outputs), with σ² ×α², or 0 when centred; by hand from
    :func:`infinite_width_predictions` at α = 1. Tolerance: float round-off (rtol 1e-5 in
    float32, 1e-12 in float64)."""
    rng = np.random.default_rng(0)
    x_train, x_test = rng.standard_normal((8, 4)), rng.standard_normal((5, 4))
    y_train, y_test = rng.standard_normal((8, 3)), rng.standard_normal((5, 3))
    model = build_model(ModelConfig(arch="mlp", depth=1, activation="erf"), 32, (4,), 3)
    steps = np.array([0.0, 10.0, 100.0])
    plain = infinite_width_predictions(model.kernel_fn, x_train, y_train, x_test, 0.5, steps)
    rtol = 1e-12 if x64 else 1e-5
    for alpha, center in ((1.0, False), (2.5, False), (2.5, True)):
        scaled = plain if alpha == 1.0 else infinite_width_predictions(
            model.kernel_fn, x_train, y_train, x_test, 0.5, steps, output_scale=alpha,
            center=center)
        for path in ("ntk", "nngp"):
            mean, variance = (np.asarray(a, np.float64) for a in plain[path][1:])
            variance = 0.0 * variance if center else alpha**2 * variance
            want = (0.5 * np.mean((mean - y_test) ** 2, axis=(-2, -1))
                    + 0.5 * np.mean(variance, axis=-1))
            values = path_values(_infinite_outputs(path, scaled[path], y_train, y_test),
                                 ["loss", "expected_loss", "variance", "ensemble_loss"])
            assert set(values) == {("train", "loss"), ("test", "loss"),
                                   ("test", "expected_loss"), ("test", "variance")}
            np.testing.assert_allclose(values["test", "expected_loss"][0], want, rtol=rtol)
            np.testing.assert_allclose(values["test", "variance"][0],
                                       np.mean(variance, axis=-1), rtol=rtol, atol=0)
            assert np.all(values["test", "expected_loss"] >= values["test", "loss"])


WIDTH, SEEDS, ETA = 1024, 128, 1.0


@pytest.mark.parametrize(("output_scale", "center", "t"),
                         [(1.0, False, None), (2.0, False, 20.0), (1.0, True, None)],
                         ids=["plain-t_inf", "alpha2-t20", "centred-t_inf"])
def test_seeds_of_wide_linearized_networks_average_to_the_infinite_ensemble(
        x64, output_scale, center, t):
    """Monte Carlo over 128 seeds of a width-1024 one-hidden-layer erf network, linearized
    and trained in closed form (entk, vmapped over seeds) on 16 teacher points, against the
    ntk path's ``expected_loss`` and ``loss`` (16 test points).

    Tolerances, each 4 Monte-Carlo standard errors plus a finite-width allowance 1/width:

    * mean over seeds of the test loss vs ``expected_loss``: SE = sd_s(loss_s)/√S;
    * ``ensemble_loss`` (loss of the seed-averaged outputs f̄) vs the ntk ``loss`` plus the
      ½·mean σ²/S that averaging S seeds leaves: f̄ − μ has mean O(1/width) and covariance
      Σ/S, so E loss(f̄) = loss(μ) + ½·mean σ²/S + O(1/width), and its fluctuation is
      dominated by mean((μ − y)(f̄ − μ)), SE = sd_s(mean((μ − y)(f_s − μ)))/√S.

    The allowance: the centred networks' mean loss exceeds the infinite-width one by
    2.1e-3 at width 128 (1024 seeds) and 3.1e-4 at 1024 (128 seeds), i.e. ≈ 0.3/width,
    the O(1/width) correction of the finite-width NTK; 1/width leaves a 3× margin.
    Measured deviations ≤ 1 SE uncentred (SE ≈ 1.9e-3 plain, 7e-3 at α = 2, against an
    expected loss of 0.04 and 0.17 and a loss of the mean of 0.008).
    """
    data = _teacher()
    x_train, y_train, x_test = (jnp.asarray(a) for a in (data.x_train, data.y_train,
                                                          data.x_test))
    model = build_model(ModelConfig(arch="mlp", depth=1, activation="erf"), WIDTH, (4,), 1)
    params = jax.vmap(model.init)(jax.random.split(jax.random.PRNGKey(0), SEEDS))
    steps = None if t is None else np.array([t])
    options = dict(output_scale=output_scale, center=center)
    f_train, f_test = jax.jit(jax.vmap(lambda p: empirical_ntk_predictions(
        model.apply_fn, p, x_train, y_train, x_test, ETA, steps, **options)))(params)
    entk = PathOutputs("entk", np.asarray(f_train, np.float64), np.asarray(f_test, np.float64),
                       data.y_train, data.y_test, _mse, 0)
    ntk = _infinite_outputs("ntk", infinite_width_predictions(
        model.kernel_fn, x_train, y_train, x_test, ETA, steps, get=("ntk",), **options)["ntk"],
        data.y_train, data.y_test)
    finite = path_values(entk, ["loss", "ensemble_loss"])
    infinite = path_values(ntk, ["loss", "expected_loss", "variance"])
    assert finite["test", "ensemble_loss"].shape == (1, 1)

    losses = finite["test", "loss"][:, 0]
    expected, loss_of_mean = infinite["test", "expected_loss"][0, 0], infinite["test", "loss"][0, 0]
    se = losses.std(ddof=1) / np.sqrt(SEEDS)
    assert abs(losses.mean() - expected) <= 4 * se + 1 / WIDTH, (losses.mean(), expected, se)

    residual = ntk.f_test[0, 0] - data.y_test
    linear_term = np.mean(residual * (entk.f_test[:, 0] - ntk.f_test[0, 0]), axis=(-2, -1))
    se_ensemble = linear_term.std(ddof=1) / np.sqrt(SEEDS)
    want = loss_of_mean + 0.5 * infinite["test", "variance"][0, 0] / SEEDS
    ensemble = finite["test", "ensemble_loss"][0, 0]
    assert abs(ensemble - want) <= 4 * se_ensemble + 1 / WIDTH, (ensemble, want, se_ensemble)
    if center:  # no variance: one network is the ensemble, up to finite width
        assert expected == loss_of_mean
    else:  # the comparison resolves the variance term
        assert expected - loss_of_mean > 2 * (4 * se + 1 / WIDTH)


TINY = ["data.name=teacher", "data.n_train=16", "data.n_test=8", "data.input_dim=4",
        "model.depth=1", "model.activation=erf", "train.steps=60", "train.learning_rate=0.5",
        "train.log_points=4", "probe_size=4", "train.seeds=[0, 1, 2]"]
CLOSED_FORMS = "paths=['exact', 'entk', 'ntk', 'nngp']"


def _records(*overrides):
    """One cell of width 64 run by :func:`run_dense`: its config, data, cell and rows."""
    cfg = resolve_config("demo", [*TINY, *overrides])
    data = load_dataset(cfg.data, cfg.train.loss)
    cell = run_dense(cfg, data, 64)
    return cfg, data, cell, pd.DataFrame(cell.rows)


def test_a_cell_records_ensembles_with_seed_minus_one_and_closed_forms_at_infinite_time():
    """closed_form_time = 'inf' with a ridge: entk, ntk and nngp have rows at the last step
    only, equal to kernel ridge regression (ntk: by hand from the analytic kernels; entk:
    from the per-seed closed form); ensemble metrics have one row per step and split with
    seed −1, on the finite paths only. Tolerances: float32 round-off (rtol 1e-4, 1e-5)."""
    ridge = 0.1
    cfg, data, cell, rows = _records(
        CLOSED_FORMS, "train.closed_form_time='inf'", f"train.ridge={ridge}",
        "metrics=['loss', 'variance', 'expected_loss', 'ensemble_loss', 'ensemble_accuracy']")
    setup, steps = cell.setup, cell.setup.steps
    np.testing.assert_array_equal(closed_form_steps(cfg, steps), steps[-1:])
    for path in ("entk", "ntk", "nngp"):
        assert set(rows[rows.path == path].step) == {steps[-1]}
    ensembles = rows[rows.metric == "ensemble_loss"]
    assert set(ensembles.seed) == {ENSEMBLE_SEED} and set(ensembles.split) == {"train", "test"}
    assert set(ensembles.path) == {"exact", "entk"}
    assert len(ensembles[ensembles.path == "exact"]) == 2 * len(steps)
    assert set(rows[rows.metric == "expected_loss"].path) == {"ntk", "nngp"}
    assert set(rows[rows.metric == "loss"].seed) == {0, 1, 2}
    assert "ensemble_accuracy" not in set(rows.metric)  # regression: no classes

    theta_dd, theta_td = (np.asarray(setup.model.kernel_fn(a, b, "ntk"), np.float64) for a, b
                          in ((data.x_train, None), (data.x_test, data.x_train)))
    ridged = theta_dd + ridge * np.mean(np.diagonal(theta_dd)) * np.eye(len(theta_dd))
    want = _mse(theta_td @ np.linalg.solve(ridged, data.y_train), data.y_test)
    ntk = rows[(rows.path == "ntk") & (rows.split == "test")].set_index(["metric", "seed"])
    np.testing.assert_allclose(ntk.loc[("loss", 0), "value"], want, rtol=1e-4)
    np.testing.assert_allclose(ntk.loc[("expected_loss", 0), "value"],
                               want + 0.5 * ntk.loc[("variance", 0), "value"], rtol=1e-4)

    per_seed = np.stack([np.asarray(empirical_ntk_predictions(
        setup.model.apply_fn, jax.tree_util.tree_map(lambda a, i=i: a[i], setup.params0),
        setup.data["x_train"], setup.data["y_train"], setup.data["x_test"],
        cfg.train.learning_rate, None, diag_reg=ridge)[1][0]) for i in range(3)])
    entk = rows[(rows.path == "entk") & (rows.split == "test")]
    np.testing.assert_allclose(entk[entk.metric == "ensemble_loss"].value,
                               [_mse(per_seed.mean(axis=0), data.y_test)], rtol=1e-5)
    np.testing.assert_allclose(entk[entk.metric == "loss"].sort_values("seed").value,
                               _mse(per_seed, data.y_test), rtol=1e-5)


def test_mup_cells_have_no_closed_form_rows():
    _, _, cell, rows = _records(CLOSED_FORMS, "model.parameterization='mup'",
                                "metrics=['loss', 'expected_loss', 'ensemble_loss']")
    assert set(rows.path) == {"exact"}
    assert set(cell.info["diverged_step"]) == {"exact"}


def test_output_scale_and_centring_pair_the_trained_linear_path_with_its_closed_form():
    """α = 4 centred: the linear path (trained at η/α²) ends where entk does (gradient descent
    against its flow: measured 0.3 % apart at step 60, bound 5 %); the infinite ensemble is
    deterministic, so its variance is 0 and its expected loss its loss."""
    _, _, cell, rows = _records("paths=['linear', 'entk', 'ntk']", "model.output_scale=4.0",
                                "model.center=true",
                                "metrics=['loss', 'variance', 'expected_loss']")
    test_loss = rows[(rows.split == "test") & (rows.metric == "loss")]
    final = test_loss[test_loss.step == cell.setup.steps[-1]].set_index(["path", "seed"]).value
    np.testing.assert_allclose(final["linear"], final["entk"], rtol=0.05)
    start = test_loss[test_loss.step == 0].value  # every path starts from the output 0
    np.testing.assert_allclose(start, start.iloc[0], rtol=1e-6)
    ntk = rows[(rows.path == "ntk") & (rows.split == "test")]
    assert (ntk[ntk.metric == "variance"].value == 0).all()
    np.testing.assert_array_equal(ntk[ntk.metric == "expected_loss"].value,
                                  ntk[ntk.metric == "loss"].value)


def test_infinite_closed_form_time_leaves_the_trained_paths_alone():
    """'steps' records the closed forms at every recorded step, 'inf' at the last; the
    trained paths' rows are the same under both."""
    paths = "paths=['linear', 'ntk']"
    _, _, cell, by_steps = _records(paths, "metrics=['loss']")
    _, _, _, at_inf = _records(paths, "metrics=['loss']", "train.closed_form_time='inf'")
    assert set(by_steps[by_steps.path == "ntk"].step) == set(cell.setup.steps)
    assert set(at_inf[at_inf.path == "ntk"].step) == {cell.setup.steps[-1]}
    key = ["path", "seed", "step", "split", "metric"]
    trained = [frame[frame.path == "linear"].sort_values(key).reset_index(drop=True)
               for frame in (by_steps, at_inf)]
    pd.testing.assert_frame_equal(*trained)
