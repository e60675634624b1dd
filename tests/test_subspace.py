"""Subspace training (ntk_tickets.subspace) against explicit matrices, full training and the
least-squares bound of the linearized network."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from jax.flatten_util import ravel_pytree

from ntk_tickets import StudyConfig, load_dataset, records_frame, with_overrides
from ntk_tickets.cells import run_width
from ntk_tickets.experiments import run_dense
from ntk_tickets.subspace import (
    fastfood_basis,
    fastfood_project,
    hadamard,
    lottery_basis,
    matrix_project,
    subspace_apply,
    top_entries,
    train_subspaces,
)
from ntk_tickets.training import TrainingProgram


def test_hadamard_is_the_orthonormal_sylvester_matrix():
    x = np.random.default_rng(0).normal(size=(3, 16))
    expected = x @ scipy.linalg.hadamard(16).T / 4.0
    np.testing.assert_allclose(hadamard(jnp.asarray(x)), expected, atol=1e-5)
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard(jnp.ones(12))


def test_fastfood_is_a_linear_map_with_unit_columns_in_expectation():
    """P·z equals the matrix built column by column from P·e_j; E‖P·e_j‖² = 1 (Monte Carlo
    over 64 columns and 20 draws: mean within 5 %)."""
    n_params, dim = 1000, 64
    basis = fastfood_basis(jax.random.PRNGKey(0), n_params, dim)
    columns = jax.vmap(lambda e: fastfood_project(basis, e)[:n_params])(jnp.eye(dim)).T
    z = jax.random.normal(jax.random.PRNGKey(1), (dim,))
    np.testing.assert_allclose(fastfood_project(basis, z)[:n_params], columns @ z,
                               rtol=1e-4, atol=1e-5)
    norms = [jnp.sum(jax.vmap(lambda e, b=b: fastfood_project(b, e)[:n_params])(
        jnp.eye(dim)) ** 2, axis=1).mean()
        for b in (fastfood_basis(jax.random.PRNGKey(s), n_params, dim) for s in range(20))]
    assert np.mean(norms) == pytest.approx(1.0, rel=0.05)


def test_lottery_basis_spans_a_low_rank_trajectory():
    """A trajectory moving in a 2-D plane: the top-2 directions span it, orthonormal."""
    rng = np.random.default_rng(0)
    plane = np.linalg.qr(rng.normal(size=(50, 2)))[0]
    start = rng.normal(size=50)
    snapshots = start + np.stack([plane @ rng.normal(size=2) for _ in range(8)])
    basis = lottery_basis(np.vstack([start, snapshots]), 2)
    np.testing.assert_allclose(basis.T @ basis, np.eye(2), atol=1e-12)
    np.testing.assert_allclose(basis @ (basis.T @ plane), plane, atol=1e-12)


def test_top_entries_keeps_exactly_d_prunable_entries():
    params = [(np.zeros((3, 4)), np.zeros(4)), (np.zeros((4, 2)), np.zeros(2))]
    scores = jax.tree_util.tree_map(lambda a: np.arange(a.size).reshape(a.shape) + 0.0,
                                    params)
    prunable = [(True, False), (True, False)]
    mask = top_entries(scores, prunable, 5)
    assert sum(int(np.sum(m)) for m in jax.tree_util.tree_leaves(mask)) == 5
    assert not mask[0][1].any() and not mask[1][1].any()


def _cfg(*overrides):
    return with_overrides(StudyConfig(), [
        "data.name='digits'", "data.n_train=32", "data.n_test=32", "train.steps=20",
        "train.learning_rate=0.5", "train.log_points=3", "train.seeds=[0, 1]",
        "paths=['exact','linear']", "metrics=['loss','accuracy','function_gap']",
        "probe_size=4", *overrides])


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("x64", [False, True])
def test_the_whole_space_reproduces_full_training(optimizer, x64):
    """θ = θ0 + I·z with all D directions is full training: the subspace program (the
    anchor riding along, frozen and cut from the gradient) gives the dense network's
    outputs, for SGD and Adam."""
    lr = 0.5 if optimizer == "sgd" else 0.01
    cfg = _cfg(f"train.optimizer='{optimizer}'", f"train.learning_rate={lr}",
               "subspace.dims=[4]")
    with jax.enable_x64(x64):
        data = load_dataset(cfg.data, cfg.train.loss)
        cell = run_dense(cfg, data, 8)
        setup = cell.setup
        flat = jax.vmap(lambda t: ravel_pytree(t)[0])(setup.params0)
        _, unravel = ravel_pytree(jax.tree_util.tree_map(lambda a: a[0], setup.params0))
        n_params = flat.shape[1]
        basis = jnp.broadcast_to(jnp.eye(n_params, dtype=flat.dtype),
                                 (2, n_params, n_params))
        apply = subspace_apply(setup.model.apply_fn, unravel, matrix_project)
        program = TrainingProgram(lambda p, p0, x: apply(p, x), cfg.train, setup.steps)
        start = (jnp.zeros_like(flat), (flat, basis))
        frozen = jax.tree_util.tree_map(jnp.zeros_like, start[1])
        traj = program(start, setup.data, setup.batches, (jnp.ones_like(flat), frozen))
    tol = 1e-10 if x64 else 2e-5
    dense = cell.trajectories["exact"]
    scale = float(np.abs(np.asarray(dense.f_test)).max())
    np.testing.assert_allclose(traj.f_test, dense.f_test, atol=tol * scale)
    np.testing.assert_allclose(traj.f_train, dense.f_train, atol=tol * scale)


def test_linear_subspace_fits_exactly_only_from_n_times_k_dimensions():
    """On the linear path with MSE, training z in θ0 + P·z is least squares in the n·k
    residuals through J·P: below d = n·k the loss cannot go under the least-squares residual
    (computed here from the explicit Jacobian and P), from d = n·k on it can fit (bound 0),
    and at d = 2·n·k training reaches it."""
    cfg = with_overrides(StudyConfig(), [
        "data.name='teacher'", "data.n_train=6", "data.n_test=8", "data.input_dim=3",
        "train.steps=4000", "train.learning_rate=0.1", "train.optimizer='adam'",
        "train.log_points=2", "train.seeds=[0]", "train.x64=true", "paths=['exact','linear']",
        "metrics=['loss']", "probe_size=4", "subspace.kinds=['gaussian']",
        "subspace.dims=[3, 6, 12]", "subspace.learning_rate=0.1"])
    with jax.enable_x64(True):
        data = load_dataset(cfg.data, cfg.train.loss)
        cell = run_dense(cfg, data, 8)
        runs = {(d, path): traj for _, d, path, traj in train_subspaces(cfg, cell)}
        theta0 = jax.tree_util.tree_map(lambda a: a[0], cell.setup.params0)
        flat, unravel = ravel_pytree(theta0)
        apply = cell.setup.model.apply_fn
        jac = jax.jacobian(lambda v: apply(unravel(v), data.x_train).reshape(-1))(flat)
        residual0 = (np.asarray(data.y_train) - np.asarray(apply(theta0, data.x_train))
                     ).reshape(-1)
        key = jax.random.fold_in(cell.setup.mask_keys[0], 18)
        basis = fastfood_basis(key, flat.shape[0], 12)
        projection = np.asarray(jax.vmap(lambda e: fastfood_project(basis, e)[:flat.shape[0]])(
            jnp.eye(basis["signs"].shape[-1]))).T
    n_targets = residual0.size  # n·k = 6
    bounds = {}
    for d in (3, 6, 12):
        a = np.asarray(jac) @ projection[:, :d]
        z, *_ = np.linalg.lstsq(a, residual0, rcond=None)
        bound = 0.5 * np.mean((residual0 - a @ z) ** 2)
        f = np.asarray(runs[d, "linear"].f_train)[0, -1]
        trained = 0.5 * np.mean((f - np.asarray(data.y_train)) ** 2)
        assert trained >= bound * (1 - 1e-6) - 1e-14
        bounds[d] = bound
        if d < n_targets:
            assert bound > 1e-4 and trained == pytest.approx(bound, rel=1e-6)  # reached
        else:
            assert bound < 1e-20
    assert trained < 1e-3 * bounds[3]  # d = 2·n·k: trained to a fit


def test_subspace_study_records_kind_and_dimension():
    """Every kind and d has loss and accuracy rows with its own columns; axis_imp at a
    round's kept count is that round's IMP mask; larger random subspaces train better."""
    cfg = _cfg("train.optimizer='adam'", "train.learning_rate=0.01", "train.steps=60",
               "train.batch_size=8",
               "tickets.rounds=2", "tickets.prune_fraction=0.5", "tickets.controls=[]",
               "tickets.eval_paths=['exact']",
               "subspace.kinds=['gaussian','axis_random','axis_imp','lottery']",
               "subspace.dims=[2, 16]", "subspace.snapshots=16",
               "subspace.learning_rate=0.1")
    data = load_dataset(cfg.data, cfg.train.loss)
    frame = records_frame([{**r, "width": 8} for r in run_width(cfg, data, 8).rows])
    sub = frame[frame.experiment == "subspace"]
    assert set(sub["subspace"]) == {"gaussian", "axis_random", "axis_imp", "lottery"}
    assert set(sub["dim"]) == {2, 16} and set(sub["metric"]) >= {"loss", "accuracy"}
    assert (frame.loc[frame.experiment != "subspace", "subspace"] == "none").all()
    final = sub[(sub.step == 60) & (sub.metric == "loss") & (sub.split == "train")
                & (sub.path == "exact")]
    loss = final.groupby(["subspace", "dim"])["value"].mean()
    for kind in ("gaussian", "axis_random", "lottery"):
        assert loss[kind, 16] < loss[kind, 2]


def test_axis_imp_takes_the_masks_of_a_linear_search():
    """With tickets.search_path = 'linear' the IMP family is imp_linear: axis_imp ranks by
    its masks (d = a round's kept count is that round's mask, so all d weights are kept)."""
    cfg = _cfg("train.steps=10", "tickets.rounds=1", "tickets.prune_fraction=0.5",
               "tickets.controls=[]", "tickets.search_path='linear'",
               "tickets.eval_paths=['linear']", "subspace.kinds=['axis_imp']",
               "subspace.dims=[4]")
    data = load_dataset(cfg.data, cfg.train.loss)
    frame = records_frame([{**r, "width": 8} for r in run_width(cfg, data, 8).rows])
    assert set(frame.loc[frame.experiment == "subspace", "subspace"]) == {"axis_imp"}
