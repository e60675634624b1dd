"""Scaling exponents against closed forms: exact power laws, a bootstrap with a known
distribution, the t interval with one degree of freedom (a Cauchy quantile), numpy's least
squares, and the coverage of both intervals in a simulation."""

import numpy as np
import pandas as pd
import pytest

from ntk_tickets.cli import main
from ntk_tickets.results import ResultsStore, records_frame
from ntk_tickets.scaling import (
    final_values,
    fit_power_law,
    format_scaling_table,
    scaling_table,
)

WIDTHS = (16, 64, 256, 1024)


def _rows(metric, value_fn, *, widths=WIDTHS, seeds=(0, 1, 2), path="exact", mask="dense",
          steps=(0, 10), split="none", **extra):
    """Records whose value at the last step is ``value_fn(width, seed)`` (step 0: 1e9)."""
    return [dict(width=w, seed=s, path=path, mask=mask, sparsity=0.0, round=0, step=t,
                 split=split, metric=metric, value=value_fn(w, s) if t == steps[-1] else 1e9,
                 **extra)
            for w in widths for s in seeds for t in steps]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exact_power_law_with_seed_offsets_gives_the_exponent(dtype):
    offsets = {0: 0.8, 1: 1.0, 2: 1.3}  # a per-seed factor shifts log values, not the slope
    records = records_frame(_rows("weight_change",
                                  lambda w, s: dtype(2.5 * offsets[s] * w ** -0.5)))
    row = scaling_table(records).iloc[0]
    assert (row.metric, row.path, row.n_widths, row.n_seeds) == ("weight_change", "exact", 4, 3)
    tol = 1e-6 if dtype is np.float32 else 1e-12
    assert row.slope == pytest.approx(-0.5, abs=tol)
    assert row.ci_low == pytest.approx(-0.5, abs=tol)
    assert row.ci_high == pytest.approx(-0.5, abs=tol)
    geometric_mean = np.exp(np.mean(np.log(list(offsets.values()))))
    assert np.exp(row.intercept) == pytest.approx(2.5 * geometric_mean, rel=10 * tol)
    assert row.r2 == pytest.approx(1.0, abs=tol)


def test_bootstrap_interval_spans_the_seed_slopes():
    # Seed 0 scales as w^-0.4, seed 1 as w^-0.6. A resample of two seeds is {0,0}, {1,1} or
    # {0,1}, whose slopes are exactly -0.4, -0.6, -0.5 with probabilities 1/4, 1/4, 1/2.
    slopes = {0: -0.4, 1: -0.6}
    values = np.array([[w ** slopes[s] for s in (0, 1)] for w in WIDTHS])
    fit = fit_power_law(np.array(WIDTHS, float), values, ci_method="bootstrap", n_boot=4000)
    assert fit["slope"] == pytest.approx(-0.5)
    assert fit["ci_low"] == pytest.approx(-0.6) and fit["ci_high"] == pytest.approx(-0.4)
    narrow = fit_power_law(np.array(WIDTHS, float), values, ci_method="bootstrap",
                           n_boot=4000, ci=0.4)
    assert narrow["ci_low"] == pytest.approx(-0.5) and narrow["ci_high"] == pytest.approx(-0.5)


def test_t_interval_of_two_seeds_is_the_cauchy_quantile():
    # Per-seed slopes -0.4 and -0.6: mean -0.5, sd 0.1·√2, so sd/√2 = 0.1. With one degree
    # of freedom Student's t is the Cauchy distribution, whose p-quantile is tan(π(p − 1/2)).
    slopes = {0: -0.4, 1: -0.6}
    values = np.array([[3.0 * w ** slopes[s] for s in (0, 1)] for w in WIDTHS])
    for ci in (0.95, 0.5):
        fit = fit_power_law(np.array(WIDTHS, float), values, ci=ci)
        half = np.tan(np.pi * ((1 + ci) / 2 - 0.5)) * 0.1
        assert fit["slope"] == pytest.approx(-0.5, abs=1e-12)
        assert fit["ci_low"] == pytest.approx(-0.5 - half, abs=1e-9)
        assert fit["ci_high"] == pytest.approx(-0.5 + half, abs=1e-9)


def test_t_interval_covers_95_percent_and_the_bootstrap_too_little():
    # The figures quoted in the README and in scaling's docstring: with 4 seeds whose slopes
    # vary normally, the t interval covers the true slope about 95 % of the time; the seed
    # bootstrap's nominal 95 % covers about 81 %. 400 replications: binomial sd ≈ 0.011.
    rng = np.random.default_rng(1)
    widths = np.array([64, 128, 256, 512, 1024.0])
    hits = {"t": 0, "bootstrap": 0}
    n_reps, n_seeds = 400, 4
    for _ in range(n_reps):
        slopes = -0.5 + 0.05 * rng.standard_normal(n_seeds)
        offsets = 0.3 * rng.standard_normal(n_seeds)
        log_values = (offsets + slopes * np.log(widths)[:, None]
                      + 0.02 * rng.standard_normal((len(widths), n_seeds)))
        for method in hits:
            fit = fit_power_law(widths, np.exp(log_values), ci_method=method, rng=rng)
            hits[method] += fit["ci_low"] <= -0.5 <= fit["ci_high"]
    assert 0.91 <= hits["t"] / n_reps <= 0.98
    assert hits["bootstrap"] / n_reps <= 0.88


def test_a_seed_missing_at_one_width_is_left_out_and_an_empty_width_dropped():
    widths = np.array([16, 64, 256, 1024.0])
    slopes = np.array([-0.3, -0.5, -0.9])
    values = widths[:, None] ** slopes[None]
    values[2, 2] = np.nan  # seed 2 diverged at width 256
    fit = fit_power_law(widths, values)
    assert (fit["n_widths"], fit["n_seeds"]) == (4, 2)
    assert fit["slope"] == pytest.approx(-0.4, abs=1e-12)  # seeds 0 and 1 only
    values[1, :] = [np.nan, 0.0, -1.0]  # no usable value at width 64
    fit = fit_power_law(widths, values)
    assert (fit["n_widths"], fit["n_seeds"]) == (3, 2)
    assert fit["slope"] == pytest.approx(-0.4, abs=1e-12)
    with pytest.raises(ValueError, match="ci_method"):
        fit_power_law(widths, values, ci_method="jackknife")


def test_slope_matches_numpy_least_squares_on_noisy_data():
    rng = np.random.default_rng(3)
    values = np.exp(rng.normal(size=(5, 4))) * np.array([8, 32, 128, 512, 2048])[:, None] ** 0.3
    widths = np.array([8, 32, 128, 512, 2048], float)
    fit = fit_power_law(widths, values)
    slope, intercept = np.polyfit(np.log(widths), np.log(values).mean(axis=1), 1)
    assert fit["slope"] == pytest.approx(slope, rel=1e-12)
    assert fit["intercept"] == pytest.approx(intercept, rel=1e-12)
    assert fit["ci_low"] < fit["slope"] < fit["ci_high"]


def test_one_width_has_no_slope_and_one_seed_no_interval():
    assert np.isnan(fit_power_law(np.array([64.0]), np.array([[0.1, 0.2]]))["slope"])
    fit = fit_power_law(np.array([64.0, 256.0]), np.array([[0.2], [0.1]]))
    assert fit["slope"] == pytest.approx(-0.5)
    assert np.isnan(fit["ci_low"]) and np.isnan(fit["ci_high"])
    table = scaling_table(records_frame(_rows("ntk_change", lambda w, s: w ** -1.0,
                                              seeds=(0,), split="probe")))
    assert "(1 seed)" in format_scaling_table(table)


def test_final_values_select_metrics_final_steps_and_positive_values():
    rows = (_rows("weight_change", lambda w, s: 1.0 / w)
            + _rows("weight_change/dense_0", lambda w, s: 2.0 / w)
            + _rows("function_gap", lambda w, s: 0.0 if w == 16 else 1.0, path="linear",
                    split="test")
            + _rows("accuracy", lambda w, s: 0.9, split="test")
            + _rows("mask_overlap", lambda w, s: 0.5, path="none", mask="imp_linear")
            + _rows("loss", lambda w, s: 1.0, mask="imp", eps=0.1, experiment="perturb")
            + _rows("weight_change", lambda w, s: 1.0 / w, mask="imp", eps=0.1,
                    experiment="perturb"))
    final = final_values(records_frame(rows))
    assert set(final.metric) == {"weight_change", "weight_change/dense_0", "function_gap"}
    assert set(final["mask"]) == {"dense"}
    assert (final.value < 1e9).all()  # step 0 rows are not the final step
    gap = final[final.metric == "function_gap"]
    assert 16 not in set(gap.width)  # log 0 is undefined: the zero gap is left out
    table = scaling_table(records_frame(rows))
    layer = table[table.metric == "weight_change/dense_0"].iloc[0]
    assert layer.slope == pytest.approx(-1.0)
    assert table[table.metric == "function_gap"].iloc[0].n_widths == 3


def test_summarize_prints_the_table_and_writes_summary_csv(tmp_path, capsys):
    rows = (_rows("weight_change", lambda w, s: (1 + s) * w ** -0.5)
            + _rows("ntk_change", lambda w, s: (1 + s) * w ** -1.0, split="probe"))
    with ResultsStore(tmp_path, {"name": "synthetic"}, None, x64=False) as store:
        store.write_cell("all", records_frame(rows), "done", 0.0, 0.0)
    assert main(["summarize", str(tmp_path), "--n-boot", "200"]) == 0
    out = capsys.readouterr().out
    assert "weight_change" in out and "-0.500" in out and "-1.000" in out
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert list(summary.metric) == ["ntk_change", "weight_change"]
    np.testing.assert_allclose(summary.slope, [-1.0, -0.5])


def test_summarize_a_folder_without_results_exits_2(tmp_path, capsys):
    assert main(["summarize", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "does not exist" in err and err.count("\n") == 1
