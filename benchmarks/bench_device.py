"""Device benchmark: step throughput, vmapped seeds and empirical-NTK throughput on whatever
backend JAX runs on (CPU, GPU or TPU).

Run: ``.uv/bin/uv run --frozen python benchmarks/bench_device.py`` (about 3 minutes on 2 CPU
cores); on an NVIDIA GPU ``.uv/bin/uv run --frozen --extra cuda12 python
benchmarks/bench_device.py`` (widths up to 16384, meant to take under 5 minutes).

Same setting as ``bench_engine.py``: a 2-hidden-layer ReLU MLP on 512 digits, full batch,
float32, one recorded segment. Printed, measured in one run:

(a) the float32 matmul peak (one n×n matmul, n = 2048 on the CPU, 8192 elsewhere) and, per
    width, seconds per step of the exact and linear paths with their achieved FLOP/s (XLA's
    count for one step) as a fraction of that peak;
(b) the training program with S vmapped seeds (S = 1, 8, 64) against S single-seed runs in
    turn: seconds per seed-step and the ratio (< 1: vmapping pays);
(c) the empirical NTK (traced, NTK-vector products) of 256 inputs at θ0: seconds and kernel
    entries per second, per width.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_engine import matmul_peak_gflops, step_throughput  # noqa: E402

from ntk_tickets import DataConfig, ModelConfig, TrainConfig, build_model, load_dataset  # noqa: E402
from ntk_tickets.kernels import empirical_ntk  # noqa: E402
from ntk_tickets.training import TrainingProgram  # noqa: E402


def _best(fn, repeats: int = 2) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def seed_scaling(width: int, data, steps: int, seeds: tuple[int, ...]) -> list[tuple]:
    """(S, vmapped s per seed-step, in-turn s per seed-step) for each number of seeds S."""
    model = build_model(ModelConfig(), width, data.input_shape, data.n_out)
    arrays = {"x_train": jnp.asarray(data.x_train), "y_train": jnp.asarray(data.y_train),
              "x_test": jnp.asarray(data.x_test)}
    cfg = TrainConfig(steps=steps, learning_rate=0.1)
    program = TrainingProgram(lambda p, p0, x: model.apply_fn(p, x), cfg,
                              np.array([0, steps]), loop="fused")

    def seconds(n_seeds: int) -> float:
        params0 = jax.vmap(model.init)(jax.random.split(jax.random.PRNGKey(0), n_seeds))
        batches = jnp.zeros((n_seeds, 0, 0), jnp.int32)
        return _best(lambda: program(params0, arrays, batches).params)

    alone = seconds(1) / steps
    rows = [(s, seconds(s) / (s * steps), alone) for s in seeds]
    return rows


def ntk_throughput(width: int, data, n: int = 256) -> float:
    """Seconds for the traced empirical NTK of ``n`` inputs at θ0 (compiled first)."""
    model = build_model(ModelConfig(), width, data.input_shape, data.n_out)
    params = model.init(jax.random.PRNGKey(0))
    x = jnp.asarray(data.x_train[:n])
    return _best(lambda: empirical_ntk(model.apply_fn, params, x, cache=model.cache))


def main() -> None:
    on_cpu = jax.default_backend() == "cpu"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+",
                        default=[256, 1024] if on_cpu else [1024, 4096, 16384])
    parser.add_argument("--seed-width", type=int, default=256 if on_cpu else 4096,
                        help="width of the vmapped-seeds table (b)")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    data = load_dataset(DataConfig(name="digits", n_train=512, n_test=256), "mse")
    device = jax.devices()[0]
    peak = matmul_peak_gflops(2048 if on_cpu else 8192)
    print(f"device: {device.platform} {device.device_kind} ({jax.device_count()} device(s)); "
          f"jax {jax.__version__}; float32 matmul peak {peak:.0f} GFLOP/s")

    print("\n(a) step time and throughput (one seed, full batch of 512)")
    print(f"{'width':>6} {'exact s/step':>13} {'linear s/step':>14} {'exact % peak':>13} "
          f"{'linear % peak':>14}")
    for width in args.widths:
        out = step_throughput(width, data, args.steps)
        (es, ef), (ls, lf) = out["exact"], out["linear"]
        print(f"{width:>6} {es:>13.5f} {ls:>14.5f} {100 * ef / peak:>12.0f}% "
              f"{100 * lf / peak:>13.0f}%", flush=True)

    print(f"\n(b) vmapped seeds against seeds in turn (exact path, width {args.seed_width})")
    print(f"{'seeds':>6} {'vmapped s/seed-step':>20} {'in turn s/seed-step':>20} {'ratio':>6}")
    for s, vmapped, alone in seed_scaling(args.seed_width, data, args.steps, (1, 8, 64)):
        print(f"{s:>6} {vmapped:>20.6f} {alone:>20.6f} {vmapped / alone:>6.2f}", flush=True)

    print("\n(c) empirical NTK of 256 inputs at θ0 (traced, NTK-vector products)")
    print(f"{'width':>6} {'seconds':>9} {'entries/s':>11}")
    for width in args.widths:
        seconds = ntk_throughput(width, data)
        print(f"{width:>6} {seconds:>9.3f} {256**2 / seconds:>11.0f}", flush=True)


if __name__ == "__main__":
    main()
