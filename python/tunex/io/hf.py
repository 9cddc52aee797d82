"""HF model folders: which weight format a folder holds, its non-weight files, and loading its
tensors (safetensors via Rust; legacy ``pytorch_model*.bin`` only via ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

from tunex.errors import FormatError

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
# Files a CLIP vision tower needs (its tokenizer belongs to the text tower, which is not kept).
_CLIP_FILES = ("config.json", "preprocessor_config.json")


def missing(path: Path, what: str) -> FileNotFoundError:
    return FileNotFoundError(errno.ENOENT, f"{what} not found: {path}", str(path))


def require_dir(path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise missing(p, what)
    if not p.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"{what} must be a folder: {p}", str(p))
    return p


def weight_format(folder: str | os.PathLike) -> str:
    """``"safetensors"`` or ``"bin"`` (legacy pickle); FileNotFoundError listing the folder otherwise."""
    p = Path(folder)
    if (p / SAFETENSORS_INDEX).is_file() or (p / "model.safetensors").is_file():
        return "safetensors"
    if (p / BIN_INDEX).is_file() or (p / "pytorch_model.bin").is_file():
        return "bin"
    held = ", ".join(sorted(x.name for x in p.iterdir())) if p.is_dir() else "nothing"
    raise FileNotFoundError(
        errno.ENOENT,
        f"{p} holds no model weights: expected model.safetensors, {SAFETENSORS_INDEX}, "
        f"pytorch_model.bin or {BIN_INDEX} (found: {held or 'nothing'})",
        str(p),
    )


def bin_files(folder: Path) -> list[Path]:
    """The legacy pickle shards of a folder, in shard order."""
    index = folder / BIN_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        return [folder / name for name in sorted(set(weight_map.values()))]
    return [folder / "pytorch_model.bin"]


def load_bin(path: Path) -> dict[str, Any]:
    """A legacy checkpoint, unpickled safely: tensors and plain containers only."""
    import torch

    if not path.is_file():
        raise missing(path, "checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        # Old (non-zip) pickles cannot be memory-mapped.
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    return state


def load_state_dict(folder: str | os.PathLike) -> dict[str, Any]:
    """Every tensor of a HF model folder (loads the whole model: for small models and tests)."""
    from tunex.io.safetensors import SafetensorsFile

    p = require_dir(folder, "model folder")
    if weight_format(p) == "bin":
        state: dict[str, Any] = {}
        for f in bin_files(p):
            state.update(load_bin(f))
        return state
    index = p / SAFETENSORS_INDEX
    files = (
        [p / n for n in sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))]
        if index.is_file()
        else [p / "model.safetensors"]
    )
    state = {}
    for f in files:
        reader = SafetensorsFile(f)
        state.update({k: reader.get(k) for k in reader.keys()})
    return state


def bin_to_safetensors(folder: Path, dest: Path) -> Path:
    """Rewrite a legacy .bin checkpoint as safetensors shards in ``dest`` (one per .bin shard, so
    only one shard is ever in memory). Returns ``dest``."""
    from tunex.io.sharded import save_sharded

    files = bin_files(folder)
    weight_map = {}
    for i, f in enumerate(files, 1):
        stem = "model" if len(files) == 1 else f"model-{i:05d}-of-{len(files):05d}"
        state = load_bin(f)
        save_sharded(state, dest, max_shard_size=2**62, prefix=stem)
        weight_map.update({k: f"{stem}.safetensors" for k in state})
        del state
    if len(files) > 1:
        index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
        (dest / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return dest


def non_weight_files(folder: str | os.PathLike, is_clip: bool = False) -> list[Path]:
    """Files a merged/converted model should carry over: config, generation config, tokenizer
    files, chat template (or, for a CLIP vision tower, config and preprocessor config)."""
    p = Path(folder)
    if is_clip:
        return [p / n for n in _CLIP_FILES if (p / n).is_file()]
    return sorted(
        f
        for f in p.iterdir()
        if f.is_file()
        and not f.name.startswith(".")
        and not f.name.endswith(_WEIGHT_SUFFIXES)
        and f.name not in (SAFETENSORS_INDEX, BIN_INDEX)
    )


# The base config.json keys a LoRA run changed (model.rope_scaling), written beside PEFT's files in the
# adapter folder (tunex.peft.export): PEFT has no place for them; merge and chat apply them.
BASE_CONFIG_CHANGES = "tunex_base_config.json"
# The keys a run may change on its base's config.json (each a JSON object).
_CHANGEABLE = ("rope_scaling",)


def base_config_changes(adapter_dir: str | os.PathLike) -> dict:
    """The base config.json keys the adapter's run changed (``{}`` when it changed none).

    Raises:
        FormatError: naming the file: not a JSON object, an unknown key, or a value of the wrong kind.
    """
    path = Path(adapter_dir) / BASE_CONFIG_CHANGES
    if not path.is_file():
        return {}
    try:
        changes = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: not valid JSON ({e}); re-export the adapter with `tunex convert pth_to_hf`") from e
    if not isinstance(changes, dict):
        raise FormatError(f"{path}: expected a JSON object of config.json keys, got {type(changes).__name__}")
    for key, value in changes.items():
        if key not in _CHANGEABLE:
            raise FormatError(f"{path}: unknown key {key!r}; expected only {', '.join(_CHANGEABLE)}")
        if not isinstance(value, dict):
            raise FormatError(f"{path}: {key} must be a JSON object, got {type(value).__name__}")
    return changes
