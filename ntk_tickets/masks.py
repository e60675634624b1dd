"""Subnetwork masks: PyTrees of booleans with the structure of the parameters.

A mask ``m`` selects the subnetwork f(θ ⊙ m). Masks are plain PyTrees (``True`` = kept) with
exactly the structure and shapes of the parameters, so every JAX transformation applies to
them and training takes them as array arguments (DESIGN.md §2–3).

*Prunable* entries are the weights (dense matrices and convolution kernels) and, with
``prune_biases``, the biases. Entries that
are not prunable are always kept. Pruning removes the prunable entries with the smallest
scores within a *group*:

* ``scope="global"``: one group for all hidden layers together (Frankle & Carbin 2019 use
  per-layer rates; global magnitude pruning is the common modern choice);
* ``scope="layer"``: one group per parameterized top-level layer;
* the output layer is its own group when it has its own rate (``output_fraction``).

Round r of a schedule with rate p keeps exactly ``round((1 − p)^r · N_g)`` of the N_g
prunable entries of each group (:func:`prune_to_level`): rounding happens once per target,
not once per round, so the target sparsity is hit exactly. Ties are broken
deterministically: among equal scores the entry with the higher flat index is kept.

The functions here work on one network (no seed axis) and on the host, with NumPy, except
:func:`prune_to_level`, which also prunes every seed at once in one compiled program.

References: Frankle & Carbin 2019 (arXiv 1803.03635); Frankle et al. 2021, "Pruning Neural
Networks at Initialization: Why Are We Missing the Mark?" (arXiv 2009.08576), for the
random and layer-wise shuffled controls.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def ones_like(params: PyTree) -> PyTree:
    """The dense mask: ``True`` everywhere, with the shapes of ``params`` (any leading axes)."""
    return jax.tree_util.tree_map(lambda p: jnp.ones(p.shape, bool), params)


def _is_bias(path) -> bool:
    """stax layers hold ``(W, b)`` pairs: a leaf at index 1 of its tuple is a bias."""
    return isinstance(path[-1], jax.tree_util.SequenceKey) and path[-1].idx == 1


def prunable_leaves(params: PyTree, prune_biases: bool) -> PyTree:
    """Per leaf, whether its entries may be pruned: weights always, biases if asked.

    Args:
      params: one network's parameters (no seed axis), or a mask of the same structure.
      prune_biases: whether biases (the second leaf of each stax ``(W, b)`` pair) are
        prunable.

    Returns:
      A PyTree of Python bools with the structure of ``params``.
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, _: prune_biases or not _is_bias(path), params)


@dataclasses.dataclass(frozen=True)
class PruningSpec:
    """Which entries are pruned together and at which rate.

    Attributes:
      fraction: p, the fraction of the remaining prunable entries removed per round.
      scope: ``"global"`` or ``"layer"`` (see the module docstring).
      prune_biases: whether biases are prunable.
      output_fraction: the output layer's own rate, or None for the same rate ``fraction``.
    """

    fraction: float
    scope: str = "global"
    prune_biases: bool = False
    output_fraction: float | None = None


def _layer_of_leaves(params: PyTree) -> list[int]:
    """For each leaf (in ``tree_leaves`` order), the index of its top-level layer."""
    return [i for i, entry in enumerate(params) for _ in jax.tree_util.tree_leaves(entry)]


def _groups(params: PyTree, spec: PruningSpec) -> dict[str, tuple[list[int], float]]:
    """``{group: (leaf indices, rate)}`` over the prunable leaves of ``params``."""
    prunable = jax.tree_util.tree_leaves(prunable_leaves(params, spec.prune_biases))
    layers = _layer_of_leaves(params)
    output_layer = layers[-1]
    own_output = spec.output_fraction is not None
    groups: dict[str, tuple[list[int], float]] = {}
    for i, (layer, ok) in enumerate(zip(layers, prunable, strict=True)):
        if not ok:
            continue
        if layer == output_layer and own_output:
            name, rate = "output", spec.output_fraction
        elif spec.scope == "layer":
            name, rate = f"layer{layer}", spec.fraction
        else:
            name, rate = "global", spec.fraction
        groups.setdefault(name, ([], rate))[0].append(i)
    return groups


def _keep_top(score: jax.Array, kept: jax.Array, n_keep: jax.Array) -> jax.Array:
    """The ``n_keep`` highest-scoring entries among those ``kept`` (flat arrays).

    Entries are ranked by (kept, score) ascending with a stable sort, so pruned entries
    come first, NaN scores count as the lowest, and among equal scores the lower flat index
    ranks lower; the top ``n_keep`` ranks are kept. ``n_keep`` is an argument, so one
    compile serves every level.
    """
    score = jnp.nan_to_num(score, nan=-jnp.inf)
    order = jnp.lexsort((score, kept))
    rank = jnp.zeros(score.shape, jnp.int32).at[order].set(
        jnp.arange(score.size, dtype=jnp.int32))
    return rank >= score.size - n_keep


@jax.jit
def _prune_groups(score_groups: list[jax.Array], kept_groups: list[jax.Array],
                  n_keep: jax.Array) -> list[jax.Array]:
    """:func:`_keep_top` for every group (seed axis first), one compiled program."""
    one_seed = jax.vmap(_keep_top, in_axes=(0, 0, None))
    return [one_seed(score, kept, n) for score, kept, n in
            zip(score_groups, kept_groups, n_keep, strict=True)]


def prune_to_level(scores: PyTree, mask: PyTree, spec: PruningSpec, level: float, *,
                   seeds: bool = False) -> PyTree:
    """The mask of pruning level ``level``: the highest-scoring entries that ``mask`` keeps.

    Each group keeps exactly ``round((1 − p_g)^level · N_g)`` of its ``N_g`` prunable
    entries, chosen among those ``mask`` keeps, by descending score; ties go to the higher
    flat index; NaN scores count as the lowest. Non-prunable entries stay as in ``mask``.
    The selection runs as one compiled JAX program, vmapped over seeds with ``seeds``.

    Args:
      scores: float PyTree like the parameters.
      mask: the current mask (bool PyTree like the parameters).
      spec: groups and rates.
      level: ≥ 0; round r of a schedule is level r, level 0 keeps every prunable entry, and
        fractional levels are the intermediate targets of iterative criteria (SynFlow).
      seeds: whether ``scores`` and ``mask`` carry a leading seed axis (pruned seed by seed
        in one vmapped program).

    Returns:
      The new mask as a PyTree of NumPy bool arrays; it only removes entries from ``mask``.

    Raises:
      ValueError: if ``mask`` keeps fewer entries of a group than the target.
    """
    if not seeds:
        add_axis = functools.partial(jax.tree_util.tree_map, lambda a: np.asarray(a)[None])
        return jax.tree_util.tree_map(lambda a: a[0], prune_to_level(
            add_axis(scores), add_axis(mask), spec, level, seeds=True))
    score_leaves = jax.tree_util.tree_leaves(scores)
    mask_leaves, treedef = jax.tree_util.tree_flatten(mask)
    new = [np.array(m, dtype=bool) for m in mask_leaves]
    one_seed = jax.tree_util.tree_unflatten(treedef, [m[0] for m in new])
    groups = _groups(one_seed, spec)
    n_seeds = new[0].shape[0]
    kept, score, n_keep = [], [], []
    for name, (leaves, rate) in groups.items():
        kept.append(np.concatenate([new[i].reshape(n_seeds, -1) for i in leaves], axis=1))
        score.append(jnp.concatenate([jnp.reshape(score_leaves[i], (n_seeds, -1))
                                      for i in leaves], axis=1))
        n_keep.append(round((1.0 - rate) ** level * kept[-1].shape[1]))
        fewest = int(kept[-1].sum(axis=1).min())
        if n_keep[-1] > fewest:
            raise ValueError(f"group {name!r} keeps {fewest} entries, fewer than the "
                             f"{n_keep[-1]} that level {level} keeps")
    keep = _prune_groups(score, kept, jnp.asarray(n_keep, jnp.int32))
    for (leaves, _), group_keep in zip(groups.values(), keep, strict=True):
        group_keep, offset = np.asarray(group_keep), 0
        for i in leaves:
            size = new[i][0].size
            new[i] = group_keep[:, offset:offset + size].reshape(new[i].shape)
            offset += size
    return jax.tree_util.tree_unflatten(treedef, new)


def sparsity(mask: PyTree, prune_biases: bool) -> float:
    """The fraction of prunable entries that ``mask`` removes (one network)."""
    kept = total = 0
    prunable = jax.tree_util.tree_leaves(prunable_leaves(mask, prune_biases))
    for m, ok in zip(jax.tree_util.tree_leaves(mask), prunable, strict=True):
        if ok:
            kept += int(np.sum(m))
            total += np.size(m)
    return 1.0 - kept / total if total else 0.0


def density_report(mask: PyTree, layer_names: Sequence[str],
                   prune_biases: bool) -> dict[str, float]:
    """The kept fraction of the prunable entries of each named layer (one network).

    ``layer_names`` name the top-level entries that hold parameters, in order
    (:attr:`ntk_tickets.models.Model.layer_names`).
    """
    prunable = jax.tree_util.tree_leaves(prunable_leaves(mask, prune_biases))
    kept: dict[int, list[int]] = {}
    for layer, m, ok in zip(_layer_of_leaves(mask), jax.tree_util.tree_leaves(mask),
                            prunable, strict=True):
        if ok:
            counts = kept.setdefault(layer, [0, 0])
            counts[0] += int(np.sum(m))
            counts[1] += np.size(m)
    with_params = [i for i, entry in enumerate(mask) if jax.tree_util.tree_leaves(entry)]
    names = dict(zip(with_params, layer_names, strict=True))
    return {names[layer]: k / n for layer, (k, n) in sorted(kept.items())}


def jaccard(mask_a: PyTree, mask_b: PyTree, prune_biases: bool) -> float:
    """|a ∧ b| / |a ∨ b| over the prunable entries kept by two masks (1.0 if both are empty)."""
    prunable = jax.tree_util.tree_leaves(prunable_leaves(mask_a, prune_biases))
    both = either = 0
    for a, b, ok in zip(jax.tree_util.tree_leaves(mask_a), jax.tree_util.tree_leaves(mask_b),
                        prunable, strict=True):
        if ok:
            a, b = np.asarray(a, bool), np.asarray(b, bool)
            both += int(np.sum(a & b))
            either += int(np.sum(a | b))
    return both / either if either else 1.0


def random_control(mask: PyTree, prune_biases: bool, rng: np.random.Generator) -> PyTree:
    """Control ``random``: in every prunable leaf, as many kept entries as ``mask`` keeps
    there, at uniformly random positions (matched per-layer density, fresh wiring)."""
    def draw(m, ok):
        m = np.asarray(m, bool)
        return rng.permutation(m.ravel()).reshape(m.shape) if ok else m
    return jax.tree_util.tree_map(draw, mask, prunable_leaves(mask, prune_biases))


def shuffle_control(mask: PyTree, prune_biases: bool, rng: np.random.Generator) -> PyTree:
    """Control ``shuffle``: ``mask``'s entries permuted within each unit.

    For a weight leaf the incoming entries of each output unit (the last axis) are permuted
    independently, so every unit keeps its number of inputs and only *which* inputs it sees
    changes; a bias leaf (shape (1, …, units)) is permuted as a whole. Compared with
    :func:`random_control`, this also keeps the per-unit fan-in of the ticket.
    """
    def shuffle(m, ok):
        m = np.asarray(m, bool)
        if not ok:
            return m
        if m.size == m.shape[-1]:
            return rng.permutation(m.ravel()).reshape(m.shape)
        columns = m.reshape(-1, m.shape[-1])
        return rng.permuted(columns, axis=0).reshape(m.shape)
    return jax.tree_util.tree_map(shuffle, mask, prunable_leaves(mask, prune_biases))


def apply_mask(params: PyTree, mask: PyTree) -> PyTree:
    """θ ⊙ m, with pruned entries exactly 0 (any leading axes shared by both)."""
    return jax.tree_util.tree_map(lambda p, m: jnp.where(m, p, jnp.zeros_like(p)), params, mask)


def perturbed_start(theta: PyTree, xi: PyTree, mask: PyTree, eps: jax.Array) -> PyTree:
    """θ ⊙ m + ε·ξ ⊙ (1 − m): the ticket kept, its complement set to ε times a fresh draw.

    ε = 0 gives θ ⊙ m exactly (the isolated ticket).
    """
    return jax.tree_util.tree_map(
        lambda t, x, m: jnp.where(m, t, eps * x), theta, xi, mask)


def ntk_rescaling(mask: PyTree, prune_biases: bool) -> PyTree:
    """The forward multipliers c that make a masked network its own NTK parameterization.

    A layer computes (σ_w/√fan_in)·x·(W ⊙ m); with a fraction ρ of its weights kept, a unit
    sums about ρ·fan_in inputs, so its pre-activation variance at init and its share of the
    tangent kernel shrink by ρ. Multiplying the layer's kept weights by c = 1/√ρ in the
    forward pass, i.e. using the effective fan-in ρ·fan_in, restores both. Returns c per
    entry (float arrays like the parameters): 1/√ρ_l on every entry of a prunable leaf l
    that keeps a fraction 0 < ρ_l < 1, 1 elsewhere. One network, no seed axis.
    """
    def scale(m, ok):
        m = np.asarray(m)
        density = float(np.mean(m)) if m.size else 1.0
        c = 1.0 / np.sqrt(density) if ok and 0.0 < density < 1.0 else 1.0
        return np.full(m.shape, c, np.float64)

    return jax.tree_util.tree_map(scale, mask, prunable_leaves(mask, prune_biases))
