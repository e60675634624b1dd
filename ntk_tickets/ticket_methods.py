"""The registry of ticket methods that ``tickets.method`` names.

A :class:`TicketMethod` says how a method finds its masks:

* ``"rewind"``: round r prunes the smallest |θ_T| of round r − 1's trained network and
  trains the survivors again from the rewind point (``imp``);
* ``"oneshot"``: every round's mask from the dense network's |θ_T| at once (``oneshot``);
* ``"at_init"``: from one pass of scores at θ0 (``magnitude_init``, ``snip``, ``grasp``,
  ``ntk_saliency``);
* ``"rescored"``: from data-free scores at θ0 recomputed while pruning (``synflow``).

The first two are driven by the ``tickets.search_path`` training (:data:`TRAINED`).

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

SEARCH_KINDS = ("rewind", "oneshot", "at_init", "rescored")
#: The searches driven by training (``tickets.search_path`` applies to them).
TRAINED = ("rewind", "oneshot")


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

    def __post_init__(self):
        if self.search not in SEARCH_KINDS:
            raise ValueError(f"search must be one of {SEARCH_KINDS}, got {self.search!r}")
        if (self.score is None) != (self.search in TRAINED):
            need = "needs a" if self.score is None else "takes no"
            raise ValueError(f"a {self.search!r} ticket method {need} score function")


#: :class:`TicketMethod` entries, by ``tickets.method``.
TICKET_METHODS: Registry = Registry("tickets.method")

TICKET_METHODS.register("imp", TicketMethod(
    "rewind", doc="iterative magnitude pruning with rewinding (Frankle & Carbin 2019)"))
TICKET_METHODS.register("oneshot", TicketMethod(
    "oneshot", doc="every round's mask from the dense run's |θ_T| at once"))
TICKET_METHODS.register("magnitude_init", TicketMethod(
    "at_init", lambda c, i: c.magnitude_scores(i.params), doc="|θ0|"))
TICKET_METHODS.register("snip", TicketMethod(
    "at_init", lambda c, i: c.snip_scores(i.apply_fn, i.params, i.x, i.y, i.loss_fn),
    doc="connection sensitivity |g ⊙ θ| (Lee et al. 2019, arXiv 1810.02340)"))
TICKET_METHODS.register("grasp", TicketMethod(
    "at_init", lambda c, i: c.grasp_scores(i.apply_fn, i.params, i.x, i.y, i.loss_fn),
    doc="gradient-signal preservation θ ⊙ Hg (Wang et al. 2020, arXiv 2002.07376)"))
TICKET_METHODS.register("synflow", TicketMethod(
    "rescored", lambda c, i: c.synflow_scores(i.apply_fn, i.params, i.input_shape),
    doc="data-free synaptic flow (Tanaka et al. 2020, arXiv 2006.05467)"))
TICKET_METHODS.register("ntk_saliency", TicketMethod(
    "at_init", lambda c, i: c.ntk_saliency_scores(i.apply_fn, i.params, i.x_probe, i.key,
                                                   i.n_samples),
    doc="saliency of the empirical-NTK trace (in the spirit of NTK-SAP, arXiv 2304.02840)"))


def at_init_methods() -> tuple[str, ...]:
    """The methods that score weights without training (``at_init`` and ``rescored``)."""
    return tuple(n for n, m in TICKET_METHODS.items() if m.search not in TRAINED)
