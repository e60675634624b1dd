"""Linear mode connectivity: losses and errors along the straight line between two networks.

Two children spawned from one network at step k and trained to the end with different data
orders end at θ_1 and θ_2. Along θ(α) = (1 − α)·θ_1 + α·θ_2, α ∈ [0, 1]:

* :func:`instability`: max over α of the test error minus the mean of the endpoints' errors
  (Frankle, Dziugaite, Roy & Carbin 2020, "Linear Mode Connectivity and the Lottery Ticket
  Hypothesis", arXiv 1912.05671);
* :func:`loss_barrier`: max over α of L(θ(α)) − [(1 − α)·L(θ_1) + α·L(θ_2)], the height above
  the chord between the endpoint losses (Entezari, Sedghi, Saukh & Neyshabur 2022, arXiv
  2110.06296). A loss convex in θ (the linearized network under MSE) has a barrier ≤ 0;
  the max-minus-mean definition does not have that property: it is positive whenever the
  endpoint losses differ, convex or not.

The functions take values already evaluated on a grid of α (:func:`interpolation_grid`,
:func:`along_line`), so the caller decides how the network is evaluated (vmapped over α,
seeds and masks inside one compiled program).

The ``[stability]`` study (:func:`run_stability`, :class:`Connectivity`) spawns the dense
network at each step k of ``stability.spawn_steps``, and every ticket and control at its
rewind step; the first child is the run the study trains anyway (the cell's minibatch
order), the second one trains with an independent order. Like the tickets rewound to k,
children train the T − k steps from the spawn point to the end (Frankle et al. 2020); the
start step is an argument, so one compiled program serves every k.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ntk_tickets import masks
from ntk_tickets.experiments import loss_of, trajectory_rows
from ntk_tickets.metrics import accuracy_of, diverged_after
from ntk_tickets.training import batch_order

PyTree = Any


def interpolation_grid(n_interp: int) -> np.ndarray:
    """``n_interp`` ≥ 2 evenly spaced α in [0, 1], both endpoints included."""
    if n_interp < 2:
        raise ValueError(f"n_interp must be >= 2 (both endpoints), got {n_interp}")
    return np.linspace(0.0, 1.0, n_interp)


def along_line(fn: Callable[[PyTree], jax.Array], theta_1: PyTree, theta_2: PyTree,
               alphas: jax.Array) -> jax.Array:
    """``fn((1 − α)·θ_1 + α·θ_2)`` for each α of ``alphas`` (a,), vmapped over α: shape
    (a, ...) of ``fn``'s output."""
    def at(alpha):
        return fn(jax.tree_util.tree_map(lambda a, b: (1 - alpha) * a + alpha * b,
                                         theta_1, theta_2))

    return jax.vmap(at)(jnp.asarray(alphas))


def loss_barrier(losses: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    """max_α L(θ(α)) − [(1 − α)·L(θ_1) + α·L(θ_2)] over the last axis.

    Args:
      losses: (..., a) the loss along the line; ``losses[..., 0]`` at θ_1, ``[..., -1]`` at
        θ_2.
      alphas: (a,) the grid, from 0 to 1.

    Returns:
      (...) the barrier; ≤ 0 (up to rounding) for a loss convex in θ.
    """
    losses, alphas = np.asarray(losses), np.asarray(alphas)
    chord = (1 - alphas) * losses[..., :1] + alphas * losses[..., -1:]
    return np.max(losses - chord, axis=-1)


def instability(errors: np.ndarray) -> np.ndarray:
    """max_α err(θ(α)) − ½·(err(θ_1) + err(θ_2)) over the last axis (Frankle et al. 2020).

    Args:
      errors: (..., a) the error along the line, endpoints first and last.

    Returns:
      (...) the instability; ≥ 0 whenever the grid includes both endpoints.
    """
    errors = np.asarray(errors)
    return np.max(errors, axis=-1) - 0.5 * (errors[..., 0] + errors[..., -1])


# ----------------------------------------------------------------------------- the study

#: PRNG role of the second child's minibatch order, folded into each seed's mask key (the
#: ticket module's roles are 0-3).
_SECOND_ORDER = 16


def second_order(setup: Any, cfg: Any) -> jax.Array:
    """(s, steps, batch_size) minibatch indices of the second child: an epoch order drawn
    from a key independent of the first child's (the cell's own ``setup.batches``)."""
    keys = jax.vmap(lambda k: jax.random.fold_in(k, _SECOND_ORDER))(setup.mask_keys)
    return jax.vmap(batch_order, in_axes=(0, None, None, None))(
        keys, setup.data["x_train"].shape[0], cfg.train.batch_size, cfg.train.steps)


class Connectivity:
    """Spawns second children and measures the line between them and the first ones.

    One per cell: it holds the second minibatch order and, per path, one compiled program
    that evaluates the network along the line for every seed and α at once (the two
    endpoints, the point of linearization and the data are arguments, DESIGN.md §3).

    Args:
      cfg: the study config (``[stability]``, ``train``).
      cell: the :class:`~ntk_tickets.experiments.DenseCell` whose programs train the
        children.
      data: the dataset (targets for the losses and errors).
    """

    def __init__(self, cfg: Any, cell: Any, data: Any):
        self.cfg, self.cell, self.data = cfg, cell, data
        self.alphas = interpolation_grid(cfg.stability.n_interp)
        self.order = second_order(cell.setup, cfg)
        self._probes: dict[str, Callable] = {}

    def _probe(self, path: str) -> Callable:
        if path not in self._probes:
            fn = self.cell.programs[path].fn

            def line(theta_1, theta_2, params0, x_train, x_test, alphas):
                def outputs(theta):
                    return fn(theta, params0, x_train), fn(theta, params0, x_test)
                return along_line(outputs, theta_1, theta_2, alphas)

            self._probes[path] = jax.jit(jax.vmap(line, in_axes=(0, 0, 0, None, None, None)))
        return self._probes[path]

    def second_child(self, path: str, start: PyTree, update_mask: PyTree,
                     spawn_step: int) -> Any:
        """The second child of a run from ``start``: the same program with the second
        minibatch order (its :class:`~ntk_tickets.training.Trajectory`)."""
        setup = self.cell.setup
        return self.cell.programs[path](start, setup.data, self.order, update_mask,
                                        spawn_step, start_step=spawn_step)

    def rows(self, path: str, first: Any, start: PyTree, update_mask: PyTree,
             spawn_step: int) -> list[dict[str, Any]]:
        """``loss_barrier`` (train) and ``instability`` (test error; test loss for
        regression) of the line between ``first`` (the trajectory of a run from ``start``
        with the cell's order) and its second child, one row each per seed; NaN for a seed
        whose child diverged."""
        setup, data, loss = self.cell.setup, self.data, self.cfg.train.loss
        second = self.second_child(path, start, update_mask, spawn_step)
        f_train, f_test = self._probe(path)(first.params, second.params, start,
                                            setup.data["x_train"], setup.data["x_test"],
                                            jnp.asarray(self.alphas))
        losses = loss_of(np.asarray(f_train), data.y_train, loss)  # (s, a)
        errors = (1.0 - accuracy_of(np.asarray(f_test), data.y_test) if data.n_classes
                  else loss_of(np.asarray(f_test), data.y_test, loss))
        bad = np.zeros(len(setup.seeds), dtype=bool)
        for child in (first, second):  # diverged at some recorded step: (s, r) → (s,)
            bad |= diverged_after(loss_of(np.asarray(child.f_train), data.y_train, loss))[:, -1]
        values = {("train", "loss_barrier"): loss_barrier(losses, self.alphas),
                  ("test", "instability"): instability(errors)}
        return [{"seed": int(seed), "path": path, "step": self.cfg.train.steps,
                 "split": split, "metric": metric,
                 "value": float("nan") if bad[i] else float(v[i]),
                 "spawn_step": spawn_step, "experiment": "stability"}
                for (split, metric), v in values.items() for i, seed in enumerate(setup.seeds)]


def run_stability(cfg: Any, cell: Any, data: Any,
                  connectivity: Connectivity) -> list[dict[str, Any]]:
    """The dense network's children at every spawn step k of ``stability.spawn_steps``.

    At k both paths start from θ_k of the exact run (of the linear run without an exact
    path): the ``linear`` children are linearized around θ_k, the tangent space of the
    spawn point (Fort et al. 2020), which is the θ0 linearization at k = 0. Records per
    path and k (column ``spawn_step``): the line metrics (experiment ``stability``), and
    the first child's own records (experiment ``spawn``), among them the ``function_gap``
    of the θ_k-linear child to the exact one. The first child at k > 0 is trained again
    rather than taken from the dense run: like a rewound ticket, it restarts the optimizer
    (momentum, Adam moments) at k, which the dense run does not.
    """
    setup = cell.setup
    anchor = "exact" if "exact" in cell.programs else "linear"
    ones = masks.ones_like(setup.params0)
    rows: list[dict[str, Any]] = []
    for k in cfg.stability.spawn_steps:
        start = cell.rewind_point(anchor, k)
        f_test_exact = None
        for path in sorted(cell.programs, key=("exact", "linear").index):
            first = (cell.trajectories[path] if k == 0 else cell.programs[path](
                start, setup.data, setup.batches, ones, k, start_step=k))
            spawned = trajectory_rows(path, setup, first, data, cfg, f_test_exact)
            for row in spawned:
                row.update(spawn_step=k, experiment="spawn")
            rows += spawned + connectivity.rows(path, first, start, ones, k)
            if path == "exact":
                f_test_exact = np.asarray(first.f_test)
    return rows
