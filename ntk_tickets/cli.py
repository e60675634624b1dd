"""The ``ntk-tickets`` command line.

Commands available now:

* ``ntk-tickets info`` — versions, the JAX device, and an analytic NTK and a closed-form
  kernel prediction computed end to end on a small digits problem (a smoke test of the
  whole stack).
* ``ntk-tickets config FILE.toml [--set dotted.key=value ...]`` — validate a study config
  and print it resolved, with its hash.
* ``ntk-tickets list`` — the presets, one line each.
* ``ntk-tickets run PRESET_OR_CONFIG [--set ...] [--out DIR] [--force]`` — run a paired
  width study into ``DIR`` (default ``results/<name>``), resuming where it stopped.
* ``ntk-tickets demo [--out DIR] [--force]`` — the ``demo`` preset into ``results/demo``,
  then a per-width summary table.

Exit status: 0 on success, 2 with one line on stderr for a user mistake (a bad field,
file or value); never a traceback for those.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ntk_tickets.errors import UserInputError


def _cmd_info(args: argparse.Namespace) -> None:
    import jax.numpy as jnp

    from ntk_tickets import DataConfig, ModelConfig, build_model, environment_info, load_dataset, nt

    for name, version in environment_info(x64=False).items():
        print(f"{name:>16}: {version}")
    start = time.perf_counter()
    data = load_dataset(DataConfig(name="digits", n_train=100, n_test=100, seed=0))
    model = build_model(ModelConfig(), width=1, input_shape=data.input_shape, n_out=data.n_out)
    predict_fn = nt.predict.gradient_descent_mse_ensemble(
        model.kernel_fn, data.x_train, data.y_train, diag_reg=1e-4)
    y_test = predict_fn(x_test=data.x_test, get="ntk")
    accuracy = float(jnp.mean(jnp.argmax(y_test, 1) == jnp.argmax(data.y_test, 1)))
    print(f"infinite-width NTK (2-layer ReLU MLP) on 100 digits: test accuracy {accuracy:.2f} "
          f"({time.perf_counter() - start:.1f} s)")


def _cmd_config(args: argparse.Namespace) -> None:
    from ntk_tickets import config_hash, config_to_dict, load_config

    cfg = load_config(args.config, args.set)
    print(json.dumps(config_to_dict(cfg), indent=2))
    print(f"config hash: {config_hash(cfg)}")


def _cmd_list(args: argparse.Namespace) -> None:
    from ntk_tickets.study import preset_description, preset_names

    for name in preset_names():
        print(f"{name:<24} {preset_description(name)}")


def _run(spec: str, overrides: Sequence[str], out: str | None, force: bool) -> Path:
    from ntk_tickets.results import load_records
    from ntk_tickets.study import resolve_config, run_study, ticket_table, width_table

    cfg = resolve_config(spec, overrides)
    out_dir = Path(out) if out else Path("results") / cfg.name
    report = run_study(cfg, out_dir, force=force)
    records = load_records(out_dir)
    print(width_table(records))
    if cfg.tickets is not None:
        print(ticket_table(records))
    print(f"results: {out_dir}/records.parquet, manifest: {out_dir}/manifest.json "
          f"({len(report.computed)} cells computed, {len(report.skipped)} already done)")
    for cell, steps in report.diverged.items():
        print(f"warning: cell {cell} diverged (first bad step by path and seed: {steps}); "
              "lower train.learning_rate", file=sys.stderr)
    return out_dir


def _cmd_run(args: argparse.Namespace) -> None:
    _run(args.config, args.set, args.out, args.force)


def _cmd_demo(args: argparse.Namespace) -> None:
    out = Path(args.out or "results/demo")
    _run("demo", [], str(out / "paired"), args.force)
    _run("demo-tickets", [], str(out / "tickets"), args.force)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ntk-tickets",
        description="Lottery tickets, linearized networks and infinite-width kernels, "
                    "side by side as width grows.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = commands.add_parser("info", help="versions, device, and an end-to-end NTK check")
    info.set_defaults(run=_cmd_info)
    config = commands.add_parser("config", help="validate a study config and print it")
    config.add_argument("config", help="a TOML study config")
    config.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set train.steps=200")
    config.set_defaults(run=_cmd_config)
    commands.add_parser("list", help="the presets, one line each").set_defaults(run=_cmd_list)
    run = commands.add_parser("run", help="run a study from a preset or a TOML config")
    run.add_argument("config", metavar="PRESET_OR_CONFIG")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config field, e.g. --set model.widths=[64,256]")
    demo = commands.add_parser("demo", help="a one-minute paired width study and ticket "
                                            "comparison on digits")
    for sub in (run, demo):
        sub.add_argument("--out", metavar="DIR", help="results directory (default "
                         "results/<name>; demo: DIR/paired and DIR/tickets under results/demo)")
        sub.add_argument("--force", action="store_true",
                         help="recompute, discarding earlier results in DIR")
    run.set_defaults(run=_cmd_run)
    demo.set_defaults(run=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI; returns the exit status (0 ok, 2 bad input)."""
    args = _parser().parse_args(argv)
    try:
        args.run(args)
    except UserInputError as e:
        print(f"ntk-tickets: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
