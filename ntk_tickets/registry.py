"""Name → entry tables: the one place where a config field's allowed values are defined.

Metrics, ticket criteria, architectures, activations, optimizers, schedules, losses and
datasets are each a :class:`Registry`. A registry maps a name to an *entry*: a small frozen
dataclass (or a function) holding what the name needs and how it is computed, labelled and
scaled. Config validation takes the allowed names from the registries, and every dispatcher
looks its entry up with ``registry[name]``, which ends in a clear error for an unknown name.
Adding a metric, an optimizer or a dataset is therefore one entry (and its test); see the
README section "Adding a metric".

Example::

    OPTIMIZERS = Registry("train.optimizer")

    @OPTIMIZERS.register("sgd")
    def _sgd(cfg, learning_rate):
        ...

    OPTIMIZERS["sgd"]          # the function
    OPTIMIZERS["bogus"]        # UserInputError: train.optimizer = 'bogus' is not allowed; ...
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import Any, Generic, TypeVar

from ntk_tickets.errors import UserInputError

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """An ordered, append-only mapping from names to entries for one config field.

    Args:
      field: the dotted config field whose values are this registry's names (used in error
        messages), e.g. ``"train.optimizer"``.
    """

    def __init__(self, field: str):
        self.field = field
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T | None = None) -> Any:
        """Adds ``entry`` under ``name``; without ``entry``, returns a decorator that adds
        the decorated object and returns it unchanged.

        Raises:
          ValueError: if ``name`` is already registered.
        """
        if entry is None:
            def decorator(obj: T) -> T:
                self.register(name, obj)
                return obj
            return decorator
        if name in self._entries:
            raise ValueError(f"{self.field}: {name!r} is already registered")
        self._entries[name] = entry
        return entry

    def names(self) -> tuple[str, ...]:
        """The registered names, in registration order."""
        return tuple(self._entries)

    def __getitem__(self, name: str) -> T:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise UserInputError(
                f"{self.field} = {name!r} is not allowed; choose one of "
                f"{', '.join(map(repr, self._entries))}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def get(self, name: str, default: Any = None) -> Any:
        """The entry of ``name``, or ``default`` (no error) when there is none."""
        return self._entries.get(name, default)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.field!r}, {list(self._entries)})"


def resolve(reference: str) -> Any:
    """The object named by ``"package.module:attribute"``, imported on first use.

    Config fields name their registry this way, so that validating a config imports only
    the module that holds the registry.
    """
    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module), attribute)


def choices_of(reference: str | tuple[str, ...]) -> tuple[str, ...]:
    """The allowed names of a field: a tuple as it is, or the names of a registry given as
    ``"module:attribute"``."""
    if isinstance(reference, tuple):
        return reference
    return tuple(resolve(reference))
