"""The registry of recorded metrics: one entry per name that ``metrics`` may list.

A :class:`Metric` holds what the metric needs, how it is computed from what a path
recorded, how it is labelled, and whether its width scaling is fitted. Every consumer reads
the entry: config validation (allowed names), the cell runner (which values to compute and
whether the training scan must record the probe NTK), ``summarize`` and the width figures
(:func:`scaling_metrics`), and axis labels (:func:`metric_label`).

Most metrics are computed on the host from the recorded outputs of one path, a
:class:`PathOutputs`: ``compute(outputs)`` returns ``{(split, name): values}`` with values of
shape (seeds, recorded steps). A few are measured elsewhere and have no ``compute``:
``ntk_init_error`` and ``params_per_target`` by the cell (:mod:`ntk_tickets.experiments`),
``mask_overlap`` by the
ticket search (:mod:`ntk_tickets.tickets`).

Comparing one network with an infinite ensemble (SCIENCE.md): the ntk and nngp paths give
the *mean* over initializations and a variance, so a finite network's loss is compared with
their ``expected_loss`` (loss of the mean + variance term), and their ``loss`` with the loss
of the finite networks' average over seeds, ``ensemble_loss``. A metric with
``per_seed=False`` (``ensemble_loss``, ``ensemble_accuracy``) is computed once per cell
from the outputs averaged over the cell's seeds, values of shape (1, recorded steps), and
recorded with ``seed =`` :data:`ENSEMBLE_SEED` (−1): the ensemble is over the seeds of one
cell, so cells with other seeds give other ensembles.

Adding a metric is one entry. For example, the largest absolute test output::

    METRICS.register("max_output", Metric(
        label="largest |f(x)| on the test inputs",
        compute=lambda o: {("test", "max_output"): np.abs(o.f_test).max(axis=(-2, -1))}))

after which ``metrics = [..., "max_output"]`` records it for every trained and closed-form
path, ``ntk-tickets plot`` labels it, and ``scales_with_width=True`` would add it to
``summarize``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from ntk_tickets.registry import Registry

Values = Mapping[tuple[str, str], np.ndarray]

#: What a metric may need beyond a path's outputs (:attr:`Metric.needs`).
NEEDS = ("trajectory", "exact_outputs", "probe_kernel", "classes", "features",
         "ensemble_variance", "finite_networks")

#: The ``seed`` of the records of metrics over the ensemble of a cell's seeds.
ENSEMBLE_SEED = -1


@dataclasses.dataclass(frozen=True)
class PathOutputs:
    """What one path recorded, for every seed (axis s) and recorded step (axis r).

    Attributes:
      path: the path name (``exact``, ``linear``, ``entk``, ``ntk``, ``nngp``).
      f_train: (s, r, n_train, k) outputs on the training inputs.
      f_test: (s, r, n_test, k) outputs on the test inputs.
      y_train, y_test: targets: float (n, k), or int labels (n,) for cross-entropy.
      loss_fn: ``(f (..., n, k), y) -> (...)`` the training loss per leading index.
      n_classes: K for classification, 0 for regression.
      f_test_exact: (s, r, n_test, k) the exact path's test outputs under the same mask,
        or None (then no ``function_gap``).
      sq_change: (s, r, layers) ‖θ_t − θ_0‖² per layer, or None for closed forms.
      sq_norm0: (s, layers) ‖θ_0‖² per layer, or None.
      layer_names: the names of the parameterized layers.
      probe_kernel: (s, r, m, m) the empirical NTK on the probe inputs, or None.
      feature_sq_change: (s, r) ‖h_t − h_0‖² of the last hidden features on the test
        inputs, or None.
      feature_sq_norm0: (s,) ‖h_0‖² on the test inputs, or None.
      test_variance: (s, r, n_test) the predictive variance per test point of an
        infinite-width ensemble (ntk, nngp; the same for every output, scaled by α² and 0
        when centred, :func:`ntk_tickets.kernels.infinite_width_predictions`); None for
        finite networks, one per seed (exact, linear, entk).
    """

    path: str
    f_train: np.ndarray
    f_test: np.ndarray
    y_train: np.ndarray
    y_test: np.ndarray
    loss_fn: Callable[[np.ndarray, np.ndarray], np.ndarray]
    n_classes: int
    f_test_exact: np.ndarray | None = None
    sq_change: np.ndarray | None = None
    sq_norm0: np.ndarray | None = None
    layer_names: Sequence[str] = ()
    probe_kernel: np.ndarray | None = None
    feature_sq_change: np.ndarray | None = None
    feature_sq_norm0: np.ndarray | None = None
    test_variance: np.ndarray | None = None

    def provides(self, needs: Sequence[str]) -> bool:
        """Whether these outputs hold everything in ``needs`` (names of :data:`NEEDS`)."""
        held = {"trajectory": self.sq_change is not None,
                "exact_outputs": self.f_test_exact is not None and self.path != "exact",
                "probe_kernel": self.probe_kernel is not None,
                "classes": self.n_classes > 0,
                "features": self.feature_sq_change is not None,
                "ensemble_variance": self.test_variance is not None,
                "finite_networks": self.test_variance is None}
        return all(held[n] for n in needs)


@dataclasses.dataclass(frozen=True)
class Metric:
    """One recorded metric.

    Attributes:
      label: the axis label of its figures.
      compute: ``PathOutputs -> {(split, name): values}``, values (s, r), or (1, r) when
        not ``per_seed``; None when measured outside the per-path records (see the module
        docstring).
      needs: what ``compute`` uses beyond the outputs (names of :data:`NEEDS`); a path
        that lacks one records no value.
      scales_with_width: whether ``summarize`` fits its power law in width and
        ``ntk-tickets plot`` draws it against width.
      doc: one line: what it measures, with the reference.
      per_seed: True: values (s, r), one per seed; False: values (1, r) over the ensemble
        of the cell's seeds, recorded with ``seed =`` :data:`ENSEMBLE_SEED` and NaN from
        the first step at which any seed diverged.
    """

    label: str
    compute: Callable[[PathOutputs], Values] | None = None
    needs: tuple[str, ...] = ()
    scales_with_width: bool = False
    doc: str = ""
    per_seed: bool = True

    def __post_init__(self):
        unknown = sorted(set(self.needs) - set(NEEDS))
        if unknown:
            raise ValueError(f"Metric needs {unknown}: not among {NEEDS}")


#: :class:`Metric` entries, by name (``metrics`` in the study config).
METRICS: Registry = Registry("metrics")


def _split_values(o: PathOutputs, fn: Callable[[np.ndarray, np.ndarray], np.ndarray],
                  name: str) -> Values:
    return {("train", name): fn(o.f_train, o.y_train), ("test", name): fn(o.f_test, o.y_test)}


def _seed_average(o: PathOutputs) -> PathOutputs:
    """``o`` with outputs (1, r, n, k): the average of the networks over the seeds (axis s)."""
    with np.errstate(over="ignore", invalid="ignore"):  # diverged seeds give inf/NaN
        return dataclasses.replace(o, f_train=o.f_train.mean(axis=0, keepdims=True),
                                   f_test=o.f_test.mean(axis=0, keepdims=True))


def _expected_loss(o: PathOutputs) -> Values:
    """E over initializations of ½·mean((f − y)²) = loss of the mean + ½·mean variance."""
    return {("test", "expected_loss"): o.loss_fn(o.f_test, o.y_test)
            + 0.5 * o.test_variance.mean(axis=-1)}


def accuracy_of(f: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The fraction of points (axis −2 of ``f`` (..., n, k)) whose largest output is the
    label (``y`` integer labels (n,) or one-hot (n, k))."""
    labels = y.argmax(-1) if y.ndim == 2 else y
    return np.mean(f.argmax(-1) == labels, axis=-1)


def rmse(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Root mean square of ``a − b`` over the last two axes (points, outputs)."""
    with np.errstate(over="ignore", invalid="ignore"):  # diverged outputs give inf/NaN rows
        return np.sqrt(np.mean((a - b) ** 2, axis=(-2, -1)))


def _weight_change(o: PathOutputs) -> Values:
    """Total and per-layer ‖θ_t − θ_0‖ / ‖θ_0‖."""
    out = {("none", "weight_change"): np.sqrt(o.sq_change.sum(-1)
                                              / o.sq_norm0.sum(-1)[:, None])}
    for i, layer in enumerate(o.layer_names):
        out["none", f"weight_change/{layer}"] = np.sqrt(o.sq_change[..., i]
                                                        / o.sq_norm0[:, None, i])
    return out


def _relative_distances(kernels: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """‖K − K_ref‖_F / ‖K_ref‖_F over the last two axes; kernels (s, r, m, m), reference
    broadcastable to it."""
    flat = (kernels - reference).reshape(*kernels.shape[:2], -1)
    norm = np.linalg.norm(np.broadcast_to(reference, kernels.shape).reshape(
        *kernels.shape[:2], -1), axis=-1)
    return np.linalg.norm(flat, axis=-1) / norm


def _ntk_change(o: PathOutputs) -> Values:
    """‖K_t − K_0‖_F / ‖K_0‖_F per seed and step."""
    return {("probe", "ntk_change"): _relative_distances(o.probe_kernel, o.probe_kernel[:, :1])}


def _ntk_velocity(o: PathOutputs) -> Values:
    """‖K_{t_i} − K_{t_{i−1}}‖_F / ‖K_{t_{i−1}}‖_F between consecutive recorded steps, per
    seed and step (0 at the first)."""
    k = o.probe_kernel
    velocity = np.zeros(k.shape[:2])
    velocity[:, 1:] = _relative_distances(k[:, 1:], k[:, :-1])
    return {("probe", "ntk_velocity"): velocity}


METRICS.register("loss", Metric(
    "loss", lambda o: _split_values(o, o.loss_fn, "loss"),
    doc="the training loss (mse: ½·mean squared error; xent: cross-entropy)"))
METRICS.register("accuracy", Metric(
    "accuracy", lambda o: _split_values(o, accuracy_of, "accuracy"), needs=("classes",),
    doc="fraction of points whose largest output is the label"))
METRICS.register("weight_change", Metric(
    r"relative weight change $\|\theta_t - \theta_0\| / \|\theta_0\|$", _weight_change,
    needs=("trajectory",), scales_with_width=True,
    doc="total and per layer (weight_change/<layer>); n^-1/2 lazy (Lee et al. 2019)"))
METRICS.register("function_gap", Metric(
    "function gap (test RMSE against exact)",
    lambda o: {("test", "function_gap"): rmse(o.f_test, o.f_test_exact)},
    needs=("exact_outputs",), scales_with_width=True,
    doc="RMSE of this path's test outputs against the exact path's (same width, seed, mask)"))
METRICS.register("ntk_change", Metric(
    r"NTK change $\|\Theta_t - \Theta_0\|_F / \|\Theta_0\|_F$", _ntk_change,
    needs=("probe_kernel",), scales_with_width=True,
    doc="relative change of the empirical NTK on the probe set (exact path)"))
METRICS.register("ntk_velocity", Metric(
    r"NTK velocity $\|\Theta_{t_i} - \Theta_{t_{i-1}}\|_F / \|\Theta_{t_{i-1}}\|_F$",
    _ntk_velocity, needs=("probe_kernel",),
    doc="relative change of the empirical NTK between consecutive recorded steps (exact "
        "path; 0 at step 0; Fort et al. 2020)"))
METRICS.register("ntk_final_distance", Metric(
    r"NTK distance to the final kernel $\|\Theta_t - \Theta_T\|_F / \|\Theta_T\|_F$",
    lambda o: {("probe", "ntk_final_distance"): _relative_distances(
        o.probe_kernel, o.probe_kernel[:, -1:])},
    needs=("probe_kernel",), doc="relative distance of the empirical NTK at each recorded "
                                 "step to the final one (exact path; Fort et al. 2020)"))
METRICS.register("feature_change", Metric(
    r"feature change $\|h_t - h_0\| / \|h_0\|$",
    lambda o: {("test", "feature_change"): np.sqrt(o.feature_sq_change
                                                   / o.feature_sq_norm0[:, None])},
    needs=("features",), scales_with_width=True,
    doc="relative change of the last hidden layer's features on the test inputs (exact, "
        "linear); n^-1/2 lazy, n^0 under µP (Yang & Hu 2021)"))
METRICS.register("ntk_init_error", Metric(
    r"NTK at init vs analytic $\|\hat\Theta_0 - \Theta\|_F / \|\Theta\|_F$",
    scales_with_width=True,
    doc="empirical NTK at θ0 against the analytic one on the probe set (step 0)"))
METRICS.register("variance", Metric(
    "predictive variance (mean over test points)",
    lambda o: {("test", "variance"): o.test_variance.mean(axis=-1)},
    needs=("ensemble_variance",),
    doc="the infinite-width ensemble's predictive variance (ntk, nngp)"))
METRICS.register("expected_loss", Metric(
    "expected test loss over initializations", _expected_loss, needs=("ensemble_variance",),
    doc="mean test loss of one network over initializations (ntk, nngp; mse): loss of the "
        "ensemble mean + ½·mean predictive variance (Lee et al. 2019, eq. 12–16)"))
METRICS.register("ensemble_loss", Metric(
    "loss of the seed-averaged prediction",
    lambda o: _split_values(_seed_average(o), o.loss_fn, "ensemble_loss"),
    needs=("finite_networks",), per_seed=False,
    doc="loss of the outputs averaged over the cell's seeds (seed -1; exact, linear, entk); "
        "compare with the ntk path's loss (d'Ascoli et al. 2020)"))
METRICS.register("ensemble_accuracy", Metric(
    "accuracy of the seed-averaged prediction",
    lambda o: _split_values(_seed_average(o), accuracy_of, "ensemble_accuracy"),
    needs=("finite_networks", "classes"), per_seed=False,
    doc="accuracy of the outputs averaged over the cell's seeds (seed -1; exact, linear, "
        "entk)"))
METRICS.register("params_per_target", Metric(
    "parameters per training target P / (n·k)",
    doc="the network's parameter count over the number of training targets (exact path, "
        "step 0): the linearized model can interpolate from 1 on (double descent)"))
METRICS.register("mask_overlap", Metric(
    "Jaccard overlap of kept weights",
    doc="Jaccard overlap of the linear-search and exact-search masks (ticket studies)"))


METRICS.register("instability", Metric(
    "instability (max test error on the line − mean of the ends)",
    doc="linear mode connectivity of two children spawned at step k (Frankle et al. 2020; "
        "[stability] section; test loss for regression)"))
METRICS.register("loss_barrier", Metric(
    "loss barrier (max train loss above the chord)",
    doc="max over α of L((1−α)θ_1 + αθ_2) − ((1−α)L(θ_1) + αL(θ_2)) (Entezari et al. "
        "2022; [stability] section); <= 0 for a loss convex in θ"))


def scaling_metrics() -> tuple[str, ...]:
    """The metrics whose width scaling ``summarize`` fits and the figures draw."""
    return tuple(n for n, m in METRICS.items() if m.scales_with_width)


def metric_label(name: str) -> str:
    """The axis label of a metric (``weight_change/<layer>`` included)."""
    base, _, layer = name.partition("/")
    if base in METRICS:
        return METRICS[base].label + (f", layer {layer}" if layer else "")
    return name.replace("_", " ")


#: A loss this many times its initial value (+1) counts as diverged, as does NaN or inf.
DIVERGENCE_FACTOR = 1e3


def blew_up(train_loss: np.ndarray) -> np.ndarray:
    """(..., r) bool: the recorded steps whose training loss is not finite or exceeds
    :data:`DIVERGENCE_FACTOR` × (its value at the first recorded step + 1)."""
    with np.errstate(invalid="ignore"):
        limit = DIVERGENCE_FACTOR * (np.abs(train_loss[..., :1]) + 1.0)
        return ~np.isfinite(train_loss) | (train_loss > limit)


def diverged_after(train_loss: np.ndarray) -> np.ndarray:
    """(..., r) bool: True from the first recorded step at which the run diverged
    (:func:`blew_up`) on."""
    return np.logical_or.accumulate(blew_up(train_loss), axis=-1)


def path_values(outputs: PathOutputs, names: Sequence[str]) -> dict[tuple[str, str],
                                                                    np.ndarray]:
    """The values of the metrics ``names`` that ``outputs`` supports: (s, r) each, or
    (1, r) for a metric over the ensemble of seeds (``per_seed=False``; its rows carry
    :func:`record_seeds`).

    Every value at and after the first recorded step at which the path diverged (its
    training loss not finite, or above :data:`DIVERGENCE_FACTOR` × (initial + 1)) is NaN: a
    diverged network has no accuracy, so no table or figure can show a number for it. An
    ensemble's value is NaN from the first step at which any of its seeds diverged.
    """
    bad = diverged_after(outputs.loss_fn(outputs.f_train, outputs.y_train))  # (s, r)
    values: dict[tuple[str, str], np.ndarray] = {}
    for name in names:
        metric = METRICS[name]
        if metric.compute is not None and outputs.provides(metric.needs):
            after = bad if metric.per_seed else bad.any(axis=0, keepdims=True)
            values.update({key: np.where(after, np.nan, np.asarray(v, dtype=float))
                           for key, v in metric.compute(outputs).items()})
    return values


def record_seeds(name: str, seeds: Sequence[int]) -> Sequence[int]:
    """The seeds that the rows of metric ``name`` (or ``<name>/<part>``) carry: ``seeds``,
    or ``(ENSEMBLE_SEED,)`` for a metric over their ensemble."""
    return seeds if METRICS[name.split("/")[0]].per_seed else (ENSEMBLE_SEED,)
