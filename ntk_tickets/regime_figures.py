"""Figures of the regimes: lazy against rich, finite against infinite width, double descent.

Like :mod:`ntk_tickets.plotting` (whose conventions they share: records in, a
:class:`~matplotlib.figure.Figure` out, no pyplot), each function takes the tidy records of a
study and draws values at the final step, the mean over seeds with the seeds' range:

- :func:`factor_vs_width`: a metric against width, one colour per value of a factor
  (``parameterization``, ``output_scale``), exact solid and linear dashed: does the feature
  change shrink with width under ntk and stay under µP?
- :func:`output_scale_curves`: a metric against the output scale α, one line per width and
  parameterization: the transition from rich (small α) to lazy (large α).
- :func:`infinite_width_comparison`: like-for-like comparisons with the infinite-width
  predictor: one network's test loss (mean over seeds) against the *expected* loss of the
  ntk/nngp ensemble, and the loss of the seed-averaged prediction against the loss of the
  ensemble mean.
- :func:`double_descent`: test loss against P/(n·k), the linearized model's parameters per
  training target; the interpolation threshold is at 1 (Belkin et al. 2019; Adlam &
  Pennington 2020), and averaging over initializations removes most of the peak (d'Ascoli
  et al. 2020).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure

from ntk_tickets.config import factor_defaults
from ntk_tickets.metrics import metric_label
from ntk_tickets.plotting import _path_color, _width_ticks
from ntk_tickets.select import (
    PATH_ORDER,
    factor_label,
    final_step,
    ordered,
    per_seed_runs,
    seed_stats,
    training_runs,
    varying_factors,
)

if TYPE_CHECKING:
    import pandas as pd

#: Line style of each trained path in the regime figures.
_STYLE = {"exact": "-", "linear": "--", "entk": ":"}


def _final(records: pd.DataFrame, metric: str, split: str) -> pd.DataFrame:
    """Final-step values of ``metric`` on ``split`` of the dense networks, per seed."""
    runs = training_runs(records)
    rows = runs[(runs["metric"] == metric) & (runs["split"] == split)
                & (runs["mask"] == "dense")]
    return final_step(rows)


def _errorbar(ax, stats: pd.DataFrame, x: str, **kw) -> None:
    """Mean with a min–max bar per ``x``."""
    stats = stats.sort_values(x)
    ax.errorbar(stats[x], stats["mean"],
                yerr=[stats["mean"] - stats["min"], stats["max"] - stats["mean"]],
                capsize=2, marker="o", markersize=4, **kw)


def factor_vs_width(records: pd.DataFrame, metric: str, factor: str, *,
                    split: str | None = None) -> Figure:
    """``metric`` at the final step against width (log–log), one colour per value of
    ``factor``, one line style per trained path; mean over seeds, bars min–max.

    Raises:
      ValueError: when the records hold no positive final values of ``metric``.
    """
    rows, held = _at_reference(records, factor)
    rows = _final(rows, metric, split or _split_of(records, metric))
    rows = per_seed_runs(rows[np.isfinite(rows["value"]) & (rows["value"] > 0)])
    if rows.empty:
        raise ValueError(f"no positive final values of {metric!r}")
    fig = Figure(figsize=(5.8, 4.4), layout="constrained")
    ax = fig.subplots()
    stats = seed_stats(rows, [factor, "path", "width"])
    for i, value in enumerate(sorted(stats[factor].unique())):
        for path in ordered(stats["path"].unique(), PATH_ORDER):
            s = stats[(stats[factor] == value) & (stats["path"] == path)]
            if len(s):
                _errorbar(ax, s, "width", color=f"C{i}", linestyle=_STYLE.get(path, "-."),
                          label=f"{factor_label({factor: value})}, {path}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    _width_ticks(ax, rows["width"].unique())
    ax.set_xlabel("width")
    ax.set_ylabel(metric_label(metric) + " (log scale)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize="small")
    n_seeds = rows["seed"].nunique()
    ax.set_title(f"{metric} at the final step by {factor}{held}\nmean over {n_seeds} "
                 "seeds, bars min–max", fontsize="medium")
    return fig


def _at_reference(records: pd.DataFrame, factor: str) -> tuple[pd.DataFrame, str]:
    """The records at one value of every varying factor other than ``factor``: its default
    (ntk, α = 1) when the study has it, else its first value; and a title suffix naming
    the values held."""
    defaults = factor_defaults()
    held = {}
    for other in varying_factors(records):
        if other != factor:
            values = sorted(records[other].unique())
            held[other] = defaults[other] if defaults[other] in values else values[0]
    for column, value in held.items():
        records = records[records[column] == value]
    return records, (f" ({factor_label(held)})" if held else "")


def _split_of(records: pd.DataFrame, metric: str) -> str:
    splits = sorted(records.loc[records["metric"] == metric, "split"].unique())
    return "test" if "test" in splits or not splits else splits[0]


def output_scale_curves(records: pd.DataFrame, metric: str, *,
                        split: str | None = None) -> Figure:
    """``metric`` at the final step against the output scale α (log x), one colour per
    width, one line style per path; a panel per parameterization.

    Raises:
      ValueError: when the records hold no final values of ``metric``.
    """
    rows = _final(records, metric, split or _split_of(records, metric))
    rows = per_seed_runs(rows[np.isfinite(rows["value"])])
    if rows.empty:
        raise ValueError(f"no final values of {metric!r}")
    parameterizations = sorted(rows["parameterization"].unique())
    fig = Figure(figsize=(4.6 * len(parameterizations) + 1.6, 4.2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(parameterizations), sharey=True))
    stats = seed_stats(rows, ["parameterization", "width", "path", "output_scale"])
    widths = sorted(stats["width"].unique())
    for ax, parameterization in zip(axes, parameterizations, strict=True):
        for i, width in enumerate(widths):
            for path in ordered(stats["path"].unique(), PATH_ORDER):
                s = stats[(stats["parameterization"] == parameterization)
                          & (stats["width"] == width) & (stats["path"] == path)]
                if len(s):
                    _errorbar(ax, s, "output_scale", color=f"C{i}",
                              linestyle=_STYLE.get(path, "-."), label=f"width {width}, {path}")
        ax.set_xscale("log")
        if metric != "accuracy" and _all_positive(rows["value"]):
            ax.set_yscale("log")
        ax.set_xlabel("output scale α (log scale)")
        ax.set_title(parameterization)
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_ylabel(metric_label(metric))
    axes[-1].legend(fontsize="x-small")
    fig.suptitle(f"{metric} at the final step against α: small α rich, large α lazy")
    return fig


def _all_positive(values) -> bool:
    values = np.asarray(values, dtype=float)
    return bool(np.all(values[np.isfinite(values)] > 0))


def infinite_width_comparison(records: pd.DataFrame) -> Figure:
    """Two like-for-like comparisons of the finite networks with the infinite-width
    predictor, test loss against width:

    * left: the mean over seeds of one network's loss (exact, linear) against the ntk/nngp
      ``expected_loss``: the loss averaged over initializations, which includes the random
      initial function a single network carries;
    * right: the ``ensemble_loss`` (loss of the seed-averaged prediction) of the finite
      networks against the ntk/nngp ``loss``, the loss of the ensemble mean, and against
      what an ensemble of the study's S seeds should reach: loss of the mean + (expected
      loss − loss of the mean)/S, since averaging S independent networks divides the
      variance term by S.

    Raises:
      ValueError: when the records hold no ``expected_loss``.
    """
    expected = _final(records, "expected_loss", "test")
    if expected.empty:
        raise ValueError("no expected_loss records: add it to metrics with the ntk/nngp paths")
    loss = _final(records, "loss", "test")
    ensemble = _final(records, "ensemble_loss", "test")
    fig = Figure(figsize=(10.5, 4.3), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    panels = ((axes[0], per_seed_runs(loss), expected, "one network (mean over seeds)",
               "expected loss over initializations"),
              (axes[1], ensemble, loss, "seed-averaged prediction", "loss of the ensemble mean"))
    for ax, finite, infinite, finite_label, infinite_label in panels:
        finite = finite[finite["path"].isin(["exact", "linear", "entk"])]
        for path in ordered(finite["path"].unique(), PATH_ORDER):
            s = seed_stats(finite[finite["path"] == path], ["width"])
            _errorbar(ax, s, "width", color=_path_color(path),
                      linestyle=_STYLE.get(path, "-"), label=f"{path}: {finite_label}")
        infinite = infinite[infinite["path"].isin(["ntk", "nngp"])]
        for path in ordered(infinite["path"].unique(), PATH_ORDER):
            value = infinite.loc[infinite["path"] == path, "value"].mean()
            ax.axhline(value, color=_path_color(path), linestyle="-.",
                       label=f"{path}: {infinite_label}")
            if finite_label.startswith("seed-averaged") and (expected["path"] == path).any():
                # An ensemble of S networks keeps 1/S of the variance term.
                n_seeds = per_seed_runs(loss)["seed"].nunique()
                spread = expected.loc[expected["path"] == path, "value"].mean() - value
                ax.axhline(value + spread / n_seeds, color=_path_color(path), linestyle=":",
                           label=f"{path}: expected loss of a {n_seeds}-seed ensemble")
        ax.set_xscale("log")
        ax.set_yscale("log")
        _width_ticks(ax, records["width"].unique())
        ax.set_xlabel("width")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize="x-small")
    axes[0].set_ylabel("test loss (log scale)")
    axes[0].set_title("single networks vs the expected loss")
    axes[1].set_title("ensembles vs the ensemble mean")
    fig.suptitle("finite width against infinite width, like for like (final step)")
    return fig


def double_descent(records: pd.DataFrame) -> Figure:
    """Test loss at the final step against P/(n·k) (``params_per_target``, log x): each
    finite path's mean over seeds (bars min–max), the ``ensemble_loss`` of the seed-averaged
    prediction (open markers), and the ntk/nngp losses as horizontal lines; the
    interpolation threshold P = n·k is marked.

    Raises:
      ValueError: when the records hold no ``params_per_target``.
    """
    ratio = _final(records, "params_per_target", "none")
    if ratio.empty:
        raise ValueError("no params_per_target records: add it to metrics")
    ratio = ratio.groupby("width")["value"].first()
    fig = Figure(figsize=(6.4, 4.6), layout="constrained")
    ax = fig.subplots()
    loss = _final(records, "loss", "test")
    ensemble = _final(records, "ensemble_loss", "test")
    for path in ordered(loss["path"].unique(), PATH_ORDER):
        if path in ("ntk", "nngp"):
            ax.axhline(loss.loc[loss["path"] == path, "value"].mean(), color=_path_color(path),
                       linestyle="-.", label=f"{path} (infinite width)")
            continue
        s = seed_stats(per_seed_runs(loss[loss["path"] == path]), ["width"])
        _errorbar(ax, s.assign(x=s["width"].map(ratio)), "x", color=_path_color(path),
                  linestyle=_STYLE.get(path, "-"), label=f"{path}, one network")
        e = ensemble[ensemble["path"] == path].groupby("width")["value"].mean()
        if len(e):
            ax.plot(e.index.map(ratio), e.to_numpy(), marker="o", markerfacecolor="none",
                    color=_path_color(path), linestyle="none", label=f"{path}, ensemble")
    ax.axvline(1.0, color="0.5", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters per training target P / (n·k) (log scale)")
    ax.set_ylabel("test loss (log scale)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize="x-small")
    ax.set_title("double descent in width (final step)")
    return fig
