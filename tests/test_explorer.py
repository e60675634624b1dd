"""The explorer, headless: its callback's figure against the records of `ntk-tickets run` for
the same settings, its caches, and the static fallback without ipywidgets."""

import builtins

import numpy as np
import pytest

from ntk_tickets import load_records, run_study
from ntk_tickets.explorer import STEP_CHOICES, Explorer, ExplorerSettings, study_config

VALUES = {"width": 64, "depth": 1, "learning_rate": 0.25, "steps": 100,
          "parameterization": "ntk", "output_scale": 1.0}


@pytest.fixture(scope="module")
def explorer():
    return Explorer()


@pytest.fixture(scope="module")
def cli_records(tmp_path_factory):
    folder = tmp_path_factory.mktemp("explorer")
    run_study(study_config(ExplorerSettings(**VALUES)), folder)
    return load_records(folder)


def _record(records, path, metric, split="test", step=VALUES["steps"]):
    row = records[(records.path == path) & (records.metric == metric)
                  & (records.split == split) & (records.step == step)]
    assert len(row) == 1, (path, metric, split)
    return float(row.value.iloc[0])


def test_callback_figure_holds_the_cli_numbers(explorer, cli_records):
    """The callback the sliders call, with their values: the curves it draws give the test
    losses that `ntk-tickets run` records, and its weight change and function gap are the
    recorded ones at the same step."""
    fig = explorer.redraw(**VALUES)
    view = explorer.view(ExplorerSettings(**VALUES))
    lines = {line.get_label(): line for line in fig.axes[0].lines}
    exact = lines["exact"].get_ydata()
    linear = lines["linearized"].get_ydata()
    np.testing.assert_array_equal(exact, view.exact)
    target = view.target
    for path, curve in (("exact", exact), ("linear", linear)):
        loss = 0.5 * np.mean((curve - target) ** 2)
        assert loss == pytest.approx(_record(cli_records, path, "loss"), rel=1e-5)
    assert view.test_loss["ntk"] == pytest.approx(
        _record(cli_records, "ntk", "expected_loss"), rel=1e-6)
    ntk_mean = fig.axes[0].lines[1].get_ydata()
    np.testing.assert_allclose(ntk_mean, view.ntk_mean)
    step = int(np.flatnonzero(view.steps == VALUES["steps"])[0])
    assert view.weight_change[step] == pytest.approx(
        _record(cli_records, "exact", "weight_change", "none"), rel=1e-5)
    assert view.function_gap[step] == pytest.approx(
        _record(cli_records, "linear", "function_gap"), rel=1e-5)


def test_learning_rate_and_steps_reuse_the_compiled_programs(explorer):
    """Moves of the learning rate and the steps compile nothing; a new width compiles its
    programs once."""
    explorer.view(ExplorerSettings(**VALUES))
    (_, programs, _), = [v for k, v in explorer._cells.items() if k[0] == 64]
    compiled = {path: len(p._compiled) for path, p in programs.items()}
    for lr in (0.1, 0.5):
        for steps in (10, 1000):
            explorer.view(ExplorerSettings(**{**VALUES, "learning_rate": lr, "steps": steps}))
    assert {path: len(p._compiled) for path, p in programs.items()} == compiled == {
        "exact": 1, "linear": 1}


def test_recorded_steps_are_the_step_choices(explorer):
    _, setup, _ = explorer._run(ExplorerSettings(**VALUES))
    assert setup.steps.tolist() == list(STEP_CHOICES)
    with pytest.raises(ValueError, match="steps 50"):
        explorer.view(ExplorerSettings(**{**VALUES, "steps": 50}))


def test_mup_draws_no_kernel_band(explorer):
    view = explorer.view(ExplorerSettings(**{**VALUES, "parameterization": "mup"}))
    assert view.ntk_mean is None and set(view.test_loss) == {"exact", "linear"}


def test_a_function_of_your_own_is_learned_from_the_raw_inputs():
    view = Explorer(np.tanh).view(ExplorerSettings(**VALUES))
    np.testing.assert_allclose(view.target, np.tanh(view.x))
    np.testing.assert_allclose(view.y_train, np.tanh(view.x_train))
    assert view.x.min() >= -np.pi and view.x.max() <= np.pi


def test_widget_has_the_named_sliders_and_falls_back_without_ipywidgets(explorer,
                                                                         monkeypatch, capsys):
    ui = explorer.widget(ExplorerSettings(**VALUES))
    names = [c.description for box in ui.children[:2] for c in box.children]
    assert names == ["width", "depth", "learning rate", "steps", "param.", "α",
                     "centre f(θ0)"]
    real_import = builtins.__import__

    def no_ipywidgets(name, *args, **kwargs):
        if name == "ipywidgets":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ipywidgets)
    fig = explorer.widget(ExplorerSettings(**VALUES))
    assert "static figure" in capsys.readouterr().out
    assert fig.axes[0].lines
