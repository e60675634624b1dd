"""Paired width studies: every path on the same data, initialization, optimizer and steps.

:func:`run_paired_width` runs one *cell* (one width, all seeds vmapped) and returns tidy
records (one row per measured value; columns as in :data:`ntk_tickets.results.RECORD_COLUMNS`)
plus the cell's status and timings. The paths:

* ``exact`` and ``linear``: trained by :mod:`ntk_tickets.training`;
* ``entk``: the closed-form trajectory of the linearized network under gradient flow on the
  empirical NTK at θ0 (MSE only);
* ``ntk`` and ``nngp``: the infinite-width ensemble means (MSE only).

Cross-entropy has no closed forms by design: for ``train.loss = "xent"`` the ``entk``,
``ntk`` and ``nngp`` paths are skipped (the linear path covers the tangent-space picture).

Metrics (names from DESIGN.md §4): ``loss``/``accuracy`` (train, test) for every path;
``function_gap`` (test RMSE against ``exact``) for the others; ``weight_change`` and
``weight_change/<layer>`` (relative) for exact and linear; ``ntk_change`` (probe, every
recorded step, exact path: the linear path's tangent kernel never changes);
``ntk_init_error`` (probe, step 0); ``variance`` (test, the
infinite-width ensemble's predictive variance averaged over test points) for ntk and nngp.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ntk_tickets import kernels, masks
from ntk_tickets.config import StudyConfig
from ntk_tickets.data import Dataset
from ntk_tickets.linear import linearize
from ntk_tickets.models import Model, build_model, parameter_count
from ntk_tickets.training import (
    LOSSES,
    TrainingProgram,
    Trajectory,
    batch_order,
    log_spaced_steps,
)

DIVERGENCE_FACTOR = 1e3  # a loss this many times its initial value (+1) counts as diverged


@dataclasses.dataclass
class CellResult:
    """Records and bookkeeping of one cell (one width, all seeds)."""

    rows: list[dict[str, Any]]
    status: str
    compile_s: float
    run_s: float
    info: dict[str, Any]


def _loss(f: np.ndarray, y: np.ndarray, loss: str) -> np.ndarray:
    """The training loss of outputs ``f`` (..., n, k) against targets ``y``, per leading index."""
    loss_fn = LOSSES[loss]
    for _ in range(f.ndim - 2):
        loss_fn = jax.vmap(loss_fn, in_axes=(0, None))
    return np.asarray(loss_fn(jnp.asarray(f), jnp.asarray(y)))


def _accuracy(f: np.ndarray, y: np.ndarray) -> np.ndarray:
    labels = y.argmax(-1) if y.ndim == 2 else y
    return np.mean(f.argmax(-1) == labels, axis=-1)


def _rmse(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):  # diverged outputs give inf/NaN rows
        return np.sqrt(np.mean((a - b) ** 2, axis=(-2, -1)))


def _first_divergence(losses: np.ndarray, steps: np.ndarray) -> int | None:
    """The first recorded step whose loss is non-finite or blew up; None if none did."""
    bad = ~np.isfinite(losses) | (losses > DIVERGENCE_FACTOR * (abs(losses[0]) + 1.0))
    return int(steps[np.argmax(bad)]) if bad.any() else None


def _path_rows(path: str, seeds, steps, data: Dataset, loss: str, f_train, f_test,
               f_test_exact) -> list[dict[str, Any]]:
    """Loss, accuracy and (against exact) function gap rows for outputs (s, r, n, k)."""
    rows = []
    per_split = {"train": (f_train, data.y_train), "test": (f_test, data.y_test)}
    for split, (f, y) in per_split.items():
        values = {"loss": _loss(f, y, loss)}
        if data.n_classes:
            values["accuracy"] = _accuracy(f, y)
        for metric, v in values.items():
            rows += _grid_rows(path, seeds, steps, split, metric, v)
    if f_test_exact is not None and path != "exact":
        rows += _grid_rows(path, seeds, steps, "test", "function_gap", _rmse(f_test, f_test_exact))
    return rows


def _grid_rows(path, seeds, steps, split, metric, values) -> list[dict[str, Any]]:
    """Rows for a (seeds, steps) array of values."""
    return [
        {"seed": int(seed), "path": path, "step": int(step), "split": split, "metric": metric,
         "value": float(values[i, j])}
        for i, seed in enumerate(seeds) for j, step in enumerate(steps)
    ]


def _weight_change_rows(path, seeds, steps, model: Model, trajectory) -> list[dict[str, Any]]:
    sq_change = np.asarray(trajectory.sq_change)  # (s, r, layers)
    sq_norm0 = np.asarray(trajectory.sq_norm0)  # (s, layers)
    total = np.sqrt(sq_change.sum(-1) / sq_norm0.sum(-1)[:, None])
    rows = _grid_rows(path, seeds, steps, "none", "weight_change", total)
    for i, name in enumerate(model.layer_names):
        per_layer = np.sqrt(sq_change[..., i] / sq_norm0[:, None, i])
        rows += _grid_rows(path, seeds, steps, "none", f"weight_change/{name}", per_layer)
    return rows


def _unstack(tree, i):
    return jax.tree_util.tree_map(lambda leaf: leaf[i], tree)


@dataclasses.dataclass(frozen=True)
class CellSetup:
    """What every path, round and mask of one cell (one width, all seeds) shares.

    Attributes:
      model: the network at this width.
      seeds: (s,) the seeds.
      params0: θ0, stacked over seeds.
      data: ``x_train``, ``y_train``, ``x_test``, ``x_probe`` as JAX arrays.
      steps: (r,) the recorded steps (log-spaced, plus the rewind step of ticket studies).
      batches: (s, steps, batch_size) minibatch indices, or (s, 0, 0) for full batch.
      mask_keys: (s, 2) per-seed PRNG keys for masks, controls and perturbations.
    """

    model: Model
    seeds: np.ndarray
    params0: Any
    data: dict[str, jax.Array]
    steps: np.ndarray
    batches: jax.Array
    mask_keys: jax.Array


def setup_cell(cfg: StudyConfig, data: Dataset, width: int) -> CellSetup:
    """Builds the model and draws θ0, batch orders and mask keys, one PRNG role each."""
    model = build_model(cfg.model, width, data.input_shape, data.n_out)
    seeds = np.asarray(cfg.train.seeds)
    init_keys, order_keys, mask_keys = jnp.moveaxis(
        jax.vmap(lambda s: jax.random.split(jax.random.PRNGKey(s), 3))(seeds), 1, 0)
    steps = log_spaced_steps(cfg.train.steps, cfg.train.log_points)
    if cfg.tickets is not None:
        steps = np.union1d(steps, [cfg.tickets.rewind_step])
    if cfg.train.batch_size:
        batches = jax.vmap(batch_order, in_axes=(0, None, None, None))(
            order_keys, len(data.x_train), cfg.train.batch_size, cfg.train.steps)
    else:
        batches = jnp.zeros((len(seeds), 0, 0), dtype=jnp.int32)
    arrays = {name: jnp.asarray(a) for name, a in (
        ("x_train", data.x_train), ("y_train", data.y_train), ("x_test", data.x_test),
        ("x_probe", data.x_train[: cfg.probe_size]))}
    return CellSetup(model, seeds, jax.vmap(model.init)(init_keys), arrays, steps, batches,
                     mask_keys)


def training_programs(cfg: StudyConfig, model: Model,
                      steps: np.ndarray) -> dict[str, TrainingProgram]:
    """One :class:`TrainingProgram` per trained path in ``cfg.paths`` (exact, linear).

    The exact program records the probe NTK when ``ntk_change`` is a metric; the linear
    path's tangent kernel is the one at its start by construction, so it records none.
    """
    programs = {}
    if "exact" in cfg.paths:
        probe = None
        if "ntk_change" in cfg.metrics:
            probe = functools.partial(kernels.probe_ntk, model.apply_fn)
        programs["exact"] = TrainingProgram(lambda p, p0, x: model.apply_fn(p, x), cfg.train,
                                            steps, probe_kernel_fn=probe)
    if "linear" in cfg.paths:
        programs["linear"] = TrainingProgram(linearize(model.apply_fn), cfg.train, steps)
    return programs


def trajectory_rows(path: str, setup: CellSetup, traj: Trajectory, data: Dataset,
                    cfg: StudyConfig, f_test_exact: np.ndarray | None) -> list[dict[str, Any]]:
    """Records of one trained path: loss, accuracy, function gap (against ``f_test_exact``,
    outputs (s, r, n_test, k) of the exact path with the same mask), weight change and
    NTK change, each only if ``cfg.metrics`` lists it."""
    seeds, steps = setup.seeds, setup.steps
    rows = _path_rows(path, seeds, steps, data, cfg.train.loss, np.asarray(traj.f_train),
                      np.asarray(traj.f_test),
                      f_test_exact if "function_gap" in cfg.metrics else None)
    if "weight_change" in cfg.metrics:
        rows += _weight_change_rows(path, seeds, steps, setup.model, traj)
    if traj.probe_kernel is not None:  # (s, r, m, m): K_t against K_0, per seed and step
        change = jax.vmap(jax.vmap(kernels.relative_frobenius, in_axes=(0, None)))(
            traj.probe_kernel, traj.probe_kernel[:, 0])
        rows += _grid_rows(path, seeds, steps, "probe", "ntk_change", np.asarray(change))
    return [r for r in rows if r["metric"].split("/")[0] in cfg.metrics]


@dataclasses.dataclass
class DenseCell:
    """The dense networks of one cell, trained on every path, with their records.

    ``programs`` and ``trajectories`` (per trained path) are what ticket procedures
    continue from; ``extra_s`` counts the seconds spent outside the training programs.
    """

    setup: CellSetup
    programs: dict[str, TrainingProgram]
    trajectories: dict[str, Trajectory]
    rows: list[dict[str, Any]]
    info: dict[str, Any]
    extra_s: float


def run_dense(cfg: StudyConfig, data: Dataset, width: int) -> DenseCell:
    """Trains the dense exact and linear paths and evaluates the closed forms at one width.

    In a ticket study (``cfg.tickets`` set) the dense networks go through the masked
    program with an all-ones mask and record the rewind step, so that the same compiled
    program serves every later round, mask and perturbation.
    """
    setup = setup_cell(cfg, data, width)
    programs = training_programs(cfg, setup.model, setup.steps)
    seeds, steps = setup.seeds, setup.steps
    dense_mask = None if cfg.tickets is None else masks.ones_like(setup.params0)
    rewind_step = 0 if cfg.tickets is None else cfg.tickets.rewind_step
    trajectories = {path: program(setup.params0, setup.data, setup.batches, dense_mask,
                                  rewind_step) for path, program in programs.items()}
    info: dict[str, Any] = {"diverged_step": {
        path: divergence_by_seed(seeds, steps, np.asarray(traj.f_train), data.y_train,
                                  cfg.train.loss)
        for path, traj in trajectories.items()}}
    info["n_params"] = parameter_count(_unstack(setup.params0, 0))

    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    outputs = {}
    if cfg.train.loss == "mse":
        outputs, variances = _closed_form_outputs(cfg, setup, steps)
        for path, variance in variances.items():
            rows += _grid_rows(path, seeds, steps, "test", "variance",
                               np.broadcast_to(variance, (len(seeds), len(steps))))
    if "ntk_init_error" in cfg.metrics:
        values = [[kernels.ntk_init_error(setup.model.apply_fn, setup.model.kernel_fn,
                                          _unstack(setup.params0, i), setup.data["x_probe"])]
                  for i in range(len(seeds))]
        rows += _grid_rows("exact", seeds, [0], "probe", "ntk_init_error", np.asarray(values))
    f_test_exact = (np.asarray(trajectories["exact"].f_test) if "exact" in trajectories
                    else None)
    for path, (f_train, f_test) in outputs.items():
        rows += _path_rows(path, seeds, steps, data, cfg.train.loss, f_train, f_test,
                           f_test_exact if "function_gap" in cfg.metrics else None)
    rows = [r for r in rows if r["metric"].split("/")[0] in cfg.metrics]
    for path, traj in trajectories.items():
        rows += trajectory_rows(path, setup, traj, data, cfg, f_test_exact)
    return DenseCell(setup, programs, trajectories, rows, info, time.perf_counter() - start)


def finish_cell(cell: DenseCell, width: int) -> CellResult:
    """The cell's :class:`CellResult`: rows stamped with ``width``, status and timings."""
    for row in cell.rows:
        row["width"] = width
    diverged = any(v for per_seed in cell.info["diverged_step"].values()
                   for v in per_seed.values())
    compile_s = sum(p.compile_s for p in cell.programs.values())
    run_s = cell.extra_s + sum(p.run_s for p in cell.programs.values())
    return CellResult(cell.rows, "diverged" if diverged else "done", compile_s, run_s,
                      cell.info)


def run_paired_width(cfg: StudyConfig, data: Dataset, width: int) -> CellResult:
    """Runs every configured path at one width for all seeds (one compile per path).

    Args:
      cfg: the study config; ``cfg.paths`` and ``cfg.metrics`` select what is run and kept.
      data: the dataset (float64 numpy arrays; cast to the active JAX dtype here).
      width: hidden units (MLPs) or channels (CNNs).

    Returns:
      A :class:`CellResult` with records, ``status`` ``"done"`` or ``"diverged"``, the
      summed compile and run seconds, and ``info`` (per-path divergence steps, parameter
      count).
    """
    return finish_cell(run_dense(cfg, data, width), width)


def divergence_by_seed(seeds, steps, f_train, y_train, loss) -> dict[str, int | None]:
    """Per seed, the first recorded step at which the training loss diverged, or None."""
    losses = _loss(f_train, y_train, loss)  # (s, r)
    return {str(s): _first_divergence(losses[i], steps) for i, s in enumerate(seeds)}


def _closed_form_outputs(cfg: StudyConfig, setup: CellSetup, steps: np.ndarray):
    """Outputs (s, r, n, k) of the entk, ntk and nngp paths that ``cfg.paths`` asks for,
    and the infinite-width ensemble variance averaged over test points, (r,) per path."""
    model, params0 = setup.model, setup.params0
    x_train, y_train, x_test = (setup.data[k] for k in ("x_train", "y_train", "x_test"))
    out, variances = {}, {}
    if "entk" in cfg.paths:
        per_seed = [kernels.empirical_ntk_predictions(
            model.apply_fn, _unstack(params0, i), x_train, y_train, x_test,
            cfg.train.learning_rate, steps) for i in range(len(cfg.train.seeds))]
        out["entk"] = tuple(np.stack([np.asarray(p[j]) for p in per_seed]) for j in (0, 1))
    infinite = [p for p in ("ntk", "nngp") if p in cfg.paths]
    if infinite:
        predictions = kernels.infinite_width_predictions(
            model.kernel_fn, x_train, y_train, x_test, cfg.train.learning_rate, steps,
            get=tuple(infinite))
        n_seeds = len(cfg.train.seeds)
        for path in infinite:
            mean_train, mean_test, var_test = predictions[path]
            out[path] = tuple(np.broadcast_to(np.asarray(m), (n_seeds, *m.shape))
                              for m in (mean_train, mean_test))
            variances[path] = np.asarray(var_test).mean(axis=-1)
    return out, variances
