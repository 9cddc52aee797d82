"""tunex's exception classes.

Every failure tunex itself detects derives from :class:`TunexError`. Problems with a value also derive
from ``ValueError`` so generic callers can catch them the usual way; I/O failures stay in Python's
``OSError`` family (``FileNotFoundError`` and friends), raised by the Rust core too.
"""

from __future__ import annotations


class TunexError(Exception):
    """Base class of every error tunex raises for its own reasons."""


class FormatError(TunexError, ValueError):
    """A file's bytes do not follow its format (corrupt safetensors, bad index or adapter config)."""


class DataError(TunexError, ValueError):
    """Well-formed input whose values or shapes cannot be used (NaN weights, mismatched LoRA shapes)."""


class ConfigError(TunexError, ValueError):
    """A config file failed validation. ``problems`` lists every problem found, one string each."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = list(problems)
        count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        super().__init__(f"{source}: {count}:\n" + "\n".join(f"  - {p}" for p in problems))


class SettingError(TunexError, ValueError):
    """A ``TUNEX_*`` environment switch holds a value it does not accept (see tunex.settings)."""
