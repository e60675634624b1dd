"""The escape-dimensions study (ntk_tickets.escape), each piece against something
independent: Wilson intervals against a binomial simulation and published values, the
lottery predictions against their closed forms, Levenberg–Marquardt against least squares,
the split matrix against the Hessian of the split network, unit surgery against the
network's outputs, and a whole study through the CLI against the records contract."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from ntk_tickets import ModelConfig, build_model
from ntk_tickets.config import EscapeConfig
from ntk_tickets.escape import (
    classify,
    distinct_units,
    levenberg_marquardt,
    lottery_prediction,
    perturbed_around,
    relative_loss,
    spectrum_edges,
    split_matrix,
    unit_strengths,
    units_of,
    wilson_interval,
)
from ntk_tickets.hessian import hessian_eigenvalues, hessian_vector_product, split_neuron


@functools.cache
def _mlp(width, d=3, activation="erf"):
    return build_model(ModelConfig(arch="mlp", depth=1, activation=activation), width, (d,), 1)


def _normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape))


def _params(width, d=3, seed=0):
    """W, b ~ N(0, 1), as the ntk initialization draws them."""
    rng = np.random.default_rng([seed, 7])
    return [(), (jnp.asarray(rng.standard_normal((d, width))),
                 jnp.asarray(rng.standard_normal((1, width)))),
            (), (jnp.asarray(rng.standard_normal((width, 1))),
                 jnp.asarray(rng.standard_normal((1, 1))))]


# ----------------------------------------------------------------------------- intervals


def test_wilson_interval_matches_published_values():
    """0/10 and 10/10 (Wilson 1927; e.g. Brown, Cai & DasGupta 2001, Table 1 conventions):
    [0, 0.2775] and [0.7225, 1]; 5/10: 0.5 ± 0.2634... = [0.2366, 0.7634]."""
    lo, hi = wilson_interval(np.array([0, 10, 5]), np.array([10, 10, 10]))
    np.testing.assert_allclose(lo, [0.0, 0.72247, 0.23659], atol=5e-5)
    np.testing.assert_allclose(hi, [0.27753, 1.0, 0.76341], atol=5e-5)


@pytest.mark.parametrize("p,n", [(0.1, 64), (0.5, 64), (0.8, 30), (0.97, 128)])
def test_wilson_interval_covers_the_truth_about_95_percent_of_the_time(p, n):
    """Coverage over 40 000 simulated binomial draws. Wilson's coverage oscillates around
    the nominal 95 % with n and p (Brown, Cai & DasGupta 2001, Fig. 4: within about
    0.93–0.97 for these n); the simulation's own error is ±0.002."""
    k = np.random.default_rng(0).binomial(n, p, 40_000)
    lo, hi = wilson_interval(k, n)
    coverage = np.mean((lo <= p) & (p <= hi))
    assert 0.925 <= coverage <= 0.98, coverage


def test_lottery_predictions_are_their_closed_forms():
    """1 − (1 − p)^C(n, r*) and 1 − (1 − p)^⌊n/r*⌋; at n = r* both are p."""
    assert lottery_prediction(0.5, 5, 4, "independent") == pytest.approx(1 - 0.5 ** 5)
    assert lottery_prediction(0.5, 9, 4, "disjoint") == pytest.approx(1 - 0.5 ** 2)
    assert lottery_prediction(0.3, 8, 8, "independent") == pytest.approx(0.3)
    assert lottery_prediction(0.3, 8, 8, "disjoint") == pytest.approx(0.3)
    np.testing.assert_allclose(lottery_prediction(np.array([0.0, 1.0]), 12, 8, "independent"),
                               [0.0, 1.0])
    with pytest.raises(KeyError):
        lottery_prediction(0.3, 8, 8, "overlapping")


def test_classify_sorts_every_run_into_exactly_one_outcome():
    esc = EscapeConfig(tolerance=1e-10, grad_tolerance=1e-7, eig_tolerance=1e-6)
    loss = np.array([1e-12, 1e-2, 1e-2, 1e-2, 1e-2])
    grad = np.array([1.0, 1e-9, 1e-9, 1e-9, 1e-3])
    eig_min = np.array([-1.0, 1e-4, -1e-7, -1e-3, 1.0])
    eig_max = np.ones(5)
    out = classify(loss, grad, eig_min, eig_max, esc)
    expected = {"success": [1, 0, 0, 0, 0], "stuck": [0, 1, 1, 0, 0],
                "saddle": [0, 0, 0, 1, 0], "unconverged": [0, 0, 0, 0, 1]}
    for name, values in expected.items():
        np.testing.assert_array_equal(out[name], np.array(values, bool), err_msg=name)


def test_escape_table_counts_saddles_with_the_census_tolerance():
    """An embedded point whose λ_min is a rounding error below 0 (the split line's zero
    eigenvalue) is not a saddle; one below −eig_tolerance·λ_max is. Escaped shares and
    their Wilson intervals come from the per-seed rows."""
    from ntk_tickets.escape import escape_table
    from ntk_tickets.results import records_frame

    rows = [{"width": 4, "seed": s, "path": "exact", "step": 1, "experiment": "census",
             "metric": "hessian_max_eig", "value": 2.0} for s in (0, 1)]
    for seed, eig_min, escaped in ((0, -1e-9, 1.0), (1, -1e-3, 0.0)):
        for metric, value in (("hessian_min_eig", eig_min), ("escaped", escaped),
                              ("embed_loss_change", 1e-16), ("grad_norm", 1e-8),
                              ("success", escaped)):
            rows.append({"width": 4, "seed": seed, "path": "exact", "step": 1,
                         "experiment": "escape", "embedding": "split", "added": 1,
                         "mu": 1.5, "metric": metric, "value": value})
    table = escape_table(records_frame(rows), eig_tolerance=1e-6)
    assert len(table) == 1
    row = table.iloc[0]
    assert row["minima"] == 2 and row["saddle"] == 0.5 and row["escaped"] == 0.5
    lo, hi = wilson_interval(1, 2)
    assert (row["escaped_lo"], row["escaped_hi"]) == (pytest.approx(lo), pytest.approx(hi))


# ----------------------------------------------------------------------------- training


def test_relative_loss_is_the_mse_over_the_target_variance(float64):
    model, params = _mlp(4), _params(4)
    x, y = _normal(1, (50, 3)), _normal(2, (50, 1)) + 3.0
    f = np.asarray(model.apply_fn(params, x))
    expected = np.mean((f - np.asarray(y)) ** 2) / np.var(np.asarray(y))
    assert float(relative_loss(model.apply_fn, params, x, y)) == pytest.approx(expected,
                                                                             rel=1e-12)


def test_levenberg_marquardt_solves_linear_least_squares(float64):
    """On a linear model LM converges to the least-squares solution (np.linalg.lstsq)."""
    def apply_fn(params, x):
        return x @ params["w"] + params["b"]

    x, w_true = _normal(3, (40, 5)), _normal(4, (5, 1))
    y = x @ w_true + 0.3 * _normal(5, (40, 1))
    fitted = levenberg_marquardt(apply_fn, {"w": jnp.zeros((5, 1)), "b": jnp.zeros(1)}, x,
                                 y, max_steps=50, grad_tolerance=1e-14, loss_floor=0.0)
    design = np.concatenate([np.asarray(x), np.ones((40, 1))], axis=1)
    solution = np.linalg.lstsq(design, np.asarray(y), rcond=None)[0]
    np.testing.assert_allclose(np.asarray(fitted["w"]), solution[:5], atol=1e-9)
    np.testing.assert_allclose(np.asarray(fitted["b"]), solution[5], atol=1e-9)


def test_levenberg_marquardt_reaches_zero_loss_on_a_realizable_teacher(float64):
    """A student of the teacher's width started near the teacher fits it to round-off."""
    model = _mlp(3)
    teacher = _params(3, seed=1)
    x = _normal(6, (200, 3))
    y = model.apply_fn(teacher, x)
    start = jax.tree_util.tree_map(lambda a: a + 0.05 * _normal(7, a.shape), teacher)
    fitted = levenberg_marquardt(model.apply_fn, start, x, y, max_steps=200,
                                 grad_tolerance=0.0, loss_floor=1e-24)
    assert float(relative_loss(model.apply_fn, fitted, x, y)) < 1e-20


def test_lanczos_edges_match_the_exact_spectrum(float64):
    """With as many Lanczos steps as parameters the Ritz values are the eigenvalues."""
    model, params = _mlp(3), _params(3)
    x, y = _normal(1, (30, 3)), _normal(2, (30, 1))
    exact = spectrum_edges(model.apply_fn, params, x, y, method="exact",
                           key=jax.random.PRNGKey(0), lanczos_iters=0)
    size = ravel_pytree(params)[0].size
    lanczos = spectrum_edges(model.apply_fn, params, x, y, method="lanczos",
                             key=jax.random.PRNGKey(0), lanczos_iters=size)
    np.testing.assert_allclose(lanczos, exact, atol=1e-9 * float(jnp.max(jnp.abs(exact))))


# ----------------------------------------------------------------------------- units


@pytest.mark.parametrize("mu", [-0.5, 0.3, 1.7])
def test_split_matrix_gives_the_curvature_along_the_split_line(float64, mu):
    """Pulling the two copies of a split unit apart, v = ((1 − μ)δ, −μδ) on their incoming
    weights, leaves f unchanged to first order, so vᵀHv = μ(1 − μ)·δᵀB_jδ exactly, at any
    point (not only at critical points): the wide network's Hessian (by Hessian-vector
    products) against the narrow network's split matrix."""
    width, d, j = 4, 3, 1
    params = _params(width, d)
    x, y = _normal(1, (40, d)), _normal(2, (40, 1))
    b = split_matrix(_mlp(width, d).apply_fn, params, j, x, y)
    wide = split_neuron(params, j, mu)
    delta = _normal(3, (d + 1,))
    v = jax.tree_util.tree_map(jnp.zeros_like, wide)
    w1 = v[1][0].at[:, j].set((1 - mu) * delta[:d]).at[:, width].set(-mu * delta[:d])
    b1 = v[1][1].at[0, j].set((1 - mu) * delta[d]).at[0, width].set(-mu * delta[d])
    v[1] = (w1, b1)

    def loss(p, x, y):
        return relative_loss(_mlp(width + 1, d).apply_fn, p, x, y)

    hv = hessian_vector_product(loss, wide, v, (x, y))
    curvature = ravel_pytree(v)[0] @ ravel_pytree(hv)[0]
    assert float(curvature) == pytest.approx(mu * (1 - mu) * float(delta @ b @ delta),
                                             rel=1e-8, abs=1e-12)


def test_units_alone_and_in_place_compute_the_same_function(float64):
    """In the ntk parameterization the units ``idx`` of a width-n net, the others silenced
    (ε = 0), compute √(r/n) times what the same units compute as a width-r net, plus the
    readout bias; ε = 1 with ξ = θ0 gives θ0 back."""
    n, r, d = 6, 3, 3
    params = _params(n, d)
    idx = jnp.array([4, 0, 2])
    x = _normal(1, (20, d))
    bias = 0.05 * params[3][1]  # σ_b·b2, the readout bias term (ModelConfig's b_std)
    inside = _mlp(n, d).apply_fn(perturbed_around(params, _params(n, d, seed=9), idx, 0.0), x)
    alone = _mlp(r, d).apply_fn(units_of(params, idx), x)
    np.testing.assert_allclose(inside - bias, math.sqrt(r / n) * (alone - bias), rtol=1e-12)
    same = perturbed_around(params, params, idx, 1.0)
    for a, b in zip(jax.tree_util.tree_leaves(same), jax.tree_util.tree_leaves(params),
                    strict=True):
        np.testing.assert_array_equal(a, b)


def test_distinct_units_counts_copies_sign_flips_and_silent_units_once(float64):
    """Three directions, one unit copied twice and one sign-flipped (odd activation), and a
    silent unit: three distinct units, as Expand-and-Cluster would report."""
    w = np.asarray(_normal(1, (3, 3)))
    b = np.asarray(_normal(2, (1, 3)))
    w1 = np.concatenate([w, w[:, :1] * 2.0, -w[:, 1:2], w[:, 2:3]], axis=1)
    b1 = np.concatenate([b, b[:, :1] * 2.0, -b[:, 1:2], b[:, 2:3]], axis=1)
    a = np.array([[1.0], [0.7], [-1.2], [0.4], [0.5], [0.0]])
    params = [(), (jnp.asarray(w1), jnp.asarray(b1)), (), (jnp.asarray(a), jnp.zeros((1, 1)))]
    assert distinct_units(params, tolerance=1e-3) == 3
    np.testing.assert_allclose(unit_strengths(params)[5], 0.0)
    params[1] = (params[1][0].at[:, 3].add(0.5), params[1][1])  # no longer a copy
    assert distinct_units(params, tolerance=1e-3) == 4


def test_an_embedded_minimum_stays_critical_with_the_predicted_saddles(float64):
    """A critical point of a width-1 student (a stuck fit of a width-2 teacher), split at μ:
    the loss is unchanged to 1e-10 (relative), the gradient stays ≈ 0, and λ_min of the wide
    Hessian is negative exactly where μ(1 − μ)·B_j has a negative eigenvalue."""
    d = 2
    x = _normal(1, (100, d))
    y = _mlp(2, d).apply_fn(_params(2, d, seed=3), x)
    narrow = levenberg_marquardt(_mlp(1, d).apply_fn, _params(1, d, seed=4), x, y,
                                 max_steps=500, grad_tolerance=1e-12, loss_floor=0.0)
    loss0 = float(relative_loss(_mlp(1, d).apply_fn, narrow, x, y))
    b = np.linalg.eigvalsh(np.asarray(split_matrix(_mlp(1, d).apply_fn, narrow, 0, x, y)))
    assert loss0 > 1e-3 and np.all(np.abs(b) > 1e-6)

    def loss(p, x, y):
        return relative_loss(_mlp(2, d).apply_fn, p, x, y)

    for mu in (-0.5, 0.5, 1.5):
        wide = split_neuron(narrow, 0, mu)
        assert abs(float(loss(wide, x, y)) - loss0) <= 1e-10 * loss0
        g = jax.grad(loss)(wide, x, y)
        assert float(jnp.linalg.norm(ravel_pytree(g)[0])) < 1e-8
        eig_min = float(hessian_eigenvalues(loss, wide, (x, y))[0])
        predicted_saddle = np.any(mu * (1 - mu) * b < 0)
        assert (eig_min < -1e-8) == predicted_saddle, (mu, b, eig_min)


# ----------------------------------------------------------------------------- configs and data


def _escape_config(**changes):
    from ntk_tickets import config_from_dict

    values = {
        "name": "esc", "paths": ["exact"],
        "data": {"name": "teacher", "n_train": 64, "n_test": 8, "input_dim": 2,
                 "teacher_width": 2, "teacher_depth": 1, "teacher_activation": "erf",
                 "teacher_weights": "orthonormal"},
        "model": {"arch": "mlp", "depth": 1, "activation": "erf", "widths": [1, 2, 3]},
        "train": {"optimizer": "adam", "learning_rate": 0.02, "steps": 200, "x64": True,
                  "seeds": list(range(8))},
        "escape": {"polish_steps": 100, "subnetworks": 1, "perturb_eps": [0.0],
                   "add_neurons": 2},
    }
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = values
        for key in parents:
            node = node[key]
        node[last] = value
    return config_from_dict(values)


@pytest.mark.parametrize("change,named", [
    ({"data.name": "sine"}, "data.name"),
    ({"model.depth": 2}, "model.depth"),
    ({"train.x64": False}, "train.x64"),
    ({"paths": ["exact", "linear"]}, "paths"),
    ({"model.parameterization": "standard"}, "model.parameterization"),
    ({"model.output_scale": [1.0, 2.0]}, "model.output_scale"),
    ({"escape.hessian": "power"}, "escape.hessian"),
    ({"escape.split_mu": []}, "escape.split_mu"),
    ({"escape.add_neurons": 0}, "escape.add_neurons"),
    ({"data.teacher_width": 3}, "data.teacher_weights"),
    ({"data.teacher_activation": "sigmoid"}, "data.teacher_activation"),
])
def test_bad_escape_configs_are_refused_naming_the_field(change, named):
    from ntk_tickets import UserInputError

    with pytest.raises(UserInputError, match=named.replace(".", r"\.")):
        _escape_config(**change)


@pytest.mark.parametrize("activation", ["erf", "tanh", "softplus", "relu"])
def test_an_orthonormal_teacher_is_the_sum_of_its_units(activation):
    """Orthonormal incoming vectors, unit readout: y·rms = Σ_i φ(w_i·x) with WᵀW = I."""
    from scipy.special import erf

    from ntk_tickets import DataConfig
    from ntk_tickets.data import _teacher_weights

    cfg = DataConfig(name="teacher", input_dim=5, teacher_width=3, teacher_depth=1,
                     teacher_activation=activation, teacher_weights="orthonormal")
    w, a = _teacher_weights(cfg, np.random.default_rng(0))
    np.testing.assert_allclose(w.T @ w, np.eye(3), atol=1e-12)
    np.testing.assert_array_equal(a, np.ones((3, 1)))
    phi = {"erf": erf, "tanh": np.tanh, "softplus": lambda z: np.log1p(np.exp(z)),
           "relu": lambda z: np.maximum(z, 0)}[activation]
    from ntk_tickets import load_dataset

    data = load_dataset(cfg, "mse")
    units = phi(data.x_train @ w).sum(1, keepdims=True)
    rms = float(units.ravel() @ units.ravel() / (units.ravel() @ data.y_train.ravel()))
    np.testing.assert_allclose(units, rms * data.y_train, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- the study


def test_the_escape_study_runs_from_the_cli_and_keeps_its_contract(tmp_path, capsys):
    """A tiny study (r* = 2; width 1 cannot fit the teacher, so its runs stop at critical
    points and the escape test runs): one census row per (width, seed) and metric, the
    escape columns, function-preserving embeddings, and summarize and plot outputs."""
    from ntk_tickets.cli import main
    from ntk_tickets.results import load_records

    config = tmp_path / "esc.toml"
    config.write_text("""
name = "esc"
paths = ["exact"]
[data]
name = "teacher"
n_train = 64
n_test = 8
input_dim = 2
teacher_width = 2
teacher_depth = 1
teacher_activation = "erf"
teacher_weights = "orthonormal"
[model]
arch = "mlp"
depth = 1
activation = "erf"
widths = [1, 2, 3]
[train]
optimizer = "adam"
learning_rate = 0.02
steps = 200
x64 = true
seeds = [0, 1, 2, 3, 4, 5, 6, 7]
[escape]
polish_steps = 100
subnetworks = 1
perturb_eps = [0.0]
add_neurons = 2
""")
    out = tmp_path / "out"
    assert main(["run", str(config), "--out", str(out)]) == 0
    assert "lottery predictions" in capsys.readouterr().out
    assert main(["run", str(config), "--out", str(out)]) == 0  # a finished study is kept
    assert "already done" in capsys.readouterr().out
    records = load_records(out)
    census = records[records.experiment == "census"]
    for metric in ("success", "final_loss", "grad_norm", "hessian_min_eig"):
        rows = census[census.metric == metric]
        assert sorted(zip(rows.width, rows.seed, strict=True)) == [(w, s) for w in (1, 2, 3)
                                                     for s in range(8)], metric
    outcomes = census[census.metric.isin(["success", "stuck", "saddle", "unconverged"])]
    np.testing.assert_array_equal(outcomes.groupby(["width", "seed"])["value"].sum(), 1.0)
    assert census[(census.width == 1) & (census.metric == "success")]["value"].max() == 0

    escape = records[records.experiment == "escape"]
    stuck = census[(census.width == 1) & (census.metric == "stuck")]["value"].sum()
    assert stuck >= 1, "width 1 cannot fit a 2-unit teacher: its minima are stuck"
    assert set(escape.embedding) == {"split", "inactive"}
    assert set(escape.added) == {1, 2} and set(escape.width) == {1}
    split = escape[(escape.embedding == "split") & (escape.metric == "embed_loss_change")]
    assert len(split) == stuck * 3 * 2  # three μ, k = 1, 2
    assert split["value"].max() <= 1e-10
    grads = escape[(escape.embedding == "split") & (escape.metric == "grad_norm")]
    assert grads["value"].max() < 10 * 1e-7  # critical, as the stuck minimum was
    for metric in ("hessian_min_eig", "escaped"):
        assert (escape.metric == metric).any()

    assert main(["summarize", str(out)]) == 0
    text = capsys.readouterr().out
    assert "independent" in text and "escape test" in text
    assert (out / "summary.csv").is_file() and (out / "escape.csv").is_file()
    assert main(["plot", str(out)]) == 0
    assert {p.name for p in (out / "figures").glob("*.png")} == {
        "success_vs_width.png", "escape_fraction.png", "split_spectrum.png"}
