"""The benchmarks that must keep working on any backend run here at tiny sizes, as whole
processes, and print every row of their tables."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def _run(script: str, *args: str) -> list[str]:
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *args],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def _rows(lines: list[str], first: str) -> list[list[str]]:
    return [line.split() for line in lines if line.split()[:1] == [first]]


def test_bench_device_prints_throughput_seeds_and_ntk_tables():
    lines = _run("bench_device.py", "--widths", "16", "32", "--seed-width", "16",
                 "--steps", "2")
    assert lines[0].startswith("device: cpu")
    assert len(_rows(lines, "16")) == 2 and len(_rows(lines, "32")) == 2  # tables (a), (c)
    seeds = [row for row in (line.split() for line in lines)
             if len(row) == 4 and row[0] in ("1", "8", "64")]
    assert [row[0] for row in seeds] == ["1", "8", "64"]
    for row in seeds:
        vmapped, alone, ratio = map(float, row[1:])
        assert vmapped > 0 and alone > 0
        assert ratio == pytest.approx(vmapped / alone, rel=0.02, abs=0.01)


def test_bench_cnn_finds_the_stepwise_loop_near_the_separate_step():
    """Both loops run and the stepwise one stays near the separately jitted step (a loose
    bound: timings on a shared machine are noisy; the benchmark itself measures)."""
    lines = _run("bench_cnn.py", "--widths", "8", "--steps", "10")
    rows = _rows(lines, "8")
    assert len(rows) == 2
    for row in rows:
        assert float(row[6]) < 3.0  # stepwise / separate, noisy on a shared machine
