"""Typed, frozen study configuration: TOML in, validated dataclasses out.

A study config has the sections ``[data]``, ``[model]``, ``[train]``, optional
``[tickets]`` (mask studies), ``[stability]`` (linear mode connectivity) and ``[subspace]``
(subspace training), or ``[escape]`` (the escape-dimensions study), plus the top-level keys
``name``, ``paths``, ``metrics`` and ``probe_size``. Every field is checked on
construction; an error names the dotted field (``train.loss``) and the allowed values.
Lists become tuples so configs are hashable and immutable.

Example::

    cfg = load_config("study.toml", overrides=["model.widths=[64,256]", "train.steps=200"])
    cfg.train.steps        # 200
    config_hash(cfg)       # stable 12-hex-digit hash of the whole config
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ntk_tickets.errors import UserInputError
from ntk_tickets.registry import choices_of, resolve

PARAMETERIZATIONS = ("ntk", "standard", "mup")
#: ``train.closed_form_time``: the closed forms at the recorded steps, or at t → ∞.
CLOSED_FORM_TIMES = ("steps", "inf")
#: Config fields that may list several values; each value is a cell of the study (with its
#: own records column, named after the field's last part).
FACTOR_FIELDS = ("model.parameterization", "model.output_scale")
#: The records columns (and manifest cell entries) of :data:`FACTOR_FIELDS`.
FACTOR_COLUMNS = tuple(f.rsplit(".", 1)[-1] for f in FACTOR_FIELDS)
PATHS = ("exact", "linear", "entk", "ntk", "nngp")
TICKET_SCOPES = ("global", "layer")
CONTROLS = ("random", "reinit", "shuffle", "random_rescaled", "random_init_rescaled")
TEACHER_WEIGHTS = ("gaussian", "orthonormal")
HESSIAN_METHODS = ("exact", "lanczos")
#: ``subspace.kinds``: the fixed subspaces P of θ = θ_k + P·z (:mod:`ntk_tickets.subspace`).
SUBSPACE_KINDS = ("gaussian", "axis_random", "axis_imp", "lottery")
SEARCH_PATHS = ("exact", "linear", "both")
# Registries that name allowed values, as "module:attribute" (imported when first checked).
DATASETS = "ntk_tickets.data:DATASETS"
ARCHS = "ntk_tickets.architectures:ARCHITECTURES"
ACTIVATIONS = "ntk_tickets.architectures:ACTIVATIONS"
OPTIMIZERS = "ntk_tickets.optimizers:OPTIMIZERS"
SCHEDULES = "ntk_tickets.optimizers:SCHEDULES"
LOSSES = "ntk_tickets.optimizers:LOSSES"
METRICS = "ntk_tickets.metrics:METRICS"
TICKET_METHODS = "ntk_tickets.ticket_methods:TICKET_METHODS"
TEACHER_ACTIVATIONS = "ntk_tickets.data:TEACHER_ACTIVATIONS"
#: Metrics recorded when ``metrics`` is not given.
DEFAULT_METRICS = ("loss", "accuracy", "weight_change", "feature_change", "function_gap",
                   "ntk_change", "ntk_init_error", "variance", "expected_loss")


def _field(default: Any, *, choices: tuple[str, ...] | str | None = None,
           minimum: float | None = None, doc: str = "") -> Any:
    """A dataclass field with validation metadata: allowed choices (a tuple, or a registry
    as ``"module:attribute"``) and an inclusive minimum."""
    metadata = {"choices": choices, "minimum": minimum, "doc": doc}
    if isinstance(default, list | tuple):
        return dataclasses.field(default=tuple(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which data, how much, and how it is made.

    ``teacher``: Gaussian inputs of ``input_dim`` dimensions, targets from a random teacher
    MLP (``teacher_width``, ``teacher_depth``, ``teacher_activation``, ``teacher_weights``)
    plus ``noise``. ``sine``: 1-D regression of
    sin on [-π, π] plus ``noise``. ``digits``: scikit-learn's 8×8 digits. ``mnist1d``: the
    mnist1d generator run locally. ``npz`` / ``idx``: files given by ``path``.
    """

    name: str = _field("digits", choices=DATASETS)
    n_train: int = _field(256, minimum=1)
    n_test: int = _field(256, minimum=1)
    seed: int = _field(0, minimum=0)
    path: str = _field("", doc="file or folder for npz/idx datasets")
    input_dim: int = _field(8, minimum=1, doc="teacher input dimension")
    teacher_width: int = _field(64, minimum=1)
    teacher_depth: int = _field(2, minimum=1)
    teacher_activation: str = _field("tanh", choices=TEACHER_ACTIVATIONS)
    teacher_weights: str = _field(
        "gaussian", choices=TEACHER_WEIGHTS,
        doc="gaussian: N(0, 1/fan_in) weights; orthonormal: orthonormal incoming weight "
            "vectors and unit readout weights (Safran & Shamir 2018; needs teacher_width "
            "<= input_dim)")
    noise: float = _field(0.0, minimum=0.0, doc="std of Gaussian label noise (teacher, sine)")
    label_noise: float = _field(0.0, minimum=0.0,
                                doc="fraction of training labels replaced by uniformly random "
                                    "classes, seeded by data.seed (classification)")
    standardize: bool = _field(False, doc="standardize inputs per feature with training "
                                          "statistics (default: inputs as the data give them)")
    std_floor: float = _field(1.0, minimum=0.0,
                              doc="σ floor of standardization, relative to the RMS of the "
                                  "features' σ (0: only constant features are left unscaled)")

    def __post_init__(self):
        _validate_fields(self, "data")
        if (self.name == "teacher" and self.teacher_weights == "orthonormal"
                and self.teacher_width > self.input_dim):
            raise UserInputError(
                f"data.teacher_weights = 'orthonormal' needs teacher_width <= input_dim, got "
                f"{self.teacher_width} > {self.input_dim}: raise data.input_dim or use "
                "'gaussian'")
        if self.label_noise > 1.0:
            raise UserInputError(f"data.label_noise is a fraction of the training labels: it "
                                 f"must be in [0, 1], got {self.label_noise}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """One stax architecture at several widths (hidden units, or channels for CNNs)."""

    arch: str = _field("mlp", choices=ARCHS)
    depth: int = _field(2, minimum=1, doc="hidden layers (blocks for resmlp)")
    widths: tuple[int, ...] = _field((64, 256, 1024), minimum=1)
    activation: str = _field("relu", choices=ACTIVATIONS)
    parameterization: str | tuple[str, ...] = _field(
        "ntk", choices=PARAMETERIZATIONS,
        doc="ntk, standard or mup (maximal update, Yang & Hu 2021); a list makes one cell "
            "per value")
    base_width: int = _field(64, minimum=1, doc="the width at which mup equals ntk")
    output_scale: float | tuple[float, ...] = _field(
        1.0, minimum=0.0,
        doc="α: the trained function is α·f (α·(f − f0) when centred) at learning rate "
            "η/α² (η/α for adam); large α is lazy; a list makes one cell per value")
    center: bool = _field(False, doc="train α·(f(θ) − f(θ0)), so the output starts at 0")
    w_std: float = _field(math.sqrt(2.0), minimum=0.0)
    b_std: float = _field(0.05, minimum=0.0)
    kernel_size: int = _field(3, minimum=1, doc="CNN filter size")

    def __post_init__(self):
        _validate_fields(self, "model")
        if 0.0 in factor_values(self.output_scale):
            raise UserInputError("model.output_scale must be > 0, got 0")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The optimizer, loss and steps shared by the exact and linear paths."""

    optimizer: str = _field("sgd", choices=OPTIMIZERS)
    learning_rate: float = _field(0.5, minimum=0.0)
    momentum: float = _field(0.9, minimum=0.0, doc="for the momentum optimizer")
    weight_decay: float = _field(0.0, minimum=0.0,
                                 doc="added to the gradient (sgd, momentum); AdamW for adam")
    schedule: str = _field("constant", choices=SCHEDULES)
    steps: int = _field(1000, minimum=1)
    batch_size: int = _field(0, minimum=0, doc="0 = full batch")
    loss: str = _field("mse", choices=LOSSES)
    seeds: tuple[int, ...] = _field((0, 1), minimum=0)
    x64: bool = _field(False, doc="float64 everywhere (also set by JAX_ENABLE_X64)")
    log_points: int = _field(20, minimum=2, doc="log-spaced steps at which metrics are recorded")
    ridge: float = _field(0.0, minimum=0.0,
                          doc="diagonal regularizer of the closed forms (entk, ntk, nngp), "
                              "relative to the kernel's mean diagonal")
    closed_form_time: str = _field("steps", choices=CLOSED_FORM_TIMES,
                                   doc="steps: closed forms at the recorded steps; inf: their "
                                       "t → ∞ solution, recorded at the last step")

    def __post_init__(self):
        _validate_fields(self, "train")


@dataclasses.dataclass(frozen=True)
class TicketsConfig:
    """How subnetwork masks are found, controlled and perturbed (SCIENCE.md)."""

    method: str = _field("imp", choices=TICKET_METHODS)
    rounds: int = _field(5, minimum=1, doc="pruning rounds; round r keeps (1 - p)^r")
    prune_fraction: float = _field(0.2, minimum=0.0, doc="p, removed per round")
    rewind_step: int | tuple[int, ...] = _field(
        0, minimum=0, doc="tickets start from θ_k of the dense run; a list sweeps k (one "
                          "search and evaluation per k, records column rewind_step)")
    scope: str = _field("global", choices=TICKET_SCOPES)
    search_path: str = _field("exact", choices=SEARCH_PATHS,
                              doc="path whose training drives imp/oneshot; both = compare")
    eval_paths: tuple[str, ...] = _field(("exact", "linear"), choices=("exact", "linear"),
                                         doc="paths on which every mask is trained")
    controls: tuple[str, ...] = _field(
        ("random", "reinit"), choices=CONTROLS,
        doc="random, reinit, shuffle; random_rescaled: the random mask as its own NTK-"
            "parameterized network (kept weights × 1/√density in the forward pass); "
            "random_init_rescaled: only its initial weights × 1/√density")
    rescaled: bool = _field(False, doc="also train the ticket, shuffle and reinit masks as "
                                       "their own NTK-parameterized networks "
                                       "(<name>_rescaled)")
    prune_biases: bool = _field(False)
    output_prune_fraction: float = _field(-1.0, minimum=-1.0,
                                          doc="rate for the output layer; -1 = same")
    perturb_eps: tuple[float, ...] = _field((), minimum=0.0, doc="ε grid of the perturbation test")
    perturb_trainable: bool = _field(False, doc="train the perturbed complement too")
    synflow_iterations: int = _field(100, minimum=1)
    saliency_samples: int = _field(16, minimum=1, doc="Gaussian probes for ntk_saliency")

    def __post_init__(self):
        _validate_fields(self, "tickets")
        for field, rate in (("prune_fraction", self.prune_fraction),
                            ("output_prune_fraction", self.output_prune_fraction)):
            if not 0.0 <= rate < 1.0 and not (field == "output_prune_fraction" and rate == -1.0):
                raise UserInputError(f"tickets.{field} must be in [0, 1)"
                                     + (" or -1 (the same as prune_fraction)"
                                        if field == "output_prune_fraction" else "")
                                     + f", got {rate}")


@dataclasses.dataclass(frozen=True)
class EscapeConfig:
    """The escape-dimensions study (:mod:`ntk_tickets.escape`): a census of one-hidden-layer
    students of a teacher, the escape test of their stuck minima, and the lottery prediction
    measured beside it. Training: ``train.optimizer`` for ``train.steps``, then
    Levenberg–Marquardt for at most ``polish_steps``."""

    tolerance: float = _field(1e-10, minimum=0.0,
                              doc="success: training loss / target variance below this")
    grad_tolerance: float = _field(1e-7, minimum=0.0,
                                   doc="critical point: ‖∇ relative loss‖ below this")
    eig_tolerance: float = _field(1e-6, minimum=0.0,
                                  doc="a minimum: λ_min >= −eig_tolerance·λ_max")
    polish_steps: int = _field(300, minimum=0, doc="Levenberg–Marquardt iterations at most")
    split_mu: tuple[float, ...] = _field((-0.5, 0.5, 1.5),
                                         doc="output-weight shares μ of a split unit")
    add_neurons: int = _field(2, minimum=1, doc="the escape test adds k = 1…add_neurons units")
    hessian: str = _field("exact", choices=HESSIAN_METHODS)
    lanczos_iters: int = _field(64, minimum=2, doc="Lanczos steps when hessian = lanczos")
    noise: float = _field(1e-5, minimum=0.0, doc="std of the noise added to an embedded "
                                                  "minimum before it is retrained")
    subnetworks: int = _field(2, minimum=0, doc="random teacher_width-unit subnetworks of "
                                                 "each seed's θ0 trained alone (p_sub)")
    tickets: bool = _field(True, doc="retrain the top-|a|·‖w‖ units of successful wide "
                                      "students alone, and perturb them in place")
    perturb_eps: tuple[float, ...] = _field((0.0, 1.0), minimum=0.0,
                                            doc="ε of the rest of the network around a ticket")
    cluster_tolerance: float = _field(1e-3, minimum=0.0,
                                      doc="two units are one if 1 − |cos| of their incoming "
                                          "vectors is below this (Expand-and-Cluster)")

    def __post_init__(self):
        _validate_fields(self, "escape")
        _check_nonempty("escape.split_mu", self.split_mu)


@dataclasses.dataclass(frozen=True)
class StabilityConfig:
    """Linear mode connectivity (:mod:`ntk_tickets.stability`): at each spawn step k the
    network is copied and two children are trained with independent minibatch orders; the
    loss and error along the straight line between them give ``loss_barrier`` and
    ``instability``. Tickets of a ``[tickets]`` section spawn at their rewind steps."""

    spawn_steps: tuple[int, ...] = _field((0,), minimum=0,
                                          doc="steps k at which the dense network is copied")
    n_interp: int = _field(11, minimum=2, doc="points on the line, both endpoints included")

    def __post_init__(self):
        _validate_fields(self, "stability")
        _check_nonempty("stability.spawn_steps", self.spawn_steps)


@dataclasses.dataclass(frozen=True)
class SubspaceConfig:
    """Subspace training θ = θ_k + P·z, only z trained (:mod:`ntk_tickets.subspace`; Li et
    al. 2018, Larsen et al. 2022), for each kind of P and dimension d."""

    kinds: tuple[str, ...] = _field(("gaussian", "axis_random"), choices=SUBSPACE_KINDS,
                                    doc="gaussian (Fastfood), axis_random, axis_imp (needs "
                                        "[tickets] with method imp), lottery (top principal "
                                        "directions of the dense trajectory)")
    dims: tuple[int, ...] = _field((16, 64, 256), minimum=1, doc="subspace dimensions d")
    start_step: int = _field(0, minimum=0, doc="k: the subspace is anchored at θ_k")
    learning_rate: float = _field(0.0, minimum=0.0,
                                  doc="the learning rate of z (0: train.learning_rate); a "
                                      "d-dimensional subspace moves θ more slowly than "
                                      "training all D parameters at the same rate")
    snapshots: int = _field(128, minimum=2,
                            doc="parameter snapshots of the dense run whose principal "
                                "directions span the lottery subspace (>= max dims)")

    def __post_init__(self):
        _validate_fields(self, "subspace")
        _check_nonempty("subspace.kinds", self.kinds)
        _check_nonempty("subspace.dims", self.dims)


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """A whole study: data, model, training, optional tickets, and what to run and record."""

    name: str = _field("study")
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    tickets: TicketsConfig | None = None
    escape: EscapeConfig | None = None
    stability: StabilityConfig | None = None
    subspace: SubspaceConfig | None = None
    paths: tuple[str, ...] = _field(PATHS, choices=PATHS)
    metrics: tuple[str, ...] = _field(DEFAULT_METRICS, choices=METRICS)
    probe_size: int = _field(32, minimum=1, doc="inputs on which NTKs are compared")

    def __post_init__(self):
        _validate_fields(self, "")
        _check_name(self.name)
        for field in ("paths", "metrics", "model.widths", "train.seeds"):
            _check_nonempty(field, _get(self, field))
        source = resolve(DATASETS)[self.data.name]
        if source.needs_path and not self.data.path:
            raise UserInputError(
                f"data.path is required for data.name = {self.data.name!r}: "
                "set it to the dataset file or folder"
            )
        if self.tickets is not None:
            _check_tickets(self.tickets, self.paths, self.train.steps)
        if self.escape is not None:
            _check_escape(self)
        if self.stability is not None:
            _check_stability(self)
        if self.subspace is not None:
            _check_subspace(self)
        if self.train.batch_size > self.data.n_train:
            raise UserInputError(
                f"train.batch_size ({self.train.batch_size}) exceeds data.n_train "
                f"({self.data.n_train}): lower it, or use 0 for full batch"
            )
        if self.train.loss == "xent" and source.task == "regression":
            raise UserInputError(
                f"train.loss = 'xent' needs a classification dataset, but data.name = "
                f"{self.data.name!r} is regression: use train.loss = 'mse'"
            )
        if self.data.label_noise and source.task == "regression":
            raise UserInputError(
                f"data.label_noise replaces class labels, but data.name = {self.data.name!r} "
                "is regression: use data.noise for noisy regression targets")


def _check_tickets(t: TicketsConfig, paths: Sequence[str], steps: int) -> None:
    _check_nonempty("tickets.eval_paths", t.eval_paths)
    searched = ("exact", "linear") if t.search_path == "both" else (t.search_path,)
    for path in (*t.eval_paths, *searched):
        if path not in paths:
            raise UserInputError(
                f"the tickets section trains the {path!r} path, but paths = {list(paths)} "
                f"leaves it out: add it to paths or change tickets.eval_paths / "
                f"tickets.search_path")
    trained = resolve(TICKET_METHODS)[t.method].search in ("rewind", "oneshot")
    if t.search_path != "exact" and not trained:
        raise UserInputError(
            f"tickets.search_path = {t.search_path!r} applies to the imp and oneshot methods "
            f"only; {t.method!r} scores weights at initialization: use search_path = 'exact'")
    if max(rewind_steps(t)) > steps:
        raise UserInputError(
            f"tickets.rewind_step ({max(rewind_steps(t))}) is after the last training step "
            f"(train.steps = {steps})")


def rewind_steps(t: TicketsConfig) -> tuple[int, ...]:
    """The rewind steps of a tickets section, in the order given (one or a sweep)."""
    return t.rewind_step if isinstance(t.rewind_step, tuple) else (t.rewind_step,)


def _check_trained_paths(cfg: StudyConfig, section: str) -> None:
    """``[stability]`` and ``[subspace]`` train the exact and/or linear path."""
    if not {"exact", "linear"} & set(cfg.paths):
        raise UserInputError(f"the [{section}] section trains the exact and linear paths, "
                             f"but paths = {list(cfg.paths)}: add 'exact' or 'linear'")


def _check_stability(cfg: StudyConfig) -> None:
    _check_trained_paths(cfg, "stability")
    if not cfg.train.batch_size:
        raise UserInputError("the [stability] section compares children trained with "
                             "different minibatch orders, which full batch does not have: "
                             "set train.batch_size > 0")
    late = [k for k in cfg.stability.spawn_steps if k > cfg.train.steps]
    if late:
        raise UserInputError(f"stability.spawn_steps {late} are after the last training step "
                             f"(train.steps = {cfg.train.steps})")


def _check_subspace(cfg: StudyConfig) -> None:
    s = cfg.subspace
    _check_trained_paths(cfg, "subspace")
    if "mup" in factor_values(cfg.model.parameterization):
        raise UserInputError("the [subspace] section trains z in θ = θ_k + P·z with one "
                             "learning rate, which µP's per-layer rates do not define: use "
                             "model.parameterization = 'ntk' or 'standard'")
    if s.start_step > cfg.train.steps:
        raise UserInputError(f"subspace.start_step ({s.start_step}) is after the last "
                             f"training step (train.steps = {cfg.train.steps})")
    if "axis_imp" in s.kinds and (cfg.tickets is None or cfg.tickets.method != "imp"):
        raise UserInputError("subspace kind 'axis_imp' takes the IMP masks of a [tickets] "
                             "section with method = 'imp': add one, or drop 'axis_imp'")
    if "lottery" in s.kinds:
        if max(s.dims) > s.snapshots:
            raise UserInputError(
                f"the lottery subspace of dimension {max(s.dims)} needs at least as many "
                f"snapshots of the dense run: raise subspace.snapshots (now {s.snapshots}) "
                f"to >= {max(s.dims)}")
        if s.snapshots > cfg.train.steps - s.start_step:
            raise UserInputError(
                f"subspace.snapshots ({s.snapshots}) exceeds the {cfg.train.steps - s.start_step}"
                f" steps from subspace.start_step to train.steps: the dense run has one "
                "snapshot per step at most")


def _check_escape(cfg: StudyConfig) -> None:
    """The escape study trains one-hidden-layer MLP students of a teacher with MSE."""
    needs = [("data.name", "teacher"), ("model.arch", "mlp"), ("model.depth", 1),
             ("train.loss", "mse"), ("train.x64", True), ("paths", ("exact",)),
             ("tickets", None), ("stability", None), ("subspace", None)]
    for field, value in needs:
        if _get(cfg, field) != value:
            raise UserInputError(
                f"the [escape] study needs {field} = {value!r} (one-hidden-layer students of "
                f"a teacher, trained to zero loss), got {_get(cfg, field)!r}")
    for field in FACTOR_FIELDS:
        if len(factor_values(_get(cfg, field))) > 1:
            raise UserInputError(f"the [escape] study takes one value of {field}, got "
                                 f"{list(_get(cfg, field))}: run one study per value")
    if cfg.model.parameterization == "standard":
        raise UserInputError("the [escape] study embeds minima into wider students, which "
                             "needs model.parameterization = 'ntk' or 'mup', got 'standard'")


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _check_nonempty(field: str, values: Sequence[Any]) -> None:
    if not values:
        raise UserInputError(f"{field} must not be empty")


def _check_name(name: str) -> None:
    """A study name is a plain folder name: results go to ``results/<name>``."""
    if (not name or name in (".", "..") or any(c in name for c in "/\\\0")
            or name != name.strip()):
        raise UserInputError(
            f"name = {name!r} must be a plain name (no path separators, not '.' or '..'): "
            "choose the results folder with --out DIR instead")


def _validate_fields(section: Any, prefix: str) -> None:
    """Checks every field of a config section against its annotation and metadata, and
    stores it in canonical form (lists as tuples, integers in float fields as floats).

    Raises:
      UserInputError: naming the dotted field, the bad value and what is allowed.
    """
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        name = f"{prefix}.{f.name}" if prefix else f.name
        tp, value = hints[f.name], getattr(section, f.name)
        inner = _strip_optional(tp)
        if dataclasses.is_dataclass(inner):
            if not (isinstance(value, inner) or (value is None and inner is not tp)):
                raise UserInputError(f"{name} must be a {inner.__name__}, got {value!r}")
            continue
        value = _coerce(name, tp, value)
        _check_value(name, value, f.metadata)
        object.__setattr__(section, f.name, value)


def _check_value(name: str, value: Any, meta: Mapping[str, Any]) -> None:
    """Choices, minimum and distinctness of one (coerced) field value."""
    items = value if isinstance(value, tuple) else (value,)
    if meta.get("choices") is not None:
        allowed = choices_of(meta["choices"])
        for v in items:
            if v not in allowed:
                raise UserInputError(f"{name} = {v!r} is not allowed; choose one of "
                                     f"{', '.join(map(repr, allowed))}")
    minimum = meta.get("minimum")
    if minimum is not None and any(v < minimum for v in items):
        raise UserInputError(f"{name} must be >= {minimum}, got {value!r}")
    if isinstance(value, tuple) and len(set(value)) != len(value):
        twice = sorted({v for v in value if value.count(v) > 1})
        raise UserInputError(f"{name} lists {', '.join(map(repr, twice))} more than once: "
                             f"{list(value)}; give each value once")


def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[tp]


def _coerce(field: str, tp: Any, value: Any) -> Any:
    """Checks ``value`` against the annotation ``tp``; returns it in canonical form.

    A factor field (``X | tuple[X, ...]``) takes one value or a non-empty list of them; a
    one-element list is stored as its value.
    """
    if isinstance(tp, types.UnionType) and type(None) not in typing.get_args(tp):
        scalar, many = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            return _coerce(field, scalar, value)
        values = _coerce(field, many, value)
        _check_nonempty(field, values)
        return values[0] if len(values) == 1 else values
    origin = typing.get_origin(tp)
    if origin is tuple:
        (item_tp, _) = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise UserInputError(
                f"{field} must be a list of values like [1, 2], got {value!r}"
            )
        return tuple(_coerce(f"{field}[{i}]", item_tp, v) for i, v in enumerate(value))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if (tp is int and isinstance(value, bool)) or not isinstance(value, tp):
        raise UserInputError(f"{field} must be {_type_name(tp)}, got {value!r}")
    if tp is float and not math.isfinite(value):
        raise UserInputError(f"{field} must be a finite number, got {value!r}")
    return value


def _build_section(cls: type, values: Mapping[str, Any], prefix: str) -> Any:
    """``cls(**values)`` with nested sections built first; unknown keys are refused (the
    class validates its own fields)."""
    if not isinstance(values, Mapping):
        raise UserInputError(f"[{prefix}] must be a table of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        name = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            where = f" in [{prefix}]" if prefix else ""
            raise UserInputError(f"unknown config key {name!r}; known keys{where}: "
                                 f"{', '.join(fields)}")
        section = _strip_optional(hints[key])
        if dataclasses.is_dataclass(section):
            value = _build_section(section, value, name)
        kwargs[key] = value
    return cls(**kwargs)


def _strip_optional(tp: Any) -> Any:
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def config_from_dict(values: Mapping[str, Any]) -> StudyConfig:
    """Builds a validated :class:`StudyConfig` from nested plain values (TOML or JSON).

    Raises:
      UserInputError: naming the first bad field and what is allowed.
    """
    return _build_section(StudyConfig, values, "")


def config_to_dict(cfg: StudyConfig) -> dict[str, Any]:
    """The config as nested plain values (lists, not tuples); ``tickets`` omitted if None."""
    out = dataclasses.asdict(cfg)
    for section in ("tickets", "escape", "stability", "subspace"):
        if out[section] is None:
            del out[section]
    return json.loads(json.dumps(out))


def config_hash(cfg: StudyConfig) -> str:
    """A stable 12-hex-digit identity of the whole config (SHA-256 of its canonical JSON)."""
    return _hash(config_to_dict(cfg))


#: Fields that only enumerate a study's cells: a results folder grows along them.
CELL_FIELDS = ("name", "model.widths", "train.seeds", *FACTOR_FIELDS)


def factor_values(value: Any) -> tuple[Any, ...]:
    """The values of a factor field (:data:`FACTOR_FIELDS`) as a tuple: ``"mup"`` →
    ``("mup",)``, ``("ntk", "mup")`` unchanged."""
    return tuple(value) if isinstance(value, list | tuple) else (value,)


def factor_defaults() -> dict[str, Any]:
    """``{column: default value}`` of the factor fields (:data:`FACTOR_COLUMNS`)."""
    defaults = config_to_dict(StudyConfig())
    return {column: _dotted(defaults, field)
            for field, column in zip(FACTOR_FIELDS, FACTOR_COLUMNS, strict=True)}


def factor_tag(column: str, value: Any) -> str:
    """A factor value in a file name (cell ids, figure names): a name as it is (``mup``), a
    number after the column's initials (``output_scale = 10`` → ``os10``)."""
    if isinstance(value, str):
        return value
    return "".join(word[0] for word in column.split("_")) + f"{value:g}"


def cell_factors(cfg: StudyConfig) -> list[dict[str, Any]]:
    """Every combination of the factor fields' values, in config order: one dict
    ``{column: value}`` per combination, e.g. ``[{"parameterization": "ntk",
    "output_scale": 1.0}, {"parameterization": "mup", "output_scale": 1.0}]``."""
    combos: list[dict[str, Any]] = [{}]
    for field, column in zip(FACTOR_FIELDS, FACTOR_COLUMNS, strict=True):
        combos = [{**c, column: v} for c in combos for v in factor_values(_get(cfg, field))]
    return combos


def with_factors(cfg: StudyConfig, factors: Mapping[str, Any]) -> StudyConfig:
    """``cfg`` with each factor field set to one value (``factors`` from
    :func:`cell_factors`): the config one cell runs under."""
    sections: dict[str, dict[str, Any]] = {}
    for field in FACTOR_FIELDS:
        section, key = field.split(".")
        if key in factors:
            sections.setdefault(section, {})[key] = factors[key]
    return dataclasses.replace(cfg, **{
        section: dataclasses.replace(getattr(cfg, section), **values)
        for section, values in sections.items()})


def study_identity(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config (plain values, :func:`config_to_dict`) without :data:`CELL_FIELDS`:
    what every cell of one results folder shares. Adding widths or seeds, or renaming the
    study, keeps it; any other change makes another study."""
    out = json.loads(json.dumps(config))
    for dotted in CELL_FIELDS:
        *parents, last = dotted.split(".")
        node = out
        for key in parents:
            node = node.get(key, {})
        node.pop(last, None)
    return out


def identity_hash(config: Mapping[str, Any]) -> str:
    """12 hex digits of SHA-256 over :func:`study_identity`."""
    return _hash(study_identity(config))


def differing_fields(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The dotted names of the fields whose values differ between two nested configs."""
    out = []
    for key in sorted(set(a) | set(b)):
        name = f"{prefix}.{key}" if prefix else key
        va, vb = a.get(key), b.get(key)
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            out += differing_fields(va, vb, name)
        elif va != vb:
            out.append(name)
    return out


def identity_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """The fields in which two study identities differ (:func:`study_identity`), dotted.

    A field that ``old`` lacks counts as equal when ``new`` holds its default value: it was
    added to ntk-tickets after ``old`` was written, and the default keeps the old behaviour,
    so a later version can still grow an earlier study.
    """
    # (an [escape] section is valid only with a teacher: its defaults are added apart)
    escape = json.loads(json.dumps(dataclasses.asdict(EscapeConfig())))
    defaults = study_identity({**config_to_dict(StudyConfig(tickets=TicketsConfig())),
                               "escape": escape})
    old, new = study_identity(old), study_identity(new)  # fields that became cell factors
    return [field for field in differing_fields(old, new)
            if not (_dotted(old, field) is _ABSENT
                    and _dotted(new, field) == _dotted(defaults, field))]


_ABSENT = object()


def _dotted(values: Mapping[str, Any], field: str) -> Any:
    for key in field.split("."):
        if not isinstance(values, Mapping) or key not in values:
            return _ABSENT
        values = values[key]
    return values


def _hash(values: Mapping[str, Any]) -> str:
    canonical = json.dumps(values, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parses ``dotted.key=value`` with a TOML value; a bare word is taken as a string.

    >>> parse_override("model.widths=[64, 256]")
    (['model', 'widths'], [64, 256])
    >>> parse_override("data.name=digits")
    (['data', 'name'], 'digits')
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise UserInputError(
            f"--set {text!r} is not of the form dotted.key=value (e.g. train.steps=200)"
        )
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.split("."), value


def apply_overrides(values: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Returns a copy of nested ``values`` with each ``dotted.key=value`` override applied."""
    out = json.loads(json.dumps(values))
    for text in overrides:
        keys, value = parse_override(text)
        node = out
        for i, k in enumerate(keys[:-1]):
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise UserInputError(
                    f"--set {text!r}: {'.'.join(keys[: i + 1])} is a value, not a section"
                )
            node = child
        node[keys[-1]] = value
    return out


def load_config_dict(path: str | Path) -> dict[str, Any]:
    """Reads a TOML file into nested plain values, with a clear error for a bad file."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError as e:
        raise UserInputError(f"config file {str(path)!r} does not exist") from e
    except IsADirectoryError as e:
        raise UserInputError(f"config file {str(path)!r} is a folder, not a TOML file") from e
    except tomllib.TOMLDecodeError as e:
        raise UserInputError(f"config file {str(path)!r} is not valid TOML: {e}") from e
    except UnicodeDecodeError as e:
        raise UserInputError(f"config file {str(path)!r} is not UTF-8 text ({e.reason} at "
                             f"byte {e.start}): save it as UTF-8") from e
    except OSError as e:
        raise UserInputError(f"config file {str(path)!r} cannot be read "
                             f"({e.strerror or e})") from e


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> StudyConfig:
    """Loads a TOML study config and applies ``--set``-style overrides.

    Args:
      path: a TOML file.
      overrides: strings ``dotted.key=value`` with TOML values, applied in order.

    Returns:
      The validated :class:`StudyConfig`.

    Raises:
      UserInputError: for a missing or malformed file, or any bad field.
    """
    return config_from_dict(apply_overrides(load_config_dict(path), overrides))


def with_overrides(cfg: StudyConfig, overrides: Sequence[str]) -> StudyConfig:
    """Returns ``cfg`` with ``dotted.key=value`` overrides applied and re-validated."""
    return config_from_dict(apply_overrides(config_to_dict(cfg), overrides))
