"""Masks: exact sparsity per scope, shrinking, ties, controls, overlap, perturbed starts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntk_tickets import ModelConfig, build_model
from ntk_tickets.masks import (
    PruningSpec,
    apply_mask,
    density_report,
    jaccard,
    ones_like,
    perturbed_start,
    prune_to_level,
    random_control,
    shuffle_control,
    sparsity,
)


@pytest.fixture(scope="module")
def net():
    """A 2-hidden-layer MLP: params [(), (W,b), (), (W,b), (), (W,b)], prunable sizes
    W: 12·16, 16·16, 16·3 and b: 16, 16, 3."""
    model = build_model(ModelConfig(depth=2), 16, (12,), 3)
    return model, model.init(jax.random.PRNGKey(0))


def _random_scores(params, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda p: rng.normal(size=p.shape), params)


def _kept(mask):
    return [int(np.sum(m)) for m in jax.tree_util.tree_leaves(mask)]


@pytest.mark.parametrize("level", [1, 2, 5])
def test_global_scope_hits_the_target_count_exactly(net, level):
    model, params = net
    spec = PruningSpec(0.3)
    mask = prune_to_level(_random_scores(params), ones_like(params), spec, level)
    n_weights = 12 * 16 + 16 * 16 + 16 * 3
    weights, biases = _kept(mask)[0::2], _kept(mask)[1::2]
    assert sum(weights) == round(0.7**level * n_weights)
    assert biases == [16, 16, 3]  # biases are not prunable by default
    assert sparsity(mask, False) == pytest.approx(1 - round(0.7**level * n_weights) / n_weights)


def test_layer_scope_and_output_rate_prune_each_group_exactly(net):
    model, params = net
    spec = PruningSpec(0.5, scope="layer", prune_biases=True, output_fraction=0.1)
    mask = prune_to_level(_random_scores(params), ones_like(params), spec, 2)
    kept = _kept(mask)
    assert kept[0] + kept[1] == round(0.25 * (12 * 16 + 16))
    assert kept[2] + kept[3] == round(0.25 * (16 * 16 + 16))
    assert kept[4] + kept[5] == round(0.81 * (16 * 3 + 3))
    report = density_report(mask, model.layer_names, True)
    assert list(report) == list(model.layer_names)
    assert report[model.layer_names[-1]] == pytest.approx(round(0.81 * 51) / 51)


def test_masks_only_shrink_and_keep_the_highest_scores(net):
    _, params = net
    spec = PruningSpec(0.2)
    mask = ones_like(params)
    for level in range(1, 6):
        scores = _random_scores(params, seed=level)  # new scores every round, as in IMP
        new = prune_to_level(scores, mask, spec, level)
        for old, m in zip(jax.tree_util.tree_leaves(mask), jax.tree_util.tree_leaves(new),
                          strict=True):
            assert not np.any(np.asarray(m) & ~np.asarray(old))  # nothing revived
        w_scores = np.concatenate([np.ravel(s) for s in jax.tree_util.tree_leaves(scores)[0::2]])
        w_old = np.concatenate([np.ravel(m) for m in jax.tree_util.tree_leaves(mask)[0::2]])
        w_new = np.concatenate([np.ravel(m) for m in jax.tree_util.tree_leaves(new)[0::2]])
        removed = w_old & ~w_new
        if removed.any() and w_new.any():
            assert w_scores[removed].max() <= w_scores[w_new].min()
        mask = new


def test_ties_are_broken_by_flat_index():
    params = [(jnp.ones((2, 3)),)]
    scores = [(np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 2.0]]),)]
    mask = prune_to_level(scores, ones_like(params), PruningSpec(0.5), 1)
    # keep 3 of 6: the two non-tied largest, then the last of the four tied zeros
    np.testing.assert_array_equal(mask[0][0], [[True, False, False], [False, True, True]])
    again = prune_to_level(scores, ones_like(params), PruningSpec(0.5), 1)
    np.testing.assert_array_equal(mask[0][0], again[0][0])


def test_nan_scores_are_pruned_first():
    params = [(jnp.ones((1, 4)),)]
    scores = [(np.array([[np.nan, 3.0, 1.0, 2.0]]),)]
    mask = prune_to_level(scores, ones_like(params), PruningSpec(0.5), 1)
    np.testing.assert_array_equal(mask[0][0], [[False, True, False, True]])


def test_asking_for_more_than_the_mask_keeps_is_an_error(net):
    _, params = net
    spec = PruningSpec(0.5)
    mask = prune_to_level(_random_scores(params), ones_like(params), spec, 3)
    with pytest.raises(ValueError, match="fewer than"):
        prune_to_level(_random_scores(params), mask, spec, 1)


def test_controls_match_the_density_of_every_layer(net):
    _, params = net
    mask = prune_to_level(_random_scores(params), ones_like(params), PruningSpec(0.6), 2)
    rng = np.random.default_rng(0)
    for control in (random_control(mask, False, rng), shuffle_control(mask, False, rng)):
        assert _kept(control) == _kept(mask)
        assert jaccard(control, mask, False) < 0.6  # the wiring did change
    shuffled = shuffle_control(mask, False, rng)
    for m, s in zip(jax.tree_util.tree_leaves(mask)[0::2],
                    jax.tree_util.tree_leaves(shuffled)[0::2], strict=True):
        np.testing.assert_array_equal(np.sum(m, axis=0), np.sum(s, axis=0))  # per-unit fan-in


def test_jaccard_matches_a_hand_count():
    a = [(np.array([[1, 1, 0, 0]], bool), np.array([1, 0], bool))]
    b = [(np.array([[1, 0, 1, 0]], bool), np.array([0, 0], bool))]
    assert jaccard(a, b, prune_biases=False) == pytest.approx(1 / 3)
    assert jaccard(a, b, prune_biases=True) == pytest.approx(1 / 4)
    assert jaccard(a, a, prune_biases=False) == 1.0


def test_perturbed_start_keeps_the_ticket_and_scales_the_complement(net):
    _, params = net
    mask = prune_to_level(_random_scores(params), ones_like(params), PruningSpec(0.5), 1)
    xi = jax.tree_util.tree_map(lambda p: p + 1.0, params)
    isolated = apply_mask(params, mask)
    at_zero = perturbed_start(params, xi, mask, jnp.asarray(0.0))
    at_half = perturbed_start(params, xi, mask, jnp.asarray(0.5))
    for p, x, m, iso, z, h in zip(*(jax.tree_util.tree_leaves(t) for t in
                                    (params, xi, mask, isolated, at_zero, at_half)),
                                  strict=True):
        np.testing.assert_array_equal(z, iso)
        np.testing.assert_array_equal(np.asarray(h)[m], np.asarray(p)[m])
        np.testing.assert_allclose(np.asarray(h)[~m], 0.5 * np.asarray(x)[~m])
        assert np.all(np.asarray(iso)[~m] == 0.0)


def _reference_prune(scores, mask, spec, level):
    """The selection written out with NumPy: per group, sort (kept, score) ascending with a
    stable sort over the concatenated flat entries and keep the last n_keep."""
    from ntk_tickets.masks import _groups
    score_leaves = [np.asarray(s, np.float64) for s in jax.tree_util.tree_leaves(scores)]
    mask_leaves, treedef = jax.tree_util.tree_flatten(mask)
    new = [np.array(m, bool) for m in mask_leaves]
    for leaves, rate in _groups(mask, spec).values():
        kept = np.concatenate([new[i].ravel() for i in leaves])
        score = np.nan_to_num(np.concatenate([score_leaves[i].ravel() for i in leaves]),
                              nan=-np.inf)
        n_keep = round((1.0 - rate) ** level * kept.size)
        order = np.lexsort((score, kept))
        keep = np.zeros(kept.size, bool)
        keep[order[kept.size - n_keep:]] = True
        for i, part in zip(leaves, np.split(keep, np.cumsum([new[i].size for i in leaves])),
                           strict=False):
            new[i] = part.reshape(new[i].shape)
    return jax.tree_util.tree_unflatten(treedef, new)


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_all_seeds_at_once_equal_each_seed_and_the_numpy_selection(net, scope, x64):
    """Scores with many ties and NaNs, a mask already pruned once: the vmapped program
    keeps exactly what the NumPy selection keeps, for every seed."""
    _, params = net
    spec = PruningSpec(0.4, scope=scope, prune_biases=True, output_fraction=0.2)
    rng = np.random.default_rng(1)
    scores = jax.tree_util.tree_map(
        lambda p: np.where(rng.random((3, *p.shape)) < 0.05, np.nan,
                           rng.integers(0, 6, (3, *p.shape))).astype(np.float32), params)
    start = prune_to_level(scores, ones_like(scores), spec, 1, seeds=True)
    together = prune_to_level(scores, start, spec, 2.5, seeds=True)
    for s in range(3):
        one = jax.tree_util.tree_map(lambda a, s=s: np.asarray(a)[s], (scores, start))
        alone = prune_to_level(*one, spec, 2.5)
        reference = _reference_prune(*one, spec, 2.5)
        for a, b, c, m in zip(*(jax.tree_util.tree_leaves(t) for t in (together, alone,
                                                                       reference, one[1])),
                              strict=True):
            np.testing.assert_array_equal(a[s], b)
            np.testing.assert_array_equal(b, c)
            assert not np.any(b & ~m)  # only removes entries
