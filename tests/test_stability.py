"""Linear mode connectivity (ntk_tickets.stability) against closed forms and the convexity
of the linearized network's MSE loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntk_tickets import ModelConfig, build_model, linearize
from ntk_tickets.stability import along_line, instability, interpolation_grid, loss_barrier


def test_barrier_and_instability_of_hand_made_curves():
    """A parabola bump above the chord has its closed-form height; a straight line has none;
    the max-minus-mean instability is half the endpoint gap on a monotone line."""
    alphas = interpolation_grid(11)
    chord = 1.0 + 2.0 * alphas
    bump = chord + 4 * 0.3 * alphas * (1 - alphas)   # height 0.3 at α = ½
    assert loss_barrier(bump, alphas) == pytest.approx(0.3)
    assert loss_barrier(chord, alphas) == pytest.approx(0.0, abs=1e-15)
    assert instability(chord) == pytest.approx(1.0)  # max 3 − mean(1, 3)
    np.testing.assert_allclose(loss_barrier(np.stack([bump, chord]), alphas), [0.3, 0.0],
                               atol=1e-15)
    with pytest.raises(ValueError, match="n_interp"):
        interpolation_grid(1)


def test_along_line_interpolates_every_leaf():
    theta_1 = {"w": jnp.zeros(3), "b": jnp.ones(())}
    theta_2 = {"w": jnp.full(3, 2.0), "b": jnp.zeros(())}
    out = along_line(lambda p: jnp.sum(p["w"]) + p["b"], theta_1, theta_2,
                     interpolation_grid(3))
    np.testing.assert_allclose(out, [1.0, 3.5, 6.0])


def test_the_linearized_networks_mse_has_no_barrier(float64):
    """The linearized network is linear in θ, so its MSE is convex along any line: the barrier
    is ≤ 0 up to rounding (here ≥ −(a few ulp)·loss). The max-minus-mean barrier of the same
    curve is positive when the endpoint losses differ: that definition cannot pass this test."""
    model = build_model(ModelConfig(depth=2, activation="tanh"), 32, (4,), 2)
    theta0 = model.init(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    x, y = jnp.asarray(rng.standard_normal((40, 4))), jnp.asarray(rng.standard_normal((40, 2)))
    ends = [jax.tree_util.tree_map(lambda a, s=s: a + 0.8 * jnp.asarray(
        np.random.default_rng(s).standard_normal(a.shape)), theta0) for s in (1, 2)]
    alphas = interpolation_grid(21)
    f_lin = linearize(model.apply_fn)

    def mse(f):
        return 0.5 * jnp.mean((f - y) ** 2)

    linear = np.asarray(along_line(lambda p: mse(f_lin(p, theta0, x)), *ends, alphas))
    assert loss_barrier(linear, alphas) <= 1e-12 * linear.max()
    assert linear[0] != pytest.approx(linear[-1])
    max_minus_mean = linear.max() - 0.5 * (linear[0] + linear[-1])
    assert max_minus_mean > 0
    chord = (1 - alphas) * linear[0] + alphas * linear[-1]
    assert np.all(linear[1:-1] < chord[1:-1])  # strictly: f_lin moves along the line
