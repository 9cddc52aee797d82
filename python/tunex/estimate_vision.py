"""``tunex estimate`` for a ``[vision]`` config: the tower, the projector and the image tokens.

Counted from the tower's config.json (no weights read), or from a built-in shape for the towers the
shipped LLaVA configs name when they are not on this machine. Added to the decoder's estimate:
the tower's weights (frozen, in the compute dtype; with ``vision.tower_lora`` its adapters with
their gradients and AdamW moments), the projector's weights with gradients and fp32 AdamW moments
(it always trains), and the image tokens each image takes of ``data.max_length``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

# hub ids of towers the shipped configs use -> their vision config (as in their config.json)
PRESETS = {
    "clip-vit-large-patch14-336": dict(
        model_type="clip_vision_model",
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
    ),
    "clip-vit-large-patch14": dict(
        model_type="clip_vision_model",
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=224,
        patch_size=14,
    ),
    "siglip-so400m-patch14-384": dict(
        model_type="siglip_vision_model",
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=27,
        num_attention_heads=16,
        image_size=384,
        patch_size=14,
    ),
}


@dataclass
class VisionCount:
    kind: str
    layers: int
    hidden: int
    tower_params: int
    projector_params: int
    tower_adapter_params: int
    image_tokens: int

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def tower_config(path: str):
    """The tower's VisionConfig: its folder's config.json, else a preset its name ends with."""
    from tunex.models.hub import resolve_model_path
    from tunex.models.vision import read_vision_config, vision_config_from_hf

    try:
        return read_vision_config(Path(resolve_model_path(path)))
    except (FileNotFoundError, OSError, ValueError):
        pass
    for name, raw in PRESETS.items():
        if path.rstrip("/").endswith(name):
            return vision_config_from_hf(raw, f"built-in shape of {name}")
    raise FileNotFoundError(
        f"vision.path {path!r}: no config.json there and no built-in shape ({', '.join(PRESETS)}); "
        "download the tower first"
    )


def tower_params(v) -> int:
    c, i = v.hidden_size, v.intermediate_size
    patch = v.num_channels * v.patch_size**2 * c + (c if v.kind == "siglip" else 0)
    embeddings = patch + (v.num_patches + int(v.has_class_token)) * c + (c if v.has_class_token else 0)
    layer = 4 * (c * c + c) + (c * i + i) + (i * c + c) + 2 * 2 * c
    norms = 2 * c * (2 if v.kind == "clip" else 1)  # (CLIP's pre-norm) and the final norm
    return embeddings + v.num_layers * layer + norms


def projector_params(kind: str, vision_hidden: int, text_hidden: int) -> int:
    first = vision_hidden * text_hidden + text_hidden
    return first + (text_hidden * text_hidden + text_hidden if kind == "mlp2x_gelu" else 0)


def tower_adapter_params(v, r: int) -> int:
    c, i = v.hidden_size, v.intermediate_size
    return v.num_layers * r * (4 * (c + c) + (c + i) + (i + c))


def count(cfg: Any, text_hidden: int) -> VisionCount:
    v = tower_config(cfg.vision.path)
    v.feature_layer(cfg.vision.select_layer)
    return VisionCount(
        kind=v.kind,
        layers=v.num_layers,
        hidden=v.hidden_size,
        tower_params=tower_params(v),
        projector_params=projector_params(cfg.vision.projector, v.hidden_size, text_hidden),
        tower_adapter_params=tower_adapter_params(v, cfg.vision.tower_lora_r or cfg.method.r)
        if cfg.vision.tower_lora
        else 0,
        image_tokens=v.num_patches,
    )


def add_to_estimate(est: Any, cfg: Any, dtype_bytes: int) -> VisionCount:
    """Add the tower and the projector to ``est`` (parts, params, trainable); returns the counts."""
    vc = count(cfg, est.shape.hidden)
    est.parts["vision tower weights"] = vc.tower_params * dtype_bytes
    # fp32 weights, fp32 gradients, two fp32 AdamW moments
    est.parts["projector + grads + AdamW"] = vc.projector_params * 16
    if vc.tower_adapter_params:
        est.parts["tower adapters + grads + AdamW"] = vc.tower_adapter_params * 16
    est.params += vc.tower_params + vc.projector_params
    est.trainable += vc.projector_params + vc.tower_adapter_params
    if cfg.vision.stage == "pretrain":  # the LLM is frozen: only the projector trains
        est.trainable = vc.projector_params
    return vc


def describe(vc: VisionCount, cfg: Any) -> str:
    tower = "with LoRA" if vc.tower_adapter_params else "frozen"
    return (
        f"vision: {vc.kind.upper()} tower, {vc.layers} layers, hidden {vc.hidden}, "
        f"{vc.tower_params / 1e6:.1f} M params ({tower}); projector {cfg.vision.projector} "
        f"{vc.projector_params / 1e6:.2f} M params; {vc.image_tokens} image tokens per image "
        f"(layer {cfg.vision.select_layer}); stage {cfg.vision.stage}"
    )
