"""tunex: fine-tune large language models (full, LoRA, QLoRA) with Rust-accelerated hot paths."""

from __future__ import annotations

from tunex._native import __version__
from tunex.config import Config, load_config
from tunex.errors import ConfigError, DataError, FormatError, TunexError
from tunex.io.sharded import save_sharded
from tunex.merge import MergeReport, merge


def __getattr__(name: str):
    # ``tunex.quant`` imports torch; load it on first use so ``import tunex`` (and the CLI) stay light.
    if name == "quant":
        import importlib

        return importlib.import_module("tunex.quant")
    raise AttributeError(f"module 'tunex' has no attribute {name!r}")


__all__ = [
    "__version__",
    "Config",
    "ConfigError",
    "DataError",
    "FormatError",
    "TunexError",
    "load_config",
    "merge",
    "MergeReport",
    "quant",
    "save_sharded",
]
