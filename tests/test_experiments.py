"""Paired width studies end to end: scaling trends, divergence, results schema, resume, CLI."""

import json
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from ntk_tickets import with_overrides
from ntk_tickets.cli import main
from ntk_tickets.errors import UserInputError
from ntk_tickets.preset_files import resolve_config
from ntk_tickets.results import RECORD_COLUMNS, load_manifest, load_records
from ntk_tickets.study import run_study, x64_enabled

TINY = [
    "data.name=teacher", "data.n_train=32", "data.n_test=16", "data.input_dim=4",
    "model.depth=1", "model.activation=erf", "train.steps=60", "train.learning_rate=1.0",
    "train.log_points=4", "probe_size=4",
]


def _cfg(*overrides):
    return resolve_config("demo", [*TINY, *overrides])


@pytest.fixture(scope="module")
def scaling_records(tmp_path_factory):
    cfg = _cfg("model.widths=[16, 1024]", "train.seeds=[0, 1, 2]",
               "paths=['exact', 'linear', 'entk', 'ntk', 'nngp']")
    out = tmp_path_factory.mktemp("scaling")
    run_study(cfg, out, log=lambda line: None)
    return load_records(out), out


def _final(records, path, metric):
    rows = records[(records.path == path) & (records.metric == metric)]
    rows = rows[rows.step == rows.step.max()]
    return rows.groupby("width")["value"].mean()


def test_function_gap_and_weight_change_shrink_with_width(scaling_records):
    """Lee et al. 2019: the exact network approaches its linearization as width grows."""
    records, _ = scaling_records
    gap = _final(records, "linear", "function_gap")
    change = _final(records, "exact", "weight_change")
    assert gap[1024] < 0.3 * gap[16], gap.to_dict()
    assert change[1024] < 0.3 * change[16], change.to_dict()


def test_linear_training_matches_its_closed_form_and_init_error_shrinks(scaling_records):
    records, _ = scaling_records
    lin = records[(records.path == "linear") & (records.metric == "loss")]
    entk = records[(records.path == "entk") & (records.metric == "loss")]
    merged = lin.merge(entk, on=["width", "seed", "step", "split"])
    start = merged[merged.step == 0]  # both start at f(θ0); float32 round-off apart
    np.testing.assert_allclose(start.value_x, start.value_y, rtol=1e-6)
    # Step η = 1 is not small: GD's (1 − ηλ)^s decays faster than the flow's exp(−ηλs) at
    # first (measured up to 36 % apart at step 3), but both reach the same fit (0.6 % apart).
    final = merged[merged.step == merged.step.max()]
    np.testing.assert_allclose(final.value_x, final.value_y, rtol=0.05)
    init_error = records[records.metric == "ntk_init_error"].groupby("width")["value"].mean()
    assert init_error[1024] < 0.5 * init_error[16]


def test_records_schema_and_manifest(scaling_records):
    records, out = scaling_records
    assert list(records.columns[: len(RECORD_COLUMNS)]) == list(RECORD_COLUMNS)
    assert set(records.path) == {"exact", "linear", "entk", "ntk", "nngp"}
    assert set(records.split) == {"train", "test", "probe", "none"}
    assert {"weight_change/dense_0", "weight_change/readout", "ntk_change"} <= set(
        records.metric)
    variance = records[records.metric == "variance"]
    assert set(variance.path) == {"ntk", "nngp"}
    at_init = variance[variance.step == 0].value
    assert (at_init > 0).all()  # the prior: the ensemble's outputs at init are random
    final = variance[variance.step == variance.step.max()].value
    assert (final >= -1e-6).all()
    assert not records.duplicated(["width", "seed", "path", "step", "split", "metric"]).any()
    manifest = load_manifest(out)
    assert manifest["environment"]["neural-tangents"] == "0.6.5"
    assert set(manifest["cells"]) == {"w00016_ntk_os1_s0-2", "w01024_ntk_os1_s0-2"}
    for cell in manifest["cells"].values():
        assert cell["status"] == "done" and cell["compile_s"] > 0 and cell["run_s"] > 0
    assert manifest["config"]["model"]["widths"] == [16, 1024]


def test_x64_flag_runs_the_study_in_float64(tmp_path, monkeypatch):
    cfg = _cfg("model.widths=[8]", "train.seeds=[0]", "paths=['exact']", "metrics=['loss']",
               "train.x64=true")
    run_study(cfg, tmp_path, log=lambda line: None)
    assert load_manifest(tmp_path)["environment"]["x64"] is True
    monkeypatch.setenv("JAX_ENABLE_X64", "1")
    assert x64_enabled(_cfg())
    monkeypatch.setenv("JAX_ENABLE_X64", "0")
    assert not x64_enabled(_cfg())


def test_cross_entropy_study_skips_closed_forms_and_learns(tmp_path):
    cfg = resolve_config("demo", [
        "data.n_train=100", "data.n_test=100", "model.widths=[64]", "train.seeds=[0]",
        "train.loss=xent", "train.learning_rate=2.0", "train.steps=100", "probe_size=4"])
    run_study(cfg, tmp_path, log=lambda line: None)
    records = load_records(tmp_path)
    assert set(records.path) == {"exact", "linear"}
    loss = _final(records[records.split == "train"], "exact", "loss")
    first = records[(records.path == "exact") & (records.metric == "loss")
                    & (records.split == "train") & (records.step == 0)].value
    assert float(loss.iloc[0]) < 0.5 * float(first.iloc[0])
    assert float(_final(records[records.split == "test"], "linear", "accuracy").iloc[0]) > 0.6


def test_only_configured_metrics_are_recorded(tmp_path):
    cfg = _cfg("model.widths=[8]", "train.seeds=[0]", "metrics=['loss']",
               "paths=['exact', 'linear']")
    run_study(cfg, tmp_path, log=lambda line: None)
    assert set(load_records(tmp_path).metric) == {"loss"}


def test_divergence_is_recorded_and_other_cells_go_on(tmp_path):
    cfg = _cfg("model.widths=[8, 16]", "train.seeds=[0]", "train.learning_rate=500.0",
               "paths=['exact']", "metrics=['loss']")
    report = run_study(cfg, tmp_path, log=lambda line: None)
    manifest = load_manifest(tmp_path)
    assert {c["status"] for c in manifest["cells"].values()} == {"diverged"}
    assert set(report.diverged) == {"w00008_ntk_os1_s0", "w00016_ntk_os1_s0"}
    assert isinstance(manifest["cells"]["w00008_ntk_os1_s0"]["diverged_step"]["exact"]["0"], int)


def test_rerun_skips_finished_cells(tmp_path):
    cfg = _cfg("model.widths=[8]", "train.seeds=[0]", "paths=['exact']", "metrics=['loss']")
    run_study(cfg, tmp_path, log=lambda line: None)
    before = load_records(tmp_path)
    report = run_study(with_overrides(cfg, []), tmp_path, log=lambda line: None)
    assert report.skipped == ["w00008_ntk_os1_s0"] and report.computed == []
    assert len(load_records(tmp_path)) == len(before)


def test_run_command_writes_results_and_prints_the_table(tmp_path, capsys):
    args = ["run", "demo", "--out", str(tmp_path)]
    for item in [*TINY, "model.widths=[8]", "train.seeds=[0]"]:
        args += ["--set", item]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "loss:exact" in out and "gap:linear" in out  # teacher data: regression
    assert (tmp_path / "records.parquet").exists()
    assert json.loads((tmp_path / "manifest.json").read_text())["config"]["name"] == "demo"


@pytest.mark.parametrize("args, fragment", [
    (["run", "no-such-preset"], "'no-such-preset' is neither a preset nor a config file"),
    (["run", "demo", "--set", "train.nope=1"], "unknown config key 'train.nope'"),
    (["run", "demo", "--set", "train.steps=many"], "train.steps must be an integer"),
    (["run", "missing.toml"], "missing.toml' does not exist"),
])
def test_run_bad_input_exits_2_with_one_line(tmp_path, capsys, args, fragment):
    assert main([*args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1


def test_ntk_change_is_recorded_at_every_step_and_grows_from_zero(scaling_records):
    records, _ = scaling_records
    change = records[records.metric == "ntk_change"]
    assert set(change.path) == {"exact"}  # the linear path's tangent kernel never changes
    steps = sorted(records[records.metric == "loss"].step.unique())
    assert sorted(change.step.unique()) == steps
    per_step = change[change.width == 16].groupby("step")["value"].mean()
    assert per_step.iloc[0] == 0.0 and per_step.iloc[-1] > 0.0
    final = _final(records, "exact", "ntk_change")
    assert final[1024] < 0.3 * final[16], final.to_dict()  # lazier kernels at width


def test_ticket_study_through_the_cli_prints_the_ticket_table(tmp_path, capsys):
    args = ["run", "demo-tickets", "--out", str(tmp_path)]
    for item in ["model.widths=[16]", "train.seeds=[0]", "train.steps=20", "data.n_train=64",
                 "data.n_test=32", "tickets.rounds=2"]:
        args += ["--set", item]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "test accuracy of each mask" in out and "reinit" in out
    records = load_records(tmp_path)
    assert set(records["mask"]) == {"dense", "imp", "random", "reinit", "imp_rescaled",
                                    "random_rescaled", "random_init_rescaled",
                                    "reinit_rescaled"}
    assert set(records["round"]) == {0, 1, 2}
    manifest = load_manifest(tmp_path)
    cell = next(iter(manifest["cells"].values()))
    assert set(cell["sparsity_report"]["imp"]) == {"1", "2"}


def test_a_study_killed_with_sigkill_resumes_with_nothing_lost_or_duplicated(tmp_path):
    """Kill a real `ntk-tickets run` once its first cell is on disk, run again, and compare
    with an uninterrupted run: the same records, each exactly once."""
    overrides = [*TINY, "model.widths=[8, 12, 16, 20, 24, 28]", "train.seeds=[0]",
                 "train.steps=400", "paths=['exact', 'linear']",
                 "metrics=['loss', 'accuracy', 'weight_change']"]
    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "ntk_tickets", "run", "demo", "--out", str(killed)]
    for item in overrides:
        command += ["--set", item]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list((killed / "cells").glob("*.parquet")) and time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished_before = len(list((killed / "cells").glob("*.parquet")))
    assert 1 <= finished_before < 6

    cfg = _cfg(*overrides[len(TINY):])
    report = run_study(cfg, killed, log=lambda line: None)
    assert len(report.skipped) >= finished_before and len(report.computed) >= 1
    clean = tmp_path / "clean"
    run_study(cfg, clean, log=lambda line: None)
    key = ["width", "seed", "path", "step", "split", "metric"]
    resumed, reference = (load_records(d).sort_values(key).reset_index(drop=True)
                          for d in (killed, clean))
    assert not resumed.duplicated(key).any()
    assert len(resumed) == len(reference)
    np.testing.assert_allclose(resumed["value"], reference["value"], rtol=1e-6)
    assert {c["status"] for c in load_manifest(killed)["cells"].values()} == {"done"}


def test_a_study_grows_by_widths_and_seeds_computing_only_new_cells(tmp_path):
    base = ["train.seeds=[0]", "paths=['exact', 'linear']", "metrics=['loss']"]
    run_study(_cfg("model.widths=[8]", *base), tmp_path, log=lambda line: None)
    first = load_records(tmp_path)
    report = run_study(_cfg("model.widths=[8, 16]", *base), tmp_path, log=lambda line: None)
    assert report.computed == ["w00016_ntk_os1_s0"] and report.skipped == ["w00008_ntk_os1_s0"]
    grown = load_records(tmp_path)
    pd.testing.assert_frame_equal(grown[grown.width == 8].reset_index(drop=True), first)
    report = run_study(_cfg("model.widths=[8, 16]", "train.seeds=[0, 1]", *base[1:]),
                       tmp_path, log=lambda line: None)
    assert report.computed == ["w00008_ntk_os1_s1", "w00016_ntk_os1_s1"]
    records = load_records(tmp_path)
    assert sorted(records.groupby(["width", "seed"]).groups) == [(8, 0), (8, 1), (16, 0),
                                                                 (16, 1)]
    assert not records.duplicated().any()
    # The added seed's values equal those of a study that had it from the start.
    fresh = tmp_path / "fresh"
    run_study(_cfg("model.widths=[16]", "train.seeds=[1]", *base[1:]), fresh,
              log=lambda line: None)
    key = ["path", "step", "split", "metric"]
    grown_seed = records[(records.width == 16) & (records.seed == 1)].sort_values(key)
    np.testing.assert_allclose(grown_seed["value"],
                               load_records(fresh).sort_values(key)["value"], rtol=1e-6)
    with pytest.raises(UserInputError, match="train.steps differs"):
        run_study(_cfg("model.widths=[8]", "train.steps=61", *base), tmp_path,
                  log=lambda line: None)


def test_ctrl_c_prints_one_line_and_keeps_the_finished_cells(tmp_path):
    out = tmp_path / "study"
    command = [sys.executable, "-m", "ntk_tickets", "run", "demo", "--out", str(out)]
    for item in [*TINY, "model.widths=[8, 12, 16, 20, 24, 28]", "train.seeds=[0]",
                 "train.steps=400", "paths=['exact', 'linear']", "metrics=['loss']"]:
        command += ["--set", item]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.monotonic() + 120
    while not list((out / "cells").glob("*.parquet")) and time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err
    cells = load_manifest(out)["cells"].values()
    saved = sum(c["status"] == "done" for c in cells)
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(rf"ntk-tickets: interrupted: {saved} cells? saved in {re.escape(str(out))}"
                        r"; run the same command to resume", last), last
    assert saved >= 1
    # ... and the same command resumes: every cell once, nothing lost.
    resumed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    records = load_records(out)
    assert sorted(records["width"].unique()) == [8, 12, 16, 20, 24, 28]
    assert not records.duplicated(["width", "seed", "path", "step", "split", "metric"]).any()
