"""The shipped presets (``ntk_tickets/presets/*.toml``): names, descriptions, runtimes, and
the config a preset name or TOML path resolves to.

Kept apart from :mod:`ntk_tickets.study` so that ``ntk-tickets list`` and a bad ``run``
input are answered without importing JAX or pandas (DESIGN.md §6).
"""

from __future__ import annotations

import importlib.resources
import os
import re
from collections.abc import Sequence
from importlib.resources.abc import Traversable

from ntk_tickets.config import StudyConfig, load_config
from ntk_tickets.errors import UserInputError


def preset_names() -> list[str]:
    """Names of the shipped presets (``ntk_tickets/presets/*.toml``), sorted."""
    files = importlib.resources.files("ntk_tickets") / "presets"
    return sorted(f.name.removesuffix(".toml") for f in files.iterdir()
                  if f.name.endswith(".toml"))


def preset_path(name: str) -> Traversable:
    """The file of preset ``name`` (inside the installed package)."""
    return importlib.resources.files("ntk_tickets") / "presets" / f"{name}.toml"


def _preset_comments(name: str) -> list[str]:
    """The leading comment lines of a preset file, without the ``#``."""
    lines = []
    for line in preset_path(name).read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return lines


def preset_description(name: str) -> str:
    """The first comment line of a preset file: what the preset studies, in one line."""
    comments = _preset_comments(name)
    return comments[0] if comments else ""


def preset_runtime(name: str) -> str:
    """The runtime a preset documents (its ``# Runtime on 2 CPU cores: …`` comment, up to
    the first period or parenthesis, e.g. ``"about 2 min"``), or an empty string."""
    text = " ".join(_preset_comments(name))
    marker = "Runtime on 2 CPU cores:"
    if marker not in text:
        return ""
    return re.split(r"\.(?:\s|$)", text.split(marker, 1)[1])[0].split(" (")[0].strip()


def resolve_config(spec: str, overrides: Sequence[str] = ()) -> StudyConfig:
    """A preset name or a TOML path, with ``dotted.key=value`` overrides applied.

    Raises:
      UserInputError: if ``spec`` is neither a preset nor an existing file, or a field is bad.
    """
    if spec in preset_names():
        with importlib.resources.as_file(preset_path(spec)) as path:
            return load_config(path, overrides)
    if spec.endswith(".toml") or os.path.exists(spec):
        return load_config(spec, overrides)
    raise UserInputError(
        f"{spec!r} is neither a preset nor a config file; presets: "
        f"{', '.join(preset_names())} (see `ntk-tickets list`)"
    )
