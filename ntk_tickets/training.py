"""One training loop for the exact and the linearized network.

Both paths train a function ``fn(params, params0, x)`` with the same optax optimizer, loss,
batches and steps; they differ only in ``fn``:

* exact: ``fn = lambda params, params0, x: apply_fn(params, x)``;
* linear: ``fn = linearize(apply_fn)``, the first-order expansion around ``params0``.

The loop is one jitted program per shape: ``lax.scan`` over the recording segments, a
``lax.fori_loop`` over the steps inside each segment, and ``vmap`` over seeds, so no host
round trip happens during training and one compile serves every seed. At each recorded
step (log-spaced, :func:`log_spaced_steps`) it stores the network outputs on the training
and test inputs and the squared weight change per layer (and optionally a probe kernel and
the change of the last hidden layer's features on the test inputs);
losses, accuracies and function gaps are computed from those outputs afterwards
(:mod:`ntk_tickets.experiments`). Masks enter as an ``update_mask`` argument, so masked
(ticket) training is the same program, and so do per-parameter learning-rate factors
(µP and the output scale, :mod:`ntk_tickets.regimes`).

Losses: ``mse`` is ½·mean((f − y)²) over all n·k entries, the normalization under which
``t`` steps of gradient descent with step size η match neural-tangents' closed form at
time ``t`` (see :mod:`ntk_tickets.kernels`); ``xent`` is the mean softmax cross-entropy
with integer labels.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ntk_tickets.config import TrainConfig
from ntk_tickets.optimizers import LOSSES, make_optimizer
from ntk_tickets.regimes import scale_updates

PyTree = Any
ModelFn = Callable[[PyTree, PyTree, jax.Array], jax.Array]


def log_spaced_steps(steps: int, n_points: int) -> np.ndarray:
    """Distinct integer steps from 0 to ``steps``, roughly log-spaced, always with both ends.

    >>> log_spaced_steps(100, 5).tolist()
    [0, 1, 3, 10, 31, 100]
    """
    inner = np.unique(np.round(np.geomspace(1, steps, n_points)).astype(np.int64))
    return np.unique(np.concatenate([[0], inner, [steps]]))


def batch_order(key: jax.Array, n_train: int, batch_size: int, steps: int) -> jax.Array:
    """Indices of the minibatch of each step, shape (steps, batch_size).

    Epochs are seeded permutations of the training set; a final partial batch is dropped.
    The order depends only on ``key``, so every path sees the same batches.
    """
    per_epoch = n_train // batch_size
    n_epochs = -(-steps // per_epoch)
    keys = jax.random.split(key, n_epochs)
    perms = jax.vmap(lambda k: jax.random.permutation(k, n_train))(keys)
    batches = perms[:, : per_epoch * batch_size].reshape(-1, batch_size)
    return batches[:steps]


@dataclasses.dataclass(frozen=True)
class Trajectory:
    """What one training run records, for every seed (leading axis s) and recorded step.

    Attributes:
      steps: (r,) the recorded steps.
      f_train: (s, r, n_train, k) outputs on the training inputs.
      f_test: (s, r, n_test, k) outputs on the test inputs.
      sq_change: (s, r, n_layers) ‖θ_t − θ_start‖² per parameterized layer.
      sq_norm0: (s, n_layers) ‖θ_start‖² per parameterized layer.
      params: the final parameters θ_T, stacked over seeds.
      params_rewind: the parameters θ_k at the rewind step k, stacked over seeds.
      probe_kernel: (s, r, m, m) the traced empirical NTK of the trained function on the
        probe inputs at each recorded step, or None when not requested.
      feature_sq_change: (s, r) ‖h_t − h_start‖² of the last hidden layer's features on the
        test inputs, or None when not requested.
      feature_sq_norm0: (s,) ‖h_start‖² on the test inputs, or None.
      snapshots: (s, r, ...) what ``snapshot_fn`` returned at each recorded step (the
        parameters, for the lottery subspace), or None.
    """

    steps: np.ndarray
    f_train: jax.Array
    f_test: jax.Array
    sq_change: jax.Array
    sq_norm0: jax.Array
    params: PyTree
    params_rewind: PyTree
    probe_kernel: jax.Array | None = None
    feature_sq_change: jax.Array | None = None
    feature_sq_norm0: jax.Array | None = None
    snapshots: jax.Array | None = None


def _layer_sq_norms(params: PyTree) -> jax.Array:
    """Squared L2 norm of each top-level entry that holds parameters, shape (n_layers,)."""
    return jnp.stack([
        sum(jnp.sum(leaf**2) for leaf in jax.tree_util.tree_leaves(entry))
        for entry in params if jax.tree_util.tree_leaves(entry)
    ])


def _n_seeds(params0: PyTree) -> int:
    return jax.tree_util.tree_leaves(params0)[0].shape[0]


def make_train_fn(fn: ModelFn, cfg: TrainConfig, record_steps: np.ndarray, *,
                  probe_kernel_fn: Callable[[PyTree, jax.Array], jax.Array] | None = None,
                  feature_fn: ModelFn | None = None,
                  snapshot_fn: Callable[[PyTree], jax.Array] | None = None) -> Callable:
    """Builds the jitted, seed-vmapped training program.

    Args:
      fn: ``(params, params0, x) -> outputs``.
      cfg: optimizer, loss, steps and batch size.
      record_steps: increasing steps at which outputs are recorded, from 0 to ``cfg.steps``.
      probe_kernel_fn: optional ``(params, x_probe) -> (m, m)`` kernel recorded at every
        recorded step (e.g. the traced empirical NTK, for ``ntk_change``).
      feature_fn: optional ``(params, params0, x) -> h``, the features whose change on the
        test inputs is recorded (for ``feature_change``).
      snapshot_fn: optional ``params -> array`` recorded at every recorded step (e.g. the
        flattened parameters).

    Returns:
      A jitted ``train(params0, update_mask, data, batches, rewind_step, lr_factors,
      start_step)`` returning the
      fields of :class:`Trajectory` after ``steps`` as a tuple. ``params0`` (the start of
      training and the point of linearization), ``update_mask`` and ``batches`` (int,
      (s, steps, batch_size), or (s, 0, 0) for full batch) have a leading seed axis; ``data``
      is a dict with ``x_train``, ``y_train``, ``x_test`` and (with ``probe_kernel_fn``)
      ``x_probe``. ``update_mask`` is a PyTree shaped like ``params0`` (0/1, or a float scale
      per entry) or None: where it is 0 the optimizer's update is replaced by exactly 0
      after every transformation (momentum, Adam moments, weight decay), so entries that
      start at 0 stay exactly 0; elsewhere the update is multiplied by it (a masked network
      trained in its own NTK parameterization, :func:`ntk_tickets.tickets.rescaled_start`).
      ``rewind_step`` (int scalar, one of ``record_steps``) selects the step whose
      parameters are returned as ``params_rewind``. ``lr_factors`` (a PyTree of scalars
      shaped like one seed's parameters, or None) multiplies each parameter's update after
      the optimizer: per-parameter learning rates (:func:`ntk_tickets.regimes.lr_factors`).
      ``start_step`` (int scalar) is the step at which training starts: ``params0`` is then
      θ at that step (a network rewound or spawned at k), trained on the minibatches of
      steps k … ``steps`` − 1 only; recorded steps before k hold ``params0``.
      Everything is an argument: nothing, parameters and masks included, is closed over
      (DESIGN.md §3), so one compile serves every seed, mask and rewind step. Run it with
      :class:`TrainingProgram`.
    """
    optimizer = make_optimizer(cfg)
    loss_fn = LOSSES[cfg.loss]
    bounds = jnp.asarray(np.stack([record_steps[:-1], record_steps[1:]], axis=1))

    def train_one(params0, update_mask, data, batches, rewind_step, lr_factors, start_step):
        x_train, y_train = data["x_train"], data["y_train"]

        def loss_of(params, x, y):
            return loss_fn(fn(params, params0, x), y)

        def step(i, carry):
            params, opt_state = carry
            if cfg.batch_size:
                x, y = x_train[batches[i]], y_train[batches[i]]
            else:
                x, y = x_train, y_train
            grads = jax.grad(loss_of)(params, x, y)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            updates = scale_updates(updates, lr_factors)
            if update_mask is not None:
                updates = jax.tree_util.tree_map(
                    lambda u, m: jnp.where(m, u * m, jnp.zeros_like(u)), updates, update_mask)
            return optax.apply_updates(params, updates), opt_state

        def record(params):
            delta = jax.tree_util.tree_map(jnp.subtract, params, params0)
            out = {"f_train": fn(params, params0, x_train),
                   "f_test": fn(params, params0, data["x_test"]),
                   "sq_change": _layer_sq_norms(delta)}
            if probe_kernel_fn is not None:
                out["probe_kernel"] = probe_kernel_fn(params, data["x_probe"])
            if feature_fn is not None:
                h = feature_fn(params, params0, data["x_test"])
                out["feature_sq_change"] = jnp.sum((h - h0) ** 2)
            if snapshot_fn is not None:
                out["snapshot"] = snapshot_fn(params)
            return out

        def segment(carry, bound):
            params, opt_state, params_rewind = carry
            params, opt_state = jax.lax.fori_loop(jnp.maximum(bound[0], start_step),
                                                  bound[1], step, (params, opt_state))
            params_rewind = jax.tree_util.tree_map(
                lambda a, b: jnp.where(bound[1] == rewind_step, a, b), params, params_rewind)
            return (params, opt_state, params_rewind), record(params)

        h0 = None if feature_fn is None else feature_fn(params0, params0, data["x_test"])
        first = record(params0)
        carry = (params0, optimizer.init(params0), params0)
        (params, _, params_rewind), rest = jax.lax.scan(segment, carry, bounds)
        recorded = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a[None], b]),
                                          first, rest)
        return (recorded["f_train"], recorded["f_test"], recorded["sq_change"],
                _layer_sq_norms(params0), params, params_rewind,
                recorded.get("probe_kernel"), recorded.get("feature_sq_change"),
                None if h0 is None else jnp.sum(h0 ** 2), recorded.get("snapshot"))

    def train(params0, update_mask, data, batches, rewind_step, lr_factors, start_step):
        if _n_seeds(params0) > 1:
            return jax.vmap(train_one, in_axes=(0, 0, None, 0, None, None, None))(
                params0, update_mask, data, batches, rewind_step, lr_factors, start_step)
        # One seed: run unbatched. XLA:CPU runs a batched matmul of batch 1 at about half
        # the speed of the plain one (benchmarks/bench_engine.py).
        squeeze = functools.partial(jax.tree_util.tree_map, lambda a: a[0])
        out = train_one(squeeze(params0), squeeze(update_mask), data, squeeze(batches),
                        rewind_step, lr_factors, start_step)
        return jax.tree_util.tree_map(lambda a: a[None], out)

    return jax.jit(train)


class TrainingProgram:
    """One training program, compiled once per argument shape and reused.

    Calling it with new parameters, masks or rewind steps of the same shapes reuses the
    compiled executable, so a ticket study compiles once per width and path, not once per
    round or mask (DESIGN.md §3). Compile and run seconds are accumulated separately.

    Example::

        program = TrainingProgram(linearize(model.apply_fn), cfg.train, steps)
        trajectory = program(params0, data, batches)
        print(program.compile_s, program.run_s)

    ``lr_factors`` (per-parameter learning-rate factors, :func:`ntk_tickets.regimes.lr_factors`)
    is kept and passed to the program as an argument at every call.
    """

    def __init__(self, fn: ModelFn, cfg: TrainConfig, record_steps: np.ndarray, *,
                 probe_kernel_fn: Callable[[PyTree, jax.Array], jax.Array] | None = None,
                 feature_fn: ModelFn | None = None, lr_factors: PyTree | None = None,
                 snapshot_fn: Callable[[PyTree], jax.Array] | None = None):
        self.fn = fn  # the trained function (params, params0, x) -> outputs
        self.record_steps = np.asarray(record_steps)
        self.lr_factors = (None if lr_factors is None
                           else jax.tree_util.tree_map(jnp.asarray, lr_factors))
        self._train = make_train_fn(fn, cfg, self.record_steps,
                                    probe_kernel_fn=probe_kernel_fn, feature_fn=feature_fn,
                                    snapshot_fn=snapshot_fn)
        self._compiled: dict[Any, Any] = {}
        self.compile_s = 0.0
        self.run_s = 0.0

    def __call__(self, params0: PyTree, data: dict[str, jax.Array], batches: jax.Array,
                 update_mask: PyTree | None = None, rewind_step: int = 0,
                 start_step: int = 0) -> Trajectory:
        """Trains from ``params0`` (leading seed axis), at step ``start_step``, to the last
        step; see :func:`make_train_fn`.

        Raises:
          ValueError: if ``rewind_step`` is not one of the recorded steps.
        """
        if rewind_step not in self.record_steps:
            raise ValueError(f"rewind_step {rewind_step} is not a recorded step "
                             f"{self.record_steps.tolist()}")
        if update_mask is not None:  # 0/1 masks and update scales share one program
            update_mask = jax.tree_util.tree_map(lambda m, p: jnp.asarray(m, p.dtype),
                                                 update_mask, params0)
        args = (params0, update_mask, data, batches, jnp.asarray(rewind_step, jnp.int32),
                self.lr_factors, jnp.asarray(start_step, jnp.int32))
        leaves, treedef = jax.tree_util.tree_flatten(args)
        key = (treedef, tuple((leaf.shape, leaf.dtype) for leaf in leaves))
        if key not in self._compiled:
            start = time.perf_counter()
            self._compiled[key] = self._train.lower(*args).compile()
            self.compile_s += time.perf_counter() - start
        start = time.perf_counter()
        out = jax.block_until_ready(self._compiled[key](*args))
        self.run_s += time.perf_counter() - start
        return Trajectory(self.record_steps, *out)
