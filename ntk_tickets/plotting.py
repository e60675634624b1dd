"""The standard figures of a results directory, as matplotlib ``Figure`` objects.

Every function takes the tidy records of a study (:func:`ntk_tickets.results.load_records`)
and returns a :class:`matplotlib.figure.Figure` built without pyplot: no global state is
touched and nothing needs closing. :func:`save_figures` writes them with the Agg canvas; a
notebook shows one by evaluating it once the inline backend is on (``%matplotlib inline``,
or any ``import matplotlib.pyplot`` in Jupyter). Values "at the final step" are those at
the last recorded step of each (width, seed, path, mask, round, split, metric, ε), the
convention of :mod:`ntk_tickets.scaling`. Classification studies are scored by test
accuracy; regression studies (no accuracy records) by test loss.

The figures and the picture each one tests:

- :func:`loss_curves`: training curves of every path, one panel per width (does the
  linearized network train like the exact one?);
- :func:`metric_vs_width`: a metric at the final step against width on log–log axes with
  its power-law fit, e.g. the relative weight change ‖θ_T − θ0‖ / ‖θ0‖ ∝ n^slope (under
  the NTK parameterization the tangent-space picture predicts n^−1/2 for the input and
  readout layers and n^−1 for hidden n × n layers, whose ‖W0‖ grows like n);
- :func:`ticket_accuracy`: test accuracy of tickets and controls against sparsity;
- :func:`mask_overlap`: Jaccard overlap of the linear-path and exact-path IMP masks;
- :func:`perturbation_curves`: the ticket's accuracy when its complement is set to ε·ξ;
- :func:`study_figures` / :func:`save_figures`: all of the above that the records support.

Example::

    records = load_records("results/demo/paired")
    metric_vs_width(records, "weight_change")      # shown inline in a notebook
    save_figures("results/demo/paired")            # results/demo/paired/figures/*.png
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator

from ntk_tickets.config import factor_tag
from ntk_tickets.errors import UserInputError
from ntk_tickets.metrics import metric_label, scaling_metrics
from ntk_tickets.scaling import scaling_table
from ntk_tickets.select import (
    CONTROL_MASKS,
    PATH_ORDER,
    factor_groups,
    final_step,
    ordered,
    per_seed_runs,
    perturbation_runs,
    score_metric,
    seed_stats,
    training_runs,
    varying_factors,
)

if TYPE_CHECKING:
    import pandas as pd

FIGURES = "figures"

_PANEL_SIZE = (3.8, 3.2)


# ----------------------------------------------------------------------------- selection


def _path_color(path: str) -> str:
    """The same colour for a path in every figure (grey for a path outside ``PATH_ORDER``)."""
    return f"C{PATH_ORDER.index(path)}" if path in PATH_ORDER else "C7"


def _panels(n: int) -> tuple[Figure, list[Axes]]:
    """A constrained-layout figure with ``n`` panels sharing y: one row up to four panels,
    rows of three beyond. Unused grid cells are removed."""
    ncols = n if n <= 4 else 3
    nrows = -(-n // ncols)
    fig = Figure(figsize=(_PANEL_SIZE[0] * ncols + 0.6, _PANEL_SIZE[1] * nrows + 0.5),
                 layout="constrained")
    grid = fig.subplots(nrows, ncols, sharey=True, squeeze=False).ravel()
    for ax in grid[n:]:
        ax.remove()
    return fig, list(grid[:n])


def _ncols(axes: Sequence[Axes]) -> int:
    """The number of columns of the panel grid of ``axes``."""
    return axes[0].get_subplotspec().get_gridspec().ncols


def _figure_legend(fig: Figure, axes: Sequence[Axes], title: str) -> None:
    """One legend for all panels, right of them, each label once in order of appearance."""
    entries: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, handle)
    fig.legend(list(entries.values()), list(entries), loc="outside right upper", title=title,
               fontsize="small")


def _finish_panels(fig: Figure, axes: Sequence[Axes], ylabel: str, legend_title: str,
                   title: str) -> Figure:
    """The y label on the first column, one legend right of the panels, and the title."""
    for ax in axes[::_ncols(axes)]:
        ax.set_ylabel(ylabel)
    _figure_legend(fig, axes, legend_title)
    fig.suptitle(title)
    return fig


def _width_ticks(ax: Axes, widths) -> None:
    """Major ticks of a log x axis at exactly the studied widths, no minor ticks."""
    widths = sorted({int(w) for w in widths})
    ax.set_xticks(widths, labels=[str(w) for w in widths])
    ax.xaxis.set_minor_locator(NullLocator())


def _positive(values) -> bool:
    values = np.asarray(values, dtype=float)
    return bool(values.size) and bool(np.all(values[np.isfinite(values)] > 0))


# ----------------------------------------------------------------------------- figures


def loss_curves(records: pd.DataFrame, *, metric: str = "loss", split: str = "test",
                mask: str = "dense", pruning_round: int | None = None) -> Figure:
    """Training curves: ``metric`` on ``split`` against the training step, one panel per
    width (shared y), one line per path: the mean over seeds, shaded from the minimum to the
    maximum over seeds.

    The x axis is ``step + 1`` on a log scale (steps are recorded log-spaced, and step 0 is
    the initialization). The y axis is logarithmic for the loss, linear for accuracy.

    Args:
      records: tidy records of a study.
      metric: e.g. ``"loss"`` or ``"accuracy"``.
      split: ``"train"`` or ``"test"``.
      mask: the mask family (``"dense"``: the unpruned network).
      pruning_round: the round of ``mask``; None: its last round.

    Returns:
      The figure.

    Raises:
      ValueError: when the records hold no such values.
    """
    runs = training_runs(records)
    rows = runs[(runs["metric"] == metric) & (runs["split"] == split) & (runs["mask"] == mask)]
    if pruning_round is None and len(rows):
        pruning_round = int(rows["round"].max())
    rows = rows[rows["round"] == pruning_round]
    if rows.empty:
        raise ValueError(f"no {split} {metric!r} records for mask {mask!r}"
                         + (f" round {pruning_round}" if pruning_round is not None else ""))
    widths = sorted(rows["width"].unique())
    paths = ordered(rows["path"].unique(), PATH_ORDER)
    stats = seed_stats(rows, ["width", "path", "step"])
    fig, axes = _panels(len(widths))
    for ax, width in zip(axes, widths, strict=True):
        for path in paths:
            s = stats[(stats["width"] == width) & (stats["path"] == path)]
            if s.empty:
                continue
            x = s["step"].to_numpy() + 1
            color = _path_color(path)
            ax.plot(x, s["mean"], color=color, label=path)
            ax.fill_between(x, s["min"], s["max"], color=color, alpha=0.2, linewidth=0)
        ax.set_xscale("log")
        ax.set_title(f"width {width}")
        ax.set_xlabel("training step + 1 (log scale)")
        ax.grid(True, which="major", alpha=0.3)
    if metric == "loss" and _positive(rows["value"]):
        axes[0].set_yscale("log")
    for ax in axes[::_ncols(axes)]:
        ax.set_ylabel(f"{split} {metric_label(metric)}"
                      + (" (log scale)" if ax.get_yscale() == "log" else ""))
    _figure_legend(fig, axes, "path")
    n_seeds = rows["seed"].nunique()
    network = "dense network" if mask == "dense" else f"mask {mask}, round {pruning_round}"
    fig.suptitle(f"{split} {metric} during training, {network}\n"
                 f"mean over {n_seeds} seed{'s' if n_seeds != 1 else ''}, band min–max")
    return fig


def _fit_row(summary: pd.DataFrame, metric: str, path: str, mask: str, pruning_round: int,
             split: str):
    """The summary row of one fit, or None when absent or not finite."""
    sel = ((summary["metric"] == metric) & (summary["path"] == path)
           & (summary["mask"] == mask) & (summary["round"] == pruning_round))
    if "split" in summary.columns:
        sel &= summary["split"] == split
    rows = summary[sel]
    if rows.empty or not (np.isfinite(rows["slope"].iloc[0])
                          and np.isfinite(rows["intercept"].iloc[0])):
        return None
    return rows.iloc[0]


def fit_label(path: str, slope: float, ci_low: float, ci_high: float) -> str:
    """The legend text of one power-law fit, e.g. ``exact: slope -0.52 [-0.60, -0.45]``."""
    if np.isfinite(ci_low) and np.isfinite(ci_high):
        return f"{path}: slope {slope:.2f} [{ci_low:.2f}, {ci_high:.2f}]"
    return f"{path}: slope {slope:.2f} (one seed: no interval)"


def metric_vs_width(records: pd.DataFrame, metric: str, *, summary: pd.DataFrame | None = None,
                    mask: str = "dense", pruning_round: int | None = None,
                    split: str | None = None) -> Figure:
    """A metric at the final step against width, log–log, with its power-law fit per path.

    Faint points are the seeds, markers the geometric mean over seeds at each width (the
    per-width value the fit goes through), and the line the fit
    ``value = exp(intercept) · width^slope`` of :func:`ntk_tickets.scaling.scaling_table`,
    labelled with its slope and 95 % interval over seeds.

    Args:
      records: tidy records of a study.
      metric: e.g. ``"weight_change"``, ``"ntk_change"``, ``"function_gap"``.
      summary: a scaling table (columns ``metric, path, mask, round, slope, ci_low,
        ci_high, intercept``, optionally ``split``); None: computed here with
        ``scaling_table(records, metrics=[metric])``.
      mask: the mask family.
      pruning_round: the round of ``mask``; None: its last round (0 for ``"dense"``).
      split: the split of ``metric``; None: its only split, or ``"test"`` if it has several.

    Returns:
      The figure.

    Raises:
      ValueError: when the records hold no positive values of ``metric`` for ``mask``.
    """
    runs = training_runs(records)
    rows = final_step(runs[(runs["metric"] == metric) & (runs["mask"] == mask)
                           & (runs["path"] != "none")])
    rows = rows[np.isfinite(rows["value"]) & (rows["value"] > 0)]
    if pruning_round is None and len(rows):
        pruning_round = int(rows["round"].max())
    rows = rows[rows["round"] == pruning_round]
    if split is None and len(rows):
        splits = sorted(rows["split"].unique())
        split = splits[0] if len(splits) == 1 else ("test" if "test" in splits else splits[0])
    rows = rows[rows["split"] == split]
    if rows.empty:
        raise ValueError(f"no positive final values of {metric!r} for mask {mask!r}")
    if summary is None:
        summary = scaling_table(records, metrics=[metric])
    fig = Figure(figsize=(5.6, 4.4), layout="constrained")
    ax = fig.subplots()
    for path in ordered(rows["path"].unique(), PATH_ORDER):
        values = rows[rows["path"] == path]
        color = _path_color(path)
        ax.scatter(values["width"], values["value"], color=color, alpha=0.3, s=12,
                   linewidths=0)
        log_mean = values.assign(value=np.log(values["value"])).groupby("width")["value"].mean()
        fit = _fit_row(summary, metric, path, mask, pruning_round, split)
        ax.plot(log_mean.index, np.exp(log_mean.to_numpy()), "o", color=color,
                label=None if fit is not None else f"{path} (no fit)")
        if fit is not None:
            width = np.geomspace(values["width"].min(), values["width"].max(), 50)
            ax.plot(width, np.exp(fit["intercept"]) * width ** fit["slope"], "-", color=color,
                    label=fit_label(path, fit["slope"], fit["ci_low"], fit["ci_high"]))
    ax.set_xscale("log")
    ax.set_yscale("log")
    _width_ticks(ax, rows["width"].unique())
    ax.set_xlabel("width n (log scale)")
    ax.set_ylabel(f"{metric_label(metric)} (log scale)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(title=r"fit $e^{\mathrm{intercept}}\, n^{\mathrm{slope}}$: slope [95 % CI]",
              fontsize="small", title_fontsize="small")
    network = "dense network" if mask == "dense" else f"mask {mask}, round {pruning_round}"
    where = "" if split in (None, "none") else f" ({split})"
    when = "at initialization" if (rows["step"] == 0).all() else "at the final step"
    ax.set_title(f"{metric}{where} {when}, {network}\n"
                 "faint points: seeds; markers: geometric mean over seeds", fontsize="medium")
    return fig


def ticket_accuracy(records: pd.DataFrame, *, path: str = "exact") -> Figure:
    """Test accuracy (test loss for regression) of every mask family against sparsity, at the
    final step, one panel per width; the dense network is the dashed line.

    Each line is one family (``imp``, ``imp_linear``, …; controls ``random``, ``shuffle``,
    ``reinit`` dotted) with the mean over seeds and ± one standard deviation as error bars.
    The x axis is the sparsity (fraction of prunable weights removed) on a logit scale, so
    that the rounds of IMP, each pruning the same fraction, are evenly spaced. The
    perturbation test (mask ``perturb``) is left out: see :func:`perturbation_curves`.

    Args:
      records: tidy records of a ticket study.
      path: the path the masks were trained on.

    Returns:
      The figure.

    Raises:
      ValueError: when the records hold no masked networks on ``path``.
    """
    metric = score_metric(records, path)
    runs = training_runs(records)
    rows = final_step(runs[(runs["metric"] == metric) & (runs["split"] == "test")
                           & (runs["path"] == path)])
    masked = rows[rows["mask"] != "dense"]
    if masked.empty:
        raise ValueError(f"no masked networks on path {path!r} in these records")
    dense = seed_stats(rows[rows["mask"] == "dense"], ["width"]).set_index("width")
    stats = seed_stats(masked, ["width", "mask", "sparsity"])
    widths = sorted(rows["width"].unique())
    families = ordered(masked["mask"].unique(), last=CONTROL_MASKS)
    logit = bool(np.all((masked["sparsity"] > 0) & (masked["sparsity"] < 1)))
    fig, axes = _panels(len(widths))
    for ax, width in zip(axes, widths, strict=True):
        if width in dense.index:
            mean, std = dense.loc[width, "mean"], dense.loc[width, "std"]
            ax.axhline(mean, color="k", linestyle="--", linewidth=1, label="dense")
            ax.axhspan(mean - std, mean + std, color="k", alpha=0.08, linewidth=0)
        for i, family in enumerate(families):
            s = stats[(stats["width"] == width) & (stats["mask"] == family)]
            if s.empty:
                continue
            control = family in CONTROL_MASKS
            ax.errorbar(s["sparsity"], s["mean"], yerr=s["std"], color=f"C{i}", capsize=3,
                        marker="s" if control else "o", markersize=4,
                        linestyle=":" if control else "-", label=family)
        if logit:
            # The sparsity reached per round depends on the width (counts are rounded).
            sparsities = np.sort(stats.loc[stats["width"] == width, "sparsity"].unique())
            ax.set_xscale("logit")
            ax.set_xticks(sparsities, labels=[f"{s:.1%}" for s in sparsities])
            ax.xaxis.set_minor_locator(NullLocator())
        ax.set_title(f"width {width}")
        ax.set_xlabel("sparsity (fraction pruned" + (", logit scale)" if logit else ")"))
        ax.grid(True, alpha=0.3)
    if metric == "loss" and _positive(rows["value"]):
        axes[0].set_yscale("log")
    return _finish_panels(fig, axes, f"test {metric}", "mask",
                          f"test {metric} of pruned networks trained on path {path!r}\n"
                          "final step, mean ± std over seeds (grey band: dense ± std)")


def chance_overlap(density):
    """The expected Jaccard overlap d / (2 − d) of two independent random masks that each
    keep a fraction ``d`` of the weights (|A ∩ B| ≈ d²N, |A ∪ B| ≈ (2d − d²)N)."""
    density = np.asarray(density, dtype=float)
    return density / (2.0 - density)


def mask_overlap(records: pd.DataFrame) -> Figure:
    """The Jaccard overlap of the kept weights of the linear-path and exact-path masks
    (metric ``mask_overlap``) against width, one line per round labelled with its sparsity
    (averaged over widths, whose rounded counts differ slightly), mean ± std over seeds.
    Dotted lines: the overlap of two random masks of the same density, d / (2 − d).

    Args:
      records: tidy records of a ticket study with ``tickets.search_path = "both"``.

    Returns:
      The figure.

    Raises:
      ValueError: when the records hold no ``mask_overlap`` values.
    """
    rows = final_step(records[records["metric"] == "mask_overlap"])
    if rows.empty:
        raise ValueError("no mask_overlap records: run a ticket study with "
                         "tickets.search_path = \"both\"")
    stats = seed_stats(rows, ["mask", "round", "width"])
    sparsities = rows.groupby(["mask", "round"])["sparsity"].mean()
    masks = sorted(stats["mask"].unique())
    fig = Figure(figsize=(5.6, 4.4), layout="constrained")
    ax = fig.subplots()
    for i, ((mask, pruning_round), s) in enumerate(stats.groupby(["mask", "round"])):
        sparsity = sparsities[mask, pruning_round]
        which = f" ({mask})" if len(masks) > 1 else ""
        ax.errorbar(s["width"], s["mean"], yerr=s["std"], color=f"C{i}", marker="o",
                    capsize=3, label=f"round {pruning_round}: sparsity {sparsity:.1%}{which}")
        ax.axhline(float(chance_overlap(1.0 - sparsity)), color=f"C{i}", linestyle=":",
                   linewidth=1)
    ax.set_xscale("log")
    _width_ticks(ax, stats["width"].unique())
    ax.set_xlabel("width n (log scale)")
    ax.set_ylabel("Jaccard overlap |A ∩ B| / |A ∪ B| of kept weights")
    ax.set_ylim(0.0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(title="IMP round (dotted: random masks)", fontsize="small",
              title_fontsize="small")
    ax.set_title("overlap of the tangent-space (linear) and exact IMP masks\n"
                 "final step, mean ± std over seeds", fontsize="medium")
    return fig


def perturbation_curves(records: pd.DataFrame, *, path: str = "exact") -> Figure:
    """The ticket's test accuracy (test loss for regression) when the complement of its mask
    is set to ε·ξ, against ε, one line per width, mean ± std over seeds at the final step.

    The x axis is symmetric-log (linear below the smallest positive ε), so that ε = 0, the
    isolated ticket, is drawn. Dashed lines: the dense network of each width.

    Args:
      records: tidy records of a study with ``tickets.perturb_eps``.
      path: the path the perturbed tickets were trained on.

    Returns:
      The figure.

    Raises:
      ValueError: when the records hold no perturbation test on ``path``.
    """
    metric = score_metric(records, path)
    rows = final_step(records[(records["metric"] == metric) & (records["split"] == "test")
                              & (records["path"] == path)])
    perturbed = perturbation_runs(rows)
    if perturbed.empty:
        raise ValueError(f"no perturbation records (experiment 'perturb') on path {path!r}")
    stats = seed_stats(perturbed, ["width", "eps"])
    dense = seed_stats(training_runs(rows[rows["mask"] == "dense"]),
                       ["width"]).set_index("width")
    eps = np.sort(perturbed["eps"].unique())
    positive = eps[eps > 0]
    fig = Figure(figsize=(5.6, 4.4), layout="constrained")
    ax = fig.subplots()
    for i, width in enumerate(sorted(stats["width"].unique())):
        s = stats[stats["width"] == width]
        ax.errorbar(s["eps"], s["mean"], yerr=s["std"], color=f"C{i}", marker="o", capsize=3,
                    label=f"width {width}")
        if width in dense.index:
            ax.axhline(dense.loc[width, "mean"], color=f"C{i}", linestyle="--", linewidth=1,
                       label="dense (dashed)" if i == 0 else None)
    linthresh = float(positive.min()) if positive.size else 1.0
    ax.set_xscale("symlog", linthresh=linthresh)
    ax.set_xlim(eps.min() - 0.5 * linthresh, 1.5 * max(eps.max(), linthresh))
    ax.set_xticks(eps, labels=[f"{e:g}" for e in eps])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("perturbation scale ε of the pruned weights\n"
                  f"(symlog, linear below {linthresh:g}; ε = 0: the isolated ticket)")
    if metric == "loss" and _positive(rows["value"]):
        ax.set_yscale("log")
    ax.set_ylabel(f"test {metric}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    sparsity = perturbed["sparsity"].max()
    ax.set_title(f"ticket at sparsity {sparsity:.1%} with its complement set to ε·ξ\n"
                 f"path {path}, final step, mean ± std over seeds", fontsize="medium")
    return fig


# ----------------------------------------------------------------------------- a study


def study_figures(records: pd.DataFrame, *,
                  summary: pd.DataFrame | None = None) -> dict[str, Figure]:
    """Every standard figure whose data these records hold, by name.

    Names: ``loss_test`` and ``accuracy_test`` (:func:`loss_curves` of the dense network),
    ``<metric>_vs_width`` for the metrics of :func:`~ntk_tickets.metrics.scaling_metrics` with
    positive values at
    two or more widths, ``ticket_accuracy`` (exact path) and ``ticket_accuracy_<path>``
    (other paths), ``mask_overlap`` and ``perturbation`` (with a suffix ``_rewind<k>`` per
    rewind step when the study sweeps it), and ``rewind_sweep``, ``stability`` and
    ``subspace`` (:func:`ntk_tickets.connectivity_figures.connectivity_figures`).

    A study that varies a factor (parameterization, output scale) gets these figures once
    per combination of factor values, named with a suffix such as ``_mup_os1``.

    Args:
      records: tidy records of a study.
      summary: the scaling table for the width figures; None: computed once here.

    Returns:
      A dict from figure name to figure, empty for records with nothing to plot.
    """
    groups = factor_groups(records)
    if len(groups) == 1:
        return _group_figures(records, summary)
    figures = _regime_figures(records)
    for _, group in groups:
        (factors,) = group[varying_factors(records)].drop_duplicates().to_dict("records")
        suffix = "_".join(factor_tag(c, v) for c, v in factors.items())
        figures.update({f"{name}_{suffix}": fig
                        for name, fig in _group_figures(group, None).items()})
    return figures



#: The metrics that the factor comparisons draw against width and against α.
REGIME_METRICS = ("feature_change", "function_gap", "weight_change")


def _regime_figures(records: pd.DataFrame) -> dict[str, Figure]:
    """The comparisons across factor values (:mod:`ntk_tickets.regime_figures`):
    ``<metric>_by_<factor>`` against width, ``<metric>_vs_output_scale`` against α."""
    from ntk_tickets import regime_figures

    figures: dict[str, Figure] = {}
    dense = per_seed_runs(records[records["mask"] == "dense"])
    held = [m for m in REGIME_METRICS if (dense["metric"] == m).any()]
    for factor in varying_factors(records):
        if dense["width"].nunique() >= 2:
            for metric in held:
                figures[f"{metric}_by_{factor}"] = regime_figures.factor_vs_width(
                    records, metric, factor)
        if factor == "output_scale":
            for metric in (*held, score_metric(dense)):
                figures[f"{metric}_vs_output_scale"] = regime_figures.output_scale_curves(
                    records, metric)
    return figures


def _group_figures(records: pd.DataFrame, summary: pd.DataFrame | None) -> dict[str, Figure]:
    """The standard figures of records with one value of each factor, and those of
    :mod:`ntk_tickets.connectivity_figures` (rewinding, stability, subspaces)."""
    from ntk_tickets import regime_figures
    from ntk_tickets.connectivity_figures import connectivity_figures

    figures: dict[str, Figure] = {}
    everything, records = records, records[records["experiment"].isin(("train", "perturb"))]
    if (records["metric"] == "expected_loss").any():
        figures["infinite_width"] = regime_figures.infinite_width_comparison(records)
    if (records["metric"] == "params_per_target").any():
        figures["double_descent"] = regime_figures.double_descent(records)
    dense = records[(records["mask"] == "dense") & (records["split"] == "test")]
    for metric in ("loss", "accuracy"):
        if (dense["metric"] == metric).any():
            figures[f"{metric}_test"] = loss_curves(records, metric=metric)
    final = final_step(records[records["metric"].isin(scaling_metrics())
                               & (records["mask"] == "dense") & (records["path"] != "none")])
    final = final[np.isfinite(final["value"]) & (final["value"] > 0)]
    scaled = [m for m in scaling_metrics()
              if final.loc[final["metric"] == m, "width"].nunique() >= 2]
    if scaled and summary is None:
        summary = scaling_table(records, metrics=list(scaling_metrics()))
    for metric in scaled:
        figures[f"{metric}_vs_width"] = metric_vs_width(records, metric, summary=summary)
    rewinds = sorted(records.loc[records["mask"] != "dense", "rewind_step"].unique())
    for k in rewinds:
        at_k = records[(records["mask"] == "dense") | (records["rewind_step"] == k)]
        suffix = "" if len(rewinds) == 1 else f"_rewind{k}"
        figures.update({f"{name}{suffix}": fig for name, fig in _ticket_figures(at_k).items()})
    figures.update(connectivity_figures(everything))
    return figures


def _ticket_figures(records: pd.DataFrame) -> dict[str, Figure]:
    """``ticket_accuracy``, ``mask_overlap`` and ``perturbation`` figures of one rewind
    step's masks."""
    figures: dict[str, Figure] = {}
    runs = training_runs(records)
    masked = runs[(runs["mask"] != "dense") & (runs["path"] != "none") & (runs["split"] == "test")]
    for path in ordered(masked["path"].unique(), PATH_ORDER):
        name = "ticket_accuracy" if path == "exact" else f"ticket_accuracy_{path}"
        figures[name] = ticket_accuracy(records, path=path)
    if (records["metric"] == "mask_overlap").any():
        figures["mask_overlap"] = mask_overlap(records)
    perturbed = perturbation_runs(records[records["split"] == "test"])
    for path in ordered(perturbed["path"].unique(), PATH_ORDER):
        name = "perturbation" if path == "exact" else f"perturbation_{path}"
        figures[name] = perturbation_curves(records, path=path)
    return figures


def figure_png(fig: Figure, *, dpi: int = 120) -> bytes:
    """The figure rendered as PNG bytes with the Agg canvas (no pyplot, no display)."""
    buffer = io.BytesIO()
    FigureCanvasAgg(fig)  # attaches itself to the figure
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def _folder_figures(folder: Path, records: pd.DataFrame) -> dict[str, Figure]:
    """The figures of a results folder: the escape study's
    (:func:`ntk_tickets.escape_figures.escape_study_figures`) or :func:`study_figures`."""
    from ntk_tickets.results import load_manifest

    config = load_manifest(folder)["config"]
    if config.get("escape") is not None:
        from ntk_tickets.escape_figures import escape_study_figures

        return escape_study_figures(folder, records, config["data"]["teacher_width"])
    return study_figures(records)


def save_figures(directory: str | os.PathLike, *, dpi: int = 120) -> list[Path]:
    """Writes every figure of :func:`study_figures` to ``DIR/figures/<name>.png``.

    Each file is written to a temporary file in ``DIR/figures`` and renamed over the old one
    (:func:`ntk_tickets.results.save_output`), so a crash never leaves a half-written PNG.
    Figures of earlier runs whose data is gone are left as they are.

    Args:
      directory: a results folder ``DIR``.
      dpi: resolution of the PNG files.

    Returns:
      The paths written, in the order of :func:`study_figures`.

    Raises:
      UserInputError: when ``DIR`` holds no records (missing, unreadable or empty), or a
        figure cannot be written.
    """
    from ntk_tickets.results import load_records, save_output

    folder = Path(directory)
    records = load_records(folder)
    if records.empty:
        raise UserInputError(f"results folder {str(folder)!r} has no records yet: run "
                             f"`ntk-tickets run CONFIG --out {folder}` first")
    figures = _folder_figures(folder, records)
    return [save_output(folder / FIGURES / f"{name}.png", figure_png(fig, dpi=dpi))
            for name, fig in figures.items()]
