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
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax

from ntk_tickets.config import (
    StudyConfig,
    config_hash,
    config_to_dict,
    load_config,
)
from ntk_tickets.data import load_dataset
from ntk_tickets.errors import UserInputError
from ntk_tickets.experiments import run_paired_width
from ntk_tickets.results import ResultsStore, records_frame
from ntk_tickets.tickets import run_ticket_width


def preset_names() -> list[str]:
    """Names of the shipped presets (``ntk_tickets/presets/*.toml``), sorted."""
    files = importlib.resources.files("ntk_tickets") / "presets"
    return sorted(f.name.removesuffix(".toml") for f in files.iterdir()
                  if f.name.endswith(".toml"))


def _preset_path(name: str):
    return importlib.resources.files("ntk_tickets") / "presets" / f"{name}.toml"


def preset_description(name: str) -> str:
    """The first comment line of a preset file."""
    for line in _preset_path(name).read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


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


def run_study(cfg: StudyConfig, out_dir: str | Path, *, force: bool = False,
              log: Callable[[str], None] | None = None) -> StudyReport:
    """Runs every cell of a paired width study that ``out_dir`` does not hold yet.

    Args:
      cfg: the study config.
      out_dir: the results directory (created if needed).
      force: recompute everything, discarding earlier results in ``out_dir``.
      log: receives one progress line per cell (default: print to stderr).

    Returns:
      A :class:`StudyReport`.
    """
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    x64 = x64_enabled(cfg)
    with jax.enable_x64(x64):
        data = load_dataset(cfg.data, cfg.train.loss)
        report = StudyReport(Path(out_dir), [], [], {})
        with contextlib.closing(ResultsStore(out_dir, config_to_dict(cfg), config_hash(cfg),
                                             data.fingerprint, x64, force=force)) as store:
            done = store.done_cells()
            widths = cfg.model.widths
            for i, width in enumerate(widths):
                cid = cell_id(width)
                if cid in done:
                    report.skipped.append(cid)
                    log(f"[{i + 1}/{len(widths)}] width {width}: already done, skipped")
                    continue
                start = time.perf_counter()
                run_cell = run_paired_width if cfg.tickets is None else run_ticket_width
                result = run_cell(cfg, data, width)
                store.write_cell(cid, records_frame(result.rows), result.status,
                                 result.compile_s, result.run_s, **result.info)
                report.computed.append(cid)
                if result.status == "diverged":
                    report.diverged[cid] = result.info["diverged_step"]
                log(f"[{i + 1}/{len(widths)}] width {width}: {result.status} in "
                    f"{time.perf_counter() - start:.1f} s (compile {result.compile_s:.1f} s)")
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
