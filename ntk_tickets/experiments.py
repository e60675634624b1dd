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
``weight_change/<layer>`` (relative) for exact and linear; ``ntk_change`` (probe, final
step) for exact and linear; ``ntk_init_error`` (probe, step 0); ``variance`` (test, the
infinite-width ensemble's predictive variance averaged over test points) for ntk and nngp.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ntk_tickets import kernels
from ntk_tickets.config import StudyConfig
from ntk_tickets.data import Dataset
from ntk_tickets.linear import linearize
from ntk_tickets.models import Model, build_model, parameter_count
from ntk_tickets.training import (
    LOSSES,
    batch_order,
    log_spaced_steps,
    make_train_fn,
    run_training,
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
    model = build_model(cfg.model, width, data.input_shape, data.n_out)
    seeds = np.asarray(cfg.train.seeds)
    init_keys, order_keys = jnp.moveaxis(
        jax.vmap(lambda s: jax.random.split(jax.random.PRNGKey(s)))(seeds), 1, 0)
    params0 = jax.vmap(model.init)(init_keys)
    x_train, y_train, x_test = (jnp.asarray(a) for a in (data.x_train, data.y_train,
                                                          data.x_test))
    steps = log_spaced_steps(cfg.train.steps, cfg.train.log_points)
    if cfg.train.batch_size:
        batches = jax.vmap(batch_order, in_axes=(0, None, None, None))(
            order_keys, len(data.x_train), cfg.train.batch_size, cfg.train.steps)
    else:
        batches = jnp.zeros((len(seeds), 0, 0), dtype=jnp.int32)

    functions = {"exact": lambda p, p0, x: model.apply_fn(p, x),
                 "linear": linearize(model.apply_fn)}
    outputs, rows, info = {}, [], {"diverged_step": {}}
    compile_total = run_total = 0.0
    for path in (p for p in ("exact", "linear") if p in cfg.paths):
        train_fn = make_train_fn(functions[path], cfg.train, steps)
        traj, compile_s, run_s = run_training(train_fn, steps, params0, x_train, y_train,
                                              x_test, batches)
        compile_total, run_total = compile_total + compile_s, run_total + run_s
        outputs[path] = (np.asarray(traj.f_train), np.asarray(traj.f_test))
        if "weight_change" in cfg.metrics:
            rows += _weight_change_rows(path, seeds, steps, model, traj)
        if "ntk_change" in cfg.metrics:
            rows += _ntk_change_rows(path, seeds, steps[-1], model, traj.params, params0,
                                     x_train[: cfg.probe_size])
        info["diverged_step"][path] = _divergence_by_seed(
            seeds, steps, outputs[path][0], data.y_train, cfg.train.loss)

    start = time.perf_counter()
    if cfg.train.loss == "mse":
        closed, variances = _closed_form_outputs(cfg, model, params0, x_train, y_train,
                                                 x_test, steps)
        outputs.update(closed)
        for path, variance in variances.items():
            rows += _grid_rows(path, seeds, steps, "test", "variance",
                               np.broadcast_to(variance, (len(seeds), len(steps))))
    if "ntk_init_error" in cfg.metrics:
        values = [[kernels.ntk_init_error(model.apply_fn, model.kernel_fn,
                                          _unstack(params0, i), x_train[: cfg.probe_size])]
                  for i in range(len(seeds))]
        rows += _grid_rows("exact", seeds, [0], "probe", "ntk_init_error", np.asarray(values))
    run_total += time.perf_counter() - start

    f_test_exact = outputs["exact"][1] if "exact" in outputs else None
    for path, (f_train, f_test) in outputs.items():
        rows += _path_rows(path, seeds, steps, data, cfg.train.loss, f_train, f_test,
                           f_test_exact if "function_gap" in cfg.metrics else None)
    rows = [r for r in rows if r["metric"].split("/")[0] in cfg.metrics]
    for row in rows:
        row["width"] = width
    diverged = any(v for per_seed in info["diverged_step"].values() for v in per_seed.values())
    info["n_params"] = parameter_count(_unstack(params0, 0))
    return CellResult(rows, "diverged" if diverged else "done", compile_total, run_total, info)


def _divergence_by_seed(seeds, steps, f_train, y_train, loss) -> dict[str, int | None]:
    losses = _loss(f_train, y_train, loss)  # (s, r)
    return {str(s): _first_divergence(losses[i], steps) for i, s in enumerate(seeds)}


def _ntk_change_rows(path, seeds, step, model, params, params0, x_probe):
    values = [[kernels.ntk_change(model.apply_fn, _unstack(params, i), _unstack(params0, i),
                                  x_probe)] for i in range(len(seeds))]
    return _grid_rows(path, seeds, [step], "probe", "ntk_change", np.asarray(values))


def _closed_form_outputs(cfg, model, params0, x_train, y_train, x_test, steps):
    """Outputs (s, r, n, k) of the entk, ntk and nngp paths that ``cfg.paths`` asks for,
    and the infinite-width ensemble variance averaged over test points, (r,) per path."""
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
