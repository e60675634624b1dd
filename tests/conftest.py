"""Shared fixtures: float32/float64 switching without touching global state for long."""

import jax
import pytest


@pytest.fixture(params=[False, True], ids=["float32", "float64"])
def x64(request):
    """Runs the test once in float32 and once in float64; yields the flag."""
    with jax.enable_x64(request.param):
        yield request.param


@pytest.fixture
def float64():
    """Runs the test in float64."""
    with jax.enable_x64(True):
        yield
