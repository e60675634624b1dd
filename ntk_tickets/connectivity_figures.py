"""Figures and tables where tickets and tangent spaces meet: rewinding, linear mode
connectivity, kernel velocity and subspace training.

Like :mod:`ntk_tickets.plotting` (records in, a :class:`~matplotlib.figure.Figure` out, no
pyplot), values at the final step, mean over seeds with the seeds' range:

- :func:`rewind_sweep`: ticket test accuracy against the rewind step k, one line per
  sparsity (controls dotted), one panel per width;
- :func:`stability_vs_time`: on one time axis, per width: the dense network's kernel
  velocity per step (Fort et al. 2020), the instability of children spawned at k (Frankle
  et al. 2020) and the function gap between the network linearized at θ_k and the exact
  one, both trained from θ_k;
- :func:`subspace_accuracy`: test accuracy against the subspace dimension d, one line per
  kind, with the dense accuracy and its 90 % (d_int90, Li et al. 2018).

Tables: :func:`subspace_table` (d_int90 per width, path and kind) and
:func:`stability_table` (instability and loss barrier per spawn step).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure

from ntk_tickets.plotting import _finish_panels, _panels, _path_color
from ntk_tickets.select import (
    CONTROL_MASKS,
    PATH_ORDER,
    final_step,
    ordered,
    score_metric,
    seed_stats,
    training_runs,
)

if TYPE_CHECKING:
    import pandas as pd

#: The fraction of the dense network's test accuracy that defines d_int90 (Li et al. 2018).
INTRINSIC_FRACTION = 0.9
_STYLE = {"exact": "-", "linear": "--"}


def _symlog_steps(ax, steps) -> None:
    """A symlog x axis (step 0 included) with ticks at exactly ``steps``."""
    steps = sorted({int(s) for s in steps})
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xticks(steps, labels=[str(s) for s in steps])
    ax.minorticks_off()


def _spread(stats: pd.DataFrame) -> list:
    """Error bars from the mean down to the min and up to the max (:func:`seed_stats`)."""
    return [stats["mean"] - stats["min"], stats["max"] - stats["mean"]]


def rewind_sweep(records: pd.DataFrame, *, path: str = "exact") -> Figure:
    """Test accuracy (test loss for regression) of the ticket families (``imp``,
    ``imp_rescaled``, …) and the first control against the rewind step k, one line per
    sparsity (colour) and family (line style; the control dotted), one panel per width; the
    dense network dashed.

    Raises:
      ValueError: when the records hold fewer than two rewind steps of masked networks.
    """
    metric = score_metric(records, path)
    runs = training_runs(records)
    rows = final_step(runs[(runs["metric"] == metric) & (runs["split"] == "test")
                           & (runs["path"] == path)])
    masked = rows[rows["mask"] != "dense"]
    if masked["rewind_step"].nunique() < 2:
        raise ValueError("the rewind sweep needs tickets at two or more rewind steps "
                         "(tickets.rewind_step = [0, k, ...])")
    widths = sorted(rows["width"].unique())
    families = ordered(masked["mask"].unique(), last=CONTROL_MASKS)
    tickets = [f for f in families if f not in CONTROL_MASKS]
    shown = [*tickets, *[f for f in families if f in CONTROL_MASKS][:1]]
    sparsities = sorted(masked["sparsity"].unique())
    fig, axes = _panels(len(widths))
    for ax, width in zip(axes, widths, strict=True):
        dense = rows[(rows["mask"] == "dense") & (rows["width"] == width)]["value"]
        if len(dense):
            ax.axhline(dense.mean(), color="k", linestyle="--", linewidth=1, label="dense")
        for family in shown:
            s = seed_stats(masked[(masked["width"] == width) & (masked["mask"] == family)],
                           ["sparsity", "rewind_step"])
            for i, sparsity in enumerate(sparsities):
                line = s[s["sparsity"] == sparsity].sort_values("rewind_step")
                if line.empty:
                    continue
                control = family in CONTROL_MASKS
                style = ":" if control else ("-", "--", "-.")[tickets.index(family) % 3]
                ax.errorbar(line["rewind_step"], line["mean"], yerr=_spread(line),
                            color=f"C{i}", marker="s" if control else "o", markersize=4,
                            capsize=3, linestyle=style,
                            label=f"{family}, {sparsity:.1%} pruned")
        _symlog_steps(ax, masked["rewind_step"])
        ax.set_title(f"width {width}")
        ax.set_xlabel("rewind step k")
        ax.grid(True, alpha=0.3)
    return _finish_panels(fig, axes, f"test {metric}", "mask",
                          f"tickets rewound to θ_k, trained on path {path!r}\n"
                          "final step, mean over seeds, bars: min–max")


def _velocity_per_step(records: pd.DataFrame) -> pd.DataFrame:
    """The dense exact network's ``ntk_velocity`` divided by the steps between its
    recorded steps: the relative kernel change per step, at the end of each interval."""
    runs = training_runs(records)
    rows = runs[(runs["metric"] == "ntk_velocity") & (runs["mask"] == "dense")
                & (runs["path"] == "exact") & (runs["step"] > 0)].copy()
    previous = rows.groupby(["width", "seed"])["step"].shift(1).fillna(0)
    rows["value"] = rows["value"] / (rows["step"] - previous)
    return rows


def stability_vs_time(records: pd.DataFrame) -> Figure:
    """Kernel velocity, instability and the θ_k-linearization's gap on one time axis.

    One column per width, three rows sharing the step axis (symlog):

    1. the dense exact network's relative NTK change per step (``ntk_velocity`` over the
       steps between records; needs ``ntk_velocity`` in ``metrics``);
    2. ``instability`` of the dense children spawned at k, exact and linear (the linear
       children are linearized at θ_k), and of the ticket at its highest sparsity;
    3. ``function_gap`` at the final step between the child linearized at θ_k and the
       exact child, both trained from θ_k with the same minibatches.

    Raises:
      ValueError: when the records hold no ``[stability]`` results.
    """
    stab = records[records["experiment"] == "stability"]
    if stab.empty:
        raise ValueError("no stability records: add a [stability] section")
    widths = sorted(stab["width"].unique())
    fig = Figure(figsize=(3.8 * len(widths) + 1.6, 8.0), layout="constrained")
    grid = fig.subplots(3, len(widths), sharex=True, sharey="row", squeeze=False)
    velocity = _velocity_per_step(records)
    spawn = final_step(records[(records["experiment"] == "spawn")
                               & (records["metric"] == "function_gap")
                               & (records["split"] == "test")])
    instab = stab[stab["metric"] == "instability"]
    masked = instab[instab["mask"] != "dense"]
    ticket = (ordered(masked["mask"].unique(), last=CONTROL_MASKS)[0]
              if len(masked) else None)
    for col, width in enumerate(widths):
        top, mid, low = grid[:, col]
        v = seed_stats(velocity[velocity["width"] == width], ["step"])
        if len(v):
            top.plot(v["step"], v["mean"], color=_path_color("exact"), marker="o",
                     markersize=3, label="dense exact: kernel velocity")
            top.set_yscale("log")
        for path in ordered(instab["path"].unique(), PATH_ORDER):
            here = instab[(instab["width"] == width) & (instab["path"] == path)]
            for mask, rows, marker in (("dense", here[here["mask"] == "dense"], "o"),
                                       (ticket, here[here["mask"] == ticket], "s")):
                if mask is None or rows.empty:
                    continue
                if mask != "dense":
                    rows = rows[rows["sparsity"] == rows["sparsity"].max()]
                    mask = f"{mask} {rows['sparsity'].iloc[0]:.1%} pruned"
                s = seed_stats(rows, ["spawn_step"])
                mid.errorbar(s["spawn_step"], s["mean"],
                             yerr=_spread(s),
                             color=_path_color(path), linestyle=_STYLE.get(path, ":"),
                             marker=marker, markersize=4, capsize=3,
                             label=f"{mask}, {path}")
        g = seed_stats(spawn[spawn["width"] == width], ["spawn_step"])
        if len(g):
            low.errorbar(g["spawn_step"], g["mean"], yerr=_spread(g),
                         color=_path_color("linear"), marker="o", markersize=4, capsize=3,
                         label="linearized at θ_k vs exact")
        _symlog_steps(low, [*instab["spawn_step"], records["step"].max()])
        top.set_title(f"width {width}")
        low.set_xlabel("step t, or spawn step k")
        for ax in grid[:, col]:
            ax.grid(True, alpha=0.3)
    grid[0, 0].set_ylabel("kernel change per step\n‖ΔΘ‖/‖Θ‖ / Δt")
    grid[1, 0].set_ylabel("instability\n(test error barrier)")
    grid[2, 0].set_ylabel("θ_k-linear vs exact\ntest RMSE at the end")
    handles: dict[str, object] = {}
    for ax in grid.ravel():
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=3,
               fontsize="small")
    fig.suptitle("when does training leave the tangent space?\n"
                 "mean over seeds, bars: min–max")
    return fig


def subspace_final(records: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(subspace runs, dense networks)``: their final-step test scores (accuracy, or loss
    for regression), per width, path, seed (and kind and d)."""
    metric = score_metric(records)
    final = final_step(records[(records["metric"] == metric) & (records["split"] == "test")
                               & records["experiment"].isin(["train", "subspace"])])
    dense = final[(final["experiment"] == "train") & (final["mask"] == "dense")]
    sub = final[final["experiment"] == "subspace"]
    return sub, dense


def subspace_table(records: pd.DataFrame) -> pd.DataFrame:
    """d_int90 per width, path and kind: the smallest d whose mean test accuracy over
    seeds reaches :data:`INTRINSIC_FRACTION` of the dense network's on the same path (NaN
    when no d of the sweep does). Regression studies (no accuracy) use the test loss, and
    the threshold is the dense loss / 0.9.

    Returns:
      Columns ``width, path, subspace, d_int90, dense, best`` (the dense score and the
      best subspace score of the sweep), empty when there are no subspace records.
    """
    import pandas as pd

    sub, dense = subspace_final(records)
    if sub.empty:
        return pd.DataFrame(columns=["width", "path", "subspace", "d_int90", "dense", "best"])
    accuracy = score_metric(records) == "accuracy"
    dense_mean = dense.groupby(["width", "path"])["value"].mean()
    means = sub.groupby(["width", "path", "subspace", "dim"])["value"].mean().reset_index()
    rows = []
    for (width, path, kind), curve in means.groupby(["width", "path", "subspace"]):
        reference = dense_mean.get((width, path), np.nan)
        reached = (curve["value"] >= INTRINSIC_FRACTION * reference if accuracy
                   else curve["value"] <= reference / INTRINSIC_FRACTION)
        rows.append({"width": width, "path": path, "subspace": kind,
                     "d_int90": float(curve.loc[reached, "dim"].min()) if reached.any()
                     else np.nan, "dense": reference,
                     "best": curve["value"].max() if accuracy else curve["value"].min()})
    return pd.DataFrame(rows)


def stability_table(records: pd.DataFrame) -> pd.DataFrame:
    """Mean ``instability`` and ``loss_barrier`` over seeds per width, path, mask, round
    and spawn step (empty without stability records)."""
    stab = records[records["experiment"] == "stability"]
    return stab.pivot_table(index=["width", "path", "mask", "round", "spawn_step"],
                            columns="metric", values="value", aggfunc="mean").reset_index()


def subspace_accuracy(records: pd.DataFrame) -> Figure:
    """Test accuracy against the subspace dimension d (log), one line per kind (exact
    solid, linear dashed), the dense accuracy and 90 % of it dotted, one panel per width.

    Raises:
      ValueError: when the records hold no subspace runs.
    """
    sub, dense = subspace_final(records)
    if sub.empty:
        raise ValueError("no subspace records: add a [subspace] section")
    metric = score_metric(records)
    widths = sorted(sub["width"].unique())
    kinds = ordered(sub["subspace"].unique(),
                    ["gaussian", "axis_random", "axis_imp", "lottery"])
    fig, axes = _panels(len(widths))
    for ax, width in zip(axes, widths, strict=True):
        for path in ordered(sub["path"].unique(), PATH_ORDER):
            reference = dense[(dense["width"] == width) & (dense["path"] == path)]["value"]
            if len(reference) and path == "exact":
                ax.axhline(reference.mean(), color="k", linestyle="--", linewidth=1,
                           label="dense (exact)")
                if metric == "accuracy":
                    ax.axhline(INTRINSIC_FRACTION * reference.mean(), color="k",
                               linestyle=":", linewidth=1, label="90 % of dense")
            for i, kind in enumerate(kinds):
                s = seed_stats(sub[(sub["width"] == width) & (sub["path"] == path)
                                   & (sub["subspace"] == kind)], ["dim"])
                if s.empty:
                    continue
                ax.errorbar(s["dim"], s["mean"], yerr=_spread(s),
                            color=f"C{i}", linestyle=_STYLE.get(path, ":"), marker="o",
                            markersize=4, capsize=3, label=f"{kind}, {path}")
        ax.set_xscale("log")
        dims = sorted(sub["dim"].unique())
        ax.set_xticks(dims, labels=[str(d) for d in dims])
        ax.minorticks_off()
        ax.set_title(f"width {width}")
        ax.set_xlabel("subspace dimension d")
        ax.grid(True, alpha=0.3)
    return _finish_panels(fig, axes, f"test {metric}", "subspace, path",
                          "training θ = θ_k + P·z in a d-dimensional subspace\n"
                          "final step, mean over seeds, bars: min–max")


def connectivity_figures(records: pd.DataFrame) -> dict[str, Figure]:
    """The figures of this module whose data the records hold, by name:
    ``rewind_sweep`` (and ``rewind_sweep_linear``), ``stability``, ``subspace``."""
    figures: dict[str, Figure] = {}
    runs = training_runs(records)
    masked = runs[(runs["mask"] != "dense") & (runs["split"] == "test")
                  & (runs["path"] != "none")]
    if masked["rewind_step"].nunique() >= 2:
        for path in ordered(masked["path"].unique(), PATH_ORDER):
            name = "rewind_sweep" if path == "exact" else f"rewind_sweep_{path}"
            figures[name] = rewind_sweep(records, path=path)
    if (records["experiment"] == "stability").any():
        figures["stability"] = stability_vs_time(records)
    if (records["experiment"] == "subspace").any():
        figures["subspace"] = subspace_accuracy(records)
    return figures
