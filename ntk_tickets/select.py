"""Record selection shared by the figures, ``summarize``, the CLI tables and notebooks.

One place decides what "the final value" of a run is, which metric scores a study, how seeds
are summarized, and in which order paths and masks are shown:

* :func:`final_step`: the rows at the last recorded step of each run (one width, seed, path,
  mask, round, split, metric, experiment and ε); ``ntk_init_error``, recorded at step 0
  only, keeps its step 0.
* :func:`score_metric`: ``"accuracy"`` for classification, ``"loss"`` for regression.
* :func:`seed_stats` and :func:`nan_mean`: mean, sample standard deviation, min, max and
  count over seeds, NaN where a seed diverged.
* :data:`PATH_ORDER`, :data:`CONTROL_MASKS` and :func:`ordered`: the display order.
* :func:`training_runs` / :func:`perturbation_runs`: the records of plain training runs
  (dense networks, tickets and controls) and of the perturbation test (``experiment``
  column).
* :func:`varying_factors` and :func:`factor_groups`: the factor columns (parameterization,
  output scale) that a study varies, and its records split by them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from ntk_tickets.config import CONTROLS, PATHS
from ntk_tickets.config import FACTOR_COLUMNS as _FACTOR_COLUMNS
from ntk_tickets.metrics import ENSEMBLE_SEED

if TYPE_CHECKING:
    import pandas as pd

#: Paths in the order (and colour order) they are shown; others follow alphabetically.
PATH_ORDER: tuple[str, ...] = PATHS
#: Control masks, shown after the ticket families.
CONTROL_MASKS: tuple[str, ...] = (*CONTROLS, "shuffle_rescaled", "reinit_rescaled")
#: The columns of the factor fields (parameterization, output scale): one value per cell.
FACTOR_COLUMNS: tuple[str, ...] = _FACTOR_COLUMNS
#: The columns that identify one run's value at one step.
RUN_COLUMNS = ("width", "seed", "path", "mask", "round", "split", "metric", "experiment", "eps",
               "rewind_step", "spawn_step", "subspace", "dim", *FACTOR_COLUMNS)


def final_step(records: pd.DataFrame) -> pd.DataFrame:
    """The rows at the last recorded step of each run (:data:`RUN_COLUMNS`).

    Args:
      records: tidy records (``RECORD_COLUMNS``).

    Returns:
      The subset of ``records`` with one step per run.
    """
    keys = [c for c in RUN_COLUMNS if c in records.columns]
    keyed = records.assign(eps=records["eps"].fillna(-math.inf)) if "eps" in keys else records
    last = keyed.groupby(keys)["step"].transform("max")
    return records[records["step"] == last]


def score_metric(records: pd.DataFrame, path: str | None = None) -> str:
    """``"accuracy"`` when test accuracy is recorded (on ``path``, if given), else ``"loss"``
    (regression studies have no accuracy)."""
    rows = records[(records["metric"] == "accuracy") & (records["split"] == "test")]
    if path is not None:
        rows = rows[rows["path"] == path]
    return "accuracy" if len(rows) else "loss"


def nan_mean(values) -> float:
    """The mean over seeds, NaN if any seed's value is NaN: a diverged run has no value,
    and a mean over the seeds that survived would hide it."""
    return float(np.mean(np.asarray(values, dtype=float)))


def seed_stats(frame: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Mean, sample std (0 for one seed), min, max and number of seeds of ``value``, per
    group of ``by``; every statistic is NaN where a seed's value is NaN (:func:`nan_mean`)."""
    def strict(fn):
        return lambda v: fn(np.asarray(v, dtype=float))

    stats = frame.groupby(by)["value"].agg(
        mean=strict(np.mean), std=strict(lambda v: np.std(v, ddof=1) if v.size > 1 else 0.0),
        min=strict(np.min), max=strict(np.max), count="size")
    return stats.reset_index()


def ordered(names: Iterable[str], first: Sequence[str] = (),
            last: Sequence[str] = ()) -> list[str]:
    """``names`` without repeats: those in ``first`` in that order, then the others sorted,
    then those in ``last`` in that order."""
    names = set(names)
    middle = sorted(names - set(first) - set(last))
    return [n for n in first if n in names] + middle + [n for n in last if n in names]


def varying_factors(records: pd.DataFrame) -> list[str]:
    """The factor columns that take more than one value in ``records``: the ones a table or
    figure must keep apart (e.g. ``["parameterization"]`` for an ntk-vs-µP study)."""
    return [c for c in FACTOR_COLUMNS if c in records.columns and records[c].nunique() > 1]


def factor_groups(records: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """``records`` split by the values of its varying factors, each with a label such as
    ``"mup, output_scale 10"`` (one group labelled ``""`` when no factor varies)."""
    factors = varying_factors(records)
    if not factors:
        return [("", records)]
    return [(factor_label(dict(zip(factors, key if isinstance(key, tuple) else (key,),
                                   strict=True))), group)
            for key, group in records.groupby(factors, sort=True)]


def factor_label(factors: dict) -> str:
    """``{"parameterization": "mup", "output_scale": 10.0}`` → ``"mup, output_scale 10"``."""
    return ", ".join(v if isinstance(v, str) else f"{c} {v:g}" for c, v in factors.items())


def per_seed_runs(records: pd.DataFrame) -> pd.DataFrame:
    """The records of single networks: without the rows of metrics over a cell's ensemble
    of seeds (``seed ==`` :data:`~ntk_tickets.metrics.ENSEMBLE_SEED`)."""
    return records[records["seed"] != ENSEMBLE_SEED]


def training_runs(records: pd.DataFrame) -> pd.DataFrame:
    """The records of plain training runs (not the perturbation test)."""
    return records[records["experiment"] == "train"]


def perturbation_runs(records: pd.DataFrame) -> pd.DataFrame:
    """The records of the perturbation test (``experiment == "perturb"``, ε in ``eps``)."""
    return records[records["experiment"] == "perturb"]
