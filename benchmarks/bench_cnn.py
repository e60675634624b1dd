"""CNN training loops on the CPU: the step inside a loop against the step as its own program.

Run: ``.uv/bin/uv run --frozen python benchmarks/bench_cnn.py`` (about 9 minutes, most of
it the fused loop at 256 channels; pass ``--widths 32 64`` for a quick look).

The ``cnn1d`` of the ``cnn-scaling`` preset (two convolutions, filter 5, mnist1d with 256
training inputs, full-batch SGD, MSE, float32). For each width it prints the seconds per
step of:

* ``separate``: a Python loop over one jitted SGD step (the reference: what XLA does with
  one step as its own program);
* ``fused``: :class:`ntk_tickets.TrainingProgram` with the loop inside the program
  (``loop="fused"``, what every MLP uses), timed over fewer steps because it is slow;
* ``stepwise``: the same with ``loop="stepwise"`` (a host loop over one compiled step,
  seeds in turn), which ``loop="auto"`` takes for convolutions on the CPU;

each for one seed and for 2 seeds, and the ratios to ``separate`` (per seed). Compile
time is excluded (each program runs once before it is timed).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from ntk_tickets import DataConfig, ModelConfig, TrainConfig, build_model, load_dataset
from ntk_tickets.optimizers import mse_loss
from ntk_tickets.training import TrainingProgram


def _timed(run) -> float:
    jax.block_until_ready(run())
    start = time.perf_counter()
    jax.block_until_ready(run())
    return time.perf_counter() - start


def separate_step_s(model, params0, data, lr: float, steps: int) -> float:
    """Seconds per step of a Python loop over one jitted SGD step, one seed."""
    def loss(params):
        return mse_loss(model.apply_fn(params, data["x_train"]), data["y_train"])

    @jax.jit
    def step(params):
        grads = jax.grad(loss)(params)
        return jax.tree_util.tree_map(lambda p, g: p - lr * g, params, grads)

    def run():
        params = jax.tree_util.tree_map(lambda a: a[0], params0)
        for _ in range(steps):
            params = step(params)
        return params
    return _timed(run) / steps


def program_step_s(model, params0, data, cfg: TrainConfig, loop: str) -> float:
    """Seconds per step of a :class:`TrainingProgram` recording only the two ends."""
    program = TrainingProgram(lambda p, p0, x: model.apply_fn(p, x), cfg,
                              np.array([0, cfg.steps]), loop=loop)
    batches = jnp.zeros((len(cfg.seeds), 0, 0), jnp.int32)
    return _timed(lambda: program(params0, data, batches).params) / cfg.steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    dataset = load_dataset(DataConfig(name="mnist1d", n_train=256, n_test=256), "mse")
    data = {name: jnp.asarray(getattr(dataset, name))
            for name in ("x_train", "y_train", "x_test")}
    print(f"backend {jax.default_backend()}, cnn1d depth 2, filter 5, 256 inputs, "
          f"full-batch SGD; seconds per step (per seed for 2 seeds)")
    print(f"{'width':>5} {'seeds':>5} {'separate':>9} {'fused':>9} {'stepwise':>9} "
          f"{'fused/sep':>9} {'stepwise/sep':>12}")
    for width in args.widths:
        model = build_model(ModelConfig(arch="cnn1d", depth=2, kernel_size=5), width,
                            dataset.input_shape, dataset.n_out)
        for seeds in ((0,), (0, 1)):
            params0 = jax.vmap(model.init)(jax.vmap(jax.random.PRNGKey)(jnp.asarray(seeds)))
            sep = separate_step_s(model, params0, data, 0.5, args.steps)
            cfg = TrainConfig(learning_rate=0.5, steps=args.steps, seeds=seeds)
            stepwise = program_step_s(model, params0, data, cfg, "stepwise") / len(seeds)
            fused_steps = args.steps if width < 128 else 2  # 0.4–8 s per step from 128
            fused_cfg = TrainConfig(learning_rate=0.5, steps=fused_steps, seeds=seeds)
            fused = program_step_s(model, params0, data, fused_cfg, "fused") / len(seeds)
            print(f"{width:>5} {len(seeds):>5} {sep:>9.4f} {fused:>9.4f} {stepwise:>9.4f} "
                  f"{fused / sep:>9.1f} {stepwise / sep:>12.2f}", flush=True)


if __name__ == "__main__":
    main()
