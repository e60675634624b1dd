"""Figures and tables of rewinding, stability and subspaces, checked against the records they
draw from."""

import numpy as np
import pytest

from ntk_tickets import StudyConfig, load_dataset, records_frame, with_overrides
from ntk_tickets.cells import run_width
from ntk_tickets.connectivity_figures import (
    INTRINSIC_FRACTION,
    stability_table,
    subspace_accuracy,
    subspace_table,
)
from ntk_tickets.plotting import study_figures


@pytest.fixture(scope="module")
def records():
    cfg = with_overrides(StudyConfig(), [
        "data.name='digits'", "data.n_train=32", "data.n_test=32", "train.steps=24",
        "train.batch_size=8", "train.optimizer='adam'", "train.learning_rate=0.01",
        "train.loss='xent'", "train.log_points=3", "train.seeds=[0, 1]",
        "paths=['exact','linear']", "probe_size=4",
        "metrics=['loss','accuracy','function_gap','ntk_velocity']",
        "tickets.rounds=1", "tickets.prune_fraction=0.5", "tickets.rewind_step=[0, 4]",
        "tickets.controls=['random_rescaled']", "stability.spawn_steps=[0, 4]",
        "stability.n_interp=3", "subspace.kinds=['gaussian','axis_random']",
        "subspace.dims=[4, 64]", "subspace.learning_rate=0.1"])
    data = load_dataset(cfg.data, cfg.train.loss)
    return records_frame([{**r, "width": 8} for r in run_width(cfg, data, 8).rows])


def test_every_section_has_its_figures(records):
    names = set(study_figures(records))
    assert {"rewind_sweep", "rewind_sweep_linear", "stability", "subspace",
            "ticket_accuracy_rewind0", "ticket_accuracy_rewind4",
            "ticket_accuracy_linear_rewind4", "accuracy_test"} <= names
    assert "ticket_accuracy" not in names  # one per rewind step instead


def test_subspace_figure_and_d_int90_follow_the_records(records):
    sub = records[(records.experiment == "subspace") & (records.metric == "accuracy")
                  & (records.split == "test") & (records.step == 24)]
    dense = records[(records.experiment == "train") & (records["mask"] == "dense")
                    & (records.metric == "accuracy") & (records.split == "test")
                    & (records.step == 24)]
    table = subspace_table(records).set_index(["width", "path", "subspace"])
    for (width, path, kind), row in table.iterrows():
        means = sub[(sub.width == width) & (sub.path == path)
                    & (sub.subspace == kind)].groupby("dim")["value"].mean()
        reference = dense[(dense.width == width) & (dense.path == path)]["value"].mean()
        reached = means[means >= INTRINSIC_FRACTION * reference]
        expected = reached.index.min() if len(reached) else np.nan
        assert row["dense"] == pytest.approx(reference)
        assert row["d_int90"] == pytest.approx(expected, nan_ok=True)
    fig = subspace_accuracy(records)
    ax = fig.axes[0]  # width 8
    lines = {line.get_label(): line for line in ax.get_lines()}
    gaussian = sub[(sub.width == 8) & (sub.path == "exact") & (sub.subspace == "gaussian")]
    expected = gaussian.groupby("dim")["value"].mean()
    drawn = [c for c in ax.containers if c.get_label() == "gaussian, exact"][0]
    np.testing.assert_allclose(np.asarray(drawn.lines[0].get_ydata(), dtype=float),
                               expected.to_numpy())
    assert "dense (exact)" in lines


def test_stability_table_holds_every_spawn_and_rewind_step(records):
    table = stability_table(records)
    dense = table[table["mask"] == "dense"]
    assert set(dense["spawn_step"]) == {0, 4} and set(dense["path"]) == {"exact", "linear"}
    assert set(table[table["mask"] == "imp"]["spawn_step"]) == {0, 4}
    assert (table["instability"] >= 0).all()
    assert table.loc[table.path == "linear", "loss_barrier"].abs().max() < 1e-5
