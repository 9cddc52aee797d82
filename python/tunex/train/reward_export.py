"""A reward model's checkpoint -> a HF ``*ForSequenceClassification`` folder (``num_labels = 1``).

transformers' ``AutoModelForSequenceClassification`` loads the folder and scores a sequence with
``score`` on its last non-padding token, as tunex trained it. A full fine-tune's weights go as they
are; a LoRA/QLoRA run's adapters are merged into the base's dense weights (``W + s B A``; a QLoRA
run merges into the unquantized base, so its scores differ from training's by the 4-bit rounding).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from tunex.errors import FormatError


def merged_weights(cfg: Any, trained: dict[str, torch.Tensor], kind: str, source: Path) -> dict[str, torch.Tensor]:
    """The whole model's weights, the adapters (if any) merged into their base layers."""
    if kind == "full":
        return dict(trained)
    if cfg.method.use_dora:
        raise FormatError(f"{source}: a DoRA reward model cannot be merged here yet; train it with use_dora = false")
    from tunex.models import load_model, resolve_model_path
    from tunex.models.config import tunex_targets
    from tunex.peft import apply_lora
    from tunex.peft.targets import lora_modules
    from tunex.train.preference import add_reward_head

    m = cfg.method
    model = load_model(resolve_model_path(cfg.model.path), dtype=torch.float32)
    apply_lora(model, tunex_targets(m.target_modules, model.config), m.r, m.alpha, 0.0, m.use_rslora, False)
    add_reward_head(model, torch.float32)
    model.load_state_dict({k: v.float() for k, v in trained.items()}, strict=False)
    state = dict(model.state_dict())
    with torch.no_grad():
        for name, layer in lora_modules(model):
            state[f"{name}.weight"] = layer.dense_weight() + layer.delta_weight()
            for key in [k for k in state if k.startswith(f"{name}.lora_")]:
                del state[key]
    return state


def write_reward_model(
    cfg: Any, state: dict[str, Any], kind: str, out: str | os.PathLike, dtype: torch.dtype, max_shard_size: str | int
) -> None:
    from tunex.train.export import write_full_model

    weights = merged_weights(cfg, state["model"], kind, Path(out))
    weights = {k: v for k, v in weights.items() if not k.startswith("lm_head.")}

    def as_classifier(config: dict[str, Any], tokenizer: Any) -> None:
        arch = (config.get("architectures") or ["LlamaForCausalLM"])[0]
        config["architectures"] = [arch.replace("ForCausalLM", "ForSequenceClassification")]
        config["num_labels"] = 1
        config["id2label"], config["label2id"] = {"0": "LABEL_0"}, {"LABEL_0": 0}
        if config.get("pad_token_id") is None and getattr(tokenizer, "pad_token_id", None) is not None:
            config["pad_token_id"] = int(tokenizer.pad_token_id)  # how transformers finds the last token

    write_full_model(cfg, weights, Path(out), dtype, max_shard_size, edit_config=as_classifier)
