"""The metric registry: one entry adds a metric everywhere; diverged values are NaN."""

import dataclasses

import numpy as np
import pytest

from ntk_tickets import StudyConfig, load_manifest, load_records, run_study, with_overrides
from ntk_tickets.errors import UserInputError
from ntk_tickets.metrics import (
    ENSEMBLE_SEED,
    METRICS,
    Metric,
    PathOutputs,
    metric_label,
    path_values,
    record_seeds,
)
from ntk_tickets.study import width_table

TINY = ["data.name='digits'", "data.n_train=64", "data.n_test=32", "model.depth=1",
        "train.steps=20", "train.log_points=4", "train.seeds=[0]", "probe_size=4"]


@pytest.fixture
def max_output(monkeypatch):
    """The README's worked example, registered for one test only."""
    monkeypatch.setitem(METRICS._entries, "max_output", Metric(
        label="largest |f(x)| on the test inputs",
        compute=lambda o: {("test", "max_output"): np.abs(o.f_test).max(axis=(-2, -1))}))


def test_a_metric_added_in_one_entry_is_recorded_for_every_path(tmp_path, max_output):
    cfg = with_overrides(StudyConfig(), [*TINY, "model.widths=[16]",
                                         "paths=['exact','linear','ntk']",
                                         "metrics=['loss','max_output']"])
    run_study(cfg, tmp_path, log=lambda line: None)
    records = load_records(tmp_path)
    rows = records[records.metric == "max_output"]
    assert set(rows.path) == {"exact", "linear", "ntk"} and set(rows.split) == {"test"}
    assert (rows.value >= 0).all() and rows.value.notna().all()
    assert (rows[rows.path == "exact"].value > 0).all()  # the ensemble mean starts at 0
    assert metric_label("max_output") == "largest |f(x)| on the test inputs"


def test_unknown_metrics_are_refused_with_the_registry_names():
    with pytest.raises(UserInputError, match="metrics = 'max_output' is not allowed; choose "
                                             "one of 'loss', 'accuracy'"):
        with_overrides(StudyConfig(), ["metrics=['max_output']"])


def _outputs(f_train, loss):
    n, k = f_train.shape[-2:]
    y = np.eye(k)[np.arange(n) % k]
    return PathOutputs("exact", f_train, f_train.copy(), y, y, loss, n_classes=k)


def test_every_value_after_the_first_non_finite_loss_is_nan():
    f = np.zeros((1, 4, 6, 3))
    f[0, :, np.arange(6), np.arange(6) % 3] = 1.0  # perfect predictions: accuracy 1
    f[0, 2, 0, 0] = np.nan                          # step 2 diverges

    def loss(f, y):
        return 0.5 * np.mean((f - y) ** 2, axis=(-2, -1))

    values = path_values(_outputs(f, loss), ["loss", "accuracy"])
    accuracy = values["test", "accuracy"][0]
    np.testing.assert_array_equal(accuracy[:2], [1.0, 1.0])
    assert np.isnan(accuracy[2:]).all()  # step 3 is finite again, but after the divergence
    assert np.isnan(values["train", "loss"][0, 2:]).all()


def test_a_diverged_study_shows_nan_everywhere_and_names_every_path(tmp_path):
    cfg = with_overrides(StudyConfig(), [*TINY, "model.widths=[16]",
                                         "train.learning_rate=10000.0",
                                         "paths=['exact','ntk','nngp']",
                                         "metrics=['loss','accuracy']"])
    run_study(cfg, tmp_path, log=lambda line: None)
    records = load_records(tmp_path)
    exact = records[(records.path == "exact") & (records.step > 0)]
    assert exact.value.isna().all()  # loss and accuracy alike, from step 1 on
    # Gradient flow (the closed forms) does not diverge: their values stay numbers.
    assert records[records.path == "ntk"].value.notna().all()
    steps = load_manifest(tmp_path)["cells"]["w00016_ntk_os1_s0"]["diverged_step"]
    assert steps == {"exact": {"0": 1}, "ntk": {"0": None}, "nngp": {"0": None}}
    row = width_table(records).splitlines()[-1].split()
    assert row[0] == "16" and row[1] == "NaN"


def test_ensemble_metrics_average_the_seeds_and_are_nan_once_any_seed_diverged():
    """ensemble_loss/accuracy: one value per step over the seed-averaged outputs (seed −1),
    NaN from the first step at which any seed diverged; per-seed values of the other seeds
    stay."""
    rng = np.random.default_rng(0)
    f = rng.standard_normal((3, 4, 6, 3))
    f[1, 2, 0, 0] = np.inf  # seed 1 diverges at step 2

    def loss(f, y):
        with np.errstate(invalid="ignore"):
            return 0.5 * np.mean((f - y) ** 2, axis=(-2, -1))

    outputs = _outputs(f, loss)
    values = path_values(outputs, ["loss", "ensemble_loss", "ensemble_accuracy"])
    ensemble = values["test", "ensemble_loss"]
    assert ensemble.shape == (1, 4)
    mean = f[:, :2].mean(axis=0)
    np.testing.assert_allclose(ensemble[0, :2], loss(mean, outputs.y_test), rtol=1e-12)
    labels = outputs.y_test.argmax(-1)
    np.testing.assert_array_equal(values["train", "ensemble_accuracy"][0, :2],
                                  np.mean(mean.argmax(-1) == labels, axis=-1))
    assert np.isnan(ensemble[0, 2:]).all()
    assert np.isnan(values["test", "ensemble_accuracy"][0, 2:]).all()
    assert np.isfinite(values["test", "loss"][[0, 2]]).all()  # the other seeds keep theirs
    assert record_seeds("ensemble_loss", [0, 1, 2]) == (ENSEMBLE_SEED,) == (-1,)
    assert list(record_seeds("weight_change/readout", [0, 1, 2])) == [0, 1, 2]
    # Infinite-width paths are ensembles already: no seed ensemble, but an expected loss.
    infinite = dataclasses.replace(outputs, path="ntk", test_variance=np.ones((3, 4, 6)))
    assert set(path_values(infinite, ["ensemble_loss", "expected_loss"])) == {
        ("test", "expected_loss")}


def test_ntk_velocity_and_final_distance_of_a_kernel_that_grows_linearly():
    """K_t = (1 + t)·K_0 at steps 0, 1, 3: the velocity between consecutive steps is
    (t_i − t_{i−1}) / (1 + t_{i−1}) = 1, 1 (0 at the first step), and the distance to the final
    kernel |t − 3| / 4 = 3/4, 1/2, 0; ntk_change (t) agrees."""
    from ntk_tickets.metrics import METRICS

    rng = np.random.default_rng(0)
    a = rng.standard_normal((4, 4))
    k0 = a @ a.T
    steps = np.array([0.0, 1.0, 3.0])
    kernels = np.stack([(1 + steps)[:, None, None] * k0] * 2)  # two seeds
    f = np.zeros((2, 3, 6, 3))
    outputs = dataclasses.replace(_outputs(f, lambda f, y: np.zeros(f.shape[:-2])),
                                  probe_kernel=kernels)
    velocity = METRICS["ntk_velocity"].compute(outputs)["probe", "ntk_velocity"]
    np.testing.assert_allclose(velocity, [[0, 1, 1]] * 2, atol=1e-12)
    distance = METRICS["ntk_final_distance"].compute(outputs)["probe", "ntk_final_distance"]
    np.testing.assert_allclose(distance, [[0.75, 0.5, 0]] * 2, atol=1e-12)
    change = METRICS["ntk_change"].compute(outputs)["probe", "ntk_change"]
    np.testing.assert_allclose(change, [steps] * 2, atol=1e-12)
