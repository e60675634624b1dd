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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

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
