"""The built-in configs shipped in ``configs/`` (found in the installed package, editable or not)."""

from __future__ import annotations

import difflib
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def names() -> list[str]:
    """Sorted names (without .toml) of every built-in config."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))


def find(pattern: str | None = None) -> tuple[list[str], bool]:
    """Configs matching ``pattern`` case-insensitively.

    Returns (names, exact): the substring matches when there are any (exact=True), else the closest
    names by spelling (exact=False), so a typo still leads somewhere.
    """
    all_names = names()
    if not pattern:
        return all_names, True
    needle = pattern.lower()
    hits = [n for n in all_names if needle in n.lower()]
    if hits:
        return hits, True
    scores = {n: _closeness(needle, n.lower()) for n in all_names}
    close = sorted((n for n, s in scores.items() if s >= 0.6), key=lambda n: (-scores[n], n))
    return close[:10], False


def _closeness(needle: str, name: str) -> float:
    """How well ``needle`` spells the whole name or one of its ``_``-separated parts (0..1)."""
    parts = [name, *name.split("_")]
    return max(difflib.SequenceMatcher(None, needle, part).ratio() for part in parts)


def path_of(name: str) -> Path:
    """The file of built-in config ``name`` (with or without .toml); FileNotFoundError names close ones."""
    stem = name[:-5] if name.endswith(".toml") else name
    file = CONFIG_DIR / f"{stem}.toml"
    if file.is_file():
        return file
    close, _ = find(stem)
    hint = f"; closest: {', '.join(close)}" if close else ""
    raise FileNotFoundError(f"no built-in config named {stem!r}{hint} (see `tunex list-cfg`)")


def resolve(path_or_name: str | Path) -> Path:
    """A config file path as given, or else the built-in config of that name."""
    p = Path(path_or_name)
    if p.is_file():
        return p
    if p.suffix == ".toml" and (len(p.parts) > 1):
        raise FileNotFoundError(f"{p}: no such config file")
    return path_of(str(path_or_name))
