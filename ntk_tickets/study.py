"""Presets, config resolution and the study runner behind ``ntk-tickets run`` and ``demo``.

A study is a list of cells, one per width and combination of factor values
(:data:`ntk_tickets.config.FACTOR_FIELDS`: parameterization, output scale); seeds are vmapped
inside a cell. Each finished cell is written to the results directory at once, so an
interrupted run resumes where it stopped and a finished cell is never recomputed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax

from ntk_tickets.config import (
    FACTOR_COLUMNS,
    StudyConfig,
    cell_factors,
    config_to_dict,
    factor_tag,
    factor_values,
    with_factors,
)
from ntk_tickets.data import Dataset, load_dataset
from ntk_tickets.errors import StudyInterrupted, UserInputError
from ntk_tickets.executors import (
    check_executor_options,
    default_workers,
    execute_cells,
    ray_cluster,
)
from ntk_tickets.memory import check_memory
from ntk_tickets.metrics import METRICS
from ntk_tickets.models import build_model, parameter_count
from ntk_tickets.progress import Progress
from ntk_tickets.results import ResultsStore
from ntk_tickets.select import (
    CONTROL_MASKS,
    PATH_ORDER,
    factor_groups,
    final_step,
    nan_mean,
    ordered,
    score_metric,
    training_runs,
)


def x64_enabled(cfg: StudyConfig) -> bool:
    """float64 if ``train.x64`` is set or ``JAX_ENABLE_X64`` is truthy in the environment."""
    env = os.environ.get("JAX_ENABLE_X64", "").lower() in ("1", "true", "yes", "on")
    return cfg.train.x64 or env


def x64_note(x64: bool, backend: str) -> str:
    """A warning for float64 on a TPU, which emulates it in software (several times slower,
    and not every operation is supported); empty otherwise."""
    if x64 and backend == "tpu":
        return ("warning: float64 on a TPU is emulated in software (several times slower); "
                "set train.x64 = false (and unset JAX_ENABLE_X64) unless the study needs it")
    return ""


@dataclasses.dataclass
class StudyReport:
    """What a run did: cells computed now, cells found finished, and diverged cells."""

    out_dir: Path
    computed: list[str]
    skipped: list[str]
    diverged: dict[str, dict]


@dataclasses.dataclass(frozen=True)
class Cell:
    """One unit of work and of the store: one width, one value of each factor field
    (``factors``: ``((column, value), ...)``, :func:`ntk_tickets.config.cell_factors`) and
    the seeds vmapped inside it."""

    width: int
    seeds: tuple[int, ...]
    factors: tuple[tuple[str, Any], ...] = ()

    @property
    def id(self) -> str:
        """The cell's id in the store, e.g. ``w00064_ntk_os1_s0-1``."""
        return cell_id(self.width, self.seeds, dict(self.factors))

    def config(self, cfg: StudyConfig) -> StudyConfig:
        """The study config this cell runs under: its seeds and factor values."""
        return with_factors(_with_seeds(cfg, self.seeds), dict(self.factors))



def cell_id(width: int, seeds: Sequence[int], factors: Mapping[str, Any] | None = None) -> str:
    """The store's id of the cell of ``width`` with ``seeds`` and factor values, e.g.
    ``w00064_mup_os10_s0-3,7`` (``factors`` in :data:`~ntk_tickets.config.FACTOR_FIELDS`
    order; cells written before factors existed have ids without them)."""
    ranges, seeds = [], sorted(seeds)
    start = prev = seeds[0]
    for seed in [*seeds[1:], None]:
        if seed is not None and seed == prev + 1:
            prev = seed
            continue
        ranges.append(f"{start}" if start == prev else f"{start}-{prev}")
        start = prev = seed
    label = ",".join(ranges)
    if len(label) > 120:  # many scattered seeds: a short digest keeps the id a file name
        label = f"{seeds[0]}-{seeds[-1]}+{hashlib.sha256(label.encode()).hexdigest()[:10]}"
    tags = "".join(f"_{factor_tag(c, v)}" for c, v in (factors or {}).items())
    return f"w{width:05d}{tags}_s{label}"


def _factor_key(entry: Mapping[str, Any], cid: str) -> tuple[tuple[str, Any], ...]:
    """The factor values of a manifest entry, in :func:`cell_factors` order."""
    missing = [c for c in FACTOR_COLUMNS if c not in entry]
    if missing:
        raise UserInputError(f"cell {cid!r} of the manifest has no {', '.join(missing)} "
                             "(edited by hand?): restore it, or choose another --out DIR")
    return tuple((c, entry[c]) for c in FACTOR_COLUMNS)


def plan_cells(cfg: StudyConfig, finished: Mapping[str, Mapping]) -> tuple[list[Cell],
                                                                           list[str]]:
    """The cells still to compute, and the ids of the finished cells this config covers.

    The seeds of a width and factor combination that some finished cell already holds are
    not computed again, so adding widths, seeds or factor values to a finished study
    computes only what is new.

    Args:
      cfg: the study config.
      finished: manifest entries of the finished cells (with ``width``, ``seeds`` and the
        factor columns).
    """
    combos = [tuple(f.items()) for f in cell_factors(cfg)]
    held: dict[tuple, set[int]] = {}
    covered = []
    for cid, entry in finished.items():
        if not (isinstance(entry.get("width"), int)
                and isinstance(entry.get("seeds"), list)
                and all(isinstance(s, int) for s in entry["seeds"])):
            raise UserInputError(
                f"cell {cid!r} of the manifest has no integer width and list of integer seeds "
                "(edited by hand?): restore it, or choose another --out DIR")
        factors = _factor_key(entry, cid)
        held.setdefault((entry["width"], factors), set()).update(entry["seeds"])
        if (entry["width"] in cfg.model.widths and factors in combos
                and set(entry["seeds"]) & set(cfg.train.seeds)):
            covered.append(cid)
    todo = []
    for factors in combos:
        for width in cfg.model.widths:
            seeds = tuple(s for s in cfg.train.seeds
                          if s not in held.get((width, factors), ()))
            if seeds:
                todo.append(Cell(width, seeds, factors))
    _check_ensembles(cfg, todo, held)
    return todo, sorted(covered)


def _check_ensembles(cfg: StudyConfig, todo: Sequence[Cell], held: Mapping[tuple, set]) -> None:
    """Refuses to add seeds to a width that a finished cell holds when the study records a
    metric over the ensemble of a cell's seeds: the new cell's ensemble would be another
    one, and no table could tell them apart."""
    ensemble = [m for m in cfg.metrics if not METRICS[m].per_seed]
    for cell in todo:
        if ensemble and held.get((cell.width, cell.factors)):
            raise UserInputError(
                f"{', '.join(ensemble)} average(s) over the seeds of one cell, and width "
                f"{cell.width} already has seeds {sorted(held[cell.width, cell.factors])}: "
                f"run seeds {list(cell.seeds)} in another --out DIR, or list all seeds again "
                "with --force")


def _with_seeds(cfg: StudyConfig, seeds: tuple[int, ...]) -> StudyConfig:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seeds=seeds))


def cell_cost(cfg: StudyConfig, data: Dataset, cell: Cell) -> int:
    """The relative cost of a cell for the time-left estimate: the model's parameter count
    (a training step costs about that many multiply-adds per example, so a hidden n × n
    layer makes it grow like n²). Computed from shapes only."""
    model = build_model(cell.config(cfg).model, cell.width, data.input_shape, data.n_out)
    return parameter_count(jax.eval_shape(model.init, jax.random.PRNGKey(0)))


def _finished_entries(out_dir: Path, cfg: StudyConfig, data: Dataset,
                      x64: bool) -> dict[str, dict] | None:
    """The finished cells of the study in ``out_dir`` if it is this study (read only, no
    lock); None when there is none or it is another study (the store decides then)."""
    from ntk_tickets.config import identity_differences, study_identity
    from ntk_tickets.results import FINISHED, MANIFEST, intact, load_manifest

    if not (out_dir / MANIFEST).is_file():
        return None
    try:
        manifest = load_manifest(out_dir)
    except UserInputError:
        return None
    same = (not identity_differences(manifest["identity"], study_identity(config_to_dict(cfg)))
            and manifest["x64"] == x64
            and manifest.get("data_fingerprint") in (None, data.fingerprint))
    finished = {cid: e for cid, e in manifest["cells"].items() if e["status"] in FINISHED}
    if not same or not intact(out_dir, finished):
        return None
    return finished


def run_study(cfg: StudyConfig, out_dir: str | Path, *, force: bool = False,
              executor: str = "serial", workers: int | None = None,
              ray_address: str | None = None, gpus_per_cell: float = 0.0,
              log: Callable[[str], None] | None = None) -> StudyReport:
    """Runs every cell of a width study that ``out_dir`` does not hold yet.

    Cells are written to the store as they finish, whichever executor computes them, so an
    interrupted run loses at most the cells in flight. A finished study is not opened for
    writing at all, so it can be re-run from a read-only folder. Before anything is deleted
    (``force``) or allocated, the memory the largest cell needs is checked against the
    device (:func:`ntk_tickets.memory.check_memory`).

    Args:
      cfg: the study config.
      out_dir: the results directory (created if needed).
      force: recompute everything, discarding the earlier results in ``out_dir``.
      executor: ``"serial"``, ``"process"`` or ``"ray"``
        (:func:`ntk_tickets.executors.execute_cells`).
      workers: parallel workers for ``process`` and a local ``ray`` cluster.
      ray_address: an existing Ray cluster to run on.
      gpus_per_cell: GPUs each Ray task asks for.
      log: receives one line per cell instead of the progress bar on stderr.

    Returns:
      A :class:`StudyReport`.

    Raises:
      UserInputError: for bad executor options, a cell too large for the device's memory
        or an unreachable Ray cluster (before ``out_dir`` is touched), or a results folder
        that cannot be used.
      StudyInterrupted: on Ctrl-C, once the cells finished so far are saved.
    """
    check_executor_options(executor, workers, ray_address, gpus_per_cell)
    out_dir = Path(out_dir)
    x64 = x64_enabled(cfg)
    with jax.enable_x64(x64):
        data = load_dataset(cfg.data, cfg.train.loss)
    report = StudyReport(out_dir, [], [], {})
    finished = None if force else _finished_entries(out_dir, cfg, data, x64)
    todo, report.skipped = plan_cells(cfg, finished or {})
    if finished is not None and not todo:
        (log or print)(f"all {len(report.skipped)} cells of this study are already done in "
                       f"{out_dir} (use --force to recompute)")
        return report
    check_memory(cfg, data, todo, x64)
    if x64_note(x64, jax.default_backend()):
        (log or print)(x64_note(x64, jax.default_backend()))
    # Ray is reached before the store opens, so that an unreachable cluster leaves the
    # folder as it was (even with --force).
    cluster = (ray_cluster(ray_address, workers or default_workers(len(todo)))
               if executor == "ray" else contextlib.nullcontext())
    with cluster, contextlib.closing(ResultsStore(out_dir, config_to_dict(cfg),
                                                  data.fingerprint, x64,
                                                  force=force)) as store:
        cells = store.manifest["cells"]
        finished = {cid: cells[cid] for cid in store.done_cells()}
        todo, report.skipped = plan_cells(cfg, finished)
        costs = {cell: float(cell_cost(cfg, data, cell)) * len(cell.seeds)
                 for cell in todo}
        progress = Progress(list(costs.values()), len(report.skipped),
                            bar=False if log else None)
        say = log or progress.log
        note = closed_form_note(cfg)
        if note and todo:
            say(note)
        if report.skipped:
            say(f"{len(report.skipped)} cells already done in {out_dir}: "
                f"{', '.join(report.skipped)} (use --force to recompute)")
        progress.draw()
        try:
            for cell, output in _execute(cfg, todo, x64, data, executor, workers, ray_address,
                                         gpus_per_cell):
                store.write_cell(cell.id, output.records, output.status, output.compile_s,
                                 output.run_s, arrays=output.arrays,
                                 width=cell.width, seeds=list(cell.seeds),
                                 **dict(cell.factors), **output.info)
                report.computed.append(cell.id)
                if output.status == "diverged":
                    report.diverged[cell.id] = output.info["diverged_step"]
                progress.advance(costs[cell])
                say(f"[{progress.done}/{progress.total}] width {cell.width}"
                    f"{_factor_text(cell)}, seeds {list(cell.seeds)}: {output.status} "
                    f"(compile {output.compile_s:.1f} s, run {output.run_s:.1f} s)")
        except KeyboardInterrupt:
            store.save_manifest()  # a cell interrupted mid-write is on disk as it is here
            raise StudyInterrupted(out_dir, len(store.done_cells())) from None
        finally:
            progress.close()
    return report


def _factor_text(cell: Cell) -> str:
    """``, mup, output_scale 10``: the factor values that the study varies."""
    return "".join(f", {c} {v}" if not isinstance(v, str) else f", {v}"
                   for c, v in cell.factors)


def closed_form_note(cfg: StudyConfig) -> str:
    """One line saying which requested closed-form paths (entk, ntk, nngp) the study skips,
    and why; empty when none is skipped."""
    closed = [p for p in ("entk", "ntk", "nngp") if p in cfg.paths]
    if not closed:
        return ""
    if cfg.train.loss != "mse":
        return (f"paths {', '.join(closed)} are skipped: cross-entropy has no closed form "
                "(the linear path covers the tangent-space picture)")
    if "mup" in factor_values(cfg.model.parameterization):
        return (f"paths {', '.join(closed)} are skipped in the mup cells: the infinite-width "
                "limit of µP is not a kernel (its features keep learning), and its per-layer "
                "learning rates change even the linearized model's kernel; linear is run")
    return ""


def _execute(cfg: StudyConfig, todo: Sequence[Cell], x64: bool, data: Dataset,
             executor: str, workers: int | None, ray_address: str | None,
             gpus_per_cell: float) -> Iterator[tuple[Cell, Any]]:
    """``(cell, CellOutput)`` as cells finish; cells that share their seeds and factor values
    run together (one config, several widths)."""
    groups: dict[tuple, list[Cell]] = {}
    for cell in todo:
        groups.setdefault((cell.seeds, cell.factors), []).append(cell)
    for cells in groups.values():
        widths = {cell.width: cell for cell in cells}
        for output in execute_cells(cells[0].config(cfg), list(widths), x64,
                                    executor=executor, data=data, workers=workers,
                                    ray_address=ray_address, gpus_per_cell=gpus_per_cell):
            yield widths[output.width], output


def by_factors(table: Callable[[Any], str]) -> Callable[[Any], str]:
    """A text table made once per combination of the factor values the records vary
    (:func:`ntk_tickets.select.factor_groups`), each under its label; empty ones dropped."""
    @functools.wraps(table)
    def tables(records) -> str:
        sections = [(label, table(group)) for label, group in factor_groups(records)]
        return "\n\n".join(f"{label}\n{text}" if label else text
                            for label, text in sections if text)
    return tables


@by_factors
def width_table(records) -> str:
    """A per-width text table of the dense networks at the final step (means over seeds):
    test accuracy of each path (test loss for regression), the same for the seed-averaged
    prediction (``ens-``) and the ntk/nngp expected test loss (``E[loss]``) where recorded,
    function gap against exact, and the exact path's relative weight and feature change.
    Diverged runs are NaN and shown as such. A study that varies a factor gets one table
    per factor value."""
    import pandas as pd

    final = final_step(training_runs(records))
    final = final[final["mask"] == "dense"]
    score = score_metric(final)
    label = "acc" if score == "accuracy" else "loss"
    paths = ordered(final["path"].unique(), PATH_ORDER)
    columns = {}
    for name, metric, split, among in ((label, score, "test", paths),
                                       (f"ens-{label}", f"ensemble_{score}", "test", paths),
                                       ("E[loss]", "expected_loss", "test", paths),
                                       ("gap", "function_gap", "test", paths[1:]),
                                       ("dθ/θ0", "weight_change", "none", ["exact"]),
                                       ("dh/h0", "feature_change", "test", ["exact"])):
        for path in among:
            rows = final[(final.path == path) & (final.metric == metric)
                         & (final.split == split)]
            if len(rows):
                columns[f"{name}:{path}"] = rows.groupby("width")["value"].agg(nan_mean)
    return pd.DataFrame(columns).to_string(float_format=lambda v: f"{v:.4f}")


@by_factors
def ticket_table(records) -> str:
    """A text table of a ticket study at the final step (means over seeds): per width and
    sparsity (and rewind step, when the study sweeps it), the test accuracy (test loss for
    regression) of each mask on the exact path (on the first trained path if exact was not
    run); the dense network is sparsity 0.

    Returns an empty string when the records hold no ticket masks.
    """
    final = final_step(training_runs(records))
    final = final[final["split"] == "test"]
    score = score_metric(final)
    final = final[final.metric == score]
    if set(final["mask"]) <= {"dense"}:
        return ""
    path = "exact" if (final.path == "exact").any() else final.path.iloc[0]
    final = final[final.path == path]
    swept = final.loc[final["mask"] != "dense", "rewind_step"].nunique() > 1
    index = ["width", "rewind_step", "sparsity"] if swept else ["width", "sparsity"]
    table = final.pivot_table(index=index, columns="mask", values="value",
                              aggfunc=nan_mean, dropna=False)
    order = ordered(table.columns, ["dense"], CONTROL_MASKS)
    header = f"test {score} of each mask ({path} path, mean over seeds)\n"
    return header + table[order].dropna(how="all").to_string(
        float_format=lambda v: f"{v:.4f}", na_rep="")
