"""Engine benchmark: linear-path compile time and exact/linear step throughput.

Run: ``.uv/bin/uv run --frozen python benchmarks/bench_engine.py`` (about 6 minutes on
2 CPU cores; ``--quick`` skips width 4096 and the slow closure compile there).

(a) Compile time of the whole jitted training program (lax.scan over SGD steps) of the
    linearized network, written two ways: ours, f_lin(θ, θ0, x) with θ0 an argument
    (ntk_tickets.linear.linearize), and the idiomatic ``nt.linearize(apply_fn, θ0)``
    closure, whose θ0 XLA sees as a constant.
(b) Seconds per step of the exact and linear paths (the project's scan loop, full batch),
    and achieved GFLOP/s from XLA's cost analysis against a float32 matmul peak measured in
    the same run.

(c) Seconds per step of the exact path with the lazy/rich options off (the default), with
    the ``feature_change`` metric, and with µP's per-parameter rates plus centring, against
    a hand-written loop that records nothing.

Targets (DESIGN.md §3): linear compile ≤ 2 s at width 4096; linear step ≤ 2× exact step;
exact ≥ 60 % of matmul peak at width ≥ 2048; options off ≤ 1.10× the plain loop.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from ntk_tickets import (
    DataConfig,
    ModelConfig,
    TrainConfig,
    build_model,
    linearize,
    load_dataset,
    nt,
)
from ntk_tickets.optimizers import mse_loss
from ntk_tickets.regimes import lr_factors, scaled_function
from ntk_tickets.training import log_spaced_steps, make_train_fn


def matmul_peak_gflops(n: int = 2048, repeats: int = 10) -> float:
    """Best-of float32 GFLOP/s of an n×n matmul."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n))
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    best = min(_time(lambda: f(a).block_until_ready()) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _sgd_step(f_lin, lr=0.1):
    def step(params, params0, x, y):
        grads = jax.grad(lambda p: mse_loss(f_lin(p, params0, x), y))(params)
        return jax.tree_util.tree_map(lambda p, g: p - lr * g, params, grads)
    return step


def _paths(model, theta0):
    """The exact path, our linear path, and the nt.linearize closure over ``theta0``."""
    closure = nt.linearize(model.apply_fn, theta0)
    return {"exact": lambda p, p0, x: model.apply_fn(p, x),
            "linear": linearize(model.apply_fn),
            "closure": lambda p, p0, x: closure(p, x)}


def _setup(width: int, data, steps: int):
    model = build_model(ModelConfig(), width, data.input_shape, data.n_out)
    params0 = jax.vmap(model.init)(jax.random.PRNGKey(0)[None])
    arrays = {"x_train": jnp.asarray(data.x_train), "y_train": jnp.asarray(data.y_train),
              "x_test": jnp.asarray(data.x_test)}
    args = (params0, None, arrays, jnp.zeros((1, 0, 0), jnp.int32), jnp.asarray(0), None,
            jnp.asarray(0))
    cfg = TrainConfig(steps=steps, learning_rate=0.1, seeds=(0,))
    theta0 = jax.tree_util.tree_map(lambda a: a[0], params0)
    return model, theta0, args, cfg


def compile_times(width: int, data) -> tuple[float, float]:
    """(ours, closure) seconds to lower and compile the whole training program (scan)."""
    model, theta0, args, cfg = _setup(width, data, 20)
    paths = _paths(model, theta0)
    record = log_spaced_steps(cfg.steps, 2)
    return tuple(_time(lambda p=p: make_train_fn(paths[p], cfg, record).lower(*args).compile())
                 for p in ("linear", "closure"))


def step_throughput(width: int, data, steps: int) -> dict[str, tuple[float, float]]:
    """{path: (seconds per step, achieved GFLOP/s)} for one seed, full batch.

    FLOPs are XLA's count for one jitted SGD step of the path; time is the project's scan
    loop over ``steps`` steps, recording only at steps 0, 1 and ``steps``.
    """
    model, theta0, args, cfg = _setup(width, data, steps)
    record = log_spaced_steps(steps, 2)
    paths = _paths(model, theta0)
    out = {}
    for path in ("exact", "linear"):
        one_step = jax.jit(_sgd_step(paths[path])).lower(theta0, theta0, args[2]["x_train"],
                                                           args[2]["y_train"])
        analysis = one_step.compile().cost_analysis()
        flops = (analysis[0] if isinstance(analysis, list) else analysis)["flops"]
        compiled = make_train_fn(paths[path], cfg, record).lower(*args).compile()
        jax.block_until_ready(compiled(*args))
        seconds = min(_time(lambda c=compiled: jax.block_until_ready(c(*args)))
                      for _ in range(2)) / steps
        out[path] = (seconds, flops / seconds / 1e9)
    return out


def regime_overhead(width: int, data, steps: int) -> dict[str, float]:
    """{variant: seconds per step} of the exact path, one seed, full batch, recording only at
    steps 0 and ``steps``: a hand-written ``fori_loop`` of SGD steps with nothing recorded
    (``plain``), the project's program with every option off (``off``), with the
    feature-change metric (``features``), and with µP's per-parameter rates plus centring
    (``mup+center``, which costs one extra forward pass per step by construction)."""
    model, theta0, args, cfg = _setup(width, data, steps)
    x, y = args[2]["x_train"], args[2]["y_train"]
    exact = _paths(model, theta0)["exact"]
    step = _sgd_step(exact)
    plain = jax.jit(lambda p, p0: jax.lax.fori_loop(0, steps, lambda i, q: step(q, p0, x, y), p))
    record = np.array([0, steps])
    mup_cfg = ModelConfig(parameterization="mup", base_width=64)
    factors = lr_factors(mup_cfg, cfg, width, lambda w: build_model(
        mup_cfg, w, data.input_shape, data.n_out).init(jax.random.PRNGKey(0)))
    variants = {
        "off": (make_train_fn(exact, cfg, record), args),
        "features": (make_train_fn(exact, cfg, record,
                                   feature_fn=lambda p, p0, x: model.feature_fn(p, x)), args),
        "mup+center": (make_train_fn(scaled_function(exact, 1.0, True), cfg, record),
                       (*args[:-1], jax.tree_util.tree_map(jnp.asarray, factors))),
    }
    out = {"plain": _seconds(plain, (theta0, theta0)) / steps}
    for name, (train, train_args) in variants.items():
        out[name] = _seconds(train, train_args) / steps
    return out


def _seconds(fn, args, repeats: int = 5) -> float:
    """Best-of wall seconds of a jitted call (compiled and warmed up first)."""
    compiled = jax.jit(fn).lower(*args).compile()
    jax.block_until_ready(compiled(*args))
    return min(_time(lambda: jax.block_until_ready(compiled(*args))) for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip width 4096")
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    data = load_dataset(DataConfig(name="digits", n_train=512, n_test=64))
    peak = matmul_peak_gflops()
    print(f"device {jax.devices()[0]}, float32 matmul peak {peak:.1f} GFLOP/s\n")

    print("(a) compile time of the linear training program")
    print(f"{'width':>6} {'ours s':>8} {'closure s':>10} {'ratio':>7}")
    for width in (1024,) if args.quick else (1024, 4096):
        ours, theirs = compile_times(width, data)
        print(f"{width:>6} {ours:>8.2f} {theirs:>10.2f} {theirs / ours:>7.1f}")

    print("\n(b) step time, full batch of 512 digits")
    print(f"{'width':>6} {'exact s':>9} {'linear s':>9} {'lin/exact':>9} "
          f"{'exact GF/s':>10} {'% peak':>7} {'lin GF/s':>9}")
    widths = (256, 1024, 2048) if args.quick else (256, 1024, 2048, 4096)
    for width in widths:
        r = step_throughput(width, data, args.steps)
        (te, ge), (tl, gl) = r["exact"], r["linear"]
        print(f"{width:>6} {te:>9.4f} {tl:>9.4f} {tl / te:>9.2f} {ge:>10.1f} "
              f"{100 * ge / peak:>6.0f}% {gl:>9.1f}")

    print("\n(c) exact step time with the regime options off and on, against a plain loop")
    print(f"{'width':>6} {'plain s':>9} {'off s':>9} {'off/plain':>9} {'features':>9} "
          f"{'mup+center':>10}")
    for width in (256, 1024) if args.quick else (256, 1024, 2048):
        r = regime_overhead(width, data, args.steps)
        print(f"{width:>6} {r['plain']:>9.4f} {r['off']:>9.4f} {r['off'] / r['plain']:>9.2f} "
              f"{r['features'] / r['plain']:>9.2f} {r['mup+center'] / r['plain']:>10.2f}")


if __name__ == "__main__":
    main()
