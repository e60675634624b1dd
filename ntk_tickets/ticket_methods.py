"""The registry of ticket methods that ``tickets.method`` names.

A :class:`TicketMethod` says how a method finds its masks:

* ``"trained"``: from the magnitudes |θ_T| of a trained network (``imp`` with rewinding,
  ``oneshot``), driven by the ``tickets.search_path`` training;
* ``"at_init"``: from one pass of scores at θ0 (``magnitude_init``, ``snip``, ``grasp``,
  ``ntk_saliency``);
* ``"iterative"``: from data-free scores recomputed while pruning (``synflow``).

An at-initialization entry's ``score(criteria, inputs)`` gets the module
:mod:`ntk_tickets.criteria` (passed in, so that this module imports no JAX and config
validation stays light) and a :class:`ScoreInputs`, and returns a PyTree of scores shaped
like the parameters; **the smallest scores are pruned first**.

Adding a criterion is one entry (plus its score function and test)::

    TICKET_METHODS.register("gradient_norm", TicketMethod(
        "at_init", lambda c, i: c.snip_scores(i.apply_fn, i.params, i.x, i.y, i.loss_fn),
        doc="..."))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from ntk_tickets.registry import Registry

SEARCH_KINDS = ("trained", "at_init", "iterative")


@dataclasses.dataclass(frozen=True)
class ScoreInputs:
    """What an at-initialization criterion may use.

    Attributes:
      apply_fn: ``(params, x) -> (n, k)`` outputs.
      params: θ0 of one seed.
      x: training inputs ``(n, *input_shape)``; ``y`` their targets for ``loss_fn``.
      loss_fn: ``(f, y) -> scalar``.
      key: a PRNG key for randomized criteria.
      x_probe: probe inputs ``(m, *input_shape)``.
      input_shape: one input's shape, without the batch axis.
      n_samples: random probe vectors of randomized estimators.
    """

    apply_fn: Callable
    params: Any
    x: Any
    y: Any
    loss_fn: Callable
    key: Any
    x_probe: Any
    input_shape: Sequence[int]
    n_samples: int = 16


@dataclasses.dataclass(frozen=True)
class TicketMethod:
    """One ``tickets.method``: how it searches (:data:`SEARCH_KINDS`), its score function
    (``at_init`` and ``iterative`` methods), and a one-line description with a reference."""

    search: str
    score: Callable[[Any, ScoreInputs], Any] | None = None
    doc: str = ""


#: :class:`TicketMethod` entries, by ``tickets.method``.
TICKET_METHODS: Registry = Registry("tickets.method")

TICKET_METHODS.register("imp", TicketMethod(
    "trained", doc="iterative magnitude pruning with rewinding (Frankle & Carbin 2019)"))
TICKET_METHODS.register("oneshot", TicketMethod(
    "trained", doc="every round's mask from the dense run's |θ_T| at once"))
TICKET_METHODS.register("magnitude_init", TicketMethod(
    "at_init", lambda c, i: c.magnitude_scores(i.params), doc="|θ0|"))
TICKET_METHODS.register("snip", TicketMethod(
    "at_init", lambda c, i: c.snip_scores(i.apply_fn, i.params, i.x, i.y, i.loss_fn),
    doc="connection sensitivity |g ⊙ θ| (Lee et al. 2019, arXiv 1810.02340)"))
TICKET_METHODS.register("grasp", TicketMethod(
    "at_init", lambda c, i: c.grasp_scores(i.apply_fn, i.params, i.x, i.y, i.loss_fn),
    doc="gradient-signal preservation θ ⊙ Hg (Wang et al. 2020, arXiv 2002.07376)"))
TICKET_METHODS.register("synflow", TicketMethod(
    "iterative", lambda c, i: c.synflow_scores(i.apply_fn, i.params, i.input_shape),
    doc="data-free synaptic flow (Tanaka et al. 2020, arXiv 2006.05467)"))
TICKET_METHODS.register("ntk_saliency", TicketMethod(
    "at_init", lambda c, i: c.ntk_saliency_scores(i.apply_fn, i.params, i.x_probe, i.key,
                                                   i.n_samples),
    doc="saliency of the empirical-NTK trace (in the spirit of NTK-SAP, arXiv 2304.02840)"))


def at_init_methods() -> tuple[str, ...]:
    """The methods that score weights without training (``at_init`` and ``iterative``)."""
    return tuple(n for n, m in TICKET_METHODS.items() if m.search != "trained")
