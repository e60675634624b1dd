"""Registries of the architectures and activations that ``model.arch`` and
``model.activation`` name.

Each entry builds ``neural_tangents.stax`` layers from the ``stax`` namespace it is given,
so this module imports neither JAX nor neural-tangents (config validation reads the names
from here); :func:`ntk_tickets.models.build_model` passes the real ``stax``.

An :class:`Architecture` returns the hidden layers (everything before the readout
``Dense(n_out)``) and, aligned with them, the name of each layer that holds parameters
(None for parameter-free layers such as activations).

* ``mlp``: ``Flatten → [Dense(width) → act] × depth``.
* ``resmlp``: ``Flatten → Dense(width) → [x + Dense(width)(act(x))] × depth → act``; the
  residual branches make depth cheap to train.
* ``cnn1d`` / ``cnn2d``: ``[Conv(width, kernel_size, SAME) → act] × depth → Flatten`` on
  ``(length, channels)`` signals or ``(height, width, channels)`` images; the number of
  channels is the width knob.

Activations: ``relu``, ``erf`` and ``gelu`` have closed-form kernels in neural-tangents;
``tanh`` has none and uses ``stax.ElementwiseNumerical`` (Gauss–Hermite quadrature of the
kernel integrals, degree :data:`TANH_QUADRATURE_DEGREE`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ntk_tickets.registry import Registry

if TYPE_CHECKING:
    from ntk_tickets.config import ModelConfig

TANH_QUADRATURE_DEGREE = 25

Layers = tuple[list[Any], list[str | None]]

#: ``stax -> layer``, by ``model.activation``.
ACTIVATIONS: Registry = Registry("model.activation")
#: :class:`Architecture` entries, by ``model.arch``.
ARCHITECTURES: Registry = Registry("model.arch")

ACTIVATIONS.register("relu", lambda stax: stax.Relu())
ACTIVATIONS.register("erf", lambda stax: stax.Erf())
ACTIVATIONS.register("gelu", lambda stax: stax.Gelu())


@ACTIVATIONS.register("tanh")
def _tanh(stax: Any) -> Any:
    import jax.numpy as jnp

    return stax.ElementwiseNumerical(jnp.tanh, deg=TANH_QUADRATURE_DEGREE)


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One ``model.arch``.

    Attributes:
      hidden: ``(cfg, width, stax) -> (layers, names)``, the layers before the readout.
      input_shape: None for any input (it is flattened), or a description such as
        ``"(length, channels)"`` whose number of entries is the input rank it needs.
    """

    hidden: Callable[[ModelConfig, int, Any], Layers]
    input_shape: str | None = None

    def input_rank(self) -> int | None:
        """The number of axes one input must have, or None for any."""
        return None if self.input_shape is None else self.input_shape.count(",") + 1


def stax_parameterization(cfg: ModelConfig) -> str:
    """The parameterization stax builds: µP is the ntk form with a rescaled readout and
    per-layer learning rates (:mod:`ntk_tickets.regimes`)."""
    return "ntk" if cfg.parameterization == "mup" else cfg.parameterization


def dense(cfg: ModelConfig, width: int, stax: Any, w_std: float | None = None) -> Any:
    """``Dense(width)`` with the config's parameterization and initial scales (``w_std``
    replaces ``cfg.w_std``, e.g. for µP's readout)."""
    return stax.Dense(width, W_std=cfg.w_std if w_std is None else w_std, b_std=cfg.b_std,
                      parameterization=stax_parameterization(cfg))


def _activation(cfg: ModelConfig, stax: Any) -> Any:
    return ACTIVATIONS[cfg.activation](stax)


def _mlp(cfg: ModelConfig, width: int, stax: Any) -> Layers:
    layers, names = [stax.Flatten()], [None]
    for i in range(cfg.depth):
        layers += [dense(cfg, width, stax), _activation(cfg, stax)]
        names += [f"dense_{i}", None]
    return layers, names


def _resmlp(cfg: ModelConfig, width: int, stax: Any) -> Layers:
    layers, names = [stax.Flatten(), dense(cfg, width, stax)], [None, "dense_in"]
    for i in range(cfg.depth):
        branch = stax.serial(_activation(cfg, stax), dense(cfg, width, stax))
        layers.append(stax.serial(stax.FanOut(2), stax.parallel(stax.Identity(), branch),
                                  stax.FanInSum()))
        names.append(f"block_{i}")
    layers.append(_activation(cfg, stax))
    names.append(None)
    return layers, names


def _cnn(n_spatial: int) -> Callable[[ModelConfig, int, Any], Layers]:
    def hidden(cfg: ModelConfig, width: int, stax: Any) -> Layers:
        layers, names = [], []
        for i in range(cfg.depth):
            layers += [stax.Conv(width, (cfg.kernel_size,) * n_spatial, padding="SAME",
                                 W_std=cfg.w_std, b_std=cfg.b_std,
                                 parameterization=stax_parameterization(cfg)),
                       _activation(cfg, stax)]
            names += [f"conv_{i}", None]
        layers.append(stax.Flatten())
        names.append(None)
        return layers, names
    return hidden


ARCHITECTURES.register("mlp", Architecture(_mlp))
ARCHITECTURES.register("resmlp", Architecture(_resmlp))
ARCHITECTURES.register("cnn1d", Architecture(_cnn(1), "(length, channels)"))
ARCHITECTURES.register("cnn2d", Architecture(_cnn(2), "(height, width, channels)"))
