"""Architectures built once with ``neural_tangents.stax``.

Each builder returns a :class:`Model`: the stax triple ``(init_fn, apply_fn, kernel_fn)``,
so the finite network and its infinite-width kernels share one parameterization, plus the
names of the parameterized layers for per-layer metrics.

Architectures (``model.arch``):

* ``mlp``: ``Flatten → [Dense(width) → act] × depth → Dense(n_out)``.
* ``resmlp``: ``Flatten → Dense(width) → [x + Dense(width)(act(x))] × depth → act →
  Dense(n_out)``; the residual branches make depth cheap to train.
* ``cnn1d`` / ``cnn2d``: ``[Conv(width, kernel_size, SAME) → act] × depth → Flatten →
  Dense(n_out)`` on ``(length, channels)`` signals or ``(height, width, channels)`` images;
  the number of channels is the width knob.

Activations: ``relu``, ``erf`` and ``gelu`` have closed-form kernels in neural-tangents;
``tanh`` has none and uses ``stax.ElementwiseNumerical`` (Gauss–Hermite quadrature of the
kernel integrals, degree :data:`TANH_QUADRATURE_DEGREE`).

Parameters are the plain nested lists/tuples that stax produces; ``params[i]`` belongs to
layer ``i`` of the top-level ``stax.serial``. :attr:`Model.layer_names` names the top-level
entries that hold parameters, in order.

References: Novak et al. 2020, "Neural Tangents" (arXiv 1912.02803); Lee et al. 2019.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from ntk_tickets._nt import stax
from ntk_tickets.config import ModelConfig
from ntk_tickets.errors import UserInputError

TANH_QUADRATURE_DEGREE = 25

# Residual blocks here end their branch in a Dense layer, so the FanInSum inputs are
# uncorrelated at init and neural-tangents' independence assumption holds; its generic
# warning is noise. Likewise the numerical-activation notes for tanh, whose derivative
# autodiff computes without the `where` pitfall the warning is about.
for _message in ("`FanIn` layers assume independent inputs", "Numerical Activation Layer",
                 "Using JAX autodiff to compute the `fn` derivative"):
    warnings.filterwarnings("ignore", message=_message, category=UserWarning)

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
      layer_names: names of the parameterized top-level layers, aligned with
        :func:`layer_params`.
      width: hidden units (MLPs) or channels (CNNs).
      input_shape: one input's shape, without the batch axis.
      n_out: output dimension.
    """

    init_fn: Callable
    apply_fn: Callable
    kernel_fn: Callable
    layer_names: tuple[str, ...]
    width: int
    input_shape: tuple[int, ...]
    n_out: int

    def init(self, key: jax.Array) -> PyTree:
        """Draws ``theta0`` for this model's input shape."""
        _, params = self.init_fn(key, (-1, *self.input_shape))
        return params


def _activation(name: str):
    if name == "relu":
        return stax.Relu()
    if name == "erf":
        return stax.Erf()
    if name == "gelu":
        return stax.Gelu()
    if name == "tanh":
        return stax.ElementwiseNumerical(jnp.tanh, deg=TANH_QUADRATURE_DEGREE)
    raise UserInputError(f"model.activation = {name!r} is not supported")


def _dense(cfg: ModelConfig, width: int):
    return stax.Dense(width, W_std=cfg.w_std, b_std=cfg.b_std,
                      parameterization=cfg.parameterization)


def _conv(cfg: ModelConfig, width: int, n_spatial: int):
    return stax.Conv(width, (cfg.kernel_size,) * n_spatial, padding="SAME", W_std=cfg.w_std,
                     b_std=cfg.b_std, parameterization=cfg.parameterization)


def _mlp_layers(cfg: ModelConfig, width: int) -> tuple[list, list[str]]:
    layers, names = [stax.Flatten()], [None]
    for i in range(cfg.depth):
        layers += [_dense(cfg, width), _activation(cfg.activation)]
        names += [f"dense_{i}", None]
    return layers, names


def _resmlp_layers(cfg: ModelConfig, width: int) -> tuple[list, list[str]]:
    layers, names = [stax.Flatten(), _dense(cfg, width)], [None, "dense_in"]
    for i in range(cfg.depth):
        branch = stax.serial(_activation(cfg.activation), _dense(cfg, width))
        layers.append(stax.serial(stax.FanOut(2), stax.parallel(stax.Identity(), branch),
                                  stax.FanInSum()))
        names.append(f"block_{i}")
    layers.append(_activation(cfg.activation))
    names.append(None)
    return layers, names


def _cnn_layers(cfg: ModelConfig, width: int, n_spatial: int) -> tuple[list, list[str]]:
    layers, names = [], []
    for i in range(cfg.depth):
        layers += [_conv(cfg, width, n_spatial), _activation(cfg.activation)]
        names += [f"conv_{i}", None]
    layers.append(stax.Flatten())
    names.append(None)
    return layers, names


_SPATIAL_DIMS = {"cnn1d": 1, "cnn2d": 2}


def _check_input_shape(arch: str, input_shape: Sequence[int]) -> None:
    if arch in _SPATIAL_DIMS and len(input_shape) != _SPATIAL_DIMS[arch] + 1:
        expected = "(length, channels)" if arch == "cnn1d" else "(height, width, channels)"
        raise UserInputError(
            f"model.arch = {arch!r} needs inputs of shape {expected}, but the data's inputs "
            f"have shape {tuple(input_shape)}: choose another model.arch or data.name"
        )


def build_model(cfg: ModelConfig, width: int, input_shape: Sequence[int], n_out: int) -> Model:
    """Builds ``cfg.arch`` at one width for inputs of ``input_shape`` and ``n_out`` outputs.

    Args:
      cfg: the model section of the study config (``width`` replaces ``cfg.widths``).
      width: hidden units (MLPs) or channels (CNNs).
      input_shape: one input's shape, without the batch axis.
      n_out: output dimension (classes, or regression targets).

    Returns:
      The :class:`Model`.

    Raises:
      UserInputError: if the architecture does not fit the input shape.
    """
    _check_input_shape(cfg.arch, input_shape)
    if cfg.arch == "mlp":
        layers, names = _mlp_layers(cfg, width)
    elif cfg.arch == "resmlp":
        layers, names = _resmlp_layers(cfg, width)
    else:
        layers, names = _cnn_layers(cfg, width, _SPATIAL_DIMS[cfg.arch])
    layers.append(_dense(cfg, n_out))
    names.append("readout")
    init_fn, apply_fn, kernel_fn = stax.serial(*layers)
    return Model(
        init_fn=init_fn,
        apply_fn=apply_fn,
        kernel_fn=kernel_fn,
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
