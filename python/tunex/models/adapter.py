"""Apply a PEFT LoRA adapter folder to a loaded model, unmerged (LoRA layers on top of the base).

Reads ``adapter_config.json`` and ``adapter_model.safetensors`` (or the legacy ``.bin``, loaded
with ``weights_only=True``). Ranks come from the tensors themselves, alphas from ``lora_alpha`` and
``alpha_pattern``; ``use_rslora``/``use_dora`` as saved. ``modules_to_save`` tensors replace the
base's. The base may be NF4-quantized (chat --bits 4).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from tunex.errors import FormatError
from tunex.models.config import ModelConfig, to_tunex_module

PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight$|^(.+)\.lora_magnitude_vector(?:\.[^.]+)?$")


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank/alpha pattern rule (the first key matching the module's trailing components),
    resolved by the same Rust code the merge uses."""
    from tunex import _native

    if not patterns:
        return default
    keys = list(patterns)
    (index,) = _native.peft_pattern_keys(keys, [module])
    return default if index is None else patterns[keys[index]]


def read_adapter(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    folder = Path(folder)
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: is {folder} a PEFT adapter folder?")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise FormatError(f"{config_file}: not valid JSON (line {exc.lineno}): {exc.msg}") from exc
    if config.get("peft_type", "LORA") != "LORA":
        raise FormatError(f"{config_file}: peft_type {config.get('peft_type')!r}; only LORA adapters load")
    weights = folder / "adapter_model.safetensors"
    if weights.is_file():
        from tunex.models.loading import read_safetensors

        tensors = read_safetensors(weights)
    elif (folder / "adapter_model.bin").is_file():
        tensors = torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{folder} has no adapter_model.safetensors (or adapter_model.bin)")
    return config, tensors


def apply_adapter(model: nn.Module, folder: str | Path) -> list[str]:
    """Wrap the adapted linears of ``model`` in LoRA layers holding the adapter's weights.

    Returns the adapted module names. The model stays unmerged and frozen.
    """
    from tunex.peft import LoRALinear

    config, tensors = read_adapter(folder)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    extra: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        name = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        m = _LORA_KEY.match(name)
        if m:
            module = m[1] or m[3]
            parts.setdefault(module, {})[m[2] or "magnitude"] = tensor
        else:
            extra[name] = tensor
    cfg = getattr(model, "config", None)
    if isinstance(cfg, ModelConfig):  # adapters name the family's own modules (InternLM2's wqkv...)
        parts = {to_tunex_module(m, cfg): p for m, p in parts.items()}
        extra = {to_tunex_module(n, cfg): t for n, t in extra.items()}
    known = dict(model.named_modules())
    names = sorted(parts)
    for module in names:
        p = parts[module]
        if module not in known or "lora_A" not in p or "lora_B" not in p:
            raise FormatError(
                f"{folder}: adapter tensors for {module!r} do not fit this model "
                f"(module {'missing' if module not in known else 'lacks lora_A/lora_B'})"
            )
        a, b = p["lora_A"], p["lora_B"]
        r = a.shape[0]
        try:
            alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", r))
        except ValueError as exc:
            raise FormatError(f"{Path(folder) / 'adapter_config.json'}: alpha_pattern {exc}") from None
        layer = LoRALinear(known[module], r, float(alpha), 0.0, bool(config.get("use_rslora", False)), "magnitude" in p)
        if tuple(layer.lora_A.weight.shape) != tuple(a.shape) or tuple(layer.lora_B.weight.shape) != tuple(b.shape):
            raise FormatError(
                f"{folder}: {module} lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not "
                f"fit a ({layer.out_features} x {layer.in_features}) layer"
            )
        with torch.no_grad():
            layer.lora_A.weight.copy_(a)
            layer.lora_B.weight.copy_(b)
            if "magnitude" in p:
                layer.lora_magnitude_vector.copy_(p["magnitude"])
        owner, _, attr = module.rpartition(".")
        setattr(model.get_submodule(owner), attr, layer)
    params = dict(model.named_parameters())
    for name, tensor in extra.items():  # modules_to_save: full replacement tensors
        target = params.get(name) or params.get(name.replace(".modules_to_save.default", ""))
        if target is None or target.shape != tensor.shape:
            raise FormatError(f"{folder}: adapter tensor {name!r} has no matching model parameter")
        with torch.no_grad():
            target.copy_(tensor)
    model.requires_grad_(False)
    return names
