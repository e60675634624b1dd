"""Executors and the progress bar: every executor writes the same records as the serial one."""

import io
import os
import shutil
import time

import pandas as pd
import pytest

from ntk_tickets.config import load_config
from ntk_tickets.errors import UserInputError
from ntk_tickets.executors import _process_pool, execute_cells
from ntk_tickets.progress import Progress, bar_enabled
from ntk_tickets.results import load_manifest, load_records
from ntk_tickets.study import run_study

# A ticket study (dense paths plus one IMP round and a control) exercises both cell kinds.
SMALL = """
name = "small"
paths = ["exact", "linear"]
metrics = ["loss", "accuracy", "weight_change", "function_gap"]
[data]
name = "digits"
n_train = 64
n_test = 64
[model]
widths = [8, 16]
[train]
steps = 20
seeds = [0, 1]
loss = "xent"
learning_rate = 0.5
log_points = 4
[tickets]
rounds = 1
eval_paths = ["exact"]
controls = ["random"]
"""


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "small.toml"
    path.write_text(SMALL)
    return load_config(path)


@pytest.fixture(scope="module")
def serial_dir(small, tmp_path_factory):
    out = tmp_path_factory.mktemp("serial")
    run_study(small, out, log=lambda line: None)
    return out


def _assert_same_study(a, b):
    pd.testing.assert_frame_equal(load_records(a), load_records(b), check_exact=True)
    cells_a, cells_b = load_manifest(a)["cells"], load_manifest(b)["cells"]
    assert {k: v["status"] for k, v in cells_a.items()} == \
        {k: v["status"] for k, v in cells_b.items()}
    assert {k: v["rows"] for k, v in cells_a.items()} == \
        {k: v["rows"] for k, v in cells_b.items()}


def test_process_pool_records_are_identical_to_serial(small, serial_dir, tmp_path):
    lines = []
    report = run_study(small, tmp_path, executor="process", workers=2, log=lines.append)
    assert sorted(report.computed) == ["w00008", "w00016"]
    assert len(lines) == 2 and all("done" in line for line in lines)
    _assert_same_study(serial_dir, tmp_path)


def test_ray_local_cluster_records_are_identical_to_serial(small, serial_dir, tmp_path):
    ray = pytest.importorskip("ray")
    assert not ray.is_initialized()
    run_study(small, tmp_path, executor="ray", workers=2, log=lambda line: None)
    assert not ray.is_initialized()  # the local cluster started for the study is shut down
    _assert_same_study(serial_dir, tmp_path)
    assert all(cell["host"] for cell in load_manifest(tmp_path)["cells"].values())


def test_process_pool_resumes_an_interrupted_serial_run(small, serial_dir, tmp_path):
    out = tmp_path / "study"
    shutil.copytree(serial_dir, out)
    (out / "cells" / "w00016.parquet").unlink()  # as if killed before this cell landed
    report = run_study(small, out, executor="process", log=lambda line: None)
    assert report.skipped == ["w00008"] and report.computed == ["w00016"]
    _assert_same_study(serial_dir, out)


@pytest.mark.parametrize("options, fragment", [
    ({"executor": "threads"}, "--executor 'threads' is not one of serial, process, ray"),
    ({"executor": "process", "workers": 0}, "--workers 0 must be at least 1"),
    ({"executor": "serial", "ray_address": "auto"}, "need --executor ray"),
    ({"executor": "ray", "gpus_per_cell": -1.0}, "must be a finite number, 0 or more"),
    ({"executor": "ray", "gpus_per_cell": float("inf")}, "must be a finite number"),
])
def test_bad_executor_options_are_refused_before_any_work(small, options, fragment):
    with pytest.raises(UserInputError, match=fragment):
        execute_cells(small, [8], x64=False, **options)


def _die(args):
    """A cell whose worker process dies at once, as if killed for memory."""
    os._exit(1)


def test_a_worker_that_dies_is_an_error_not_a_hang(small):
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="worker process died while computing width 8"):
        list(_process_pool(small, [8], False, 1, cell_fn=_die))
    assert time.perf_counter() - start < 60


def test_progress_estimates_time_left_from_cell_weights(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("ntk_tickets.progress.time.perf_counter", lambda: now[0])
    stream = io.StringIO()
    progress = Progress([1.0, 3.0], already_done=1, stream=stream, bar=True, tick_s=None)
    assert progress.eta_s() is None and "ETA ?" in progress.line()
    now[0] += 10.0
    progress.advance(1.0)  # 10 s for weight 1, weight 3 left: 30 s to go
    assert progress.eta_s() == pytest.approx(30.0)
    assert progress.line(width=6) == "[####--] 2/3 cells  0:10 elapsed  ETA 0:30"
    progress.log("cell finished")
    progress.close()
    text = stream.getvalue()
    assert "\r\x1b[Kcell finished\n" in text and text.endswith("ETA 0:30\n")


def test_no_bar_off_a_terminal_or_under_ci(monkeypatch):
    stream = io.StringIO()
    assert not bar_enabled(stream)
    progress = Progress([1.0], stream=stream)
    progress.advance(1.0)
    progress.log("width 8: done")
    progress.close()
    assert stream.getvalue() == "width 8: done\n"

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setenv("CI", "true")
    assert not bar_enabled(Terminal())
    monkeypatch.delenv("CI")
    assert bar_enabled(Terminal())


def test_bar_is_redrawn_while_a_cell_runs():
    stream = io.StringIO()
    progress = Progress([1.0], stream=stream, bar=True, tick_s=0.01)
    time.sleep(0.2)
    progress.close()
    text = stream.getvalue()
    assert text.count("0/1 cells") >= 3  # redrawn by the ticker, not only on events
    after = len(text)
    time.sleep(0.05)
    assert len(stream.getvalue()) == after and text.endswith("\n")  # stopped by close()
