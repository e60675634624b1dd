"""One cell of a width study: the dense paired study, then the sections the config has.

:func:`run_width` runs, with the same compiled programs (DESIGN.md §3):

1. the dense networks on every path (:func:`ntk_tickets.experiments.run_dense`);
2. ``[tickets]``: search, evaluation, controls and perturbation at every rewind step
   (:func:`ntk_tickets.tickets.run_tickets`);
3. ``[stability]``: the dense network's children at every spawn step, and the second
   child of every ticket and control (:mod:`ntk_tickets.stability`);
4. ``[subspace]``: training in fixed subspaces of every kind and dimension
   (:mod:`ntk_tickets.subspace`).

The escape study has cells of its own (:func:`ntk_tickets.escape.run_escape_width`).
"""

from __future__ import annotations

import time
from typing import Any

from ntk_tickets.config import StudyConfig, rewind_steps
from ntk_tickets.data import Dataset
from ntk_tickets.experiments import CellResult, DenseCell, finish_cell, run_dense
from ntk_tickets.results import mask_arrays
from ntk_tickets.stability import Connectivity, run_stability
from ntk_tickets.subspace import run_subspace
from ntk_tickets.tickets import family_name, run_tickets, search_paths


def _program_seconds(cell: DenseCell) -> float:
    return sum(p.compile_s + p.run_s for p in cell.all_programs())


def _imp_masks(cfg: StudyConfig, cell: DenseCell, kept: dict) -> dict[str, Any] | None:
    """What ``axis_imp`` ranks by: the masks of every round of the first IMP search (exact,
    or linear with ``search_path = "linear"``) at the subspace's anchor (the first rewind
    step's when the anchor is not one of them), and the dense θ_T."""
    if cfg.subspace is None or "axis_imp" not in cfg.subspace.kinds:
        return None
    steps = rewind_steps(cfg.tickets)
    k = cfg.subspace.start_step if cfg.subspace.start_step in steps else steps[0]
    family = family_name(cfg.tickets.method, search_paths(cfg.tickets)[0])
    family = family if len(steps) == 1 else f"{family}@{k}"
    path = "exact" if "exact" in cell.trajectories else "linear"
    return {"masks": [kept[family, r] for r in range(1, cfg.tickets.rounds + 1)],
            "final": cell.trajectories[path].params}


def run_width(cfg: StudyConfig, data: Dataset, width: int) -> CellResult:
    """One cell: every section of ``cfg`` at one width, all seeds vmapped.

    Args:
      cfg: the study config.
      data: the dataset.
      width: hidden units (MLPs) or channels (CNNs).

    Returns:
      The :class:`~ntk_tickets.experiments.CellResult`: the records of every section, and
      the ticket masks as arrays (:func:`ntk_tickets.results.mask_arrays`).
    """
    cell = run_dense(cfg, data, width)
    before, start = _program_seconds(cell), time.perf_counter()
    connectivity = Connectivity(cfg, cell, data) if cfg.stability is not None else None
    kept: dict = {}
    if cfg.tickets is not None:
        rows, info = run_tickets(cfg, cell, data, connectivity)
        cell.rows += rows
        cell.info["diverged_step"].update(info.pop("diverged_step"))
        kept = info.pop("masks")
        cell.info.update(info)
    if connectivity is not None:
        cell.rows += run_stability(cfg, cell, data, connectivity)
    if cfg.subspace is not None:
        cell.rows += run_subspace(cfg, cell, data, _imp_masks(cfg, cell, kept))
    # Time outside the training programs (scores, masks, the line, records) is run time.
    cell.extra_s += time.perf_counter() - start - (_program_seconds(cell) - before)
    result = finish_cell(cell, width)
    if kept:
        result.arrays = mask_arrays(kept, cell.setup.seeds)
    return result
