"""Models: output shapes, the parameter-count formula, layer names, kernel width-invariance."""

import jax
import numpy as np
import pytest

from ntk_tickets import ModelConfig, UserInputError, build_model, layer_params, parameter_count

SHAPES = {"mlp": (8, 8, 1), "resmlp": (5,), "cnn1d": (40, 1), "cnn2d": (8, 8, 1)}


@pytest.mark.parametrize("arch", list(SHAPES))
@pytest.mark.parametrize("activation", ["relu", "erf", "tanh", "gelu"])
def test_outputs_and_kernels_have_the_right_shapes(arch, activation):
    model = build_model(ModelConfig(arch=arch, activation=activation, depth=2), 6,
                        SHAPES[arch], 3)
    params = model.init(jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (4, *SHAPES[arch]))
    assert model.apply_fn(params, x).shape == (4, 3)
    kernels = model.kernel_fn(x, x[:2], ("nngp", "ntk"))
    assert kernels.nngp.shape == kernels.ntk.shape == (4, 2)
    assert np.all(np.isfinite(kernels.ntk))


@pytest.mark.parametrize("depth", [1, 3])
def test_mlp_parameter_count_formula(depth):
    d, n, k = 64, 32, 10  # 8×8×1 inputs, width, outputs
    model = build_model(ModelConfig(arch="mlp", depth=depth), n, (8, 8, 1), k)
    expected = (d * n + n) + (depth - 1) * (n * n + n) + (n * k + k)
    assert parameter_count(model.init(jax.random.PRNGKey(0))) == expected


def test_cnn_and_resmlp_parameter_count_formulas():
    c, q, k = 8, 3, 10  # channels, kernel size, outputs
    cnn = build_model(ModelConfig(arch="cnn1d", depth=2, kernel_size=q), c, (40, 1), k)
    expected = (q * 1 * c + c) + (q * c * c + c) + (40 * c * k + k)
    assert parameter_count(cnn.init(jax.random.PRNGKey(0))) == expected
    n = 16
    res = build_model(ModelConfig(arch="resmlp", depth=3), n, (5,), 2)
    expected = (5 * n + n) + 3 * (n * n + n) + (n * 2 + 2)
    assert parameter_count(res.init(jax.random.PRNGKey(0))) == expected


def test_layer_names_align_with_parameterized_layers():
    model = build_model(ModelConfig(arch="mlp", depth=2), 7, (4,), 3)
    layers = layer_params(model, model.init(jax.random.PRNGKey(0)))
    assert list(layers) == ["dense_0", "dense_1", "readout"]
    assert layers["dense_0"][0].shape == (4, 7)
    assert layers["readout"][0].shape == (7, 3)


@pytest.mark.parametrize("arch", ["mlp", "cnn1d"])
def test_ntk_parameterization_kernel_does_not_depend_on_width(x64, arch):
    shape = SHAPES[arch]
    x = jax.random.normal(jax.random.PRNGKey(2), (3, *shape))
    kernels = [build_model(ModelConfig(arch=arch, parameterization="ntk"), w, shape, 2)
               .kernel_fn(x, None, "ntk") for w in (8, 4096)]
    np.testing.assert_allclose(kernels[0], kernels[1], rtol=1e-6 if not x64 else 1e-12)


def test_standard_parameterization_kernel_does_depend_on_width():
    """Contrast for the test above: in standard parameterization the NTK grows with width."""
    x = jax.random.normal(jax.random.PRNGKey(2), (3, 5))
    narrow, wide = [build_model(ModelConfig(parameterization="standard"), w, (5,), 2)
                    .kernel_fn(x, None, "ntk") for w in (8, 4096)]
    assert float(np.min(wide / narrow)) > 10


def test_cnn_refuses_vector_inputs():
    with pytest.raises(UserInputError, match="model.arch = 'cnn2d' needs inputs of shape"):
        build_model(ModelConfig(arch="cnn2d"), 4, (10,), 2)


def test_importing_and_building_leave_the_warning_filters_alone():
    code = ("import warnings; before = list(warnings.filters)\n"
            "import ntk_tickets.models as m, ntk_tickets.kernels\n"
            "from ntk_tickets.config import ModelConfig\n"
            "model = m.build_model(ModelConfig(arch='resmlp', activation='tanh'), 8, (4,), 2)\n"
            "import jax.numpy as jnp; model.kernel_fn(jnp.ones((2, 4)), None, 'ntk')\n"
            "ours = [f for f in warnings.filters if f not in before and f[1] is not None\n"
            "        and any(f[1].match(msg) for msg in m._NOISE)]\n"
            "assert not ours, ours\n")
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", code],
                            capture_output=True, text=True, timeout=120)
    # -W error: neural-tangents' notes would raise if they were not silenced locally, and
    # no filter of ours stays behind (imported libraries may add their own)
    assert result.returncode == 0, result.stderr[-2000:]


def test_compiled_kernels_live_on_the_model():
    import jax

    from ntk_tickets.kernels import empirical_ntk

    model = build_model(ModelConfig(depth=1), 8, (3,), 2)
    params = model.init(jax.random.PRNGKey(0))
    x = jax.numpy.ones((4, 3))
    empirical_ntk(model.apply_fn, params, x, cache=model.cache)
    assert list(model.cache) == [("empirical_ntk", True, "ntk_vector_products")]
    other = build_model(ModelConfig(depth=1), 8, (3,), 2)
    assert other.cache == {}  # nothing shared between models
