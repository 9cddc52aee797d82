"""Model configs and the per-family differences, kept as data.

Every supported family is one llama-style decoder. What differs between them is described here:
how config.json spells the sizes, which projections carry a bias, and how checkpoint weight names
(and InternLM2's fused ``wqkv`` layout) map to tunex's module names, which are the HF Llama names
(``model.layers.0.self_attn.q_proj``...) for every family.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tunex.errors import FormatError

FAMILIES = ("llama", "mistral", "qwen2", "internlm2")


@dataclass
class ModelConfig:
    """Sizes and options of a decoder; built from config.json by :func:`config_from_hf`.

    ``family`` is the checkpoint's model_type (SmolLM2 is ``llama`` with tied embeddings).
    ``qkv_bias``/``o_bias``: Qwen2 has biases on q/k/v only; Llama's ``attention_bias`` and
    InternLM2's ``bias`` put them on all four projections.
    """

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    sliding_window: int | None = None
    torch_dtype: str | None = None
    raw: dict = field(default_factory=dict, repr=False)  # the config.json it came from

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("raw")
        return d


def _need(raw: dict, key: str, source: str) -> Any:
    if key not in raw:
        raise FormatError(f"{source}: missing key {key!r} (needed for a {raw.get('model_type')} model)")
    return raw[key]


def config_from_hf(raw: dict, source: str = "config.json") -> ModelConfig:
    """Map an HF config.json dict to a :class:`ModelConfig`."""
    family = raw.get("model_type")
    if family not in FAMILIES:
        raise FormatError(
            f"{source}: model_type {family!r} is not supported; tunex loads "
            f"{', '.join(FAMILIES)} (SmolLM2 and TinyLlama are llama)"
        )
    heads = int(_need(raw, "num_attention_heads", source))
    hidden = int(_need(raw, "hidden_size", source))
    scaling = raw.get("rope_scaling") or None
    theta = raw.get("rope_theta")
    params = raw.get("rope_parameters")
    if isinstance(params, dict):  # transformers >= 5 nests the rope settings
        theta = theta if theta is not None else params.get("rope_theta")
        if params.get("rope_type", "default") != "default":
            scaling = params
    bias = bool(raw.get("bias" if family == "internlm2" else "attention_bias", False))
    return ModelConfig(
        family=family,
        vocab_size=int(_need(raw, "vocab_size", source)),
        hidden_size=hidden,
        intermediate_size=int(_need(raw, "intermediate_size", source)),
        num_layers=int(_need(raw, "num_hidden_layers", source)),
        num_heads=heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(raw.get("head_dim") or hidden // heads),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta if theta is not None else 10000.0),
        rope_scaling=scaling,
        max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=True if family == "qwen2" else bias,
        o_bias=bias,
        mlp_bias=bool(raw.get("mlp_bias", False)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=raw.get("eos_token_id"),
        pad_token_id=raw.get("pad_token_id"),
        # Mistral attends to the last `sliding_window` tokens only (Qwen2's windows stay off: its
        # released models set use_sliding_window false)
        sliding_window=raw.get("sliding_window") if family == "mistral" else None,
        torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
        raw=raw,
    )


def read_config(folder: Path) -> ModelConfig:
    """The model config of an HF folder, or of a config.json-style file given directly."""
    folder = Path(folder)
    path = folder / "config.json" if folder.is_dir() else folder
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise FormatError(f"{path}: not valid JSON (line {exc.lineno}): {exc.msg}") from exc
    if not isinstance(raw, dict):
        raise FormatError(f"{path}: expected a JSON object")
    try:
        cfg = config_from_hf(raw, str(path))
    except (TypeError, ValueError, ZeroDivisionError, OverflowError, AttributeError) as exc:
        if isinstance(exc, FormatError):
            raise
        # a value of the wrong type or range (a list for a size, zero heads, ...)
        raise FormatError(f"{path}: a value does not fit its key ({type(exc).__name__}: {exc})") from exc
    _check_sizes(cfg, path)
    return cfg


_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim")


def _check_sizes(cfg: ModelConfig, path: Path) -> None:
    """Sizes the model is built from must be positive, and heads must share key/value heads evenly."""
    for name in _SIZES:
        if getattr(cfg, name) <= 0:
            raise FormatError(f"{path}: {name} = {getattr(cfg, name)}; expected a positive integer")
    if cfg.num_heads % cfg.num_kv_heads:
        raise FormatError(
            f"{path}: num_attention_heads = {cfg.num_heads} is not a multiple of num_key_value_heads = "
            f"{cfg.num_kv_heads}"
        )


# ---- weight names -------------------------------------------------------------------------------

# InternLM2 checkpoint name fragment <-> Llama name fragment (the fused wqkv is split separately).
# A fragment starting with "." is replaced anywhere; others are name prefixes.
_INTERNLM2_NAMES = (
    ("model.tok_embeddings.", "model.embed_tokens."),
    ("output.", "lm_head."),
    (".attention.wo.", ".self_attn.o_proj."),
    (".feed_forward.w1.", ".mlp.gate_proj."),
    (".feed_forward.w3.", ".mlp.up_proj."),
    (".feed_forward.w2.", ".mlp.down_proj."),
    (".attention_norm.", ".input_layernorm."),
    (".ffn_norm.", ".post_attention_layernorm."),
)


def _rename(name: str, reverse: bool) -> str:
    for ckpt, ours in _INTERNLM2_NAMES:
        old, new = (ours, ckpt) if reverse else (ckpt, ours)
        if old.startswith("."):
            name = name.replace(old, new)
        elif name.startswith(old):
            name = new + name[len(old) :]
    return name


_WQKV = re.compile(r"^(model\.layers\.\d+)\.attention\.wqkv\.(weight|bias)$")
_QKV = re.compile(r"^(model\.layers\.\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")


def split_wqkv(fused, cfg: ModelConfig) -> tuple[Any, Any, Any]:
    """InternLM2's fused projection -> (q, k, v) in the Llama layout.

    The fused rows are grouped per key/value head: for each of the ``num_kv_heads`` groups come
    ``num_heads // num_kv_heads`` query heads, then one key head, then one value head, each
    ``head_dim`` rows. Works for weights (rows, hidden) and biases (rows,).
    """
    groups, per = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads
    tail = tuple(fused.shape[1:])
    g = fused.reshape(groups, per + 2, cfg.head_dim, *tail)  # (G, per+2, D, ...)
    q = g[:, :per].reshape(cfg.num_heads * cfg.head_dim, *tail)
    k = g[:, per].reshape(groups * cfg.head_dim, *tail)
    v = g[:, per + 1].reshape(groups * cfg.head_dim, *tail)
    return q, k, v


def fuse_wqkv(q, k, v, cfg: ModelConfig):
    """The inverse of :func:`split_wqkv`."""
    import torch

    groups, per, d = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
    tail = tuple(q.shape[1:])
    parts = [q.reshape(groups, per, d, *tail), k.reshape(groups, 1, d, *tail), v.reshape(groups, 1, d, *tail)]
    return torch.cat(parts, dim=1).reshape(groups * (per + 2) * d, *tail)


def to_tunex_names(name: str, tensor, cfg: ModelConfig) -> list[tuple[str, Any]]:
    """One checkpoint tensor -> the (tunex name, tensor) pairs it becomes (usually one)."""
    if cfg.family != "internlm2":
        return [(name, tensor)]
    m = _WQKV.match(name)
    if m:
        q, k, v = split_wqkv(tensor, cfg)
        return [(f"{m[1]}.self_attn.{p}_proj.{m[2]}", t) for p, t in zip("qkv", (q, k, v))]
    return [(_rename(name, reverse=False), tensor)]


def to_checkpoint_names(state: dict, cfg: ModelConfig) -> dict:
    """A tunex state dict -> the family's own checkpoint names and layout (for export)."""
    if cfg.family != "internlm2":
        return dict(state)
    out, qkv = {}, {}
    for name, tensor in state.items():
        m = _QKV.match(name)
        if m:
            qkv.setdefault((m[1], m[3]), {})[m[2]] = tensor
            continue
        out[_rename(name, reverse=True)] = tensor
    for (prefix, kind), parts in qkv.items():
        out[f"{prefix}.attention.wqkv.{kind}"] = fuse_wqkv(parts["q"], parts["k"], parts["v"], cfg)
    return out
