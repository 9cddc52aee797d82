"""Training checkpoints -> HF formats: a PEFT adapter for LoRA/QLoRA, a HF model folder for a full
fine-tune (written by the Rust shard writer, with the base model's config and tokenizer files)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from tunex.errors import FormatError
from tunex.io.atomic import atomic_folder, replaceable
from tunex.models.config import set_rope_scaling
from tunex.peft import export_adapter
from tunex.train import checkpoint

# Files of a HF model folder that describe it rather than hold weights.
MODEL_SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)


def _method_of(state: dict[str, Any], cfg: Any, pth: Path) -> str:
    kind = state.get("method", cfg.method.kind)
    if kind != cfg.method.kind:
        raise FormatError(
            f"{pth}: written by a {kind} run but the config says method.kind = "
            f"{cfg.method.kind!r}; pass the config the run used (work_dir/config.toml)"
        )
    return kind


def convert_checkpoint(
    cfg: Any, pth: str | os.PathLike, out: str | os.PathLike, *, fp32: bool = False, max_shard_size: str | int = "2GB"
) -> str:
    """Write checkpoint ``pth`` of a run of ``cfg`` to ``out``; returns what was written."""
    pth = Path(pth)
    state = checkpoint.load(pth)
    kind = _method_of(state, cfg, pth)
    dtype = torch.float32 if fp32 else torch.float16
    if getattr(cfg, "vision", None) is not None and cfg.vision.path:  # LLaVA: tower + projector + LLM
        from tunex.train.export_llava import export_llava

        return export_llava(cfg, state, pth, Path(out), dtype, max_shard_size)
    if getattr(cfg.train, "objective", "sft") == "reward":  # a *ForSequenceClassification folder
        from tunex.train.reward_export import write_reward_model

        write_reward_model(cfg, state, kind, out, dtype, max_shard_size)
        return "a HF reward model"
    if kind in ("lora", "qlora"):
        adapter = _checkpoint_named(cfg, state["model"])
        rope = cfg.model.rope_scaling
        export_adapter(
            adapter, cfg.method, out, base_model=cfg.model.path, dtype=dtype, source=str(pth), rope_scaling=rope
        )
        if rope:  # PEFT keeps no base config; tunex's merge and chat read the side file
            return "a PEFT adapter, with the run's model.rope_scaling in tunex_base_config.json (PEFT users: set it on the base's config.json)"
        return "a PEFT adapter"
    write_full_model(cfg, state["model"], Path(out), dtype, max_shard_size)
    return "a HF model"


def write_full_model(
    cfg: Any,
    weights: dict[str, torch.Tensor],
    out: Path,
    dtype: torch.dtype,
    max_shard_size: str | int,
    edit_config: Any = None,
) -> None:
    """A full fine-tune's weights as a HF folder: shards + index, config.json, generation_config.json,
    tokenizer files. ``edit_config(config, tokenizer)`` may change config.json first (reward models)."""
    from tunex import save_sharded
    from tunex.models import resolve_model_path, to_checkpoint_names
    from tunex.models.hf_backend import model_config

    base = Path(resolve_model_path(cfg.model.path))
    config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    # tunex's module layout -> the family's own names (InternLM2's fused wqkv, ...)
    named = to_checkpoint_names(
        {k: v for k, v in weights.items() if _is_weight(k)}, model_config(base, cfg.model.backend)
    )
    tensors = {k: v.to(dtype).contiguous() for k, v in named.items()}
    tied = config.get("tie_word_embeddings", False)
    if tied or _shares_storage(tensors, "lm_head.weight", "model.embed_tokens.weight"):
        tensors.pop("lm_head.weight", None)
    tokenizer_dir = Path(cfg.model.tokenizer) if cfg.model.tokenizer else base
    config["torch_dtype"] = str(dtype).replace("torch.", "")
    if cfg.model.rope_scaling:  # the scaling the run trained with (model.rope_scaling)
        set_rope_scaling(config, cfg.model.rope_scaling)
    config.pop("quantization_config", None)
    if edit_config is not None:
        from tunex.tokenizer import load_tokenizer

        edit_config(config, load_tokenizer(tokenizer_dir))
    replaceable(out, is_model_file, "a HF model folder")
    with atomic_folder(out, overwrite=True) as tmp:  # the folder appears whole, or not at all
        save_sharded(tensors, tmp, max_shard_size=max_shard_size)
        for name in MODEL_SIDE_FILES:
            source = (base if name in ("config.json", "generation_config.json") else tokenizer_dir) / name
            if source.is_file() and name != "config.json":
                shutil.copyfile(source, tmp / name)
        from tunex.io.generation import write_generation_config

        # eos_token_id with the end-of-turn token the run trained (transformers' generate stops there)
        write_generation_config(tmp, base, tokenizer_dir, cfg.data.template)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def is_model_file(name: str) -> bool:
    """A file a HF model folder written by tunex holds (what replacing it may delete)."""
    weights = name.startswith("model") and (name.endswith(".safetensors") or name.endswith(".safetensors.index.json"))
    return weights or name in MODEL_SIDE_FILES


def _is_weight(key: str) -> bool:
    # rotary tables and other derived buffers are not part of a HF checkpoint
    return not key.endswith(("rotary_emb.inv_freq", ".cos_cached", ".sin_cached"))


def _shares_storage(tensors: dict[str, torch.Tensor], a: str, b: str) -> bool:
    if a not in tensors or b not in tensors:
        return False
    return torch.equal(tensors[a], tensors[b])


def checkpoint_as_adapter(cfg: Any, pth: str | os.PathLike, out: str | os.PathLike) -> Path:
    """A LoRA/QLoRA checkpoint as a fp32 PEFT adapter folder (for ``convert merge``)."""
    pth = Path(pth)
    state = checkpoint.load(pth)
    kind = _method_of(state, cfg, pth)
    if kind == "full":
        raise FormatError(
            f"{pth}: a full fine-tune has no adapter to merge; use `tunex convert pth_to_hf` to write the model"
        )
    return export_adapter(
        _checkpoint_named(cfg, state["model"]),
        cfg.method,
        out,
        base_model=cfg.model.path,
        dtype=torch.float32,
        source=str(pth),
        rope_scaling=cfg.model.rope_scaling,
    )


def _checkpoint_named(cfg: Any, adapter: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Adapter tensors under the base model family's own module names (InternLM2's ``wqkv``, ``wo``,
    ``w1``...), as PEFT names them on that model, so the adapter loads there and merges into it."""
    from tunex.models import resolve_model_path, to_checkpoint_names
    from tunex.models.hf_backend import model_config

    return to_checkpoint_names(adapter, model_config(resolve_model_path(cfg.model.path), cfg.model.backend))
