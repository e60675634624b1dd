"""Presets, config resolution and the study runner behind ``ntk-tickets run`` and ``demo``.

A study is a list of cells, one per width (seeds are vmapped inside a cell). Each finished
cell is written to the results directory at once, so an interrupted run resumes where it
stopped and a finished cell is never recomputed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.resources
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import jax

from ntk_tickets.config import (
    StudyConfig,
    config_hash,
    config_to_dict,
    load_config,
)
from ntk_tickets.data import Dataset, load_dataset
from ntk_tickets.errors import UserInputError
from ntk_tickets.executors import (
    check_executor_options,
    default_workers,
    execute_cells,
    ray_cluster,
)
from ntk_tickets.models import build_model, parameter_count
from ntk_tickets.progress import Progress
from ntk_tickets.results import ResultsStore


def preset_names() -> list[str]:
    """Names of the shipped presets (``ntk_tickets/presets/*.toml``), sorted."""
    files = importlib.resources.files("ntk_tickets") / "presets"
    return sorted(f.name.removesuffix(".toml") for f in files.iterdir()
                  if f.name.endswith(".toml"))


def _preset_path(name: str):
    return importlib.resources.files("ntk_tickets") / "presets" / f"{name}.toml"


def _preset_comments(name: str) -> list[str]:
    """The leading comment lines of a preset file, without the ``#``."""
    lines = []
    for line in _preset_path(name).read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return lines


def preset_description(name: str) -> str:
    """The first comment line of a preset file: what the preset studies, in one line."""
    comments = _preset_comments(name)
    return comments[0] if comments else ""


def preset_runtime(name: str) -> str:
    """The runtime a preset documents (its ``# Runtime on 2 CPU cores: …`` comment, up to
    the first period or parenthesis, e.g. ``"about 2 min"``), or an empty string."""
    text = " ".join(_preset_comments(name))
    marker = "Runtime on 2 CPU cores:"
    if marker not in text:
        return ""
    return text.split(marker, 1)[1].split(".")[0].split(" (")[0].strip()


def resolve_config(spec: str, overrides: Sequence[str] = ()) -> StudyConfig:
    """A preset name or a TOML path, with ``dotted.key=value`` overrides applied.

    Raises:
      UserInputError: if ``spec`` is neither a preset nor an existing file, or a field is bad.
    """
    if spec in preset_names():
        with importlib.resources.as_file(_preset_path(spec)) as path:
            return load_config(path, overrides)
    if spec.endswith(".toml") or os.path.exists(spec):
        return load_config(spec, overrides)
    raise UserInputError(
        f"{spec!r} is neither a preset nor a config file; presets: "
        f"{', '.join(preset_names())} (see `ntk-tickets list`)"
    )


def x64_enabled(cfg: StudyConfig) -> bool:
    """float64 if ``train.x64`` is set or ``JAX_ENABLE_X64`` is truthy in the environment."""
    env = os.environ.get("JAX_ENABLE_X64", "").lower() in ("1", "true", "yes", "on")
    return cfg.train.x64 or env


@dataclasses.dataclass
class StudyReport:
    """What a run did: cells computed now, cells found finished, and diverged cells."""

    out_dir: Path
    computed: list[str]
    skipped: list[str]
    diverged: dict[str, dict]


def cell_id(width: int) -> str:
    """The identity of the cell of one width, e.g. ``w00064``."""
    return f"w{width:05d}"


def cell_cost(cfg: StudyConfig, data: Dataset, width: int) -> int:
    """The relative cost of the cell of ``width`` for the time-left estimate: the model's
    parameter count (a training step costs about that many multiply-adds per example, so a
    hidden n × n layer makes it grow like n²). Computed from shapes only."""
    model = build_model(cfg.model, width, data.input_shape, data.n_out)
    return parameter_count(jax.eval_shape(model.init, jax.random.PRNGKey(0)))


def run_study(cfg: StudyConfig, out_dir: str | Path, *, force: bool = False,
              executor: str = "serial", workers: int | None = None,
              ray_address: str | None = None, gpus_per_cell: float = 0.0,
              log: Callable[[str], None] | None = None) -> StudyReport:
    """Runs every cell of a width study that ``out_dir`` does not hold yet.

    Cells are written to the store as they finish, whichever executor computes them, so an
    interrupted run loses at most the cells in flight.

    Args:
      cfg: the study config.
      out_dir: the results directory (created if needed).
      force: recompute everything, discarding earlier results in ``out_dir``.
      executor: ``"serial"``, ``"process"`` or ``"ray"``
        (:func:`ntk_tickets.executors.execute_cells`).
      workers: parallel workers for ``process`` and a local ``ray`` cluster.
      ray_address: an existing Ray cluster to run on.
      gpus_per_cell: GPUs each Ray task asks for.
      log: receives one line per cell instead of the progress bar on stderr.

    Returns:
      A :class:`StudyReport`.

    Raises:
      UserInputError: for bad executor options or an unreachable Ray cluster (before
        ``out_dir`` is touched), or a results folder that cannot be used.
    """
    check_executor_options(executor, workers, ray_address, gpus_per_cell)
    x64 = x64_enabled(cfg)
    with jax.enable_x64(x64):
        data = load_dataset(cfg.data, cfg.train.loss)
    report = StudyReport(Path(out_dir), [], [], {})
    # Ray is reached before the store opens, so that an unreachable cluster leaves the
    # folder as it was (even with --force).
    cluster = (ray_cluster(ray_address, workers or default_workers(len(cfg.model.widths)))
               if executor == "ray" else contextlib.nullcontext())
    with cluster, contextlib.closing(ResultsStore(out_dir, config_to_dict(cfg),
                                                  config_hash(cfg), data.fingerprint, x64,
                                                  force=force)) as store:
        done = store.done_cells()
        report.skipped = [cell_id(w) for w in cfg.model.widths if cell_id(w) in done]
        todo = [w for w in cfg.model.widths if cell_id(w) not in done]
        costs = {w: float(cell_cost(cfg, data, w)) for w in todo}
        progress = Progress(list(costs.values()), len(report.skipped),
                            bar=False if log else None)
        say = log or progress.log
        if report.skipped:
            say(f"{len(report.skipped)} of {len(cfg.model.widths)} cells already done in "
                f"{out_dir}: {', '.join(report.skipped)} (use --force to recompute)")
        progress.draw()
        try:
            for cell in execute_cells(cfg, todo, x64, executor=executor, data=data,
                                      workers=workers, ray_address=ray_address,
                                      gpus_per_cell=gpus_per_cell):
                cid = cell_id(cell.width)
                store.write_cell(cid, cell.records, cell.status, cell.compile_s, cell.run_s,
                                 **cell.info)
                report.computed.append(cid)
                if cell.status == "diverged":
                    report.diverged[cid] = cell.info["diverged_step"]
                progress.advance(costs[cell.width])
                say(f"[{progress.done}/{progress.total}] width {cell.width}: {cell.status} "
                    f"(compile {cell.compile_s:.1f} s, run {cell.run_s:.1f} s)")
        finally:
            progress.close()
    return report


def width_table(records) -> str:
    """A per-width text table of the final step (means over seeds): test accuracy of each
    path (test loss for regression), function gap against exact, and the exact path's
    relative weight change."""
    final = records[records["step"] == records.groupby("width")["step"].transform("max")]
    final = final[final["mask"] == "dense"] if "mask" in final else final
    columns = {}
    score = "accuracy" if (final.metric == "accuracy").any() else "loss"
    label = "acc" if score == "accuracy" else "loss"
    for path in ("exact", "linear", "entk", "ntk", "nngp"):
        rows = final[(final.path == path) & (final.metric == score) & (final.split == "test")]
        if len(rows):
            columns[f"{label}:{path}"] = rows.groupby("width")["value"].mean()
    for path in ("linear", "entk", "ntk", "nngp"):
        gap = final[(final.path == path) & (final.metric == "function_gap")]
        if len(gap):
            columns[f"gap:{path}"] = gap.groupby("width")["value"].mean()
    change = final[(final.path == "exact") & (final.metric == "weight_change")]
    if len(change):
        columns["dθ/θ0:exact"] = change.groupby("width")["value"].mean()
    import pandas as pd

    return pd.DataFrame(columns).to_string(float_format=lambda v: f"{v:.4f}")


def ticket_table(records) -> str:
    """A text table of a ticket study at the final step (means over seeds): per width and
    sparsity, the test accuracy (test loss for regression) of each mask on the exact path
    (on the first trained path if exact was not run); the dense network is sparsity 0.

    Returns an empty string when the records hold no ticket masks.
    """
    final = records[(records["step"] == records["step"].max()) & (records["split"] == "test")
                    & (records["mask"] != "perturb")]
    score = "accuracy" if (final.metric == "accuracy").any() else "loss"
    final = final[final.metric == score]
    if set(final["mask"]) <= {"dense"}:
        return ""
    path = "exact" if (final.path == "exact").any() else final.path.iloc[0]
    final = final[final.path == path]
    table = final.pivot_table(index=["width", "sparsity"], columns="mask", values="value",
                              aggfunc="mean")
    order = ["dense"] + sorted(c for c in table.columns if c != "dense")
    header = f"test {score} of each mask ({path} path, mean over seeds)\n"
    return header + table[order].to_string(float_format=lambda v: f"{v:.4f}", na_rep="")
