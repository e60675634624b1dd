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
They are skipped under ``model.parameterization = "mup"`` too (no rows): the infinite-width
limit of µP is not a kernel (its features keep learning; Yang & Hu 2021) and its per-layer
learning rates make the linearized model's kernel differ from the empirical NTK.

The closed forms use ``train.ridge`` as neural-tangents' ``diag_reg`` (relative to the
kernel's mean diagonal) and the cell's output scale α and centring (the trained function
α·f, or α·(f − f0), at learning rate η/α²: same kernel and η, initial outputs α·f0 or 0,
ensemble variance ×α² or 0; :mod:`ntk_tickets.kernels`). With ``train.closed_form_time =
"inf"`` they are evaluated at t → ∞ and recorded at the study's last step only
(:func:`closed_form_steps`), next to the trained paths' final values.

Metrics (names from DESIGN.md §4): ``loss``/``accuracy`` (train, test) for every path;
``function_gap`` (test RMSE against ``exact``) for the others; ``weight_change`` and
``weight_change/<layer>`` (relative) for exact and linear; ``ntk_change`` (probe, every
recorded step, exact path: the linear path's tangent kernel never changes);
``ntk_init_error`` (probe, step 0); ``variance`` (test, the
infinite-width ensemble's predictive variance averaged over test points) and
``expected_loss`` (test, the loss averaged over initializations) for ntk and nngp;
``ensemble_loss`` and ``ensemble_accuracy`` (train, test; the outputs averaged over the
cell's seeds, recorded with seed −1) for exact, linear and entk.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ntk_tickets import kernels, masks, metrics, regimes
from ntk_tickets.config import StudyConfig, rewind_steps
from ntk_tickets.data import Dataset
from ntk_tickets.linear import linearize
from ntk_tickets.models import Model, build_model, parameter_count
from ntk_tickets.optimizers import LOSSES
from ntk_tickets.training import (
    TrainingProgram,
    Trajectory,
    batch_order,
    log_spaced_steps,
    map_seeds,
    seeds_in_parallel,
)


@dataclasses.dataclass
class CellResult:
    """Records and bookkeeping of one cell (one width, all seeds); ``arrays`` are kept with
    the cell's results (ticket masks, :func:`ntk_tickets.results.mask_arrays`)."""

    rows: list[dict[str, Any]]
    status: str
    compile_s: float
    run_s: float
    info: dict[str, Any]
    arrays: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


def loss_of(f: np.ndarray, y: np.ndarray, loss: str) -> np.ndarray:
    """The training loss of outputs ``f`` (..., n, k) against targets ``y``, per leading index."""
    loss_fn = LOSSES[loss]
    for _ in range(f.ndim - 2):
        loss_fn = jax.vmap(loss_fn, in_axes=(0, None))
    return np.asarray(loss_fn(jnp.asarray(f), jnp.asarray(y)))


def _first_divergence(losses: np.ndarray, steps: np.ndarray) -> int | None:
    """The first recorded step whose loss is non-finite or blew up; None if none did."""
    bad = metrics.blew_up(losses)
    return int(steps[np.argmax(bad)]) if bad.any() else None


def path_rows(outputs: metrics.PathOutputs, seeds, steps,
              names: Sequence[str]) -> list[dict[str, Any]]:
    """Records of the metrics ``names`` (registry :data:`ntk_tickets.metrics.METRICS`) that
    one path's outputs support, NaN after divergence."""
    rows = []
    for (split, metric), values in metrics.path_values(outputs, names).items():
        rows += _grid_rows(outputs.path, metrics.record_seeds(metric, seeds), steps, split,
                           metric, values)
    return rows


def _grid_rows(path, seeds, steps, split, metric, values) -> list[dict[str, Any]]:
    """Rows for a (seeds, steps) array of values."""
    return [
        {"seed": int(seed), "path": path, "step": int(step), "split": split, "metric": metric,
         "value": float(values[i, j])}
        for i, seed in enumerate(seeds) for j, step in enumerate(steps)
    ]


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
    steps = np.union1d(log_spaced_steps(cfg.train.steps, cfg.train.log_points),
                       start_points(cfg)).astype(np.int64)
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


def start_points(cfg: StudyConfig) -> list[int]:
    """The steps k whose parameters θ_k later runs start from: the rewind steps of
    ``[tickets]``, the spawn steps of ``[stability]`` and the anchor of ``[subspace]``.
    They are recorded steps, so that the training program can return θ_k."""
    points = [0]
    if cfg.tickets is not None:
        points += rewind_steps(cfg.tickets)
    if cfg.stability is not None:
        points += cfg.stability.spawn_steps
    if cfg.subspace is not None:
        points.append(cfg.subspace.start_step)
    return sorted(set(points))


def _needs(cfg: StudyConfig, need: str) -> bool:
    """Whether a metric of ``cfg.metrics`` needs ``need`` (:data:`metrics.NEEDS`)."""
    return any(need in metrics.METRICS[m].needs for m in cfg.metrics)


def training_programs(cfg: StudyConfig, model: Model,
                      steps: np.ndarray) -> dict[str, TrainingProgram]:
    """One :class:`TrainingProgram` per trained path in ``cfg.paths`` (exact, linear).

    Both train the cell's function (:func:`ntk_tickets.regimes.scaled_function`: output
    scale α, centring) with its per-parameter learning rates (µP, α;
    :func:`ntk_tickets.regimes.lr_factors`). The exact program records the probe NTK when
    ``ntk_change`` is a metric; the linear path's tangent kernel is the one at its start by
    construction, so it records none. With ``feature_change``, each records the change of
    its own last hidden features: the network's, or their linearization around θ0.
    """
    lr = regimes.lr_factors(cfg.model, cfg.train, model.width,
                            lambda w: build_model(cfg.model, w, model.input_shape,
                                                  model.n_out).init(jax.random.PRNGKey(0)))
    features = _needs(cfg, "features")

    def program(fn, feature_fn, probe=None):
        return TrainingProgram(
            regimes.scaled_function(fn, cfg.model.output_scale, cfg.model.center), cfg.train,
            steps, probe_kernel_fn=probe, feature_fn=feature_fn if features else None,
            lr_factors=lr)

    programs = {}
    if "exact" in cfg.paths:
        probe = (functools.partial(kernels.probe_ntk, model.apply_fn)
                 if _needs(cfg, "probe_kernel") else None)
        programs["exact"] = program(lambda p, p0, x: model.apply_fn(p, x),
                                    lambda p, p0, x: model.feature_fn(p, x), probe)
    if "linear" in cfg.paths:
        programs["linear"] = program(linearize(model.apply_fn), linearize(model.feature_fn))
    return programs


def outputs_of(path: str, data: Dataset, cfg: StudyConfig, f_train, f_test,
               f_test_exact: np.ndarray | None = None, traj: Trajectory | None = None,
               layer_names: Sequence[str] = ()) -> metrics.PathOutputs:
    """The :class:`~ntk_tickets.metrics.PathOutputs` of one path (outputs (s, r, n, k))."""
    return metrics.PathOutputs(
        path, np.asarray(f_train), np.asarray(f_test), data.y_train, data.y_test,
        functools.partial(loss_of, loss=cfg.train.loss), data.n_classes, f_test_exact,
        sq_change=None if traj is None else np.asarray(traj.sq_change),
        sq_norm0=None if traj is None else np.asarray(traj.sq_norm0),
        layer_names=layer_names,
        probe_kernel=(None if traj is None or traj.probe_kernel is None
                      else np.asarray(traj.probe_kernel)),
        feature_sq_change=(None if traj is None or traj.feature_sq_change is None
                           else np.asarray(traj.feature_sq_change)),
        feature_sq_norm0=(None if traj is None or traj.feature_sq_norm0 is None
                          else np.asarray(traj.feature_sq_norm0)))


def trajectory_rows(path: str, setup: CellSetup, traj: Trajectory, data: Dataset,
                    cfg: StudyConfig, f_test_exact: np.ndarray | None) -> list[dict[str, Any]]:
    """Records of one trained path: every metric of ``cfg.metrics`` that its trajectory
    supports (the function gap against ``f_test_exact``, outputs (s, r, n_test, k) of the
    exact path with the same mask)."""
    outputs = outputs_of(path, data, cfg, traj.f_train, traj.f_test, f_test_exact, traj,
                         setup.model.layer_names)
    return path_rows(outputs, setup.seeds, setup.steps, cfg.metrics)


@dataclasses.dataclass
class DenseCell:
    """The dense networks of one cell, trained on every path, with their records.

    ``programs`` and ``trajectories`` (per trained path) are what ticket procedures
    continue from; ``extra_programs`` are the other training programs the cell compiles
    (subspace training); ``extra_s`` counts the seconds spent outside the training
    programs.
    """

    setup: CellSetup
    programs: dict[str, TrainingProgram]
    trajectories: dict[str, Trajectory]
    rows: list[dict[str, Any]]
    info: dict[str, Any]
    extra_s: float
    first_rewind: int = 0
    extra_programs: list[TrainingProgram] = dataclasses.field(default_factory=list)
    _rewind: dict[tuple[str, int], Any] = dataclasses.field(default_factory=dict)

    def all_programs(self) -> list[TrainingProgram]:
        """The paths' programs and the others the cell compiled (subspace, snapshots)."""
        return [*self.programs.values(), *self.extra_programs]

    def rewind_point(self, path: str, step: int) -> Any:
        """θ_k of the dense run on ``path`` at recorded step k, stacked over seeds.

        The dense run returns θ_k of one step; another k trains the dense network again
        with the same compiled program (the rewind step is an argument), once per k.
        """
        dense = self.trajectories[path]
        if step == self.first_rewind:
            return dense.params_rewind
        if (path, step) not in self._rewind:
            mask = masks.ones_like(self.setup.params0)
            self._rewind[path, step] = self.programs[path](
                self.setup.params0, self.setup.data, self.setup.batches, mask,
                step).params_rewind
        return self._rewind[path, step]


def run_dense(cfg: StudyConfig, data: Dataset, width: int) -> DenseCell:
    """Trains the dense exact and linear paths and evaluates the closed forms at one width.

    In a ticket, stability or subspace study the dense networks go through the masked
    program with an all-ones mask and record the (first) rewind step, so that the same
    compiled program serves every later round, mask, perturbation and child.
    """
    setup = setup_cell(cfg, data, width)
    programs = training_programs(cfg, setup.model, setup.steps)
    seeds, steps = setup.seeds, setup.steps
    dense_mask = masks.ones_like(setup.params0) if _continued(cfg) else None
    rewind_step = rewind_steps(cfg.tickets)[0] if cfg.tickets is not None else 0
    trajectories = {path: program(setup.params0, setup.data, setup.batches, dense_mask,
                                  rewind_step) for path, program in programs.items()}
    info: dict[str, Any] = {"diverged_step": {
        path: divergence_by_seed(seeds, steps, np.asarray(traj.f_train), data.y_train,
                                  cfg.train.loss)
        for path, traj in trajectories.items()}}
    info["n_params"] = parameter_count(_unstack(setup.params0, 0))

    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    if "ntk_init_error" in cfg.metrics:
        values = [[kernels.ntk_init_error(setup.model.apply_fn, setup.model.kernel_fn,
                                          _unstack(setup.params0, i), setup.data["x_probe"],
                                          cache=setup.model.cache)]
                  for i in range(len(seeds))]
        rows += _grid_rows("exact", seeds, [0], "probe", "ntk_init_error", np.asarray(values))
    if "params_per_target" in cfg.metrics:
        ratio = info["n_params"] / (len(data.x_train) * data.n_out)
        rows += _grid_rows("exact", seeds, [0], "none", "params_per_target",
                           np.full((len(seeds), 1), ratio))
    f_test_exact = (np.asarray(trajectories["exact"].f_test) if "exact" in trajectories
                    else None)
    closed_steps = closed_form_steps(cfg, steps)
    for outputs in closed_form_outputs(cfg, setup, data, f_test_exact).values():
        rows += path_rows(outputs, seeds, closed_steps, cfg.metrics)
        info["diverged_step"][outputs.path] = divergence_by_seed(
            seeds, closed_steps, outputs.f_train, data.y_train, cfg.train.loss)
    for path, traj in trajectories.items():
        rows += trajectory_rows(path, setup, traj, data, cfg, f_test_exact)
    return DenseCell(setup, programs, trajectories, rows, info, time.perf_counter() - start,
                     rewind_step)


def _continued(cfg: StudyConfig) -> bool:
    """Whether later runs continue from the dense networks (tickets, stability, subspace):
    then the dense networks go through the masked program, which all of them share."""
    return any(s is not None for s in (cfg.tickets, cfg.stability, cfg.subspace))


def finish_cell(cell: DenseCell, width: int) -> CellResult:
    """The cell's :class:`CellResult`: rows stamped with ``width``, status and timings."""
    for row in cell.rows:
        row["width"] = width
    diverged = any(v is not None for per_seed in cell.info["diverged_step"].values()
                   for v in per_seed.values())
    compile_s = sum(p.compile_s for p in cell.all_programs())
    run_s = cell.extra_s + sum(p.run_s for p in cell.all_programs())
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
    losses = loss_of(f_train, y_train, loss)  # (s, r)
    return {str(s): _first_divergence(losses[i], steps) for i, s in enumerate(seeds)}


def has_closed_forms(cfg: StudyConfig) -> bool:
    """Whether the cell runs the closed-form paths it asks for: MSE loss and not µP (module
    docstring)."""
    return cfg.train.loss == "mse" and cfg.model.parameterization != "mup"


def closed_form_steps(cfg: StudyConfig, steps: np.ndarray) -> np.ndarray:
    """The steps at which the closed forms are recorded: the recorded ``steps`` (r,), or
    only the last one for ``train.closed_form_time = "inf"`` (their t → ∞ values, so that
    final-step tables pair them with the trained paths' final values)."""
    return steps[-1:] if cfg.train.closed_form_time == "inf" else steps


def closed_form_outputs(cfg: StudyConfig, setup: CellSetup, data: Dataset,
                         f_test_exact: np.ndarray | None) -> dict[str, metrics.PathOutputs]:
    """The outputs (s, r', n, k) of the entk, ntk and nngp paths that ``cfg.paths`` asks for
    (none without :func:`has_closed_forms`), r' the :func:`closed_form_steps`.

    All use ``train.ridge`` (neural-tangents' relative ``diag_reg``) and the cell's output
    scale and centring; ntk and nngp carry their predictive variance per test point.
    ``f_test_exact`` (s, r, n_test, k) is the exact path at every recorded step, or None.
    """
    if not has_closed_forms(cfg):
        return {}
    model, params0, steps = setup.model, setup.params0, setup.steps
    x_train, y_train, x_test = (setup.data[k] for k in ("x_train", "y_train", "x_test"))
    times = None if cfg.train.closed_form_time == "inf" else steps
    options = dict(diag_reg=cfg.train.ridge, output_scale=cfg.model.output_scale,
                   center=cfg.model.center)
    n_seeds = len(setup.seeds)
    if f_test_exact is not None:  # the exact path at the closed forms' steps
        f_test_exact = f_test_exact[:, np.isin(steps, closed_form_steps(cfg, steps))]

    def outputs(path, f_train, f_test, test_variance=None):
        return dataclasses.replace(
            outputs_of(path, data, cfg, f_train, f_test, f_test_exact),
            test_variance=test_variance)

    out = {}
    if "entk" in cfg.paths:
        budget = kernels.NTK_MAX_BYTES // (n_seeds if seeds_in_parallel() else 1)
        out["entk"] = outputs("entk", *(np.asarray(f) for f in map_seeds(
            lambda p: kernels.empirical_ntk_predictions(
                model.apply_fn, p, x_train, y_train, x_test, cfg.train.learning_rate, times,
                cache=model.cache, max_bytes=budget, **options),
            params0)))
    infinite = [p for p in ("ntk", "nngp") if p in cfg.paths]
    if infinite:
        predictions = kernels.infinite_width_predictions(
            model.kernel_fn, x_train, y_train, x_test, cfg.train.learning_rate, times,
            get=tuple(infinite), **options)
        for path in infinite:
            out[path] = outputs(path, *(np.broadcast_to(np.asarray(a), (n_seeds, *a.shape))
                                        for a in predictions[path]))
    return out
