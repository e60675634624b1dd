"""The linearized network: first-order Taylor expansion around ``theta0``.

``f_lin(θ, θ0, x) = f(θ0, x) + J(θ0, x) (θ − θ0)``, computed with one ``jax.jvp`` (one
forward-mode pass alongside the forward pass). ``theta0`` is an *argument*, never a closure:
``nt.linearize(apply_fn, params0)`` captures θ0 as a constant, and inside a jitted training
loop XLA constant-folds through it (minutes of compile time at width 4096; DESIGN.md §3).

Reference: Lee et al. 2019, "Wide Neural Networks of Any Depth Evolve as Linear Models
Under Gradient Descent" (arXiv 1902.06720), eq. (6).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

PyTree = Any


def linearize(apply_fn: Callable[[PyTree, jax.Array], jax.Array]) -> Callable:
    """Returns ``f_lin(params, params0, x)``, the linearization of ``apply_fn`` at ``params0``.

    Args:
      apply_fn: ``(params, x) -> outputs``.

    Returns:
      ``f_lin(params, params0, x) -> outputs`` with the shape of ``apply_fn(params0, x)``;
      ``f_lin(params0, params0, x) == apply_fn(params0, x)`` exactly.
    """

    def f_lin(params: PyTree, params0: PyTree, x: jax.Array) -> jax.Array:
        delta = jax.tree_util.tree_map(lambda p, p0: p - p0, params, params0)
        f0, df = jax.jvp(lambda p: apply_fn(p, x), (params0,), (delta,))
        return f0 + df

    return f_lin
