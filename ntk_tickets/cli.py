"""The ``ntk-tickets`` command line.

Commands available now:

* ``ntk-tickets info`` — versions, the JAX device, and an analytic NTK and a closed-form
  kernel prediction computed end to end on a small digits problem (a smoke test of the
  whole stack).
* ``ntk-tickets config FILE.toml [--set dotted.key=value ...]`` — validate a study config
  and print it resolved, with its hash.
* ``ntk-tickets list`` — the presets, one line each.
* ``ntk-tickets run PRESET_OR_CONFIG [--set ...] [--out DIR] [--force]
  [--executor serial|process|ray] [--workers N] [--ray-address ADDR] [--gpus-per-cell G]``
  — run a width study into ``DIR`` (default ``results/<name>``), resuming where it stopped.
* ``ntk-tickets demo [--out DIR] [--force]`` — the ``demo`` and ``demo-tickets`` presets into
  ``results/demo/paired`` and ``results/demo/tickets``, with summary tables and figures.
* ``ntk-tickets summarize DIR`` — the scaling-exponent table (log–log slope against width
  with a 95 % interval over seeds), printed and written to ``DIR/summary.csv``; for an
  escape study the census and lottery table (``summary.csv``) and the escape test
  (``escape.csv``).
* ``ntk-tickets plot DIR`` — the standard figures as PNG under ``DIR/figures/``.

Exit status: 0 on success, 2 with one line on stderr for a user mistake (a bad field,
file or value); never a traceback for those. Ctrl-C prints one line (how many cells are
saved, and that the same command resumes) and exits with 130.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ntk_tickets.errors import StudyInterrupted, UserInputError


def _cmd_info(args: argparse.Namespace) -> None:
    import jax.numpy as jnp

    from ntk_tickets import DataConfig, ModelConfig, build_model, load_dataset, nt
    from ntk_tickets.results import environment_info

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
    from ntk_tickets.preset_files import preset_description, preset_names, preset_runtime

    for name in preset_names():
        runtime = preset_runtime(name)
        print(f"{name:<30} {preset_description(name)}"
              + (f" [{runtime} on 2 CPU cores]" if runtime else ""))


def _keep_compiled_programs() -> None:
    """Points JAX's persistent compilation cache at ``$NTK_TICKETS_XLA_CACHE`` (default
    ``~/.cache/ntk_tickets/xla``; ``off`` turns it off), unless ``JAX_COMPILATION_CACHE_DIR``
    is set. Set through the environment before JAX is imported, so worker processes share it.
    A second run of the same shapes then loads its programs instead of compiling them
    (``benchmarks/bench_job.py``)."""
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ntk_tickets"
    folder = os.environ.get("NTK_TICKETS_XLA_CACHE", str(default / "xla"))
    if folder.lower() == "off":
        return
    os.environ["JAX_COMPILATION_CACHE_DIR"] = folder
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.05")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def _run(spec: str, overrides: Sequence[str], out: str | None, force: bool,
         **executor_options) -> Path:
    from ntk_tickets.preset_files import resolve_config

    cfg = resolve_config(spec, overrides)  # bad input is refused before JAX is imported
    if "jax" not in sys.modules:
        _keep_compiled_programs()
    from ntk_tickets.results import load_records
    from ntk_tickets.study import run_study, ticket_table, width_table

    out_dir = Path(out) if out else Path("results") / cfg.name
    report = run_study(cfg, out_dir, force=force, **executor_options)
    records = load_records(out_dir)
    if cfg.escape is not None:
        from ntk_tickets.escape import escape_summary

        print(escape_summary(records, cfg.data.teacher_width, cfg.escape.eig_tolerance))
    else:
        print(width_table(records))
    if cfg.tickets is not None:
        print(ticket_table(records))
    _summarize_connectivity(records)
    print(f"results: {out_dir}/records.parquet, manifest: {out_dir}/manifest.json "
          f"({len(report.computed)} cells computed, {len(report.skipped)} already done)")
    for cell, steps in report.diverged.items():
        print(f"warning: cell {cell} diverged (first bad step by path and seed: {steps}); "
              "lower train.learning_rate", file=sys.stderr)
    return out_dir


def _cmd_run(args: argparse.Namespace) -> None:
    _run(args.config, args.set, args.out, args.force, executor=args.executor,
         workers=args.workers, ray_address=args.ray_address, gpus_per_cell=args.gpus_per_cell)


def _figures(folder: Path) -> None:
    from ntk_tickets.plotting import save_figures

    paths = save_figures(folder)
    print(f"figures: {len(paths)} PNG files in {folder / 'figures'}")


def _cmd_demo(args: argparse.Namespace) -> None:
    out = Path(args.out or "results/demo")
    for preset, folder in (("demo", out / "paired"), ("demo-tickets", out / "tickets")):
        _run(preset, [], str(folder), args.force)
        _figures(folder)


def _summarize_escape(folder: Path, records, config: dict) -> None:
    from ntk_tickets.escape import escape_summary, escape_table, lottery_table
    from ntk_tickets.results import save_output

    teacher_width = config["data"]["teacher_width"]
    eig_tolerance = config["escape"]["eig_tolerance"]
    print(escape_summary(records, teacher_width, eig_tolerance))
    for name, table in (("summary.csv", lottery_table(records, teacher_width)),
                        ("escape.csv", escape_table(records, eig_tolerance))):
        path = save_output(folder / name, table.to_csv(index=False).encode())
        print(f"{name.removesuffix('.csv')}: {path}")


def _summarize_connectivity(records) -> None:
    """The stability table and d_int90 of the studies that have them."""
    if not records["experiment"].isin(["stability", "subspace"]).any():
        return  # no need to import the figures' module (and matplotlib) for nothing
    from ntk_tickets.connectivity_figures import stability_table, subspace_table

    stability = stability_table(records)
    if len(stability):
        print("linear mode connectivity at the final step (mean over seeds): instability = "
              "test error barrier, loss_barrier = train loss above the chord")
        print(stability.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    subspace = subspace_table(records)
    if len(subspace):
        print("d_int90: the smallest subspace dimension reaching 90 % of the dense test "
              "score on the same path (NaN: none of the dims did)")
        print(subspace.to_string(index=False, float_format=lambda v: f"{v:.4g}"))


def _cmd_summarize(args: argparse.Namespace) -> None:
    from ntk_tickets.results import load_manifest, load_records, save_output
    from ntk_tickets.scaling import format_scaling_table, scaling_table

    records = load_records(args.dir)
    config = load_manifest(args.dir)["config"]
    if config.get("escape") is not None:
        _summarize_escape(Path(args.dir), records, config)
        return
    _summarize_connectivity(records)
    table = scaling_table(records, ci_method=args.ci_method, n_boot=args.n_boot)
    interval = ("Student t over the per-seed slopes" if args.ci_method == "t"
                else f"{args.n_boot} bootstrap resamples of the seeds")
    print(f"log-log slope of each metric against width at the final step, "
          f"95 % interval: {interval}")
    print(format_scaling_table(table))
    path = save_output(Path(args.dir) / "summary.csv", table.to_csv(index=False).encode())
    print(f"summary: {path}")


def _cmd_plot(args: argparse.Namespace) -> None:
    _figures(Path(args.dir))


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake reported like every other user mistake: one line."""

    def error(self, message: str):
        raise UserInputError(f"{message} (see `{self.prog} --help`)")


def _parser() -> argparse.ArgumentParser:
    from ntk_tickets.executors import EXECUTORS
    from ntk_tickets.scaling import CI_METHODS

    parser = _Parser(
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
    demo = commands.add_parser("demo", help="a short paired width study and ticket comparison "
                                            "on digits, with figures")
    for sub in (run, demo):
        sub.add_argument("--out", metavar="DIR", help="results directory (default "
                         "results/<name>; demo: DIR/paired and DIR/tickets under results/demo)")
        sub.add_argument("--force", action="store_true",
                         help="recompute, discarding earlier results in DIR")
    run.add_argument("--executor", choices=EXECUTORS, default="serial",
                     help="where cells run: this process (default), a spawn-based process "
                          "pool, or Ray tasks")
    run.add_argument("--workers", type=_positive_int, metavar="N",
                     help="parallel workers (process pool; CPUs of a local Ray cluster); "
                          "default: one per cell, at most the CPU count")
    run.add_argument("--ray-address", metavar="ADDR",
                     help="an existing Ray cluster (e.g. auto, ray://head:10001); default: "
                          "start a local one")
    run.add_argument("--gpus-per-cell", type=float, default=0.0, metavar="G",
                     help="GPUs each Ray task asks for (default 0)")
    run.set_defaults(run=_cmd_run)
    demo.set_defaults(run=_cmd_demo)
    summarize = commands.add_parser(
        "summarize", help="scaling exponents (slope vs width, 95 %% CI over seeds) → "
                          "DIR/summary.csv")
    summarize.add_argument("dir", metavar="DIR", help="a results folder")
    summarize.add_argument("--ci-method", choices=CI_METHODS, default="t",
                           help="t: Student t over the per-seed slopes (default); bootstrap: "
                                "percentile interval of a seed bootstrap (too narrow with "
                                "few seeds)")
    summarize.add_argument("--n-boot", type=_positive_int, default=1000, metavar="N",
                           help="bootstrap resamples of the seeds (default 1000)")
    summarize.set_defaults(run=_cmd_summarize)
    plot = commands.add_parser("plot", help="the standard figures → DIR/figures/*.png")
    plot.add_argument("dir", metavar="DIR", help="a results folder")
    plot.set_defaults(run=_cmd_plot)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI; returns the exit status (0 ok, 2 bad input)."""
    try:
        args = _parser().parse_args(argv)
        args.run(args)
    except UserInputError as e:
        print(f"ntk-tickets: error: {e}", file=sys.stderr)
        return 2
    except StudyInterrupted as e:
        print(f"ntk-tickets: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("ntk-tickets: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (e.g. `ntk-tickets list | head -1`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
