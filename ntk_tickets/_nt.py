"""The one gateway to neural-tangents: a compatibility layer for current JAX.

neural-tangents 0.6.5 (its last release) was written against JAX 0.4. On current JAX it
fails at import for three reasons, each repaired here *before* ``import neural_tangents``:

1. ``neural_tangents/__init__.py`` imports its ``experimental`` subpackage, which imports
   TensorFlow through ``jax2tf``. ntk_tickets never uses it, so an empty module is put in
   its place in ``sys.modules`` and TensorFlow is never imported.
2. Names that moved in JAX: ``Jaxpr``, ``JaxprEqn``, ``Literal``, ``Var`` and ``Primitive``
   left ``jax.core`` for ``jax.extend.core``; ``jax.util`` is gone; ``ad.zeros_like_p``,
   ``ad.source_info_util``, ``ad.config`` and ``ad.reducing_transposes`` left
   ``jax.interpreters.ad``. They are restored as aliases (only where missing, so a JAX that
   still has them is left untouched).
3. ``NtkImplementation.STRUCTURED_DERIVATIVES`` relies on the old signature of the private
   ``ad.linearize`` and cannot be repaired by aliasing; ``AUTO`` compiles it to count FLOPs.
   Both are refused by :func:`check_ntk_implementation` with a clear message rather than
   run. ``JACOBIAN_CONTRACTION`` and ``NTK_VECTOR_PRODUCTS`` work and are checked against
   pure-JAX references in ``tests/test_nt_canary.py``.

Two defects of ``nt.predict`` are repaired *after* the import, by replacing module-level
functions of ``neural_tangents._src.predict`` (all checked in ``tests/test_nt_canary.py``):

4. ``max_learning_rate`` passes ``eigvals=`` to ``scipy.linalg.eigvalsh``, a keyword SciPy
   1.14 removed. It is replaced by :func:`_max_learning_rate`, the same formula with
   ``subset_by_index=`` (SciPy >= 1.5), also in the ``nt.predict`` namespace.
5. ``gradient_descent_mse`` factorizes ``k_train_train`` (``eigh`` for finite ``t``,
   Cholesky for ``t=None``) inside ``jax.core.eval_context()``, so that a concrete kernel is
   factorized once, eagerly, even on a first call from inside ``jit``. On stackless JAX
   (>= 0.4.36) that context also cuts off enclosing traces: a kernel that is itself a tracer
   (``vmap`` over seeds, ``jit``, ``grad``) raises ``UnexpectedTracerError``. The two
   factorization helpers are wrapped by :func:`_factorize_traced_kernels_at_use`: a concrete
   kernel is factorized as before, a traced one when the returned functions are applied,
   i.e. outside ``eval_context`` and in the caller's trace.

Every other module of ntk_tickets imports ``nt`` and ``stax`` from here.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
import types

import jax
import jax.core
import jax.extend.core
import jax.numpy as jnp
import scipy.linalg
from jax.interpreters import ad

SUPPORTED_NT_VERSIONS = ("0.6.5",)
SUPPORTED_NTK_IMPLEMENTATIONS = ("jacobian_contraction", "ntk_vector_products")


class NeuralTangentsUnavailableError(ImportError):
    """neural-tangents is missing, of an unsupported version, or does not import."""


def _installed_nt_version() -> str:
    try:
        return importlib.metadata.version("neural-tangents")
    except importlib.metadata.PackageNotFoundError as e:
        raise NeuralTangentsUnavailableError(
            "neural-tangents is not installed; ntk_tickets supports neural-tangents=="
            f"{' or '.join(SUPPORTED_NT_VERSIONS)}: run `uv sync` in the project, or "
            f"`pip install neural-tangents=={SUPPORTED_NT_VERSIONS[-1]}`"
        ) from e


def _alias_moved_jax_names() -> None:
    """Restores, where missing, the JAX names that neural-tangents 0.6.5 imports."""
    from jax._src import util as jax_src_util
    from jax._src.interpreters import ad as jax_src_ad

    for name in ("Jaxpr", "JaxprEqn", "Literal", "Var", "Primitive"):
        if not hasattr(jax.core, name):
            setattr(jax.core, name, getattr(jax.extend.core, name))
    if "jax.util" not in sys.modules:
        try:
            importlib.import_module("jax.util")
        except ImportError:
            util = types.ModuleType("jax.util")
            util.safe_map = jax_src_util.safe_map
            util.safe_zip = jax_src_util.safe_zip
            sys.modules["jax.util"] = util
    for name in ("source_info_util", "config"):
        if not hasattr(ad, name):
            setattr(ad, name, getattr(jax_src_ad, name))
    if not hasattr(ad, "reducing_transposes"):
        ad.reducing_transposes = {}
    if not hasattr(ad, "zeros_like_p"):
        # Only used as a dictionary key by neural-tangents' structured-derivative rules;
        # a fresh primitive never appears in a traced program, so the rule never fires.
        ad.zeros_like_p = jax.extend.core.Primitive("ntk_tickets_zeros_like")


def _import_neural_tangents() -> types.ModuleType:
    version = _installed_nt_version()
    if version not in SUPPORTED_NT_VERSIONS:
        raise NeuralTangentsUnavailableError(
            f"neural-tangents {version} is installed, but ntk_tickets supports only "
            f"neural-tangents=={' or '.join(SUPPORTED_NT_VERSIONS)}: run `uv sync`, or "
            f"`pip install neural-tangents=={SUPPORTED_NT_VERSIONS[-1]}`"
        )
    _alias_moved_jax_names()
    sys.modules.setdefault(
        "neural_tangents.experimental", types.ModuleType("neural_tangents.experimental")
    )
    try:
        import neural_tangents
    except Exception as e:  # any failure here is an incompatibility, reported as one
        raise NeuralTangentsUnavailableError(
            f"neural-tangents {version} does not import on jax {jax.__version__} "
            f"({type(e).__name__}: {e}); ntk_tickets is tested with jax 0.10 and "
            f"neural-tangents=={SUPPORTED_NT_VERSIONS[-1]}"
        ) from e
    return neural_tangents


nt = _import_neural_tangents()
stax = nt.stax
NT_VERSION = nt.__version__
_predict_src = nt._src.predict  # defines what ``nt.predict`` re-exports; patched below


def _max_learning_rate(ntk_train_train, y_train_size=None, momentum=0.0, eps=1e-12):
    """``nt.predict.max_learning_rate`` (same signature and result) for current SciPy.

    2 (1 + momentum) N / (λ_max + eps), with λ_max the largest eigenvalue of the train-train
    NTK flattened to a matrix and N = ``y_train_size`` (default: that matrix's side, right
    for ``trace_axes=()``): the largest η for which I − η K / N, one GD step on
    ½ |f − y|² / N, is a contraction, times 1 + momentum for heavy-ball momentum. Unlike
    upstream it also accepts a traced kernel (under ``jit``), through ``jnp``.

    Args:
      ntk_train_train: the NTK on the training data, shape (n, n) or (n, n, k, k).
      y_train_size: N, the total size of the training targets.
      momentum: the heavy-ball momentum.
      eps: guards against division by zero.

    Returns:
      The maximal feasible learning rate.
    """
    ntk = nt._src.utils.utils.make_2d(ntk_train_train)
    factor = ntk.shape[0] if y_train_size is None else y_train_size
    if not isinstance(ntk, jax.core.Tracer) and _predict_src._is_on_cpu(ntk):
        last = ntk.shape[0] - 1
        max_eva = scipy.linalg.eigvalsh(ntk, subset_by_index=(last, last))[-1]
    else:
        max_eva = jnp.linalg.eigvalsh(ntk)[-1]
    return 2 * (1 + momentum) * factor / (max_eva + eps)


def _factorize_traced_kernels_at_use(get_fns_in_eigenbasis, get_cho_solve):
    """Wraps ``predict``'s factorization helpers so a traced kernel is factorized at use.

    Args:
      get_fns_in_eigenbasis: upstream ``_get_fns_in_eigenbasis(k, diag_reg,
        diag_reg_absolute_scale, fns)``, returning one ``(y, t) -> fn(k, t) @ y`` per ``fn``.
      get_cho_solve: upstream ``_get_cho_solve(k, diag_reg, diag_reg_absolute_scale,
        lower)``, returning ``(b, b_axes) -> k⁻¹ b``.

    Returns:
      The two helpers with the same signatures. For a concrete kernel they return the
      upstream functions; for a tracer, functions that factorize it on every application.
    """

    def fns_in_eigenbasis(k_train_train, diag_reg, diag_reg_absolute_scale, fns):
        args = (diag_reg, diag_reg_absolute_scale)
        if not isinstance(k_train_train, jax.core.Tracer):
            return get_fns_in_eigenbasis(k_train_train, *args, fns)

        def at_use(fn):
            def transform(y_train, t):
                (eager,) = get_fns_in_eigenbasis(k_train_train, *args, (fn,))
                return eager(y_train, t)

            return transform

        return tuple(at_use(fn) for fn in fns)

    def cho_solve(a, diag_reg, diag_reg_absolute_scale, lower=False):
        args = (diag_reg, diag_reg_absolute_scale, lower)
        if not isinstance(a, jax.core.Tracer):
            return get_cho_solve(a, *args)
        return lambda b, b_axes: get_cho_solve(a, *args)(b, b_axes)

    return fns_in_eigenbasis, cho_solve


def _repair_predict() -> None:
    """Installs repairs 4 and 5 of the module docstring."""
    _predict_src.max_learning_rate = nt.predict.max_learning_rate = _max_learning_rate
    _predict_src._get_fns_in_eigenbasis, _predict_src._get_cho_solve = (
        _factorize_traced_kernels_at_use(_predict_src._get_fns_in_eigenbasis,
                                         _predict_src._get_cho_solve))


_repair_predict()


def check_ntk_implementation(name: str) -> int:
    """Maps an implementation name to ``nt.NtkImplementation``, refusing broken ones.

    Args:
      name: ``"jacobian_contraction"`` or ``"ntk_vector_products"``.

    Returns:
      The ``nt.NtkImplementation`` value to pass to ``nt.empirical_ntk_fn``.

    Raises:
      ValueError: for ``"structured_derivatives"`` and ``"auto"``, which do not work with
        neural-tangents 0.6.5 on current JAX, and for unknown names.
    """
    key = name.lower()
    if key in ("structured_derivatives", "auto"):
        raise ValueError(
            f"NTK implementation {name!r} is not available: neural-tangents "
            f"{NT_VERSION}'s structured derivatives rely on a JAX-internal `ad.linearize` "
            f"that changed in jax {jax.__version__} ('auto' compiles them too); use one of "
            f"{', '.join(SUPPORTED_NTK_IMPLEMENTATIONS)}"
        )
    if key not in SUPPORTED_NTK_IMPLEMENTATIONS:
        raise ValueError(
            f"unknown NTK implementation {name!r}; use one of "
            f"{', '.join(SUPPORTED_NTK_IMPLEMENTATIONS)}"
        )
    return getattr(nt.NtkImplementation, key.upper())
