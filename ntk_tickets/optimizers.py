"""Registries of the training losses, optimizers and learning-rate schedules.

Each entry is a function; optax and JAX are imported inside it, so that validating a config
imports neither. ``train.loss``, ``train.optimizer`` and ``train.schedule`` take their
allowed values from :data:`LOSSES`, :data:`OPTIMIZERS` and :data:`SCHEDULES`.

Losses: ``mse`` is ½·mean((f − y)²) over all n·k entries, the normalization under which
``t`` steps of gradient descent with step size η match neural-tangents' closed form at
time ``t`` (see :mod:`ntk_tickets.kernels`); ``xent`` is the mean softmax cross-entropy
with integer labels.

Adding an optimizer is one entry::

    @OPTIMIZERS.register("lion")
    def _lion(cfg, learning_rate):
        import optax
        return optax.lion(learning_rate, weight_decay=cfg.weight_decay)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ntk_tickets.registry import Registry

if TYPE_CHECKING:
    import jax
    import optax

    from ntk_tickets.config import TrainConfig

#: ``(f, y) -> scalar`` training losses, by ``train.loss``.
LOSSES: Registry = Registry("train.loss")
#: ``(cfg, learning_rate) -> optax.GradientTransformation``, by ``train.optimizer``.
OPTIMIZERS: Registry = Registry("train.optimizer")
#: ``(cfg) -> float or optax schedule``, by ``train.schedule``.
SCHEDULES: Registry = Registry("train.schedule")


@LOSSES.register("mse")
def mse_loss(f: jax.Array, y: jax.Array) -> jax.Array:
    """½·mean((f − y)²) over all entries; ``f``, ``y`` of shape (n, k)."""
    import jax.numpy as jnp

    return 0.5 * jnp.mean((f - y) ** 2)


@LOSSES.register("xent")
def xent_loss(f: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy; ``f`` logits (n, k), ``labels`` int (n,)."""
    import jax.numpy as jnp
    import optax

    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(f, labels))


@SCHEDULES.register("constant")
def _constant(cfg: TrainConfig) -> float:
    return cfg.learning_rate


@SCHEDULES.register("cosine")
def _cosine(cfg: TrainConfig) -> Any:
    """Decays to 0 over ``cfg.steps``."""
    import optax

    return optax.cosine_decay_schedule(cfg.learning_rate, cfg.steps)


@SCHEDULES.register("warmup_cosine")
def _warmup_cosine(cfg: TrainConfig) -> Any:
    """Linear warm-up over the first 5 % of steps, then cosine decay to 0."""
    import optax

    return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate,
                                              max(1, cfg.steps // 20), cfg.steps)


def _with_l2(cfg: TrainConfig, base: optax.GradientTransformation) -> Any:
    """``base`` with ``weight_decay · θ`` added to the gradient first (L2), if any."""
    import optax

    if cfg.weight_decay:
        return optax.chain(optax.add_decayed_weights(cfg.weight_decay), base)
    return base


@OPTIMIZERS.register("sgd")
def _sgd(cfg: TrainConfig, learning_rate: Any) -> Any:
    """Plain gradient descent; weight decay is added to the gradient (L2)."""
    import optax

    return _with_l2(cfg, optax.sgd(learning_rate))


@OPTIMIZERS.register("momentum")
def _momentum(cfg: TrainConfig, learning_rate: Any) -> Any:
    """Heavy-ball momentum ``train.momentum``; weight decay added to the gradient (L2)."""
    import optax

    return _with_l2(cfg, optax.sgd(learning_rate, momentum=cfg.momentum))


@OPTIMIZERS.register("adam")
def _adam(cfg: TrainConfig, learning_rate: Any) -> Any:
    """AdamW with decoupled weight decay (equal to Adam at weight decay 0)."""
    import optax

    return optax.adamw(learning_rate, weight_decay=cfg.weight_decay)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """The optax optimizer of ``cfg`` (:data:`OPTIMIZERS`) with its learning-rate schedule
    (:data:`SCHEDULES`)."""
    return OPTIMIZERS[cfg.optimizer](cfg, SCHEDULES[cfg.schedule](cfg))
