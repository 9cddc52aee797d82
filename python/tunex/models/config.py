"""Model configs and the per-family differences, kept as data.

Every supported family is one llama-style decoder. What differs between them is described here:
how config.json spells the sizes, which projections carry a bias, and how checkpoint weight names
(and InternLM2's fused ``wqkv`` layout) map to tunex's module names, which are the HF Llama names
(``model.layers.0.self_attn.q_proj``...) for every family.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tunex.errors import FormatError

FAMILIES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "internlm2",
    "gemma2",
    "gemma3_text",
    "phi3",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
)
GEMMA = ("gemma2", "gemma3_text")
MOE = ("mixtral", "qwen2_moe", "qwen3_moe")  # mixture-of-experts families (models/moe.py)
ROPE_KINDS = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")
# the keys each rope scaling kind reads from config.json's rope_scaling (besides rope_type)
ROPE_KEYS = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("original_max_position_embeddings",),
    "longrope": ("original_max_position_embeddings", "long_factor", "short_factor"),
}


@dataclass
class ModelConfig:
    """Sizes and options of a decoder; built from config.json by :func:`config_from_hf`.

    ``family`` is the checkpoint's model_type (SmolLM2 is ``llama`` with tied embeddings).
    ``qkv_bias``/``o_bias``: Qwen2 has biases on q/k/v only; Llama's ``attention_bias`` and
    InternLM2's ``bias`` put them on all four projections. ``qk_norm``: Qwen3 normalises each
    query and key head (``self_attn.q_norm`` / ``k_norm``, RMSNorm over the head dim) before RoPE.
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
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over each query and key head before RoPE
    # Phi-3: q/k/v in one projection (self_attn.qkv_proj, rows q then k then v) and gate/up in one
    # (mlp.gate_up_proj); InternLM2's wqkv is self_attn.qkv_proj too, its rows grouped per kv head
    # (``qkv_grouped``: see split_wqkv)
    fused_qkv: bool = False
    qkv_grouped: bool = False
    fused_gate_up: bool = False
    # Gemma 2 / 3 (models/gemma.py): each layer's kind ("sliding_attention" / "full_attention"),
    # the RoPE base of the sliding layers, tanh soft-capping of attention scores and of the logits,
    # and the attention scale's denominator (scores are q.k / sqrt(query_pre_attn_scalar))
    layer_types: list[str] | None = None
    rope_local_theta: float | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    query_pre_attn_scalar: float | None = None
    # mixture of experts (models/moe.py): experts per MoE layer, experts each token goes to, each
    # expert's intermediate size, Qwen2-MoE's shared expert, whether the top-k routing weights are
    # renormalised to sum to one, which layers are MoE (the others a dense MLP of intermediate_size)
    # and config.json's load-balancing coefficient (applied only when training asks for it)
    num_experts: int = 0
    experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = False
    sparse_layers: list[bool] | None = None
    router_aux_loss_coef: float = 0.0
    torch_dtype: str | None = None
    backend: str = "tunex"  # which model runs it (an HFConfig says "transformers": models/hf_backend.py)
    raw: dict = field(default_factory=dict, repr=False)  # the config.json it came from

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("raw")
        return d


def rope_kind(cfg: ModelConfig) -> str:
    """The rope scaling kind of ``cfg`` ("default" without scaling)."""
    scaling = cfg.rope_scaling or {}
    return scaling.get("rope_type", scaling.get("type", "default"))


def _check_rope(scaling: dict | None, source: str) -> None:
    if not scaling:
        return
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_KINDS:
        raise FormatError(
            f"{source}: rope_scaling type {kind!r} is not supported (expected one of {', '.join(ROPE_KINDS[1:])})"
        )
    missing = [k for k in ROPE_KEYS.get(kind, ()) if scaling.get(k) is None]
    if missing:
        raise FormatError(f"{source}: rope_scaling of type {kind!r} lacks {', '.join(map(repr, missing))}")
    if float(scaling.get("partial_rotary_factor", 1.0)) != 1.0:
        raise FormatError(f"{source}: partial_rotary_factor != 1 (rotary on part of each head) is not supported")


def with_rope_scaling(cfg: ModelConfig, scaling: dict | None, source: str = "model.rope_scaling") -> ModelConfig:
    """``cfg`` with its rope scaling replaced by ``scaling`` (a config.json-style rope_scaling; empty
    or None: ``cfg`` unchanged). A kind that reads the trained length (llama3, yarn, longrope) gets the
    checkpoint's ``max_position_embeddings`` unless it names ``original_max_position_embeddings``,
    as transformers fills it in.

    Raises:
        FormatError: naming ``source``: an unsupported kind, a missing key, LongRoPE factors that do
            not give one value per rotary frequency (head_dim / 2).
    """
    if not scaling:
        return cfg
    scaling = dict(scaling)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind in ("llama3", "yarn", "longrope"):
        scaling.setdefault("original_max_position_embeddings", cfg.max_position_embeddings)
    _check_rope(scaling, source)
    if kind == "longrope":
        for key in ("long_factor", "short_factor"):
            if len(scaling[key]) != cfg.head_dim // 2:
                raise FormatError(
                    f"{source}: {key} has {len(scaling[key])} values; this model's rotary frequencies need "
                    f"head_dim / 2 = {cfg.head_dim // 2}"
                )
    import dataclasses

    return dataclasses.replace(cfg, rope_scaling=scaling)


def rope_context(cfg: ModelConfig) -> int:
    """The context length ``cfg``'s rope settings are made for: ``max_position_embeddings``, or the
    trained length times the factor of a scaling that stretches it."""
    scaling = cfg.rope_scaling or {}
    kind = rope_kind(cfg)
    if kind in ("default", "longrope"):
        return cfg.max_position_embeddings
    old = int(scaling.get("original_max_position_embeddings") or cfg.max_position_embeddings)
    return max(cfg.max_position_embeddings, int(old * float(scaling.get("factor") or 1.0)))


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
            f'{", ".join(FAMILIES)} (SmolLM2 and TinyLlama are llama); model.backend = "auto" runs other '
            "architectures through transformers (pip install 'tunex[hf]')"
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
    if family == "phi3" and scaling and scaling.get("rope_type", scaling.get("type")) in ("su", "yarn"):
        scaling = {**scaling, "rope_type": "longrope"}  # Phi-3's names for its LongRoPE, as transformers reads them
    if scaling and "original_max_position_embeddings" not in scaling and raw.get("original_max_position_embeddings"):
        # Phi-3 keeps it beside rope_scaling
        scaling = {**scaling, "original_max_position_embeddings": raw["original_max_position_embeddings"]}
    _check_rope(scaling, source)
    if float(raw.get("partial_rotary_factor", 1.0)) != 1.0:
        raise FormatError(f"{source}: partial_rotary_factor != 1 (rotary on part of each head) is not supported")
    bias = bool(raw.get("bias" if family == "internlm2" else "attention_bias", False))
    gemma = _gemma_options(raw, source) if family in GEMMA else {}
    moe = _moe_options(raw, source) if family in MOE else {}
    if family in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe") and raw.get("use_sliding_window"):
        raise FormatError(
            f"{source}: use_sliding_window true (windowed attention in the upper layers) is not supported; "
            "the released Qwen2/Qwen3 models set it false"
        )
    act = raw.get("hidden_act") or "silu"
    if family not in GEMMA and act not in ("silu", "swish"):
        raise FormatError(f"{source}: hidden_act {act!r} is not supported for {family} (expected silu)")
    if family == "gemma3_text":
        theta, scaling = gemma.pop("rope_theta"), gemma.pop("rope_scaling")
        _check_rope(scaling, source)
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
        qkv_bias=True if family == "qwen2" else bool(raw.get("qkv_bias", True)) if family == "qwen2_moe" else bias,
        o_bias=bias,
        mlp_bias=bool(raw.get("mlp_bias", False)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=raw.get("eos_token_id"),
        pad_token_id=raw.get("pad_token_id"),
        # Mistral attends to the last `sliding_window` tokens only (Qwen2's windows stay off: its
        # released models set use_sliding_window false)
        sliding_window=raw.get("sliding_window") if family in ("mistral", "mixtral", "phi3", *GEMMA) else None,
        fused_qkv=family in ("phi3", "internlm2"),
        qkv_grouped=family == "internlm2",
        fused_gate_up=family == "phi3",
        qk_norm=family in ("qwen3", "gemma3_text", "qwen3_moe"),
        **gemma,
        **moe,
        torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
        raw=raw,
    )


def _moe_options(raw: dict, source: str) -> dict:
    """Mixtral / Qwen2-MoE / Qwen3-MoE settings of config.json."""
    family = raw["model_type"]
    n = int(_need(raw, "num_hidden_layers", source))
    key = "num_local_experts" if family == "mixtral" or "num_experts" not in raw else "num_experts"
    experts = int(_need(raw, key, source))
    top_k = int(_need(raw, "num_experts_per_tok", source))
    if experts <= 0 or not 0 < top_k <= experts:
        raise FormatError(
            f"{source}: {key} = {experts} and num_experts_per_tok = {top_k}; expected 0 < num_experts_per_tok <= {key}"
        )
    if float(raw.get("router_jitter_noise") or 0.0) != 0.0:
        raise FormatError(f"{source}: router_jitter_noise != 0 (noise on the router's input) is not supported")
    if family == "mixtral":  # every layer MoE, experts as wide as intermediate_size, top-k renormalised
        inter, sparse, norm = int(_need(raw, "intermediate_size", source)), [True] * n, True
    else:  # Qwen: every decoder_sparse_step-th layer is MoE unless listed in mlp_only_layers
        inter, norm = int(_need(raw, "moe_intermediate_size", source)), bool(raw.get("norm_topk_prob", False))
        step, dense = int(raw.get("decoder_sparse_step") or 1), set(raw.get("mlp_only_layers") or ())
        sparse = [i not in dense and (i + 1) % step == 0 for i in range(n)]
    shared = int(_need(raw, "shared_expert_intermediate_size", source)) if family == "qwen2_moe" else 0
    return dict(
        num_experts=experts,
        experts_per_tok=top_k,
        moe_intermediate_size=inter,
        shared_expert_intermediate_size=shared,
        norm_topk_prob=norm,
        sparse_layers=sparse,
        router_aux_loss_coef=float(raw.get("router_aux_loss_coef") or 0.0),
    )


def _softcap(raw: dict, key: str, source: str) -> float | None:
    """The soft-cap ``key`` of config.json (c in ``c * tanh(x / c)``): None when absent or null."""
    value = raw.get(key)
    if value is None:
        return None
    cap = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    if not (math.isfinite(cap) and cap > 0):
        raise FormatError(
            f"{source}: {key} = {value!r}; expected a positive finite number (the cap c of c * tanh(x / c)), "
            "or null for no soft-capping"
        )
    return cap


def _gemma_options(raw: dict, source: str) -> dict:
    """Gemma 2 / Gemma 3 text settings of config.json (both the layout transformers 4 wrote and the
    nested ``rope_parameters`` of transformers 5)."""
    family = raw["model_type"]
    act = raw.get("hidden_activation") or raw.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise FormatError(
            f"{source}: hidden_activation {act!r} is not supported for {family} (expected gelu_pytorch_tanh)"
        )
    n = int(_need(raw, "num_hidden_layers", source))
    types = raw.get("layer_types")
    if types is None:  # every `pattern`-th layer attends globally, the others in a window
        pattern = 2 if family == "gemma2" else int(raw.get("sliding_window_pattern") or 6)
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    if len(types) != n or set(types) - {"sliding_attention", "full_attention"}:
        raise FormatError(
            f"{source}: layer_types must list 'sliding_attention' or 'full_attention' for each of {n} layers"
        )
    if "sliding_attention" in types:
        _need(raw, "sliding_window", source)
    if raw.get("use_bidirectional_attention"):
        raise FormatError(f"{source}: use_bidirectional_attention (an embedding model) is not supported")
    out = dict(
        layer_types=list(types),
        attn_softcap=_softcap(raw, "attn_logit_softcapping", source),
        final_softcap=_softcap(raw, "final_logit_softcapping", source),
        query_pre_attn_scalar=float(_need(raw, "query_pre_attn_scalar", source)),
    )
    if family == "gemma2":
        return out
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:  # transformers >= 5
        full, local = params.get("full_attention") or {}, params.get("sliding_attention") or {}
        theta, local_theta = full.get("rope_theta", 1_000_000.0), local.get("rope_theta", 10_000.0)
        scaling = full if full.get("rope_type", "default") != "default" else None
        if local.get("rope_type", "default") != "default":
            raise FormatError(f"{source}: rope scaling on the sliding layers is not supported")
    else:
        theta, local_theta = raw.get("rope_theta", 1_000_000.0), raw.get("rope_local_base_freq", 10_000.0)
        scaling = raw.get("rope_scaling") or None  # the global layers' only
    return {**out, "rope_theta": theta, "rope_local_theta": float(local_theta), "rope_scaling": scaling}


def check_tokenizer_fits(tokenizer, cfg: ModelConfig, folder, tokenizer_source=None) -> None:
    """Refuse a tokenizer with more tokens than the model has embedding rows (its ids would index
    past the embedding). A larger embedding (padded vocabularies) is fine.

    Raises:
        FormatError: naming both sizes and both sources.
    """
    n = int(tokenizer.vocab_size)
    if n > cfg.vocab_size:
        raise FormatError(
            f"{tokenizer_source or folder}: the tokenizer has {n} tokens but the model's embedding "
            f"({Path(folder) / 'config.json'} vocab_size) has {cfg.vocab_size} rows; use the model's own tokenizer"
        )


def read_config_json(folder: Path) -> tuple[Path, dict]:
    """The path and the JSON object of an HF folder's config.json, or of such a file given directly.

    Raises:
        FormatError: the file is not valid JSON or not an object.
    """
    folder = Path(folder)
    path = folder / "config.json" if folder.is_dir() else folder
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise FormatError(f"{path}: not valid JSON (line {exc.lineno}): {exc.msg}") from exc
    if not isinstance(raw, dict):
        raise FormatError(f"{path}: expected a JSON object")
    return path, raw


def read_config(folder: Path) -> ModelConfig:
    """The model config of an HF folder, or of a config.json-style file given directly."""
    path, raw = read_config_json(folder)
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
    (".attention.wqkv.", ".self_attn.qkv_proj."),
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


def to_tunex_names(name: str, tensor, cfg: ModelConfig) -> list[tuple[str, Any]]:
    """One checkpoint tensor -> the (tunex name, tensor) pairs it becomes (one: InternLM2's names
    are mapped, its fused ``wqkv`` stays fused as ``self_attn.qkv_proj``)."""
    if cfg.family != "internlm2":
        return [(name, tensor)]
    return [(_rename(name, reverse=False), tensor)]


def to_llama_names(name: str, tensor, cfg: ModelConfig) -> list[tuple[str, Any]]:
    """One checkpoint tensor -> Llama-layout (name, tensor) pairs: InternLM2's fused ``wqkv`` split
    into q/k/v (for formats that know the Llama layout only, as GGUF export)."""
    if cfg.family != "internlm2":
        return [(name, tensor)]
    m = _WQKV.match(name)
    if m:
        q, k, v = split_wqkv(tensor, cfg)
        return [(f"{m[1]}.self_attn.{p}_proj.{m[2]}", t) for p, t in zip("qkv", (q, k, v))]
    return [(_rename(name, reverse=False), tensor)]


def to_checkpoint_names(state: dict, cfg: ModelConfig) -> dict:
    """A tunex state dict (weights, or adapter tensors named by module) -> the family's own
    checkpoint names (for export; InternLM2's ``wqkv``, ``wo``, ``w1``...)."""
    if cfg.family != "internlm2":
        return dict(state)
    return {_rename(name, reverse=True): tensor for name, tensor in state.items()}


def to_tunex_module(name: str, cfg: ModelConfig) -> str:
    """A module (or tensor) name of the family's checkpoints -> tunex's (for adapters written
    against the family's own names, as PEFT writes them)."""
    if cfg.family != "internlm2":
        return name
    return _rename(name + ".", reverse=False)[:-1]  # the fragments end in "." (a module name does not)


# InternLM2's own module names -> tunex's, for LoRA target_modules written the InternLM2 way
_INTERNLM2_TARGETS = {"wqkv": "qkv_proj", "wo": "o_proj", "w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def tunex_targets(target, cfg: ModelConfig):
    """``target_modules`` naming the family's own modules -> tunex's module names (a list only:
    a regex or "all-linear" passes through)."""
    if cfg.family != "internlm2" or not isinstance(target, list):
        return target
    return [_INTERNLM2_TARGETS.get(t, t) for t in target]


def set_rope_scaling(config: dict, scaling: dict) -> None:
    """Put ``scaling`` (config.json's rope_scaling) into a config.json dict in the layout it uses:
    ``rope_scaling``, or transformers 5's nested ``rope_parameters`` (Gemma 3's global layers')."""
    params = config.get("rope_parameters")

    def with_theta(theta) -> dict:
        return {**({} if theta is None else {"rope_theta": theta}), **scaling}

    if isinstance(params, dict) and isinstance(params.get("full_attention"), dict):
        params["full_attention"] = with_theta(params["full_attention"].get("rope_theta"))
    elif isinstance(params, dict):
        config["rope_parameters"] = with_theta(params.get("rope_theta", config.get("rope_theta")))
    else:
        config["rope_scaling"] = dict(scaling)
