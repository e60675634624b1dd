"""Scaling exponents: log–log slopes of a metric against width, with bootstrap intervals.

The tangent-space picture (Lee et al. 2019, arXiv 1902.06720) predicts power laws in width n
under the NTK parameterization: the NTK change and the gap between the exact and the
linearized network shrink like n^(-1/2), and so does the relative weight change of the input
and readout layers, while a hidden n × n layer, whose ‖W0‖_F grows like n, moves like n^(-1). This
module fits ``log value = intercept + slope · log width`` to the final step of each width and
puts a confidence interval on the slope by resampling seeds (a cluster bootstrap: one draw of
seeds, with replacement, is used at every width).

For one group of records (one metric, path, mask, round and split), let ``L[w, s]`` be the log
of the value at the final step of width ``w`` and seed ``s``. The fitted curve goes through
the per-width means over seeds of ``L`` (a geometric mean of the values), so the slope is
ordinary least squares on ``(log w, mean_s L[w, s])``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: The metrics whose width scaling the tangent-space picture predicts.
SCALING_METRICS = ("weight_change", "ntk_change", "function_gap", "ntk_init_error")
#: The key columns of :func:`scaling_table`, one row per combination.
GROUP_COLUMNS = ("metric", "path", "mask", "round", "split")
SUMMARY_COLUMNS = GROUP_COLUMNS + ("n_widths", "n_seeds", "slope", "ci_low", "ci_high",
                                   "intercept", "r2")


def _is_scaling_metric(name: str, metrics: Sequence[str]) -> bool:
    """``name`` is one of ``metrics`` or a per-layer form ``<metric>/<layer>`` of one."""
    return name in metrics or name.split("/", 1)[0] in metrics


def final_values(records, metrics: Sequence[str] = SCALING_METRICS):
    """The value at the last recorded step of every (group, width, seed), for ``metrics``
    (per-layer forms ``weight_change/<layer>`` included) and positive finite values only.

    Rows of the perturbation test (mask ``perturb``) and of mask comparisons (path ``none``)
    are left out: their width axis is not the question here.

    Returns:
      A DataFrame with the :data:`GROUP_COLUMNS` plus ``width``, ``seed``, ``value``.
    """
    keep = (records["metric"].map(lambda m: _is_scaling_metric(m, metrics))
            & (records["mask"] != "perturb") & (records["path"] != "none"))
    rows = records[keep]
    keys = list(GROUP_COLUMNS) + ["width", "seed"]
    last = rows.groupby(keys)["step"].transform("max")
    final = rows[rows["step"] == last]
    final = final[np.isfinite(final["value"]) & (final["value"] > 0)]
    return final.groupby(keys, as_index=False)["value"].mean()


def _slopes(log_width: np.ndarray, log_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares slopes and intercepts of ``log_values[..., w]`` against ``log_width[w]``.

    Args:
      log_width: ``[W]``.
      log_values: ``[..., W]``.

    Returns:
      ``(slope, intercept)``, each of shape ``[...]``.
    """
    x = log_width - log_width.mean()
    y_mean = log_values.mean(axis=-1)
    slope = (log_values - y_mean[..., None]) @ x / (x @ x)
    return slope, y_mean - slope * log_width.mean()


def fit_power_law(widths: np.ndarray, values: np.ndarray, *, n_boot: int = 1000,
                  ci: float = 0.95, rng: np.random.Generator | None = None) -> dict[str, float]:
    """Fits ``value ≈ exp(intercept) · width^slope`` with a seed-bootstrap interval.

    Args:
      widths: ``[W]`` distinct widths.
      values: ``[W, S]`` positive values per width and seed; NaN where a seed is missing.
      n_boot: bootstrap resamples of the seeds.
      ci: the central probability of the interval.
      rng: the resampling generator (default: seeded with 0, so tables are reproducible).

    Returns:
      ``slope``, ``intercept``, ``r2`` (of the fit to the per-width means) and ``ci_low``,
      ``ci_high`` (NaN with fewer than two seeds or two widths).
    """
    rng = rng or np.random.default_rng(0)
    log_width, log_values = np.log(widths), np.log(values)
    means = np.nanmean(log_values, axis=1)
    if len(widths) < 2:
        nan = float("nan")
        return {"slope": nan, "intercept": nan, "r2": nan, "ci_low": nan, "ci_high": nan}
    slope, intercept = _slopes(log_width, means)
    residual = means - (intercept + slope * log_width)
    spread = np.sum((means - means.mean()) ** 2)
    r2 = 1.0 - np.sum(residual**2) / spread if spread > 0 else float("nan")
    low = high = float("nan")
    n_seeds = values.shape[1]
    if n_seeds >= 2:
        draws = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
        resampled = np.nanmean(log_values[:, draws], axis=-1).T  # [B, W]
        boot, _ = _slopes(log_width, resampled[np.all(np.isfinite(resampled), axis=1)])
        low, high = np.quantile(boot, [(1 - ci) / 2, (1 + ci) / 2])
    return {"slope": float(slope), "intercept": float(intercept), "r2": float(r2),
            "ci_low": float(low), "ci_high": float(high)}


def scaling_table(records, *, metrics: Sequence[str] = SCALING_METRICS, n_boot: int = 1000,
                  ci: float = 0.95, seed: int = 0):
    """The scaling-exponent table of a study: one power-law fit per metric, path, mask,
    round and split, against width, at the final step.

    Args:
      records: the tidy records of a study (:func:`ntk_tickets.results.load_records`).
      metrics: metric names; ``weight_change`` also selects ``weight_change/<layer>``.
      n_boot: bootstrap resamples of the seeds.
      ci: the central probability of the interval.
      seed: seeds the bootstrap, so the same records always give the same table.

    Returns:
      A DataFrame with :data:`SUMMARY_COLUMNS`, sorted by metric, path, mask and round.
    """
    import pandas as pd

    final = final_values(records, metrics)
    rng = np.random.default_rng(seed)
    rows = []
    for key, group in final.groupby(list(GROUP_COLUMNS), sort=True):
        grid = group.pivot_table(index="width", columns="seed", values="value")
        fit = fit_power_law(grid.index.to_numpy(float), grid.to_numpy(float), n_boot=n_boot,
                            ci=ci, rng=rng)
        rows.append(dict(zip(GROUP_COLUMNS, key, strict=True), n_widths=len(grid),
                         n_seeds=grid.shape[1], **fit))
    return pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))


def format_scaling_table(table) -> str:
    """The scaling table as aligned text: slope with its interval per metric and path."""
    if table.empty:
        return "no scaling metrics with positive values at two or more widths"
    shown = table.assign(
        slope=[f"{s:+.3f}" for s in table["slope"]],
        ci=[f"[{lo:+.3f}, {hi:+.3f}]" if np.isfinite(lo) else "(1 seed)"
            for lo, hi in zip(table["ci_low"], table["ci_high"], strict=True)],
        r2=[f"{r:.3f}" for r in table["r2"]],
    )
    columns = ["metric", "path", "mask", "round", "n_widths", "n_seeds", "slope", "ci", "r2"]
    return shown[columns].to_string(index=False)
