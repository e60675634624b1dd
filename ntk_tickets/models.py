"""Architectures built once with ``neural_tangents.stax``.

Each builder returns a :class:`Model`: the stax triple ``(init_fn, apply_fn, kernel_fn)``,
so the finite network and its infinite-width kernels share one parameterization, plus the
names of the parameterized layers for per-layer metrics.

Architectures and activations are the registry entries of :mod:`ntk_tickets.architectures`.

Parameters are the plain nested lists/tuples that stax produces; ``params[i]`` belongs to
layer ``i`` of the top-level ``stax.serial``. :attr:`Model.layer_names` names the top-level
entries that hold parameters, in order.

References: Novak et al. 2020, "Neural Tangents" (arXiv 1912.02803); Lee et al. 2019.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax

from ntk_tickets._nt import stax
from ntk_tickets.architectures import ARCHITECTURES, dense
from ntk_tickets.config import FACTOR_FIELDS, ModelConfig, factor_values
from ntk_tickets.errors import UserInputError
from ntk_tickets.regimes import readout_w_std

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Model:
    """A stax network at one width.

    Attributes:
      init_fn: ``(key, input_shape) -> (output_shape, params)``; ``input_shape`` includes
        the batch axis, e.g. ``(-1, 8, 8, 1)``.
      apply_fn: ``(params, x) -> f(x)``, ``x`` of shape ``(n, *input_shape)``, output
        ``(n, n_out)``.
      kernel_fn: ``(x1, x2, get) -> kernel``; the analytic infinite-width NNGP / NTK.
      feature_fn: ``(params, x) -> h``, the last hidden layer's features (everything before
        the readout), shape ``(n, d)`` (``(n, width)`` for MLPs); ``params`` are the whole
        network's.
      layer_names: names of the parameterized top-level layers, aligned with
        :func:`layer_params`.
      width: hidden units (MLPs) or channels (CNNs).
      input_shape: one input's shape, without the batch axis.
      n_out: output dimension.
      cache: this model's compiled programs (e.g. its empirical-NTK function), kept
        between calls by :mod:`ntk_tickets.kernels` (``cache=model.cache``); they live and
        die with the model.
    """

    init_fn: Callable
    apply_fn: Callable
    kernel_fn: Callable
    feature_fn: Callable
    layer_names: tuple[str, ...]
    width: int
    input_shape: tuple[int, ...]
    n_out: int
    cache: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def init(self, key: jax.Array) -> PyTree:
        """Draws ``theta0`` for this model's input shape."""
        _, params = self.init_fn(key, (-1, *self.input_shape))
        return params


# neural-tangents' generic notes, silenced where they are noise: residual branches here end
# in a Dense layer, so FanInSum's inputs are uncorrelated at init and its independence
# assumption holds; tanh's derivative is taken by autodiff without the `where` pitfall.
_NOISE = ("`FanIn` layers assume independent inputs", "Numerical Activation Layer",
          "Using JAX autodiff to compute the `fn` derivative")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silences :data:`_NOISE` inside the block only (the process's filters are restored)."""
    with warnings.catch_warnings():
        for message in _NOISE:
            warnings.filterwarnings("ignore", message=message, category=UserWarning)
        yield


def _quietly(fn: Callable) -> Callable:
    """``fn`` with :data:`_NOISE` silenced while it runs."""
    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with _quiet():
            return fn(*args, **kwargs)
    return wrapped


def _check_input_shape(arch: str, input_shape: Sequence[int]) -> None:
    need = ARCHITECTURES[arch].input_shape
    if need is not None and len(input_shape) != ARCHITECTURES[arch].input_rank():
        raise UserInputError(
            f"model.arch = {arch!r} needs inputs of shape {need}, but the data's inputs "
            f"have shape {tuple(input_shape)}: choose another model.arch or data.name"
        )


def _check_one_cell(cfg: ModelConfig) -> None:
    for field in FACTOR_FIELDS:
        section, key = field.split(".")
        if section == "model" and len(factor_values(getattr(cfg, key))) > 1:
            raise ValueError(f"{field} lists {getattr(cfg, key)}: a model has one value; "
                             "config.cell_factors and config.with_factors split a study")


def build_model(cfg: ModelConfig, width: int, input_shape: Sequence[int], n_out: int) -> Model:
    """Builds ``cfg.arch`` at one width for inputs of ``input_shape`` and ``n_out`` outputs.

    Under ``parameterization = "mup"`` the layers are built in the ntk form and the readout's
    ``W_std`` is scaled by √(base_width / width) (:mod:`ntk_tickets.regimes`); the analytic
    ``kernel_fn`` is then that of this finite-width scaling, not a µP limit.

    Args:
      cfg: the model section of the study config (``width`` replaces ``cfg.widths``), with
        one parameterization and one output scale.
      width: hidden units (MLPs) or channels (CNNs).
      input_shape: one input's shape, without the batch axis.
      n_out: output dimension (classes, or regression targets).

    Returns:
      The :class:`Model`.

    Raises:
      UserInputError: if the architecture does not fit the input shape.
      ValueError: if ``cfg`` lists several parameterizations or output scales.
    """
    _check_one_cell(cfg)
    _check_input_shape(cfg.arch, input_shape)
    with _quiet():
        layers, names = ARCHITECTURES[cfg.arch].hidden(cfg, width, stax)
        _, hidden_fn, _ = stax.serial(*layers)
        layers.append(dense(cfg, n_out, stax, w_std=readout_w_std(cfg, width)))
        init_fn, apply_fn, kernel_fn = stax.serial(*layers)
    names.append("readout")
    return Model(
        init_fn=init_fn,
        apply_fn=apply_fn,
        kernel_fn=_quietly(kernel_fn),
        feature_fn=lambda params, x: hidden_fn(params[:-1], x),
        layer_names=tuple(n for n in names if n is not None),
        width=width,
        input_shape=tuple(input_shape),
        n_out=n_out,
    )


def layer_params(model: Model, params: PyTree) -> dict[str, PyTree]:
    """The parameters of each named layer: ``{layer_name: params[i]}``, in layer order."""
    held = [p for p in params if jax.tree_util.tree_leaves(p)]
    if len(held) != len(model.layer_names):
        raise ValueError(
            f"params hold {len(held)} parameterized layers, the model names "
            f"{len(model.layer_names)}"
        )
    return dict(zip(model.layer_names, held, strict=True))


def parameter_count(params: PyTree) -> int:
    """The number of scalar parameters in a PyTree."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params))
