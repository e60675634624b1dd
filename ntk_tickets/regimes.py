"""Lazy and rich training: the maximal-update parameterization and the output scale α.

Two knobs move a network between the *lazy* regime, where it stays close to its
linearization around θ0 (the tangent-space picture), and the *rich* regime, where its
hidden features keep learning at every width:

* ``model.parameterization = "mup"``: the maximal-update parameterization (µP; Yang & Hu
  2021, "Tensor Programs IV", arXiv 2011.14522, Table 3; Yang et al. 2022, "Tensor Programs
  V", arXiv 2203.03466, Table 3). ntk_tickets writes it in the form of the NTK
  parameterization (every layer ``W_std/√fan_in``) with two changes that vanish at
  ``model.base_width`` n0, so that µP *is* the ntk network at that width. With r = n/n0:

  - the readout gets the extra multiplier 1/√r (:func:`readout_w_std`): its initial output
    shrinks like n^−½, and its updates move the output by Θ(1);
  - each parameter's learning rate is multiplied by a factor that depends on how many of
    its axes grow with width (:func:`mup_lr_factors`):

    ================================================  ===============  ======
    parameter                                         sgd, momentum    adam
    ================================================  ===============  ======
    no axis grows (readout bias)                      1                1
    one axis grows (input weights, hidden biases,     r                1
    readout weights)
    two axes grow (hidden weights, hidden convs)      r                1/√r
    ================================================  ===============  ======

  These follow from the abc-parameterization tables by the symmetry
  (a, b, c) → (a + θ, b − θ, c − 2θ) for SGD (θ = ½ moves every layer to b = 0, the NTK form)
  and (a + θ, b − θ, c − θ) for Adam, whose updates do not scale with the gradient. Under
  them every hidden feature moves by Θ(1) in one step at every width, while under ``ntk``
  it moves by Θ(n^−½) (tested in ``tests/test_regimes.py``).

* ``model.output_scale`` α with ``model.center`` (Chizat, Oyallon & Bach 2019, arXiv
  1812.07956; Geiger et al. 2020, arXiv 1906.08034): the trained function is α·f(θ, x), or
  α·(f(θ, x) − f(θ0, x)) when centred, at learning rate η/α² for SGD and momentum. The
  function's first-order change per step is then the same for every α, while the weights
  move α times less: α → ∞ is the lazy (linearized) limit at a fixed function-space speed.
  For Adam, whose step does not grow with the gradient, the rate is η/α (the same
  function-space speed). Centring removes the random initial output, so the trained function
  starts at 0.

Everything here is a plain function of shapes and config values; the learning-rate factors
enter the training program as an argument (:class:`ntk_tickets.training.TrainingProgram`),
never as constants, following DESIGN.md §3.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from ntk_tickets.config import ModelConfig, TrainConfig

PyTree = Any
ModelFn = Callable[[PyTree, PyTree, jax.Array], jax.Array]

#: Optimizers whose update is proportional to the gradient (SGD's µP table and 1/α²);
#: any other is treated like Adam, whose update is invariant to the gradient's scale.
GRADIENT_PROPORTIONAL = ("sgd", "momentum")


def width_ratio(cfg: ModelConfig, width: int) -> float:
    """r = width / ``model.base_width``."""
    return width / cfg.base_width


def readout_w_std(cfg: ModelConfig, width: int) -> float:
    """The readout layer's ``W_std``: ``w_std``, times 1/√r under µP."""
    if cfg.parameterization == "mup":
        return cfg.w_std / math.sqrt(width_ratio(cfg, width))
    return cfg.w_std


def growing_axes(shapes_narrow: PyTree, shapes_wide: PyTree) -> PyTree:
    """Per parameter, the number of axes that grow with width.

    Args:
      shapes_narrow, shapes_wide: the parameters' shapes (e.g. ``jax.eval_shape`` of
        ``init``) of one architecture at two different widths.

    Returns:
      A PyTree of ints shaped like the parameters: 0 for a readout bias, 1 for input
      weights, biases of hidden layers and the readout weights, 2 for hidden weights.
    """
    return jax.tree_util.tree_map(
        lambda a, b: sum(x != y for x, y in zip(a.shape, b.shape, strict=True)),
        shapes_narrow, shapes_wide)


def mup_lr_factor(n_growing: int, ratio: float, optimizer: str) -> float:
    """The µP learning-rate factor of one parameter with ``n_growing`` width-sized axes
    (the table in the module docstring)."""
    if n_growing == 0:
        return 1.0
    if optimizer in GRADIENT_PROPORTIONAL:
        return ratio
    return 1.0 / math.sqrt(ratio) if n_growing >= 2 else 1.0


def output_scale_lr_factor(alpha: float, optimizer: str) -> float:
    """The learning-rate factor of output scale α: 1/α² (sgd, momentum), 1/α (adam)."""
    return alpha ** -2 if optimizer in GRADIENT_PROPORTIONAL else 1.0 / alpha


def lr_factors(model_cfg: ModelConfig, train_cfg: TrainConfig, width: int,
               init_fn: Callable[[int], PyTree]) -> PyTree:
    """Per-parameter learning-rate factors of one cell: µP's (if ``mup``) times α's.

    Args:
      model_cfg: the cell's model section (one parameterization, one output scale).
      train_cfg: its training section (the optimizer decides the table).
      width: the cell's width.
      init_fn: ``width -> params`` (shapes are all it needs; it is called under
        ``jax.eval_shape``), e.g. ``lambda w: build_model(cfg, w, ...).init(key)``.

    Returns:
      A PyTree of float scalars shaped like the parameters, by which the optimizer's update
      of each parameter is multiplied; None when every factor is 1 (ntk or standard at
      α = 1), so that the training step does no extra work.
    """
    alpha = output_scale_lr_factor(model_cfg.output_scale, train_cfg.optimizer)
    if model_cfg.parameterization != "mup" and alpha == 1.0:
        return None
    narrow = jax.eval_shape(lambda: init_fn(width))
    if model_cfg.parameterization != "mup":
        return jax.tree_util.tree_map(lambda _: alpha, narrow)
    axes = growing_axes(narrow, jax.eval_shape(lambda: init_fn(2 * width)))
    ratio = width_ratio(model_cfg, width)
    return jax.tree_util.tree_map(
        lambda n: alpha * mup_lr_factor(n, ratio, train_cfg.optimizer), axes)


def scaled_function(fn: ModelFn, output_scale: float, center: bool) -> ModelFn:
    """The trained function of output scale α: ``α·fn``, or ``α·(fn(θ) − fn(θ0))`` centred.

    Args:
      fn: ``(params, params0, x) -> outputs`` (the exact network or its linearization).
      output_scale: α.
      center: subtract the output at ``params0``.

    Returns:
      ``fn`` itself when α = 1 and not centred (no extra work), else the scaled function.
    """
    if output_scale == 1.0 and not center:
        return fn

    def scaled(params: PyTree, params0: PyTree, x: jax.Array) -> jax.Array:
        out = fn(params, params0, x)
        if center:
            out = out - fn(params0, params0, x)
        return output_scale * out

    return scaled


def scale_updates(updates: PyTree, factors: PyTree | None) -> PyTree:
    """``updates`` multiplied leaf by leaf by the learning-rate ``factors`` (None: as is)."""
    if factors is None:
        return updates
    return jax.tree_util.tree_map(lambda u, s: u * jnp.asarray(s, u.dtype), updates, factors)
