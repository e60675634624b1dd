"""One training loop for the exact and the linearized network.

Both paths train a function ``fn(params, params0, x)`` with the same optax optimizer, loss,
batches and steps; they differ only in ``fn``:

* exact: ``fn = lambda params, params0, x: apply_fn(params, x)``;
* linear: ``fn = linearize(apply_fn)``, the first-order expansion around ``params0``.

The loop is one jitted program per shape: ``lax.scan`` over the recording segments, a
``lax.fori_loop`` over the steps inside each segment, and ``vmap`` over seeds, so no host
round trip happens during training and one compile serves every seed. At each recorded
step (log-spaced, :func:`log_spaced_steps`) it stores the network outputs on the training
and test inputs and the squared weight change per layer; losses, accuracies and function
gaps are computed from those outputs afterwards (:mod:`ntk_tickets.metrics`).

Losses: ``mse`` is ½·mean((f − y)²) over all n·k entries, the normalization under which
``t`` steps of gradient descent with step size η match neural-tangents' closed form at
time ``t`` (see :mod:`ntk_tickets.kernels`); ``xent`` is the mean softmax cross-entropy
with integer labels.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ntk_tickets.config import TrainConfig

PyTree = Any
ModelFn = Callable[[PyTree, PyTree, jax.Array], jax.Array]


def mse_loss(f: jax.Array, y: jax.Array) -> jax.Array:
    """½·mean((f − y)²) over all entries; ``f``, ``y`` of shape (n, k)."""
    return 0.5 * jnp.mean((f - y) ** 2)


def xent_loss(f: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy; ``f`` logits (n, k), ``labels`` int (n,)."""
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(f, labels))


LOSSES = {"mse": mse_loss, "xent": xent_loss}


def log_spaced_steps(steps: int, n_points: int) -> np.ndarray:
    """Distinct integer steps from 0 to ``steps``, roughly log-spaced, always with both ends.

    >>> log_spaced_steps(100, 5).tolist()
    [0, 1, 3, 10, 31, 100]
    """
    inner = np.unique(np.round(np.geomspace(1, steps, n_points)).astype(np.int64))
    return np.unique(np.concatenate([[0], inner, [steps]]))


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """The optax optimizer of ``cfg`` with its learning-rate schedule.

    ``constant``; ``cosine`` decays to 0 over ``cfg.steps``; ``warmup_cosine`` warms up
    linearly over the first 5 % of steps, then decays.
    """
    if cfg.schedule == "constant":
        lr = cfg.learning_rate
    elif cfg.schedule == "cosine":
        lr = optax.cosine_decay_schedule(cfg.learning_rate, cfg.steps)
    else:
        lr = optax.warmup_cosine_decay_schedule(
            0.0, cfg.learning_rate, max(1, cfg.steps // 20), cfg.steps)
    if cfg.optimizer == "sgd":
        return optax.sgd(lr)
    if cfg.optimizer == "momentum":
        return optax.sgd(lr, momentum=cfg.momentum)
    return optax.adam(lr)


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
    """What one training run records, for every seed (leading axis) and recorded step.

    Attributes:
      steps: (r,) the recorded steps.
      f_train: (s, r, n_train, k) outputs on the training inputs.
      f_test: (s, r, n_test, k) outputs on the test inputs.
      sq_change: (s, r, n_layers) ‖θ_t − θ0‖² per parameterized layer.
      sq_norm0: (s, n_layers) ‖θ0‖² per parameterized layer.
      params: the final parameters, stacked over seeds.
    """

    steps: np.ndarray
    f_train: jax.Array
    f_test: jax.Array
    sq_change: jax.Array
    sq_norm0: jax.Array
    params: PyTree


def _layer_sq_norms(params: PyTree) -> jax.Array:
    """Squared L2 norm of each top-level entry that holds parameters, shape (n_layers,)."""
    return jnp.stack([
        sum(jnp.sum(leaf**2) for leaf in jax.tree_util.tree_leaves(entry))
        for entry in params if jax.tree_util.tree_leaves(entry)
    ])


def make_train_fn(fn: ModelFn, cfg: TrainConfig, record_steps: np.ndarray) -> Callable:
    """Builds the jitted, seed-vmapped training program.

    Args:
      fn: ``(params, params0, x) -> outputs``.
      cfg: optimizer, loss, steps and batch size.
      record_steps: increasing steps at which outputs are recorded, from 0 to ``cfg.steps``.

    Returns:
      A jitted ``train(params0, x_train, y_train, x_test, batches)`` returning
      ``(f_train, f_test, sq_change, sq_norm0, params)`` as in :class:`Trajectory`;
      ``params0`` and ``batches`` (int, (s, steps, batch_size), or (s, 0, 0) for full
      batch) have a leading seed axis. Everything is an argument: nothing, parameters
      included, is closed over (DESIGN.md §3). Run it with :func:`run_training`.
    """
    optimizer = make_optimizer(cfg)
    loss_fn = LOSSES[cfg.loss]
    bounds = jnp.asarray(np.stack([record_steps[:-1], record_steps[1:]], axis=1))

    def train_one(params0, x_train, y_train, x_test, batches):
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
            return optax.apply_updates(params, updates), opt_state

        def record(params):
            delta = jax.tree_util.tree_map(jnp.subtract, params, params0)
            return (fn(params, params0, x_train), fn(params, params0, x_test),
                    _layer_sq_norms(delta))

        def segment(carry, bound):
            carry = jax.lax.fori_loop(bound[0], bound[1], step, carry)
            return carry, record(carry[0])

        first = record(params0)
        (params, _), rest = jax.lax.scan(segment, (params0, optimizer.init(params0)), bounds)
        f_train, f_test, sq_change = (
            jnp.concatenate([a[None], b]) for a, b in zip(first, rest, strict=True))
        return f_train, f_test, sq_change, _layer_sq_norms(params0), params

    return jax.jit(jax.vmap(train_one, in_axes=(0, None, None, None, 0)))


def run_training(train_fn: Callable, record_steps: np.ndarray, params0: PyTree,
                 x_train: jax.Array, y_train: jax.Array, x_test: jax.Array,
                 batches: jax.Array) -> tuple[Trajectory, float, float]:
    """Compiles and runs ``train_fn`` from :func:`make_train_fn`, timing the two apart.

    Returns:
      ``(trajectory, compile_s, run_s)``.
    """
    args = (params0, x_train, y_train, x_test, batches)
    start = time.perf_counter()
    compiled = train_fn.lower(*args).compile()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    f_train, f_test, sq_change, sq_norm0, params = jax.block_until_ready(compiled(*args))
    run_s = time.perf_counter() - start
    trajectory = Trajectory(record_steps, f_train, f_test, sq_change, sq_norm0, params)
    return trajectory, compile_s, run_s
