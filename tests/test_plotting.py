"""Figures of a results folder, checked against the synthetic records they are drawn from:
the line data read back from the axes, the scales, labels and legends, and the PNG files."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ntk_tickets.errors import UserInputError
from ntk_tickets.plotting import (
    chance_overlap,
    final_step,
    loss_curves,
    mask_overlap,
    metric_vs_width,
    perturbation_curves,
    save_figures,
    study_figures,
    ticket_accuracy,
)
from ntk_tickets.results import ResultsStore, records_frame

WIDTHS = (16, 64, 256)
SEEDS = (0, 1, 2)
STEPS = (0, 1, 9)
NOISE = {0: 0.97, 1: 1.0, 2: 1.04}  # per-seed factors
PATHS = ("exact", "linear")


def _power_law(w, s, path):
    """3·w^-0.5 for exact, 2·w^-0.25 for linear, times a seed factor."""
    scale, slope = (3.0, -0.5) if path == "exact" else (2.0, -0.25)
    return scale * w ** slope * NOISE[s]


def _paired_rows(widths=WIDTHS, paths=PATHS):
    """A paired width study: test loss/accuracy curves and weight_change (step 0: 1e9, so a
    figure that does not use the final step shows it)."""
    rows = []
    for w in widths:
        for s in SEEDS:
            for p in paths:
                for t in STEPS:
                    rows.append(dict(width=w, seed=s, path=p, step=t, split="test",
                                     metric="loss", value=1.0 / (t + 1) + 0.01 * s))
                    rows.append(dict(width=w, seed=s, path=p, step=t, split="test",
                                     metric="accuracy", value=0.5 + 0.04 * t + 0.01 * s))
                    rows.append(dict(width=w, seed=s, path=p, step=t, split="none",
                                     metric="weight_change",
                                     value=_power_law(w, s, p) if t == STEPS[-1] else 1e9))
    return rows


def _summary():
    """A hand-built scaling table (the contract of ntk_tickets.scaling.scaling_table)."""
    return pd.DataFrame([
        dict(metric="weight_change", path="exact", mask="dense", round=0, split="none",
             n_widths=3, n_seeds=3, slope=-0.5, ci_low=-0.6, ci_high=-0.4,
             intercept=np.log(3.0)),
        dict(metric="weight_change", path="linear", mask="dense", round=0, split="none",
             n_widths=3, n_seeds=3, slope=-0.25, ci_low=-0.3, ci_high=-0.2,
             intercept=np.log(2.0)),
    ])


MASKS = ("imp", "random", "reinit")
SPARSITY = {1: 0.5, 2: 0.75, 3: 0.875}
EPS = (0.0, 0.01, 0.1, 1.0)


def _accuracy(mask, sparsity, seed, eps=0.0):
    drop = {"dense": 0.0, "imp": 0.1, "random": 0.4, "reinit": 0.3, "perturb": 0.2}[mask]
    return 0.9 - drop * sparsity - 0.05 * eps + 0.01 * seed


def _ticket_rows(widths=(16, 64), metric="accuracy", overlap=True, perturb=True):
    """A ticket study at the final step 9 (step 0 has value -1: never plotted)."""
    rows = []

    def add(w, s, mask, rnd, sparsity, value, **extra):
        for t in (0, 9):
            rows.append(dict(width=w, seed=s, path="exact", mask=mask, round=rnd,
                             sparsity=sparsity, step=t, split="test", metric=metric,
                             value=value if t == 9 else -1.0, **extra))

    for w in widths:
        for s in SEEDS:
            add(w, s, "dense", 0, 0.0, _accuracy("dense", 0.0, s))
            for rnd, sp in SPARSITY.items():
                for mask in MASKS:
                    add(w, s, mask, rnd, sp, _accuracy(mask, sp, s))
                if overlap:
                    rows.append(dict(width=w, seed=s, path="none", mask="imp_linear",
                                     round=rnd, sparsity=sp, step=9, split="none",
                                     metric="mask_overlap", value=0.6 + 0.1 * rnd + 0.01 * s))
            if perturb:
                for eps in EPS:
                    add(w, s, "imp", 3, 0.875, _accuracy("perturb", 0.875, s, eps), eps=eps,
                        experiment="perturb")
    return rows


def _lines_by_label(ax):
    return {line.get_label(): line for line in ax.get_lines()}


def _errorbars(ax):
    """{label: (x, y, yerr half-width)} of the error-bar plots of ``ax``."""
    out = {}
    for container in ax.containers:
        line = container.lines[0]
        bars = container.lines[2][0].get_segments() if container.lines[2] else []
        half = [abs(seg[1][1] - seg[0][1]) / 2 for seg in bars]
        out[container.get_label()] = (np.asarray(line.get_xdata(), float),
                                      np.asarray(line.get_ydata(), float), np.asarray(half))
    return out


# ----------------------------------------------------------------------------- metric vs width


def test_metric_vs_width_draws_the_fitted_power_law_and_the_final_values():
    records = records_frame(_paired_rows())
    fig = metric_vs_width(records, "weight_change", summary=_summary())
    (ax,) = fig.axes
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert "width" in ax.get_xlabel() and "weight change" in ax.get_ylabel()
    assert ax.get_title()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["exact: slope -0.50 [-0.60, -0.40]", "linear: slope -0.25 [-0.30, -0.20]"]
    lines = _lines_by_label(ax)
    for path, scale, slope in (("exact", 3.0, -0.5), ("linear", 2.0, -0.25)):
        fit = lines[next(label for label in lines if label.startswith(f"{path}:"))]
        x, y = np.asarray(fit.get_xdata()), np.asarray(fit.get_ydata())
        assert x.min() == WIDTHS[0] and x.max() == WIDTHS[-1]
        np.testing.assert_allclose(y, scale * x ** slope, rtol=1e-12)
    # Markers: the geometric mean over seeds of the final values, one per width.
    markers = [line for line in ax.get_lines() if line.get_marker() == "o"]
    assert len(markers) == 2
    geometric = np.exp(np.mean(np.log(list(NOISE.values()))))
    for marker, path in zip(markers, PATHS, strict=True):
        np.testing.assert_array_equal(marker.get_xdata(), WIDTHS)
        expected = [_power_law(w, 0, path) / NOISE[0] * geometric for w in WIDTHS]
        np.testing.assert_allclose(marker.get_ydata(), expected, rtol=1e-12)
    # Faint points: every seed at every width, step 0 (1e9) left out.
    points = np.concatenate([c.get_offsets() for c in ax.collections])
    assert len(points) == len(WIDTHS) * len(SEEDS) * len(PATHS)
    assert points[:, 1].max() < 10


def test_metric_vs_width_without_a_fit_labels_the_path_and_skips_the_line():
    records = records_frame(_paired_rows())
    summary = _summary().iloc[:1]  # exact only
    fig = metric_vs_width(records, "weight_change", summary=summary)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["exact: slope -0.50 [-0.60, -0.40]", "linear (no fit)"]


def test_metric_vs_width_computes_the_fit_when_no_summary_is_given():
    records = records_frame(_paired_rows())
    fig = metric_vs_width(records, "weight_change")
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    # Seed factors shift every width alike: the slope and its interval are exact.
    assert labels == ["exact: slope -0.50 [-0.50, -0.50]", "linear: slope -0.25 [-0.25, -0.25]"]


def test_metric_vs_width_raises_without_positive_values():
    with pytest.raises(ValueError, match="ntk_change"):
        metric_vs_width(records_frame(_paired_rows()), "ntk_change", summary=_summary())


# ----------------------------------------------------------------------------- loss curves


def test_loss_curves_one_panel_per_width_one_line_per_path():
    records = records_frame(_paired_rows())
    fig = loss_curves(records)
    assert len(fig.axes) == len(WIDTHS)
    assert [ax.get_title() for ax in fig.axes] == [f"width {w}" for w in WIDTHS]
    shared = fig.axes[0].get_shared_y_axes()
    assert all(shared.joined(fig.axes[0], ax) for ax in fig.axes)
    for ax in fig.axes:
        assert ax.get_xscale() == "log" and "step + 1" in ax.get_xlabel()
        lines = _lines_by_label(ax)
        assert sorted(lines) == sorted(PATHS)
        np.testing.assert_array_equal(lines["exact"].get_xdata(), np.asarray(STEPS) + 1)
        mean = [1.0 / (t + 1) + 0.01 for t in STEPS]  # mean over seeds 0, 1, 2
        np.testing.assert_allclose(lines["exact"].get_ydata(), mean)
    assert fig.axes[0].get_yscale() == "log" and "loss" in fig.axes[0].get_ylabel()
    assert [t.get_text() for t in fig.legends[0].get_texts()] == list(PATHS)


def test_loss_curves_of_many_widths_wrap_into_rows_of_three():
    widths = (8, 16, 32, 64, 128)
    fig = loss_curves(records_frame(_paired_rows(widths=widths)))
    assert [ax.get_title() for ax in fig.axes] == [f"width {w}" for w in widths]
    assert [bool(ax.get_ylabel()) for ax in fig.axes] == [True, False, False, True, False]


def test_loss_curves_of_accuracy_are_linear_and_unknown_metrics_raise():
    records = records_frame(_paired_rows())
    fig = loss_curves(records, metric="accuracy")
    assert fig.axes[0].get_yscale() == "linear" and "accuracy" in fig.axes[0].get_ylabel()
    with pytest.raises(ValueError, match="no test 'ntk_change'"):
        loss_curves(records, metric="ntk_change")


# ----------------------------------------------------------------------------- tickets


def test_ticket_accuracy_lines_per_mask_at_the_recorded_sparsities():
    records = records_frame(_ticket_rows())
    fig = ticket_accuracy(records)
    assert len(fig.axes) == 2
    for ax in fig.axes:
        bars = _errorbars(ax)
        assert sorted(bars) == sorted(MASKS)  # no perturb, no dense
        for mask in MASKS:
            x, y, half = bars[mask]
            np.testing.assert_array_equal(x, list(SPARSITY.values()))
            np.testing.assert_allclose(y, [_accuracy(mask, sp, 1) for sp in SPARSITY.values()])
            np.testing.assert_allclose(half, 0.01)  # sample std of seeds 0, 1, 2 offsets
        dense = _lines_by_label(ax)["dense"]
        np.testing.assert_allclose(dense.get_ydata(), _accuracy("dense", 0.0, 1))
        assert dense.get_linestyle() == "--"
        assert "sparsity" in ax.get_xlabel()
    assert fig.axes[0].get_ylabel() == "test accuracy"


def test_ticket_accuracy_falls_back_to_test_loss_for_regression():
    records = records_frame(_ticket_rows(metric="loss", overlap=False, perturb=False))
    fig = ticket_accuracy(records)
    assert fig.axes[0].get_ylabel() == "test loss"
    with pytest.raises(ValueError, match="linear"):
        ticket_accuracy(records, path="linear")


def test_mask_overlap_one_line_per_round_against_width():
    records = records_frame(_ticket_rows(widths=(16, 64, 256)))
    fig = mask_overlap(records)
    (ax,) = fig.axes
    assert ax.get_xscale() == "log" and "width" in ax.get_xlabel()
    assert "Jaccard" in ax.get_ylabel()
    bars = _errorbars(ax)
    assert sorted(bars) == [f"round {r}: sparsity {sp:.1%}" for r, sp in SPARSITY.items()]
    for r, sp in SPARSITY.items():
        x, y, _ = bars[f"round {r}: sparsity {sp:.1%}"]
        np.testing.assert_array_equal(x, (16, 64, 256))
        np.testing.assert_allclose(y, 0.6 + 0.1 * r + 0.01)
    # The chance level of two random masks at density d is d / (2 - d): 1/3 at half density.
    assert chance_overlap(0.5) == pytest.approx(1 / 3)
    chance = {round(float(line.get_ydata()[0]), 6) for line in ax.get_lines()
              if line.get_linestyle() == ":"}
    assert chance == {round(float(chance_overlap(1 - sp)), 6) for sp in SPARSITY.values()}


def test_mask_figures_when_the_sparsity_reached_differs_by_width():
    # With prune_fraction 0.2 the kept counts round differently at each width: a round's
    # sparsity is 1 - round(0.8^r N) / N. Each round stays one line, each panel its own ticks.
    records = records_frame(_ticket_rows(widths=(16, 64, 256)))
    records["sparsity"] = records["sparsity"] + np.where(records["sparsity"] > 0,
                                                         1e-3 * np.log2(records["width"]), 0)
    bars = _errorbars(mask_overlap(records).axes[0])
    assert len(bars) == len(SPARSITY)
    assert all(len(x) == 3 for x, _, _ in bars.values())
    fig = ticket_accuracy(records)
    for ax, width in zip(fig.axes, (16, 64, 256), strict=True):
        expected = [sp + 1e-3 * np.log2(width) for sp in SPARSITY.values()]
        np.testing.assert_allclose(ax.get_xticks(), expected)


def test_perturbation_curves_include_eps_zero_on_a_symlog_axis():
    records = records_frame(_ticket_rows())
    fig = perturbation_curves(records)
    (ax,) = fig.axes
    assert ax.get_xscale() == "symlog" and "ε" in ax.get_xlabel()
    bars = _errorbars(ax)
    assert sorted(bars) == ["width 16", "width 64"]
    for x, y, _ in bars.values():
        np.testing.assert_array_equal(x, EPS)
        np.testing.assert_allclose(y, [_accuracy("perturb", 0.875, 1, e) for e in EPS])
    assert ax.get_xlim()[0] < 0.0  # eps = 0 is inside the axis, not on its edge
    assert ax.get_ylabel() == "test accuracy"


def test_final_step_keeps_the_last_step_of_each_eps():
    records = records_frame(_ticket_rows(widths=(16,)))
    final = final_step(records)
    assert set(final["step"]) == {9}
    perturbed = final[final["experiment"] == "perturb"]
    assert len(perturbed) == len(EPS) * len(SEEDS)
    assert set(perturbed["mask"]) == {"imp"}  # the family stays in the mask column


# ----------------------------------------------------------------------------- a study


def test_study_figures_only_for_data_that_exists():
    one_width = study_figures(records_frame(_paired_rows(widths=(16,))), summary=_summary())
    assert sorted(one_width) == ["accuracy_test", "loss_test"]
    paired = study_figures(records_frame(_paired_rows()), summary=_summary())
    assert sorted(paired) == ["accuracy_test", "loss_test", "weight_change_vs_width"]
    tickets = study_figures(records_frame(_ticket_rows()), summary=_summary())
    assert sorted(tickets) == ["accuracy_test", "mask_overlap", "perturbation",
                               "ticket_accuracy"]
    plain = study_figures(records_frame(_ticket_rows(overlap=False, perturb=False)),
                          summary=_summary())
    assert sorted(plain) == ["accuracy_test", "ticket_accuracy"]


def _store(folder, rows):
    with ResultsStore(folder, {"name": "synthetic"}, None, x64=False) as store:
        store.write_cell("width=all", records_frame(rows), "done")


def test_save_figures_writes_png_files_under_figures_and_nothing_else(tmp_path):
    folder = tmp_path / "study"
    _store(folder, _paired_rows() + _ticket_rows(widths=WIDTHS))
    before = {p for p in folder.rglob("*") if p.is_file()}
    paths = save_figures(folder, dpi=40)
    names = ["loss_test", "accuracy_test", "weight_change_vs_width", "ticket_accuracy",
             "mask_overlap", "perturbation"]
    assert paths == [folder / "figures" / f"{name}.png" for name in names]
    after = {p for p in folder.rglob("*") if p.is_file()}
    assert after - before == set(paths)  # no temporary files, nothing outside figures/
    for path in paths:
        data = path.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000


def test_save_figures_on_a_missing_or_empty_folder_says_what_to_do(tmp_path):
    with pytest.raises(UserInputError, match="does not exist.*ntk-tickets run"):
        save_figures(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    _store(empty, [])
    with pytest.raises(UserInputError, match=r"no records.*ntk-tickets run"):
        save_figures(empty)
    assert not (empty / "figures").exists()


def test_figures_are_drawn_and_saved_without_pyplot(tmp_path):
    code = (
        "import sys\n"
        "from ntk_tickets.plotting import figure_png, loss_curves\n"
        "from ntk_tickets.results import records_frame\n"
        "rows = [dict(width=8, seed=0, path='exact', step=t, split='test', metric='loss',\n"
        "             value=1.0 / (t + 1)) for t in (0, 1, 2)]\n"
        "png = figure_png(loss_curves(records_frame(rows)), dpi=30)\n"
        "assert png.startswith(b'\\x89PNG'), png[:8]\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)


def test_every_gallery_image_in_the_readme_is_committed():
    # The README's gallery links PNGs under results/; each must exist and not be git-ignored,
    # or the gallery is broken on a fresh clone.
    root = Path(__file__).resolve().parents[1]
    images = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", (root / "README.md").read_text())
    assert len(images) >= 7
    for image in images:
        assert (root / image).is_file(), image
    if (root / ".git").exists():
        ignored = subprocess.run(["git", "check-ignore", *images], cwd=root,
                                 capture_output=True, text=True).stdout.split()
        assert ignored == [], f"git ignores gallery images: {ignored}"
