"""Bad input on the command line: one clear line, exit status 2, and no file changed."""

import json
import shutil
from pathlib import Path

import pytest

from ntk_tickets.cli import main

TINY = """
name = "tiny"
paths = ["exact"]
metrics = ["loss", "accuracy", "weight_change"]
[data]
name = "digits"
n_train = 32
n_test = 32
[model]
widths = [4, 8]
[train]
steps = 5
seeds = [0]
log_points = 2
"""


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file's bytes, but the (empty until locked) lock file, which holds no results."""
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def _one_line_error(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith("ntk-tickets: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err
    return err


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny study: (config path, results folder)."""
    root = tmp_path_factory.mktemp("tiny")
    config = root / "tiny.toml"
    config.write_text(TINY)
    assert main(["run", str(config), "--out", str(root / "study")]) == 0
    return config, root / "study"


@pytest.fixture
def study(finished, tmp_path):
    config, folder = finished
    copy = tmp_path / "study"
    shutil.copytree(folder, copy)
    (copy / ".lock").unlink(missing_ok=True)
    return config, copy


def test_unknown_preset(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "tickets-vs-widht"]) == 2
    _one_line_error(capsys, "'tickets-vs-widht' is neither a preset nor a config file",
                    "tickets-vs-width")
    assert list(tmp_path.iterdir()) == []  # no results folder was made


@pytest.mark.parametrize("override, fragment", [
    ("model.widthz=[64]", "widthz"),
    ("train.steps=many", "train.steps must be an integer"),
    ("model.widths=64", "model.widths"),
    ("model.parameterization='mu'", "model.parameterization = 'mu' is not allowed"),
    ("model.parameterization=[]", "model.parameterization must not be empty"),
    ("model.output_scale=0", "model.output_scale must be > 0"),
    ("model.output_scale=[1, 1]", "model.output_scale lists 1.0 more than once"),
    ("data.label_noise=1.5", "data.label_noise is a fraction"),
    ("train.closed_form_time='never'", "train.closed_form_time = 'never' is not allowed"),
    ("train.ridge=-1", "train.ridge must be >= 0"),
])
def test_bad_override_leaves_existing_results_untouched(study, capsys, override, fragment):
    config, folder = study
    before = _snapshot(folder)
    assert main(["run", str(config), "--out", str(folder), "--set", override]) == 2
    _one_line_error(capsys, fragment)
    assert _snapshot(folder) == before


@pytest.mark.parametrize("options, fragment", [
    (["--gpus-per-cell", "1"], "need --executor ray"),
    (["--executor", "ray", "--gpus-per-cell", "nan"], "must be a finite number"),
    (["--workers", "0"], "argument --workers: 0 is not a positive integer"),
])
def test_bad_executor_options_with_force_discard_nothing(study, capsys, options, fragment):
    # --force discards a folder's results, so the options must be checked before it does.
    config, folder = study
    before = _snapshot(folder)
    assert main(["run", str(config), "--out", str(folder), "--force", *options]) == 2
    _one_line_error(capsys, fragment)
    assert _snapshot(folder) == before


def test_unwritable_results_folder(study, tmp_path, capsys):
    config, _ = study
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(["run", str(config), "--out", str(blocker / "study")]) == 2
    _one_line_error(capsys, "cannot create results folder", "choose another --out DIR")
    assert blocker.read_text() == "not a folder"


def test_unwritable_summary_file(study, capsys):
    _, folder = study
    (folder / "summary.csv").mkdir()  # something that cannot be replaced by a file
    before = _snapshot(folder)
    assert main(["summarize", str(folder)]) == 2
    _one_line_error(capsys, "cannot write", "summary.csv")
    assert _snapshot(folder) == before


@pytest.mark.parametrize("command", ["summarize", "plot"])
def test_corrupted_records_file_is_reported_not_replaced(study, capsys, command):
    _, folder = study
    (folder / "records.parquet").write_bytes(b"not parquet")
    before = _snapshot(folder)
    assert main([command, str(folder)]) == 2
    _one_line_error(capsys, "records.parquet' is corrupted")
    assert _snapshot(folder) == before  # no summary.csv, no figures, records untouched


@pytest.mark.parametrize("damaged", ["manifest.json", "cells/w00008_ntk_os1_s0.parquet"])
def test_run_refuses_a_corrupted_study_and_changes_nothing(study, capsys, damaged):
    config, folder = study
    (folder / damaged).write_bytes(b"garbage")
    before = _snapshot(folder)
    assert main(["run", str(config), "--out", str(folder)]) == 2
    _one_line_error(capsys, "is corrupted")
    assert _snapshot(folder) == before


def test_run_rebuilds_a_corrupted_records_file_from_its_cells(study, capsys):
    # records.parquet is derived from the cell files (the source of truth): rerunning
    # rebuilds it exactly, and recomputes nothing.
    config, folder = study
    original = (folder / "records.parquet").read_bytes()
    (folder / "records.parquet").write_bytes(b"garbage")
    assert main(["run", str(config), "--out", str(folder)]) == 0
    assert "0 cells computed, 2 already done" in capsys.readouterr().out
    assert (folder / "records.parquet").read_bytes() == original


def test_a_cell_too_large_for_memory_is_refused_before_force_deletes(study, capsys):
    config, folder = study
    before = _snapshot(folder)
    assert main(["run", str(config), "--out", str(folder), "--force", "--set", "model.depth=2",
                 "--set", "model.widths=[200000]"]) == 2
    _one_line_error(capsys, "width 200000 with 1 seed(s) needs about", "GiB available",
                    "lower model.widths")
    assert _snapshot(folder) == before  # --force deleted nothing


def test_rerunning_a_finished_study_writes_nothing(study, capsys):
    # Permissions make the folder read-only, except for root (as in CI), who writes
    # anyway: there, writing nothing at all proves that a read-only folder would do.
    config, folder = study
    for path in [folder, *folder.rglob("*")]:
        path.chmod(path.stat().st_mode & ~0o222)
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*")
              if p.is_file()}
    assert main(["run", str(config), "--out", str(folder)]) == 0
    assert "0 cells computed, 2 already done" in capsys.readouterr().out
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*")
             if p.is_file()}
    assert after == before and not (folder / ".lock").exists()
    for path in [folder, *folder.rglob("*")]:
        path.chmod(path.stat().st_mode | 0o200)


def test_a_study_name_that_is_a_path_is_refused(tmp_path, capsys):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
    assert main(["run", str(config), "--set", f"name='{tmp_path / 'elsewhere'}'"]) == 2
    _one_line_error(capsys, "must be a plain name")
    assert not (tmp_path / "elsewhere").exists()


def test_a_config_that_is_not_utf8_is_one_line(tmp_path, capsys):
    config = tmp_path / "latin1.toml"
    config.write_bytes(TINY.replace('"tiny"', '"caf\xe9"').encode("latin-1"))
    assert main(["run", str(config), "--out", str(tmp_path / "out")]) == 2
    _one_line_error(capsys, "is not UTF-8 text")


def test_a_hand_edited_manifest_is_one_line(study, capsys):
    config, folder = study
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["x64"] = "no"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    before = _snapshot(folder)
    assert main(["run", str(config), "--out", str(folder)]) == 2
    _one_line_error(capsys, "'x64' must be a JSON bool")
    assert _snapshot(folder) == before
