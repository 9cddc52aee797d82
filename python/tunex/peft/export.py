"""Writing LoRA adapters in PEFT's on-disk format.

An adapter folder holds ``adapter_config.json`` (indent 2, sorted keys) and
``adapter_model.safetensors`` with keys ``base_model.model.<module>.lora_A.weight`` (r, in),
``...lora_B.weight`` (out, r) and, for DoRA, ``...lora_magnitude_vector`` (out,). The adapter name
("default") is not part of the saved keys.

A run that changed the base model's ``config.json`` (``model.rope_scaling``) also writes
``tunex_base_config.json``: the keys to set on the base's config.json, as config.json spells them.
PEFT has no place for them; ``tunex convert merge`` writes them into the merged config.json and
``tunex chat --adapter`` loads the base with them (:func:`base_config_changes`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from tunex.errors import FormatError
from tunex.io.hf import BASE_CONFIG_CHANGES

PEFT_PREFIX = "base_model.model."
ADAPTER_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector")


def adapter_modules(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Module names that carry an adapter in a tunex state dict, in key order."""
    seen: dict[str, None] = {}
    for key in state:
        if key.endswith(".lora_A.weight"):
            seen[key[: -len(".lora_A.weight")]] = None
    return list(seen)


def peft_tensors(
    state: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None, source: str = "<state dict>"
) -> dict[str, torch.Tensor]:
    """tunex adapter tensors -> PEFT's key names, contiguous, cast to ``dtype`` when given.

    Raises:
        FormatError: when ``state`` holds no LoRA tensors or an A without its B.
    """
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key.endswith(ADAPTER_SUFFIXES):
            t = tensor.detach().to("cpu")
            out[PEFT_PREFIX + key] = (t.to(dtype) if dtype is not None else t).contiguous()
    modules = adapter_modules(state)
    if not modules:
        raise FormatError(
            f"{source}: holds no LoRA tensors (keys ending in .lora_A.weight); is it a checkpoint of a full fine-tune?"
        )
    missing = [m for m in modules if f"{m}.lora_B.weight" not in state]
    if missing:
        raise FormatError(f"{source}: LoRA A without its B for {', '.join(missing[:3])}")
    return out


def adapter_config(method: Any, modules: list[str], base_model: str, rank: int | None = None) -> dict:
    """PEFT's ``adapter_config.json`` content for a tunex ``[method]`` section.

    "all-linear" is written as the sorted set of adapted module suffixes, which loads the same
    adapter on any model with those names; a list stays a list and a regex stays a regex.
    """
    target = method.target_modules
    if target == "all-linear" or not isinstance(target, (str, list)):
        target = sorted({m.rsplit(".", 1)[-1] for m in modules})
    elif isinstance(target, list):
        target = sorted(set(target))
    return {
        "alpha_pattern": {},
        "base_model_name_or_path": base_model,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": float(method.alpha),
        "lora_bias": False,
        "lora_dropout": float(method.dropout),
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": int(rank if rank is not None else method.r),
        "rank_pattern": {},
        "revision": None,
        "target_modules": target,
        "task_type": "CAUSAL_LM",
        "use_dora": bool(method.use_dora),
        "use_rslora": bool(method.use_rslora),
    }


# A shard limit no adapter reaches: PEFT reads exactly one adapter_model.safetensors.
ONE_FILE = 1 << 62


ADAPTER_FILES = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
    "README.md",
    BASE_CONFIG_CHANGES,
)


def write_adapter(
    out_dir: str | os.PathLike, tensors: Mapping[str, torch.Tensor], config: dict, base_changes: dict | None = None
) -> Path:
    """Write a PEFT adapter folder as a whole: built beside ``out_dir`` and renamed into place, so
    the config and weights always belong together. A previous adapter there is replaced in one
    step; a folder holding anything else is refused.

    ``adapter_model.safetensors`` (one file, ``{"format": "pt"}`` metadata) goes through tunex's
    Rust shard writer. ``base_changes``: config.json keys the run changed on the base, written to
    ``tunex_base_config.json`` (nothing when empty).
    """
    from tunex.io.atomic import atomic_folder, replaceable
    from tunex.io.sharded import save_sharded

    out = Path(out_dir)
    replaceable(out, lambda name: name in ADAPTER_FILES, "a PEFT adapter folder")
    with atomic_folder(out, overwrite=True) as tmp:
        save_sharded(dict(tensors), tmp, max_shard_size=ONE_FILE, prefix="adapter_model")
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if base_changes:
            text = json.dumps(base_changes, indent=2, sort_keys=True) + "\n"
            (tmp / BASE_CONFIG_CHANGES).write_text(text, encoding="utf-8")
    return out


def export_adapter(
    state: Mapping[str, torch.Tensor],
    method: Any,
    out_dir: str | os.PathLike,
    base_model: str = "",
    dtype: torch.dtype | None = torch.float16,
    source: str = "<state dict>",
    rope_scaling: dict | None = None,
) -> Path:
    """tunex adapter state (module-named keys) -> PEFT adapter folder at ``out_dir``; ``rope_scaling``:
    the run's ``model.rope_scaling`` (kept in ``tunex_base_config.json``)."""
    tensors = peft_tensors(state, dtype, source)
    modules = adapter_modules(state)
    rank = int(state[f"{modules[0]}.lora_A.weight"].shape[0])
    changes = {"rope_scaling": dict(rope_scaling)} if rope_scaling else None
    return write_adapter(out_dir, tensors, adapter_config(method, modules, base_model, rank), changes)
