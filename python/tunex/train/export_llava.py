"""A multimodal run's checkpoint -> a folder transformers' ``LlavaForConditionalGeneration`` and
``AutoProcessor`` load (``convert pth_to_hf`` with ``[vision]`` in the config).

The folder holds the whole model (adapters merged into the LLM and the tower; a QLoRA run's
adapters into the dense base, as XTuner's merge), ``config.json`` with ``text_config`` and
``vision_config``, the LLM's tokenizer with ``<image>`` added, the image processor's and the
processor's configs. A LoRA run also gets the adapters themselves as PEFT folders:
``llm_adapter/`` (on the LLM) and, with ``vision.tower_lora``, ``visual_encoder_adapter/`` (on the
tower, in CLIP's ``vision_model.…`` names: ``convert merge --is-clip`` merges it), as XTuner writes them.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunex.errors import FormatError
from tunex.models.llava import IMAGE_TOKEN, LlavaModel, hf_config, hf_state

PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def merge_adapters(module: nn.Module) -> None:
    """Replace every LoRA layer of ``module`` by a plain ``nn.Linear`` holding ``W + s * B @ A``."""
    from tunex.peft.lora import LoRALinear

    for name, layer in list(module.named_modules()):
        if not isinstance(layer, LoRALinear):
            continue
        if layer.use_dora:
            raise FormatError(f"{name}: DoRA adapters are not merged into a LLaVA export; train with use_dora = false")
        with torch.no_grad():
            w = layer.dense_weight().float() + layer.delta_weight().float()
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        plain.weight = nn.Parameter(w, requires_grad=False)
        if layer.bias is not None:
            plain.bias = nn.Parameter(layer.bias.detach().float(), requires_grad=False)
        owner, _, attr = name.rpartition(".")
        setattr(module.get_submodule(owner) if owner else module, attr, plain)


def _rebuilt(cfg: Any, state: dict[str, torch.Tensor], pth: Path) -> LlavaModel:
    """The run's model on the CPU in float32 with the checkpoint's trained tensors in place."""
    from tunex.train.build import build_model
    from tunex.train.loop import load_trainable

    cfg = copy.deepcopy(cfg)
    cfg.model.dtype = "float32"
    cfg.vision.projector_checkpoint = ""  # the checkpoint holds the projector
    if cfg.method.kind == "qlora":
        cfg.method.kind = "lora"  # adapters go onto the dense base
    model = build_model(cfg, torch.device("cpu"))
    load_trainable(model, state, pth)
    return model


def export_llava(cfg: Any, state: dict[str, Any], pth: Path, out: Path, dtype: torch.dtype, max_shard_size) -> str:
    from tunex import save_sharded
    from tunex.io.atomic import atomic_folder, replaceable
    from tunex.models import resolve_model_path
    from tunex.train.export import MODEL_SIDE_FILES, is_model_file

    model = _rebuilt(cfg, state["model"], pth)
    adapters = {k: v for k, v in state["model"].items() if ".lora_" in k}
    merge_adapters(model)
    base = Path(resolve_model_path(cfg.model.path))
    tokenizer_dir = Path(resolve_model_path(cfg.model.tokenizer)) if cfg.model.tokenizer else base
    tower_dir = Path(resolve_model_path(cfg.vision.path))
    text_config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    text_config.pop("quantization_config", None)
    config = hf_config(model, text_config)
    config["torch_dtype"] = config["text_config"]["torch_dtype"] = str(dtype).replace("torch.", "")
    tensors = {k: v.to(dtype).contiguous() for k, v in hf_state(model).items()}

    def keep(name: str) -> bool:
        return is_model_file(name) or name in PROCESSOR_FILES or name.endswith("_adapter")

    replaceable(out, keep, "a LLaVA model folder")
    with atomic_folder(out, overwrite=True) as tmp:
        save_sharded(tensors, tmp, max_shard_size=max_shard_size)
        for name in MODEL_SIDE_FILES:
            source = tokenizer_dir / name
            if source.is_file() and name not in ("config.json", "generation_config.json"):
                shutil.copyfile(source, tmp / name)
        from tunex.io.generation import write_generation_config

        # eos_token_id with the end-of-turn token the run trained (transformers' generate stops there)
        write_generation_config(tmp, base, tokenizer_dir, cfg.data.template)
        _add_image_token(tmp, model.image_token_id)
        _write_processor(tmp, tower_dir, model, cfg.vision.image_aspect)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if adapters:
            _write_adapters(tmp, adapters, cfg, tower_dir)
    return "a LLaVA model (transformers' LlavaForConditionalGeneration)" + (" with its adapters" if adapters else "")


def _add_image_token(folder: Path, image_id: int) -> None:
    """``<image>`` as a special added token with id ``image_id`` in tokenizer.json and tokenizer_config.json."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise FormatError(f"{folder}: the LLM's tokenizer.json is needed to write a LLaVA folder")
    tok = json.loads(path.read_text(encoding="utf-8"))
    added = tok.setdefault("added_tokens", [])
    if not any(t.get("content") == IMAGE_TOKEN for t in added):
        vocab = tok.get("model", {}).get("vocab", {})
        taken = {t["id"] for t in added} | (set(vocab.values()) if isinstance(vocab, dict) else set())
        if image_id in taken:
            raise FormatError(f"{path}: id {image_id} (the image token's) is taken by another token")
        entry = {"content": IMAGE_TOKEN, "single_word": False, "lstrip": False, "rstrip": False}
        added.append({"id": image_id, **entry, "normalized": False, "special": True})
        path.write_text(json.dumps(tok, ensure_ascii=False, indent=2), encoding="utf-8")
        cfg_path = folder / "tokenizer_config.json"
        if cfg_path.is_file():
            tcfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            decoder = tcfg.setdefault("added_tokens_decoder", {})
            decoder[str(image_id)] = {**entry, "normalized": False, "special": True}
            cfg_path.write_text(json.dumps(tcfg, ensure_ascii=False, indent=2), encoding="utf-8")


def _write_processor(folder: Path, tower_dir: Path, model: LlavaModel, aspect: str) -> None:
    source = tower_dir / "preprocessor_config.json"
    if not source.is_file():
        raise FormatError(f"{source} not found: the tower's image processor config goes into the LLaVA folder")
    pre = json.loads(source.read_text(encoding="utf-8"))
    pre["image_processor_type"] = "LlavaImageProcessor"  # its do_pad is LLaVA-1.5's pad-to-square
    pre["do_pad"] = aspect == "pad"
    pre["processor_class"] = "LlavaProcessor"
    (folder / "preprocessor_config.json").write_text(json.dumps(pre, indent=2, sort_keys=True) + "\n")
    vision = model.vision_tower.config
    proc = {
        "processor_class": "LlavaProcessor",
        "image_token": IMAGE_TOKEN,
        "patch_size": vision.patch_size,
        "vision_feature_select_strategy": "full" if model.keep_class or not vision.has_class_token else "default",
        "num_additional_image_tokens": int(vision.has_class_token),
    }
    (folder / "processor_config.json").write_text(json.dumps(proc, indent=2, sort_keys=True) + "\n")


def _write_adapters(folder: Path, adapters: dict[str, torch.Tensor], cfg: Any, tower_dir: Path) -> None:
    from tunex.models import read_config, resolve_model_path, to_checkpoint_names
    from tunex.peft import export_adapter

    llm = {k.removeprefix("language_model."): v for k, v in adapters.items() if k.startswith("language_model.")}
    if llm:
        named = to_checkpoint_names(llm, read_config(resolve_model_path(cfg.model.path)))
        export_adapter(named, cfg.method, folder / "llm_adapter", base_model=cfg.model.path, dtype=torch.float32)
    tower = {k.removeprefix("vision_tower."): v for k, v in adapters.items() if k.startswith("vision_tower.")}
    if tower:
        method = copy.deepcopy(cfg.method)
        method.target_modules = "all-linear"
        method.r = cfg.vision.tower_lora_r or method.r
        method.alpha = cfg.vision.tower_lora_alpha or method.alpha
        export_adapter(tower, method, folder / "visual_encoder_adapter", base_model=str(tower_dir), dtype=torch.float32)
