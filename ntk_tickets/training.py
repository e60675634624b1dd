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


@dataclasses.dataclass(frozen=True)
class _OneSeed:
    """The pieces of one seed's training run, shared by both loops (:data:`LOOPS`).

    ``init(params0, data) -> (opt_state, h0)``; ``step(i, params, opt_state, params0,
    update_mask, data, batches, lr_factors) -> (params, opt_state)`` takes step ``i``;
    ``record(params, params0, data, h0) -> dict`` is what a recorded step stores.
    """

    init: Callable
    step: Callable
    record: Callable


def _one_seed(fn: ModelFn, cfg: TrainConfig, *,
              probe_kernel_fn: Callable[[PyTree, jax.Array], jax.Array] | None,
              feature_fn: ModelFn | None,
              snapshot_fn: Callable[[PyTree], jax.Array] | None) -> _OneSeed:
    optimizer = make_optimizer(cfg)
    loss_fn = LOSSES[cfg.loss]

    def init(params0, data):
        h0 = None if feature_fn is None else feature_fn(params0, params0, data["x_test"])
        return optimizer.init(params0), h0

    def step(i, params, opt_state, params0, update_mask, data, batches, lr_factors):
        if cfg.batch_size:
            x, y = data["x_train"][batches[i]], data["y_train"][batches[i]]
        else:
            x, y = data["x_train"], data["y_train"]
        grads = jax.grad(lambda p: loss_fn(fn(p, params0, x), y))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        updates = scale_updates(updates, lr_factors)
        if update_mask is not None:
            updates = jax.tree_util.tree_map(
                lambda u, m: jnp.where(m, u * m, jnp.zeros_like(u)), updates, update_mask)
        return optax.apply_updates(params, updates), opt_state

    def record(params, params0, data, h0):
        delta = jax.tree_util.tree_map(jnp.subtract, params, params0)
        out = {"f_train": fn(params, params0, data["x_train"]),
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

    return _OneSeed(init, step, record)


def _outputs(recorded: dict, params0, params, params_rewind, h0) -> tuple:
    """The fields of :class:`Trajectory` after ``steps``, in order, for one seed."""
    return (recorded["f_train"], recorded["f_test"], recorded["sq_change"],
            _layer_sq_norms(params0), params, params_rewind, recorded.get("probe_kernel"),
            recorded.get("feature_sq_change"), None if h0 is None else jnp.sum(h0 ** 2),
            recorded.get("snapshot"))


def make_train_fn(fn: ModelFn, cfg: TrainConfig, record_steps: np.ndarray, *,
                  probe_kernel_fn: Callable[[PyTree, jax.Array], jax.Array] | None = None,
                  feature_fn: ModelFn | None = None,
                  snapshot_fn: Callable[[PyTree], jax.Array] | None = None) -> Callable:
    """Builds the jitted, seed-vmapped training program (the ``fused`` loop).

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
    parts = _one_seed(fn, cfg, probe_kernel_fn=probe_kernel_fn, feature_fn=feature_fn,
                      snapshot_fn=snapshot_fn)
    bounds = jnp.asarray(np.stack([record_steps[:-1], record_steps[1:]], axis=1))

    def train_one(params0, update_mask, data, batches, rewind_step, lr_factors, start_step):
        def step(i, carry):
            return parts.step(i, *carry, params0, update_mask, data, batches, lr_factors)

        def segment(carry, bound):
            params, opt_state, params_rewind = carry
            params, opt_state = jax.lax.fori_loop(jnp.maximum(bound[0], start_step),
                                                  bound[1], step, (params, opt_state))
            params_rewind = jax.tree_util.tree_map(
                lambda a, b: jnp.where(bound[1] == rewind_step, a, b), params, params_rewind)
            return (params, opt_state, params_rewind), parts.record(params, params0, data, h0)

        opt_state, h0 = parts.init(params0, data)
        first = parts.record(params0, params0, data, h0)
        (params, _, params_rewind), rest = jax.lax.scan(
            segment, (params0, opt_state, params0), bounds)
        recorded = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a[None], b]),
                                          first, rest)
        return _outputs(recorded, params0, params, params_rewind, h0)

    def train(params0, update_mask, data, batches, rewind_step, lr_factors, start_step):
        if _n_seeds(params0) > 1:
            return jax.vmap(train_one, in_axes=(0, 0, None, 0, None, None, None))(
                params0, update_mask, data, batches, rewind_step, lr_factors, start_step)
        # One seed: run unbatched. XLA:CPU runs a batched matmul of batch 1 at about half
        # the speed of the plain one (benchmarks/bench_engine.py).
        out = train_one(_seed(params0, 0), _seed(update_mask, 0), data, _seed(batches, 0),
                        rewind_step, lr_factors, start_step)
        return jax.tree_util.tree_map(lambda a: a[None], out)

    return jax.jit(train)


def _seed(tree: PyTree, s: int) -> PyTree:
    return jax.tree_util.tree_map(lambda a: a[s], tree)


def _stacked(trees: list[PyTree]) -> PyTree:
    """The inverse of :func:`_seed`: equal PyTrees stacked along a new leading axis."""
    return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *trees)


def seeds_in_parallel() -> bool:
    """Whether :func:`map_seeds` vmaps (on accelerators) rather than loops (on the CPU)."""
    return jax.default_backend() != "cpu"


def map_seeds(fn: Callable, *stacked: PyTree) -> PyTree:
    """``fn`` of every seed of ``stacked`` (PyTrees with a leading seed axis), stacked again.

    On an accelerator this is ``jax.vmap(fn)``. On the CPU the seeds run one after another
    through the same compiled code: XLA:CPU runs the batched matmuls and convolutions that
    ``vmap`` makes slower than the seeds in turn (measured on 2 cores: the empirical-NTK
    closed form of the demo at width 256, 4 seeds, 27 s vmapped against 22 s in turn;
    ``benchmarks/bench_cnn.py`` for convolutions).
    """
    if seeds_in_parallel():
        return jax.vmap(fn)(*stacked)
    n_seeds = jax.tree_util.tree_leaves(stacked)[0].shape[0]
    return _stacked([fn(*(_seed(tree, s) for tree in stacked)) for s in range(n_seeds)])


class _Stepwise:
    """The ``stepwise`` loop: a host loop over jitted single steps, one seed at a time.

    The same steps and records as :func:`make_train_fn`, in three compiled programs per
    shape (start, step, record). On XLA:CPU a convolution's gradient inside a ``while`` loop
    is emitted without the library convolution (the transposed kernel keeps a
    non-canonical layout there; 40–90× slower, jax-ml/jax#12868), while the same step as its
    own program runs at full speed; seeds run one after another because vmapped
    convolutions become grouped ones, slower than the seeds in turn
    (``benchmarks/bench_cnn.py``).
    """

    def __init__(self, parts: _OneSeed, record_steps: np.ndarray):
        self.record_steps = record_steps

        def start(params0, data):
            opt_state, h0 = parts.init(params0, data)
            return opt_state, h0, parts.record(params0, params0, data, h0)

        self._start = jax.jit(start)
        self._step = jax.jit(parts.step)
        self._record = jax.jit(parts.record)

    def compile(self, args: tuple) -> Callable:
        """The loop compiled for the shapes of ``args`` (the training program's arguments)."""
        params0, update_mask, data, batches, _, lr_factors, _ = args
        one = _seed(params0, 0)
        opt_state, h0, _ = jax.eval_shape(self._start, one, data)
        programs = (self._start.lower(one, data).compile(),
                    self._step.lower(np.int32(0), one, opt_state, one, _seed(update_mask, 0),
                                     data, _seed(batches, 0), lr_factors).compile(),
                    self._record.lower(one, one, data, h0).compile())
        return functools.partial(self._run, *programs)

    def _run(self, start, step, record, params0, update_mask, data, batches, rewind_step,
             lr_factors, start_step) -> tuple:
        rewind_step, start_step = int(rewind_step), int(start_step)
        runs = []
        for s in range(_n_seeds(params0)):
            theta0, mask, order = _seed(params0, s), _seed(update_mask, s), _seed(batches, s)
            opt_state, h0, first = start(theta0, data)
            params, params_rewind, recorded = theta0, theta0, [first]
            for lo, hi in zip(self.record_steps[:-1], self.record_steps[1:], strict=True):
                for i in range(max(int(lo), start_step), int(hi)):
                    params, opt_state = step(np.int32(i), params, opt_state, theta0, mask,
                                             data, order, lr_factors)
                if hi == rewind_step:
                    params_rewind = params
                recorded.append(record(params, theta0, data, h0))
            recorded = _stacked(recorded)
            runs.append(_outputs(recorded, theta0, params, params_rewind, h0))
        return _stacked(runs)


LOOPS = ("auto", "fused", "stepwise")


def _has_convolution(jaxpr: Any) -> bool:
    """Whether a (closed) jaxpr or a jaxpr nested in its equations has a convolution."""
    for eqn in getattr(jaxpr, "jaxpr", jaxpr).eqns:
        if eqn.primitive.name == "conv_general_dilated":
            return True
        for value in eqn.params.values():
            for v in value if isinstance(value, (tuple, list)) else (value,):
                if hasattr(getattr(v, "jaxpr", v), "eqns") and _has_convolution(v):
                    return True
    return False


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

    ``loop`` (one of :data:`LOOPS`) is how the steps run: ``fused`` is one program with the
    loop inside (:func:`make_train_fn`), ``stepwise`` a host loop over one compiled step,
    one seed at a time (:class:`_Stepwise`); ``auto`` takes ``stepwise`` for a network with
    convolutions on the CPU and ``fused`` otherwise. Both record the same trajectory (to
    rounding). The loop taken is ``self.loop`` after the first call.
    """

    def __init__(self, fn: ModelFn, cfg: TrainConfig, record_steps: np.ndarray, *,
                 probe_kernel_fn: Callable[[PyTree, jax.Array], jax.Array] | None = None,
                 feature_fn: ModelFn | None = None, lr_factors: PyTree | None = None,
                 snapshot_fn: Callable[[PyTree], jax.Array] | None = None,
                 loop: str = "auto"):
        if loop not in LOOPS:
            raise ValueError(f"loop {loop!r} is not one of {LOOPS}")
        self.fn = fn  # the trained function (params, params0, x) -> outputs
        self.loop = loop
        self.record_steps = np.asarray(record_steps)
        self.lr_factors = (None if lr_factors is None
                           else jax.tree_util.tree_map(jnp.asarray, lr_factors))
        self._train = make_train_fn(fn, cfg, self.record_steps,
                                    probe_kernel_fn=probe_kernel_fn, feature_fn=feature_fn,
                                    snapshot_fn=snapshot_fn)
        self._stepwise = _Stepwise(_one_seed(fn, cfg, probe_kernel_fn=probe_kernel_fn,
                                             feature_fn=feature_fn, snapshot_fn=snapshot_fn),
                                   self.record_steps)
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
            self._compiled[key] = self._compile(args)
            self.compile_s += time.perf_counter() - start
        start = time.perf_counter()
        out = jax.block_until_ready(self._compiled[key](*args))
        self.run_s += time.perf_counter() - start
        return Trajectory(self.record_steps, *out)

    def _compile(self, args: tuple) -> Callable:
        if self.loop == "auto":
            params0, data = args[0], args[2]
            one = _seed(params0, 0)
            forward = jax.make_jaxpr(self.fn)(one, one, data["x_train"])
            on_cpu = jax.default_backend() == "cpu"
            self.loop = "stepwise" if on_cpu and _has_convolution(forward) else "fused"
        if self.loop == "stepwise":
            return self._stepwise.compile(args)
        return self._train.lower(*args).compile()
