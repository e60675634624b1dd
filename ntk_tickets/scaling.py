"""Scaling exponents: log–log slopes of a metric against width, with intervals over seeds.

The tangent-space picture (Lee et al. 2019, arXiv 1902.06720) predicts power laws in width n
under the NTK parameterization: the NTK change and the gap between the exact and the
linearized network shrink like n^(-1/2), and so does the relative weight change of the input
and readout layers, while a hidden n × n layer, whose ‖W0‖_F grows like n, moves like n^(-1). This
module fits ``log value = intercept + slope · log width`` to the final step of each width and
puts a confidence interval on the slope from the spread between seeds.

For one group of records (one metric, path, mask, round, split and value of each factor
such as the parameterization), let ``L[w, s]`` be the log
of the value at the final step of width ``w`` and seed ``s``. Only seeds with a value at every
width are used (a seed that diverged, or whose value is not positive, at some width is left
out), so every width averages the same seeds. The fitted curve goes through the per-width
means over seeds of ``L`` (a geometric mean of the values), so the slope is ordinary least
squares on ``(log w, mean_s L[w, s])``, which equals the mean of the per-seed slopes ``b_s``.

The interval (``ci_method``):

- ``"t"`` (default): Student's t interval on the mean of the per-seed slopes,
  ``slope ± t_{S−1} · sd(b_s) / √S``; exact when seeds vary normally.
- ``"bootstrap"``: the percentile interval of a cluster bootstrap (one draw of seeds, with
  replacement, used at every width). It is too narrow with few seeds: in a simulation with
  normal seed-to-seed variation its nominal 95 % interval covered the true slope 47 % of the
  time with 2 seeds, 74 % with 3, 81 % with 4 and 88 % with 8, against 94–95 % for ``"t"``
  (``tests/test_scaling.py`` checks both).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ntk_tickets.metrics import scaling_metrics
from ntk_tickets.select import FACTOR_COLUMNS, final_step, training_runs, varying_factors

#: How :func:`fit_power_law` can put an interval on the slope.
CI_METHODS = ("t", "bootstrap")
#: The key columns of :func:`scaling_table`, one row per combination.
GROUP_COLUMNS = ("metric", "path", "mask", "round", "split", *FACTOR_COLUMNS)
SUMMARY_COLUMNS = GROUP_COLUMNS + ("n_widths", "n_seeds", "slope", "ci_low", "ci_high",
                                   "intercept", "r2")


def _is_scaling_metric(name: str, metrics: Sequence[str]) -> bool:
    """``name`` is one of ``metrics`` or a per-layer form ``<metric>/<layer>`` of one."""
    return name in metrics or name.split("/", 1)[0] in metrics


def final_values(records, metrics: Sequence[str] | None = None):
    """The value at the last recorded step of every (group, width, seed), for ``metrics``
    (per-layer forms ``weight_change/<layer>`` included; default: the registry entries with
    ``scales_with_width``, :func:`~ntk_tickets.metrics.scaling_metrics`) and positive
    finite values only (:func:`ntk_tickets.select.final_step`).

    Rows of the perturbation test and of mask comparisons (path ``none``) are left out:
    their width axis is not the question here.

    Returns:
      A DataFrame with the :data:`GROUP_COLUMNS` plus ``width``, ``seed``, ``value``.
    """
    metrics = scaling_metrics() if metrics is None else metrics
    runs = training_runs(records)
    keep = (runs["metric"].map(lambda m: _is_scaling_metric(m, metrics))
            & (runs["path"] != "none"))
    final = final_step(runs[keep])
    final = final[np.isfinite(final["value"]) & (final["value"] > 0)]
    return final.groupby(list(GROUP_COLUMNS) + ["width", "seed"],
                         as_index=False)["value"].mean()


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


def _complete(widths: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The widths with any usable value, and at those the seeds with a value at every one.

    A value is usable when finite and positive; ``values`` is ``[W, S]``.
    """
    usable = np.isfinite(values) & (values > 0)
    rows = usable.any(axis=1)
    columns = usable[rows].all(axis=0)
    return widths[rows], values[rows][:, columns]


def fit_power_law(widths: np.ndarray, values: np.ndarray, *, ci: float = 0.95,
                  ci_method: str = "t", n_boot: int = 1000,
                  rng: np.random.Generator | None = None) -> dict[str, float]:
    """Fits ``value ≈ exp(intercept) · width^slope`` with an interval over seeds.

    Args:
      widths: ``[W]`` distinct widths.
      values: ``[W, S]`` values per width and seed; NaN (or a non-positive value) where a
        seed has none. Such seeds are left out of the fit, and so are widths with no value.
      ci: the central probability of the interval.
      ci_method: ``"t"`` or ``"bootstrap"`` (see the module docstring).
      n_boot: bootstrap resamples of the seeds (``"bootstrap"`` only).
      rng: the resampling generator (default: seeded with 0, so tables are reproducible).

    Returns:
      ``slope``, ``intercept``, ``r2`` (of the fit to the per-width means), ``ci_low``,
      ``ci_high`` (NaN with fewer than two seeds), and ``n_widths``, ``n_seeds`` (those
      used). All NaN but the counts when fewer than two widths remain.
    """
    if ci_method not in CI_METHODS:
        raise ValueError(f"ci_method {ci_method!r} is not one of {', '.join(CI_METHODS)}")
    widths, values = _complete(np.asarray(widths, float), np.asarray(values, float))
    n_widths, n_seeds = values.shape
    nan = float("nan")
    fit = {"slope": nan, "intercept": nan, "r2": nan, "ci_low": nan, "ci_high": nan,
           "n_widths": n_widths, "n_seeds": n_seeds}
    if n_widths < 2 or n_seeds < 1:
        return fit
    log_width, log_values = np.log(widths), np.log(values)
    means = log_values.mean(axis=1)
    slope, intercept = _slopes(log_width, means)
    residual = means - (intercept + slope * log_width)
    spread = np.sum((means - means.mean()) ** 2)
    fit.update(slope=float(slope), intercept=float(intercept),
               r2=1.0 - np.sum(residual**2) / spread if spread > 0 else nan)
    if n_seeds < 2:
        return fit
    if ci_method == "t":
        from scipy import stats

        seed_slopes, _ = _slopes(log_width, log_values.T)
        half = (stats.t.ppf((1 + ci) / 2, n_seeds - 1) * seed_slopes.std(ddof=1)
                / np.sqrt(n_seeds))
        low, high = slope - half, slope + half
    else:
        rng = rng or np.random.default_rng(0)
        draws = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
        boot, _ = _slopes(log_width, log_values[:, draws].mean(axis=-1).T)  # [B]
        low, high = np.quantile(boot, [(1 - ci) / 2, (1 + ci) / 2])
    fit.update(ci_low=float(low), ci_high=float(high))
    return fit


def scaling_table(records, *, metrics: Sequence[str] | None = None, ci: float = 0.95,
                  ci_method: str = "t", n_boot: int = 1000, seed: int = 0):
    """The scaling-exponent table of a study: one power-law fit per metric, path, mask,
    round and split, against width, at the final step (:func:`fit_power_law`).

    Args:
      records: the tidy records of a study (:func:`ntk_tickets.results.load_records`).
      metrics: metric names (default :func:`~ntk_tickets.metrics.scaling_metrics`);
        ``weight_change`` also
        selects ``weight_change/<layer>``.
      ci: the central probability of the interval.
      ci_method: ``"t"`` or ``"bootstrap"`` (see the module docstring).
      n_boot: bootstrap resamples of the seeds (``"bootstrap"`` only).
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
        fit = fit_power_law(grid.index.to_numpy(float), grid.to_numpy(float), ci=ci,
                            ci_method=ci_method, n_boot=n_boot, rng=rng)
        rows.append(dict(zip(GROUP_COLUMNS, key, strict=True), **fit))
    return pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))


def format_scaling_table(table) -> str:
    """The scaling table as aligned text: slope with its interval per metric and path."""
    if table.empty:
        return "no scaling metrics with positive values at two or more widths"
    shown = table.assign(
        slope=[f"{s:+.3f}" for s in table["slope"]],
        ci=[f"[{lo:+.3f}, {hi:+.3f}]" if np.isfinite(lo) else f"({n} seed)"
            for lo, hi, n in zip(table["ci_low"], table["ci_high"], table["n_seeds"],
                                 strict=True)],
        r2=[f"{r:.3f}" for r in table["r2"]],
    )
    columns = ["metric", "path", "mask", "round", *varying_factors(table), "n_widths",
               "n_seeds", "slope", "ci", "r2"]
    return shown[columns].to_string(index=False)
