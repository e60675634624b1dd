"""Executors and the progress bar: every executor writes the same records as the serial one."""

import contextlib
import io
import ipaddress
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from ntk_tickets.config import load_config
from ntk_tickets.errors import UserInputError
from ntk_tickets.executors import _process_pool, _worker_env, execute_cells, ray_cluster
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
    assert sorted(report.computed) == ["w00008_ntk_os1_s0-1", "w00016_ntk_os1_s0-1"]
    assert len(lines) == 2 and all("done" in line for line in lines)
    _assert_same_study(serial_dir, tmp_path)


def test_ray_local_cluster_records_are_identical_to_serial(small, serial_dir, tmp_path):
    ray = pytest.importorskip("ray")
    assert not ray.is_initialized()
    run_study(small, tmp_path, executor="ray", workers=2, log=lambda line: None)
    assert not ray.is_initialized()  # the local cluster started for the study is shut down
    _assert_same_study(serial_dir, tmp_path)
    assert all(cell["environment"]["host"]
               for cell in load_manifest(tmp_path)["cells"].values())


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Joins clusters that refuse connections, in a child process: a hang cannot stall the tests.
_JOIN_UNREACHABLE = """
import sys, time
from ntk_tickets.errors import UserInputError
from ntk_tickets.executors import ray_cluster
for address in sys.argv[1:]:
    start = time.perf_counter()
    try:
        with ray_cluster(address):
            sys.exit(f"joined {address}")
    except UserInputError as e:
        print(f"{time.perf_counter() - start:.1f} {e}")
"""


def test_an_unreachable_ray_cluster_fails_fast_with_one_line(monkeypatch):
    pytest.importorskip("ray")
    port = _closed_port()
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")  # what "auto" joins
    try:
        done = subprocess.run([sys.executable, "-c", _JOIN_UNREACHABLE, f"127.0.0.1:{port}",
                               "auto"], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("ray_cluster kept retrying an unreachable cluster for 60 s")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2, done.stdout  # one line each
    for line in lines:  # "auto" joins RAY_ADDRESS, and says so
        seconds, message = line.split(" ", 1)
        assert float(seconds) < 15
        assert message.startswith(f"cannot reach the Ray cluster at '127.0.0.1:{port}'")
        assert "Connection refused" in message


def _listening_sockets() -> dict[int, tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]]:
    """Inode -> (address, port) of every listening TCP socket, from /proc/net/tcp{,6}."""
    sockets = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            hex_ip, hex_port = fields[1].split(":")
            # The kernel prints the address as 32-bit words in host (little-endian) order.
            raw = b"".join(bytes.fromhex(hex_ip[i:i + 8])[::-1] for i in range(0, len(hex_ip), 8))
            sockets[int(fields[9])] = (ipaddress.ip_address(raw), int(hex_port, 16))
    return sockets


def _descendants(pid: int) -> set[int]:
    """``pid`` and every process below it."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
    tree, grew = {pid}, True
    while grew:
        below = {child for child, parent in parents.items() if parent in tree}
        grew = not below <= tree
        tree |= below
    return tree


def _socket_inodes(pids: set[int]) -> dict[int, int]:
    """Inode -> pid of the sockets these processes hold open."""
    inodes = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        inodes[int(target[8:-1])] = pid
    return inodes


def _is_loopback(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1 of a dual-stack socket
    return (mapped or ip).is_loopback


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux's /proc")
def test_ray_local_cluster_is_private_to_this_machine_and_python(monkeypatch, tmp_path):
    ray = pytest.importorskip("ray")
    from ray._private.runtime_env import uv_runtime_env_hook

    # As if run by `uv run`: Ray's hook would make workers `uv run` a copy of the cwd.
    monkeypatch.setattr(uv_runtime_env_hook, "_get_uv_run_cmdline",
                        lambda: ["uv", "run", "pytest"])
    monkeypatch.chdir(tmp_path)
    assert not ray.is_initialized()
    cluster = ray_cluster(None, 1)
    try:
        cluster.__enter__()
    except UserInputError as e:
        pytest.skip(f"Ray cannot start a local cluster here: {e}")
    try:
        assert "py_executable" not in ray.get_runtime_context().runtime_env

        @ray.remote(num_cpus=1, runtime_env={"env_vars": _worker_env()})
        def worker_facts():
            return sys.executable, os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE")

        assert ray.get(worker_facts.remote(), timeout=120) == (sys.executable, "false")
        owners = _socket_inodes(_descendants(os.getpid()))
        listening = {inode: (ip, port, owners[inode])
                     for inode, (ip, port) in _listening_sockets().items() if inode in owners}
    finally:
        cluster.__exit__(None, None, None)
    assert len(listening) >= 3, listening  # the GCS, the raylet and a worker at least
    public = {f"{ip}:{port} (pid {pid})" for ip, port, pid in listening.values()
              if not _is_loopback(ip)}
    assert not public, f"listening beyond 127.0.0.1: {sorted(public)}"


def test_process_pool_resumes_an_interrupted_serial_run(small, serial_dir, tmp_path):
    out = tmp_path / "study"
    shutil.copytree(serial_dir, out)
    (out / "cells" / "w00016_ntk_os1_s0-1.parquet").unlink()  # as if killed before it landed
    report = run_study(small, out, executor="process", log=lambda line: None)
    assert report.skipped == ["w00008_ntk_os1_s0-1"] and report.computed == ["w00016_ntk_os1_s0-1"]
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
