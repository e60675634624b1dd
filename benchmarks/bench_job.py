"""The whole job against PyTorch: one MLP trained by ``ntk-tickets run`` and by a plain
PyTorch eager loop, each as a whole process on the same machine.

Run: ``.uv/bin/uv run --frozen python benchmarks/bench_job.py --torch-python PY`` (about 4
minutes on 2 CPU cores), where ``PY`` is a Python with ``torch`` and ``numpy`` installed
(e.g. ``uv venv /tmp/torch && uv pip install -p /tmp/torch torch numpy``); without
``--torch-python`` only the project's side runs.

The job: a 2-hidden-layer ReLU MLP on 256 digits (the project's ``digits`` data, saved to
a file the PyTorch script reads), full-batch SGD, MSE, one seed, the exact path only, with
training and test loss and accuracy at 12 log-spaced steps; widths 256, 1024 and 4096
with 4000, 1500 and 200 steps. Both sides pay their own process start, imports, data,
setup and (for JAX) compile. Printed per width: the median wall seconds of ``--repeats``
runs of each, their ratio (> 1: the project is faster), and the project's own split from
its progress line: compile, run (the training program), and everything else (imports,
data, setup, metrics, files), the fixed cost.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

JOBS = ((256, 4000), (1024, 1500), (4096, 200))
LEARNING_RATE = 1.0  # NTK parameterization (the project's default)
TORCH_LEARNING_RATE = 0.1  # PyTorch's default (standard) initialization; stable at 4096

CONFIG = """\
name = "bench-job"
paths = ["exact"]
metrics = ["loss", "accuracy"]
[data]
name = "digits"
n_train = 256
n_test = 256
[model]
arch = "mlp"
depth = 2
widths = [{width}]
[train]
optimizer = "sgd"
learning_rate = {lr}
steps = {steps}
seeds = [0]
loss = "mse"
log_points = 12
"""

TORCH = """\
import sys, time
import numpy as np
import torch
width, steps, lr, data_file = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
d = np.load(data_file)
x, y, xt, yt = (torch.tensor(d[k].reshape(len(d[k]), -1), dtype=torch.float32)
                for k in ("x", "y", "xt", "yt"))
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], width), torch.nn.ReLU(),
                          torch.nn.Linear(width, width), torch.nn.ReLU(),
                          torch.nn.Linear(width, y.shape[1]))
opt = torch.optim.SGD(net.parameters(), lr=lr)
record = set(np.unique(np.round(np.geomspace(1, steps, 12)).astype(int)).tolist() + [0, steps])
rows = []
def log(step):
    with torch.no_grad():
        for split, a, b in (("train", x, y), ("test", xt, yt)):
            f = net(a)
            rows.append((step, split, 0.5 * float(((f - b) ** 2).mean()),
                         float((f.argmax(1) == b.argmax(1)).float().mean())))
log(0)
for step in range(1, steps + 1):
    opt.zero_grad()
    loss = 0.5 * ((net(x) - y) ** 2).mean()
    loss.backward()
    opt.step()
    if step in record:
        log(step)
np.savetxt(data_file + ".out.csv", np.array([r[:1] + r[2:] for r in rows]), delimiter=",")
"""


def wall(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return time.perf_counter() - start, done.stdout + done.stderr


def project_split(output: str) -> tuple[float, float]:
    """(compile, run) seconds from the cell's progress line."""
    match = re.search(r"compile ([\d.]+) s, run ([\d.]+) s", output)
    return (float(match[1]), float(match[2])) if match else (float("nan"), float("nan"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch-python", help="a Python with torch and numpy")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="width 256 only")
    args = parser.parse_args()
    from ntk_tickets import DataConfig, load_dataset
    data = load_dataset(DataConfig(name="digits", n_train=256, n_test=256), "mse")
    print(f"{'width':>6} {'steps':>6} {'ours 1st s':>11} {'ours s':>7} {'PyTorch s':>10} "
          f"{'ratio 1st':>10} {'ratio':>6} {'compile s':>10} {'run s':>6} {'fixed s':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["PYTHONPYCACHEPREFIX"] = str(tmp / "pycache")
        np.savez(tmp / "digits.npz", x=data.x_train, y=data.y_train, xt=data.x_test,
                 yt=data.y_test)
        (tmp / "torch_job.py").write_text(TORCH)
        for width, steps in JOBS[:1] if args.quick else JOBS:
            config = tmp / f"job{width}.toml"
            config.write_text(CONFIG.format(width=width, steps=steps, lr=LEARNING_RATE))
            ours_cmd = [sys.executable, "-m", "ntk_tickets", "run", str(config), "--out",
                        str(tmp / "out"), "--force"]
            wall(ours_cmd, {**env, "NTK_TICKETS_XLA_CACHE": "off"})  # bytecode
            cache = {**env, "NTK_TICKETS_XLA_CACHE": str(tmp / f"xla{width}")}
            first = wall(ours_cmd, cache)[0]
            later = [wall(ours_cmd, cache) for _ in range(args.repeats)]
            theirs = float("nan")
            if args.torch_python:
                torch_cmd = [args.torch_python, str(tmp / "torch_job.py"), str(width),
                             str(steps), str(TORCH_LEARNING_RATE), str(tmp / "digits.npz")]
                wall(torch_cmd, env)  # bytecode
                theirs = statistics.median(wall(torch_cmd, env)[0]
                                           for _ in range(args.repeats))
            ours = statistics.median(s for s, _ in later)
            compile_s, run_s = (statistics.median(v) for v in zip(
                *(project_split(out) for _, out in later), strict=True))
            print(f"{width:>6} {steps:>6} {first:>11.2f} {ours:>7.2f} {theirs:>10.2f} "
                  f"{theirs / first:>10.2f} {theirs / ours:>6.2f} {compile_s:>10.2f} "
                  f"{run_s:>6.2f} {ours - compile_s - run_s:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
