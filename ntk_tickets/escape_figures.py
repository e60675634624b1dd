"""Figures of the escape-dimensions study (:mod:`ntk_tickets.escape`).

* :func:`success_vs_width`: the census's P(success) against width, with the lottery
  predictions from p at r* and the measured p_sub and ticket success beside it.
* :func:`escape_fractions`: the share of stuck minima that escape after k added units, per
  embedding.
* :func:`split_spectrum`: the Hessian spectrum of a stuck minimum before and after one
  neuron split.
* :func:`escape_study_figures`: all of them for a results folder, by name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ntk_tickets.escape import escape_table, lottery_prediction, lottery_table


def _axes(figsize: tuple[float, float] = (5.6, 3.8)) -> tuple[Figure, Any]:
    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.add_subplot()


def _bars(value: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return np.stack([value - lo, hi - value])


def success_vs_width(records: Any, teacher_width: int) -> Figure:
    """P(success) per width (Wilson 95 % bars) with the independent-tickets prediction
    1 − (1 − p)^C(n, r*) and the disjoint bound 1 − (1 − p)^⌊n/r*⌋ (bands: p's interval), and
    where measured p_sub (random r*-unit subnetworks of θ0 trained alone) and the success
    of the top-|a|·‖w‖ ticket retrained alone."""
    table = lottery_table(records, teacher_width)
    fig, ax = _axes()
    n = table["width"].to_numpy()
    at_r_star = table[table["width"] == teacher_width]
    if len(at_r_star):
        grid = np.arange(teacher_width, n.max() + 1)
        for kind, style, color in (("independent", "--", "C3"), ("disjoint", ":", "C4")):
            p, lo, hi = (np.array([lottery_prediction(q, m, teacher_width, kind)
                                   for m in grid])
                         for q in at_r_star[["P(success)", "P_lo", "P_hi"]].iloc[0])
            label = ("independent tickets 1−(1−p)^C(n,r*)" if kind == "independent"
                     else "disjoint subnetworks 1−(1−p)^⌊n/r*⌋")
            ax.step(grid, p, style, where="mid", color=color, label=label, zorder=3)
            ax.fill_between(grid, lo, hi, step="mid", color=color, alpha=0.12, linewidth=0)
    ax.errorbar(n, table["P(success)"], _bars(*table[["P(success)", "P_lo", "P_hi"]]
                                              .to_numpy().T),
                fmt="o-", color="C0", capsize=3, label="measured P(success)")
    if "p_sub" in table:
        ax.errorbar(n + 0.08, table["p_sub"],
                    _bars(*table[["p_sub", "p_sub_lo", "p_sub_hi"]].to_numpy().T),
                    fmt="s", color="C1", capsize=3, label="p_sub: random r*-subnetwork alone")
    if "ticket_success" in table:
        ax.plot(n - 0.08, table["ticket_success"], "^", color="C2",
                label="top-|a|·‖w‖ ticket alone")
    ax.axvline(teacher_width, color="0.7", linewidth=0.8)
    ax.set_xticks(n)
    ax.set_xlabel(f"student width n (teacher r* = {teacher_width})")
    ax.set_ylabel("P(training loss < tolerance)")
    ax.set_ylim(-0.03, 1.03)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(f"census: {int(table['seeds'].iloc[0])} seeds per width", fontsize=9)
    return fig


def escape_fractions(records: Any) -> Figure:
    """The share of stuck minima that escaped on retraining against the added units k, one
    line per embedding (inactive units; splits at each μ), Wilson 95 % bars."""
    table = escape_table(records)
    if table.empty:
        raise ValueError("no escape-test records: the census found no stuck minimum")
    fig, ax = _axes()
    lines = table.groupby(["embedding", "mu"], dropna=False)
    for i, ((embedding, mu), rows) in enumerate(lines):
        label = "inactive unit" if embedding == "inactive" else f"split, μ = {mu:g}"
        k = rows["added"].to_numpy() + 0.04 * (i - (len(lines) - 1) / 2)
        ax.errorbar(k, rows["escaped"], _bars(*rows[["escaped", "escaped_lo", "escaped_hi"]]
                                              .to_numpy().T),
                    fmt="o-", capsize=3, label=label)
    ax.set_xticks(sorted(table["added"].unique()))
    ax.set_xlabel("added units k")
    ax.set_ylabel("share of stuck minima that escaped")
    ax.set_ylim(-0.03, 1.03)
    minima = int(table["minima"].max())
    ax.set_title(f"escape test of {minima} stuck minima (width "
                 f"{', '.join(map(str, sorted(table['width'].unique())))})", fontsize=9)
    ax.legend(fontsize=7)
    return fig


def split_spectrum(before: np.ndarray, after: np.ndarray, mu: float) -> Figure:
    """The sorted Hessian eigenvalues of a stuck minimum (width n) and of the same point
    after one neuron split at share μ (width n + 1), on a symmetric-log axis."""
    fig, ax = _axes()
    ax.plot(np.arange(len(before)), np.sort(before), "o", markersize=3,
            label=f"stuck minimum ({len(before)} parameters)")
    ax.plot(np.arange(len(after)), np.sort(after), "x", markersize=3,
            label=f"after splitting one unit, μ = {mu:g}")
    ax.axhline(0.0, color="0.5", linewidth=0.8)
    ax.set_yscale("symlog", linthresh=1e-8)
    ax.set_xlabel("eigenvalue index")
    ax.set_ylabel("Hessian eigenvalue (relative loss)")
    ax.legend(fontsize=7)
    ax.set_title(f"λ_min: {np.min(before):.2e} → {np.min(after):.2e}", fontsize=9)
    return fig


def split_spectra(directory: str | os.PathLike) -> list[dict[str, Any]]:
    """The Hessian spectra kept with the cells of an escape study, in cell order: per cell
    with a stuck minimum, ``width`` (the stuck width), ``hessian_seed`` (the first stuck
    seed), ``hessian_mu`` (μ = ``split_mu[0]``), ``hessian_before`` (P,) and
    ``hessian_after`` (P + d + 2,)."""
    from ntk_tickets.results import ARRAYS, load_manifest

    cells = load_manifest(directory)["cells"]
    out = []
    for file in sorted((Path(directory) / ARRAYS).glob("*.npz")):
        with np.load(file) as arrays:
            if "hessian_before" in arrays and file.stem in cells:
                out.append({"width": cells[file.stem]["width"],
                            **{k: arrays[k] for k in arrays.files}})
    return out


def escape_study_figures(directory: str | os.PathLike, records: Any,
                         teacher_width: int) -> dict[str, Figure]:
    """``success_vs_width``, ``escape_fraction`` (when a minimum was stuck) and
    ``split_spectrum`` (of the first stuck minimum) of an escape study's folder."""
    figures = {"success_vs_width": success_vs_width(records, teacher_width)}
    if not escape_table(records).empty:
        figures["escape_fraction"] = escape_fractions(records)
    spectra = split_spectra(directory)
    if spectra:
        first = spectra[0]
        figures["split_spectrum"] = split_spectrum(first["hessian_before"],
                                                   first["hessian_after"],
                                                   float(first["hessian_mu"]))
    return figures

