"""Lazy and rich regimes: µP against a hand-built reference from the published tables, the
width scaling of the feature change, and the output scale α with centring."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ntk_tickets import DataConfig, ModelConfig, StudyConfig, TrainConfig, load_dataset
from ntk_tickets.experiments import run_paired_width, setup_cell, training_programs
from ntk_tickets.models import build_model
from ntk_tickets.regimes import lr_factors, mup_lr_factor


def _study(width, *, parameterization="ntk", base_width=64, optimizer="sgd", lr=0.5, steps=5,
           depth=2, seeds=(0,), output_scale=1.0, center=False, paths=("exact",),
           metrics=("loss", "feature_change"), n=24):
    return StudyConfig(
        data=DataConfig(name="teacher", n_train=n, n_test=n, input_dim=6),
        model=ModelConfig(depth=depth, widths=(width,), parameterization=parameterization,
                          base_width=base_width, output_scale=output_scale, center=center),
        train=TrainConfig(optimizer=optimizer, learning_rate=lr, steps=steps, seeds=seeds,
                          log_points=steps + 1),
        paths=paths, metrics=metrics)


def _trajectories(cfg, width):
    data = load_dataset(cfg.data, cfg.train.loss)
    setup = setup_cell(cfg, data, width)
    programs = training_programs(cfg, setup.model, setup.steps)
    return setup, {path: program(setup.params0, setup.data, setup.batches)
                   for path, program in programs.items()}


# ----------------------------------------------------------------------------- µP


def _sp_reference(params0, x_train, y_train, x_test, *, width, base_width, d, w_std, b_std,
                  optimizer, lr, steps):
    """µP in the standard (SP) form of Yang et al. 2022 (Tensor Programs V, Table 3), written
    from the table: weights initialized with their final scale and trained with per-tensor
    learning rates whose width exponents the table gives, anchored so that width n0 is the
    NTK-parameterized network at learning rate ``lr``. Returns test outputs per step."""
    r = width / base_width
    (w1, b1), (w2, b2), (w3, b3) = [p for p in params0 if p]
    # Multipliers of the NTK form at this width (the readout's µP scale included): SP
    # weights are the NTK form's parameters times these.
    m = {"w1": w_std / np.sqrt(d), "w2": w_std / np.sqrt(width),
         "w3": w_std / np.sqrt(width) * np.sqrt(base_width / width), "b": b_std}
    sp = {"w1": m["w1"] * w1, "b1": m["b"] * b1, "w2": m["w2"] * w2, "b2": m["b"] * b2,
          "w3": m["w3"] * w3, "b3": m["b"] * b3}
    m0 = {"w1": w_std / np.sqrt(d), "w2": w_std / np.sqrt(base_width),
          "w3": w_std / np.sqrt(base_width), "b": b_std}
    # Table 3: (width exponent of the SGD rate, of the Adam rate) per tensor.
    exponents = {"w1": (1, 0), "b1": (1, 0), "w2": (0, -1), "b2": (1, 0), "w3": (-1, -1),
                 "b3": (0, 0)}
    sgd_like = optimizer in ("sgd", "momentum")
    rates = {}
    for name, (e_sgd, e_adam) in exponents.items():
        anchor = m0["b" if name.startswith("b") else name]
        rates[name] = (lr * anchor**2 * r**e_sgd) if sgd_like else (lr * anchor * r**e_adam)

    def f(p, x):
        h = jax.nn.relu(x @ p["w1"] + p["b1"])
        h = jax.nn.relu(h @ p["w2"] + p["b2"])
        return h @ p["w3"] + p["b3"]

    def make(name):
        # Adam's ε acts on the gradient, which is 1/m times larger in the SP form.
        eps = 1e-8 / m["b" if name.startswith("b") else name]
        return {"sgd": optax.sgd(rates[name]),
                "momentum": optax.sgd(rates[name], momentum=0.9),
                "adam": optax.adam(rates[name], eps=eps)}[optimizer]

    tx = optax.multi_transform({k: make(k) for k in rates}, {k: k for k in sp})
    state, out = tx.init(sp), [f(sp, x_test)]
    for _ in range(steps):
        grads = jax.grad(lambda p: 0.5 * jnp.mean((f(p, x_train) - y_train) ** 2))(sp)
        updates, state = tx.update(grads, state, sp)
        sp = optax.apply_updates(sp, updates)
        out.append(f(sp, x_test))
    return np.stack(out)


@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.5), ("momentum", 0.2), ("adam", 0.02)])
def test_mup_trains_like_the_published_table(x64, optimizer, lr):
    """Our µP (NTK form, rescaled readout, per-parameter rates) and an SP-form network
    written from Tensor Programs V's Table 3 follow the same trajectory from the same θ0."""
    width, base = 256, 32
    cfg = _study(width, parameterization="mup", base_width=base, optimizer=optimizer, lr=lr)
    setup, trajectories = _trajectories(cfg, width)
    ours = np.asarray(trajectories["exact"].f_test[0])
    params0 = jax.tree_util.tree_map(lambda a: a[0], setup.params0)
    reference = _sp_reference(params0, setup.data["x_train"], setup.data["y_train"],
                              setup.data["x_test"], width=width, base_width=base, d=6,
                              w_std=cfg.model.w_std, b_std=cfg.model.b_std,
                              optimizer=optimizer, lr=lr, steps=cfg.train.steps)
    assert np.abs(ours[-1] - ours[0]).max() > 0.05  # it trained
    tol = 1e-9 if x64 else 2e-4
    np.testing.assert_allclose(ours, reference, atol=tol * np.abs(reference).max())


def test_mup_is_the_ntk_network_at_the_base_width():
    ntk = run_paired_width(_study(48, base_width=48), *_data_and_width(48))
    mup = run_paired_width(_study(48, parameterization="mup", base_width=48),
                           *_data_and_width(48))
    assert [r["value"] for r in ntk.rows] == [r["value"] for r in mup.rows]


def _data_and_width(width):
    return load_dataset(_study(width).data, "mse"), width


def test_mup_learning_rate_table():
    assert [mup_lr_factor(n, 4.0, "sgd") for n in (0, 1, 2)] == [1.0, 4.0, 4.0]
    assert [mup_lr_factor(n, 4.0, "adam") for n in (0, 1, 2)] == [1.0, 1.0, 0.5]
    cfg = ModelConfig(parameterization="mup", base_width=16)
    factors = lr_factors(cfg, TrainConfig(optimizer="adam"), 64,
                         lambda w: build_model(cfg, w, (6,), 3).init(jax.random.PRNGKey(0)))
    (w1, b1), (w2, b2), (w3, b3) = [p for p in factors if p]
    assert (w1, b1, w2, b2, w3, b3) == (1.0, 1.0, 0.5, 1.0, 1.0, 1.0)
    assert lr_factors(ModelConfig(), TrainConfig(), 64, None) is None  # no extra work


def _feature_change(width, **kw):
    cfg = _study(width, depth=1, seeds=(0, 1, 2), **kw)
    result = run_paired_width(cfg, load_dataset(cfg.data, "mse"), width)
    return np.mean([r["value"] for r in result.rows if r["metric"] == "feature_change"
                    and r["step"] == cfg.train.steps])


@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.5), ("adam", 0.01)])
def test_feature_change_shrinks_like_root_width_under_ntk_but_not_under_mup(optimizer, lr):
    """One hidden layer, widths 512 and 8192 (16×), both far above µP's base width 32: under
    µP the features move by the same amount at every width (ratio 1), with SGD and with
    Adam; under ntk with SGD they move like n^−½ (ratio 1/4). Measured: 0.94 and 0.98 (µP),
    0.29 (ntk, SGD)."""
    def ratio(parameterization):
        kw = dict(parameterization=parameterization, optimizer=optimizer, lr=lr, steps=10,
                  base_width=32)
        return _feature_change(8192, **kw) / _feature_change(512, **kw)

    assert 0.8 < ratio("mup") < 1.25
    if optimizer == "sgd":
        assert 0.2 < ratio("ntk") < 0.36


# ----------------------------------------------------------------------------- output scale


def test_centring_starts_every_path_at_zero():
    cfg = _study(64, output_scale=3.0, center=True, paths=("exact", "linear"))
    _, trajectories = _trajectories(cfg, 64)
    for traj in trajectories.values():
        assert np.all(np.asarray(traj.f_test)[:, 0] == 0.0)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_output_scale_moves_the_weights_alpha_times_less_at_the_same_function_speed(
        float64, optimizer):
    """Centred, one step: the gradient of α·(f − f0) is α·∇f and the rate is η/α² (SGD) or
    η/α (Adam, whose step ignores the gradient's size), so the step is exactly 1/α of the
    α = 1 step, and the function moves by the same first-order amount."""
    def one_step(alpha):
        cfg = _study(64, output_scale=alpha, center=True, optimizer=optimizer, lr=0.05,
                     steps=1, paths=("exact",))
        _, trajectories = _trajectories(cfg, 64)
        traj = trajectories["exact"]
        return np.sqrt(np.asarray(traj.sq_change)[0, 1].sum()), np.asarray(traj.f_test)[0, 1]

    step1, f1 = one_step(1.0)
    step10, f10 = one_step(10.0)
    # Adam's first step is g/(|g| + ε): exact up to ε (1e-8) against entries' gradients.
    np.testing.assert_allclose(step10, step1 / 10, rtol=1e-9 if optimizer == "sgd" else 1e-3)
    # The function's change agrees to first order: the gap is the curvature term, O(Δθ²).
    np.testing.assert_allclose(f10, f1, atol=0.1 * np.abs(f1).max())


def test_large_output_scale_is_the_lazy_limit(float64):
    """Chizat, Oyallon & Bach (2019): at a fixed function-space speed the features move like
    1/α and the exact network approaches its linearization. Measured (float64, width 64,
    40 steps): feature change 0.105, 0.011, 0.0011 and function gap 0.079, 0.0098, 0.0014 at
    α = 1, 10, 100. In float32 the gap stalls near 0.008 at α = 100: steps 1/α the size of
    the weights lose float32 precision, so large α needs ``train.x64``."""
    def gap_and_features(alpha):
        cfg = _study(64, output_scale=alpha, center=True, steps=40, lr=0.5,
                     paths=("exact", "linear"),
                     metrics=("loss", "function_gap", "feature_change"))
        rows = run_paired_width(cfg, load_dataset(cfg.data, "mse"), 64).rows
        last = [r for r in rows if r["step"] == 40]
        gap = [r["value"] for r in last if r["metric"] == "function_gap"]
        feature = [r["value"] for r in last if r["metric"] == "feature_change"
                   and r["path"] == "exact"]
        return gap[0], feature[0]

    (gap1, feat1), (gap10, feat10), (gap100, feat100) = map(gap_and_features, (1, 10, 100))
    np.testing.assert_allclose([feat10 / feat1, feat100 / feat10], 0.1, rtol=0.15)
    assert gap10 / gap1 < 0.2 and gap100 / gap10 < 0.2


def test_a_model_takes_one_value_of_each_factor():
    with pytest.raises(ValueError, match="model.parameterization"):
        build_model(ModelConfig(parameterization=("ntk", "mup")), 8, (3,), 2)


# ----------------------------------------------------------------------------- studies


def _tiny(**model):
    return StudyConfig(
        data=DataConfig(name="teacher", n_train=16, n_test=16, input_dim=4),
        model=ModelConfig(depth=1, widths=(8, 16), base_width=8, **model),
        train=TrainConfig(steps=5, seeds=(0,), log_points=3),
        paths=("exact", "linear"), metrics=("loss", "weight_change", "feature_change"))


def test_factors_are_cells_of_one_study_and_a_study_grows_along_them(tmp_path):
    """Each parameterization is a cell with its own records column; adding one to a
    finished study computes only its cells, and its ntk cells equal a plain ntk study's."""
    from ntk_tickets.results import load_records
    from ntk_tickets.study import run_study

    run_study(_tiny(), tmp_path / "s", log=lambda _: None)
    both = _tiny(parameterization=("ntk", "mup"))
    report = run_study(both, tmp_path / "s", log=lambda _: None)
    assert report.skipped == ["w00008_ntk_os1_s0", "w00016_ntk_os1_s0"]
    assert report.computed == ["w00008_mup_os1_s0", "w00016_mup_os1_s0"]
    grown = load_records(tmp_path / "s")
    fresh = run_study(both, tmp_path / "fresh", log=lambda _: None)
    assert len(fresh.computed) == 4
    together = load_records(tmp_path / "fresh")
    key = ["parameterization", "width", "path", "metric", "split", "step"]
    np.testing.assert_array_equal(grown.sort_values(key)["value"],
                                  together.sort_values(key)["value"])
    assert set(grown["parameterization"]) == {"ntk", "mup"}
    assert set(grown["output_scale"]) == {1.0}
    # At the base width µP is the ntk network.
    at_base = grown[grown.width == 8].pivot_table(index=key[1:], columns="parameterization",
                                                  values="value")
    np.testing.assert_array_equal(at_base["ntk"], at_base["mup"])


@pytest.mark.parametrize("version", [2, 3])
def test_an_older_folder_is_read_and_grown(tmp_path, version):
    """A folder of an older results format keeps its numbers and grows: format 2 (before
    factors were cells: its parameterization in the config) gets the factor columns from its
    config, and formats 2 and 3 get the escape-test columns at their defaults."""
    import json

    import pandas as pd

    from ntk_tickets.results import FACTOR_COLUMNS, FORMAT_VERSION, load_records
    from ntk_tickets.study import run_study

    folder = tmp_path / "old"
    run_study(_tiny(parameterization="standard"), folder, log=lambda _: None)
    before = load_records(folder)
    # Turn it into what that format wrote: format 2 had no factor columns or entries and
    # other cell ids; neither had the escape columns.
    dropped = ["embedding", "added", "mu"] + (list(FACTOR_COLUMNS) if version == 2 else [])
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["format_version"] = version
    if version == 3:  # a factor as a list, as format 3 writes a config that varies it
        manifest["config"]["model"]["output_scale"] = [1.0]
    for cid in list(manifest["cells"]):
        entry = manifest["cells"].pop(cid)
        old_id = cid
        if version == 2:
            for column in FACTOR_COLUMNS:
                del entry[column]
            old_id = cid.replace("_standard_os1", "")
        manifest["cells"][old_id] = entry
        frame = pd.read_parquet(folder / "cells" / f"{cid}.parquet").drop(columns=dropped)
        (folder / "cells" / f"{cid}.parquet").unlink()
        frame.to_parquet(folder / "cells" / f"{old_id}.parquet")
    pd.read_parquet(folder / "records.parquet").drop(columns=dropped).to_parquet(
        folder / "records.parquet")
    (folder / "manifest.json").write_text(json.dumps(manifest))

    read = load_records(folder)
    assert set(read["parameterization"]) == {"standard"}
    assert set(read["embedding"]) == {"none"} and set(read["added"]) == {0}
    assert read["mu"].isna().all()
    pd.testing.assert_series_equal(read["value"], before["value"])
    report = run_study(_tiny(parameterization=("standard", "mup")), folder, log=lambda _: None)
    old_ids = (["w00008_s0", "w00016_s0"] if version == 2
               else ["w00008_standard_os1_s0", "w00016_standard_os1_s0"])
    assert report.skipped == old_ids
    assert report.computed == ["w00008_mup_os1_s0", "w00016_mup_os1_s0"]
    grown = load_records(folder)
    assert grown.groupby("parameterization").size().to_dict() == {
        "standard": len(before), "mup": len(before)}
    assert json.loads((folder / "manifest.json").read_text())["format_version"] == (
        FORMAT_VERSION)


def test_a_ticket_study_runs_under_each_parameterization_and_keeps_its_masks(tmp_path):
    """Tickets accept the regime knobs: the IMP search trains µP's function with its rates,
    and the masks of each parameterization are kept apart (load_masks picks by factor)."""
    from ntk_tickets import UserInputError
    from ntk_tickets.config import TicketsConfig
    from ntk_tickets.results import load_masks, load_records
    from ntk_tickets.study import run_study

    cfg = StudyConfig(
        data=DataConfig(name="teacher", n_train=16, n_test=16, input_dim=4),
        model=ModelConfig(depth=1, widths=(16,), base_width=8,
                          parameterization=("ntk", "mup")),
        train=TrainConfig(steps=5, seeds=(0,), log_points=3),
        tickets=TicketsConfig(rounds=1, prune_fraction=0.5, search_path="both",
                              controls=("random",)),
        paths=("exact", "linear"), metrics=("loss",))
    run_study(cfg, tmp_path, log=lambda _: None)
    records = load_records(tmp_path)
    imp = records[(records["mask"] == "imp") & (records["metric"] == "loss")]
    assert set(imp["parameterization"]) == {"ntk", "mup"}
    masks = {p: load_masks(tmp_path, 16, "imp", 1, 0, parameterization=p) for p in ("ntk", "mup")}
    differ = [not np.array_equal(a, b) for a, b in zip(
        jax.tree_util.tree_leaves(masks["ntk"]), jax.tree_util.tree_leaves(masks["mup"]),
        strict=True)]
    assert any(differ)  # µP trains differently above its base width, so IMP prunes differently
    with pytest.raises(UserInputError, match="several factor values"):
        load_masks(tmp_path, 16, "imp", 1, 0)


def test_the_run_says_which_closed_forms_mup_skips(tmp_path):
    from ntk_tickets.results import load_records
    from ntk_tickets.study import run_study

    cfg = dataclasses.replace(_tiny(parameterization=("ntk", "mup")),
                              paths=("exact", "ntk"), metrics=("loss",))
    lines = []
    run_study(cfg, tmp_path, log=lines.append)
    assert any("ntk are skipped in the mup cells" in line for line in lines)
    records = load_records(tmp_path)
    assert set(records[records.path == "ntk"]["parameterization"]) == {"ntk"}


def test_seeds_are_not_added_to_a_width_whose_cell_records_an_ensemble(tmp_path):
    """An ensemble metric averages over one cell's seeds: a second cell at the same width
    would hold another ensemble, so adding seeds there is refused, naming what to do, and
    the folder is left as it was."""
    from ntk_tickets import UserInputError
    from ntk_tickets.study import run_study

    cfg = dataclasses.replace(_tiny(), metrics=("loss", "ensemble_loss"))
    run_study(cfg, tmp_path, log=lambda _: None)
    before = sorted(p.name for p in (tmp_path / "cells").iterdir())
    grown = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seeds=(0, 1)))
    with pytest.raises(UserInputError, match=r"ensemble_loss average\(s\) over the seeds "
                                             r"of one cell, and width 8 already has seeds \[0\]"):
        run_study(grown, tmp_path, log=lambda _: None)
    assert sorted(p.name for p in (tmp_path / "cells").iterdir()) == before
