"""Vision towers for multimodal models: CLIP ViT and SigLIP's vision transformer.

Read from HF folders (``CLIPVisionModel``, ``CLIPModel`` whose vision half is used,
``SiglipVisionModel`` / ``SiglipModel``, or a LLaVA folder's ``vision_tower``) with tunex's
safetensors reader. Module names are HF's (``vision_model.encoder.layers.0.self_attn.q_proj``...),
so checkpoint keys, LoRA targets and PEFT adapter keys line up.

A LLaVA model takes the hidden states after layer ``select_layer`` (default -2: the second to last,
as LLaVA-1.5) and drops CLIP's class token, keeping one feature per patch. The layers after the
selected one never run.

Pre-norm transformer: (CLIP: LayerNorm of the embeddings) -> per layer LayerNorm -> full
(non-causal) attention -> residual -> LayerNorm -> MLP (fc1, activation, fc2) -> residual.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tunex.errors import FormatError

# model_type of a tower's own config, and of the configs that hold one under "vision_config"
TOWER_TYPES = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}
HOLDER_TYPES = {"clip": "clip", "siglip": "siglip", "llava": None}
ACTIVATIONS = ("quick_gelu", "gelu", "gelu_pytorch_tanh", "gelu_new")


@dataclass
class VisionConfig:
    """A vision tower's shape. ``raw`` is the HF vision config dict (written back on export)."""

    kind: str  # "clip" or "siglip"
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def has_class_token(self) -> bool:
        return self.kind == "clip"

    def feature_layer(self, select_layer: int) -> int:
        """Index into the hidden states (0 = embeddings, i = after layer i) that ``select_layer`` names."""
        states = self.num_layers + 1
        index = select_layer + states if select_layer < 0 else select_layer
        if not 0 <= index < states:
            raise ValueError(
                f"select_layer {select_layer} is outside this tower's hidden states "
                f"({-states}..{states - 1}: {self.num_layers} layers plus the embeddings)"
            )
        return index


def vision_config_from_hf(raw: dict, source: str = "config.json") -> VisionConfig:
    """The tower config in an HF config dict: a tower's own, or the ``vision_config`` of CLIP /
    SigLIP / LLaVA."""
    model_type = raw.get("model_type")
    if model_type in HOLDER_TYPES:
        inner = raw.get("vision_config")
        if not isinstance(inner, dict):
            raise FormatError(f"{source}: model_type {model_type!r} needs a 'vision_config' object")
        return vision_config_from_hf(inner, f"{source}: vision_config")
    kind = TOWER_TYPES.get(model_type)
    if kind is None:
        raise FormatError(
            f"{source}: model_type {model_type!r} is not a vision tower tunex loads; expected a "
            f"CLIP or SigLIP vision model ({', '.join([*TOWER_TYPES, *HOLDER_TYPES])})"
        )
    defaults = {"clip": ("quick_gelu", 1e-5), "siglip": ("gelu_pytorch_tanh", 1e-6)}[kind]
    try:
        cfg = VisionConfig(
            kind=kind,
            hidden_size=int(raw.get("hidden_size", 768)),
            intermediate_size=int(raw.get("intermediate_size", 3072)),
            num_layers=int(raw.get("num_hidden_layers", 12)),
            num_heads=int(raw.get("num_attention_heads", 12)),
            image_size=int(raw.get("image_size", 224)),
            patch_size=int(raw.get("patch_size", 32 if kind == "clip" else 16)),
            num_channels=int(raw.get("num_channels", 3)),
            layer_norm_eps=float(raw.get("layer_norm_eps", defaults[1])),
            hidden_act=str(raw.get("hidden_act", defaults[0])),
            raw=dict(raw),
        )
    except (TypeError, ValueError) as exc:
        raise FormatError(f"{source}: a vision config value is not a number: {exc}") from None
    if cfg.hidden_act not in ACTIVATIONS:
        raise FormatError(f"{source}: hidden_act {cfg.hidden_act!r}: expected one of {', '.join(ACTIVATIONS)}")
    if cfg.hidden_size % cfg.num_heads or cfg.patch_size > cfg.image_size:
        raise FormatError(
            f"{source}: hidden_size {cfg.hidden_size} must divide by num_attention_heads {cfg.num_heads} "
            f"and patch_size {cfg.patch_size} be at most image_size {cfg.image_size}"
        )
    return cfg


def read_vision_config(folder: Path) -> VisionConfig:
    path = Path(folder) / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: vision.path must be an HF CLIP/SigLIP folder") from None
    except json.JSONDecodeError as exc:
        raise FormatError(f"{path}: not valid JSON: {exc}") from None
    return vision_config_from_hf(raw, str(path))


def _activation(name: str):
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    if name in ("gelu_pytorch_tanh", "gelu_new"):
        return lambda x: F.gelu(x, approximate="tanh")
    return F.gelu


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        c = cfg.hidden_size
        self.q_proj = nn.Linear(c, c)
        self.k_proj = nn.Linear(c, c)
        self.v_proj = nn.Linear(c, c)
        self.out_proj = nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        h, d = self.cfg.num_heads, self.cfg.head_dim
        q = self.q_proj(x).view(b, t, h, d).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(b, t, h, d).transpose(1, 2)
        v = self.v_proj(x).view(b, t, h, d).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v)  # every patch sees every patch
        return self.out_proj(y.transpose(1, 2).reshape(b, t, c))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = _activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        c = cfg.hidden_size
        # CLIP's patch projection has no bias, SigLIP's has one
        self.patch_embedding = nn.Conv2d(
            cfg.num_channels, c, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=cfg.kind == "siglip"
        )
        if cfg.has_class_token:
            self.class_embedding = nn.Parameter(torch.zeros(c))
        self.position_embedding = nn.Embedding(cfg.num_patches + int(cfg.has_class_token), c)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        size = self.cfg.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (self.cfg.num_channels, size, size):
            raise ValueError(
                f"pixel_values of shape {tuple(pixel_values.shape)}: this tower takes "
                f"(N, {self.cfg.num_channels}, {size}, {size})"
            )
        w = self.patch_embedding.weight
        x = self.patch_embedding(pixel_values.to(w.dtype))  # (N, C, S/P, S/P)
        x = x.flatten(2).transpose(1, 2)  # (N, P, C)
        if self.cfg.has_class_token:
            cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
            x = torch.cat((cls, x), dim=1)  # (N, 1+P, C)
        return x + self.position_embedding.weight.to(x.dtype)


class VisionTransformer(nn.Module):
    """HF's ``vision_model``: embeddings, (CLIP) pre-norm, the encoder layers, the final norm."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embeddings = VisionEmbeddings(cfg)
        if cfg.kind == "clip":
            self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # HF's spelling
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.num_layers))
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class VisionTower(nn.Module):
    """``tower.features(pixel_values, select_layer) -> (N, P, C)`` patch features.

    ``gradient_checkpointing`` recomputes each layer in backward (for a tower trained with LoRA).
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.vision_model = VisionTransformer(cfg)
        self.gradient_checkpointing = False

    def hidden_state(self, pixel_values: torch.Tensor, layer: int) -> torch.Tensor:
        """Hidden states (N, T, C) after ``layer`` layers (0: the embeddings), CLS included."""
        vm = self.vision_model
        x = vm.embeddings(pixel_values)
        if self.config.kind == "clip":
            x = vm.pre_layrnorm(x)
        for block in vm.encoder.layers[:layer]:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def features(self, pixel_values: torch.Tensor, select_layer: int = -2, keep_class: bool = False) -> torch.Tensor:
        """Patch features (N, P, C) of layer ``select_layer``; CLIP's class token dropped unless
        ``keep_class`` (LLaVA's ``vision_feature_select_strategy = "full"``)."""
        x = self.hidden_state(pixel_values, self.config.feature_layer(select_layer))
        if self.config.has_class_token and not keep_class:
            x = x[:, 1:]
        return x


_TOWER_PARTS = ("embeddings", "pre_layrnorm", "encoder", "post_layernorm", "head")


def tower_state_name(name: str) -> str | None:
    """A checkpoint key -> the tower's own name (``vision_model.…``), or None for keys that are not
    the tower's (CLIP's text half, SigLIP's pooling head, a LLaVA folder's projector and LLM)."""
    for prefix in ("model.vision_tower.", "vision_tower."):
        if name.startswith(prefix):
            name = name[len(prefix) :]
            break
    if name.split(".", 1)[0] in _TOWER_PARTS:  # transformers 5 saves a lone tower without "vision_model."
        name = "vision_model." + name
    if not name.startswith("vision_model.") or name.startswith("vision_model.head."):
        return None
    if name.endswith("position_ids"):  # a buffer some checkpoints carry
        return None
    return name


def load_vision_tower(path, *, dtype=torch.float32, device="cpu") -> VisionTower:
    """Load a CLIP / SigLIP vision tower from an HF folder (or a LLaVA folder's ``vision_tower``).

    Returns:
        A :class:`VisionTower` in eval mode with frozen parameters.

    Raises:
        FormatError naming the folder when weights are missing or do not fit the config.
    """
    from tunex.models.hub import resolve_model_path
    from tunex.models.loading import _as_dtype, _no_init, read_checkpoint

    folder = resolve_model_path(path)
    cfg = read_vision_config(folder)
    dtype = _as_dtype(dtype)
    with _no_init():
        tower = VisionTower(cfg)
    fill_tower(tower, read_checkpoint(folder), dtype, device, str(folder))
    return tower.eval()


def fill_tower(tower: VisionTower, tensors, dtype, device, source: str) -> None:
    """Place the tower's tensors of a checkpoint stream into ``tower`` (built on the meta device)."""
    from tunex.models.loading import _place

    for ckpt_name, tensor in tensors:
        name = tower_state_name(ckpt_name)
        if name is None:
            continue
        try:
            _place(tower, name, tensor, dtype, device)
        except (KeyError, AttributeError):
            raise FormatError(f"{source}: tensor {ckpt_name!r} has no place in a {tower.config.kind} tower") from None
    missing = [n for n, p in tower.named_parameters() if p.is_meta]
    if missing:
        raise FormatError(
            f"{source}: the vision tower's checkpoint lacks {len(missing)} tensors, e.g. {', '.join(missing[:3])}"
        )
