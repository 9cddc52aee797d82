"""GGUF <-> HF folder conversion through the `gguf` package (llama.cpp's own reader/writer).

``gguf_to_hf``: dequantize every tensor to fp32 (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K and
the other types `gguf` knows), undo llama.cpp's Q/K row permutation, rename to HF names, write
config.json, the weights and a tokenizer rebuilt from the metadata.

``hf_to_gguf``: the reverse for merged models (llama.cpp is where many fine-tunes end up):
``f32``, ``f16``, ``bf16``, ``q8_0`` or the K-quant mixes ``q6_k``, ``q5_k_m`` and ``q4_k_m``
(1-D tensors stay f32, as llama.cpp's converter keeps them). The block types are packed in Rust
(``_native.quantize_ggml``) byte for byte as llama.cpp's reference quantizers pack them, and each
tensor gets the type ``llama-quantize`` would give it (:func:`tensor_type`).

llama.cpp permutes the rows of Q and K inside each head from HF's rotate-half layout to
interleaved pairs: row ``(h, i, j)`` of shape (heads, 2, D/2) moves to ``(h, j, i)``.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from tunex.errors import FormatError

# GGUF tensor name (after "blk.N.") <-> HF name (after "model.layers.N.")
LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q_norm": "self_attn.q_norm",  # Qwen3
    "attn_k_norm": "self_attn.k_norm",
}
# Phi-3 keeps q/k/v and gate/up fused, as its HF checkpoints do (llama.cpp's ffn_up holds gate then up)
PHI3_LAYER_NAMES = {
    **{k: v for k, v in LAYER_NAMES.items() if k not in ("attn_q", "attn_k", "attn_v", "ffn_gate", "ffn_up")},
    "attn_qkv": "self_attn.qkv_proj",
    "ffn_up": "mlp.gate_up_proj",
}
# Gemma 2 / 3: the sandwich norms (llama.cpp's ffn_norm is the norm before the MLP)
GEMMA_LAYER_NAMES = {
    **{k: v for k, v in LAYER_NAMES.items() if k != "ffn_norm"},
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# Mixtures of experts: the routers (llama.cpp's ffn_gate_inp; Mixtral is llama's architecture with
# experts) and Qwen2-MoE's shared expert; the experts' projections are stacked, see EXPERTS
MIXTRAL_LAYER_NAMES = {**LAYER_NAMES, "ffn_gate_inp": "block_sparse_moe.gate"}
QWEN_MOE_LAYER_NAMES = {
    **LAYER_NAMES,
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
}
# GGUF keeps each layer's experts as one 3-D tensor per projection, (experts, rows, columns) in HF
# order; the checkpoints hold one 2-D tensor per expert under `<prefix>.<expert>.<projection>`
EXPERTS = {
    "llama": ("block_sparse_moe.experts", {"ffn_gate_exps": "w1", "ffn_up_exps": "w3", "ffn_down_exps": "w2"}),
    "qwen2moe": ("mlp.experts", {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}),
}
EXPERTS["qwen3moe"] = EXPERTS["qwen2moe"]
# llama.cpp keeps the routers in f32 whatever the file type (its converter writes them so and
# llama-quantize leaves them alone)
ROUTER = re.compile(r"blk\.\d+\.ffn_gate_inp(_shexp)?\.weight")
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
ARCH_OF_FAMILY = {
    "llama": "llama",
    "mistral": "llama",
    "internlm2": "llama",
    "mixtral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen2_moe": "qwen2moe",
    "qwen3_moe": "qwen3moe",
    "phi3": "phi3",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
}
HF_CLASS = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen2moe": "Qwen2MoeForCausalLM",
    "qwen3moe": "Qwen3MoeForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
}
# GGUF architecture -> config.json model_type, where they differ (llama with experts is Mixtral)
MODEL_TYPE = {"gemma3": "gemma3_text", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}
# Gemma's RMSNorm weights are stored as the offset from one in HF checkpoints and as the scale in
# GGUF (llama.cpp adds one when converting; transformers' GGUF loader takes it off again)
GEMMA_ARCHS = ("gemma2", "gemma3")
SKIP = {"rope_freqs.weight"}  # llama.cpp's precomputed llama3 factors; the config carries them
# Llama 3.1 / 3.2 rope scaling; GGUF keeps only the resulting per-frequency factors, so the
# parameters are recovered by matching those factors against the published settings.
LLAMA3_ROPE_PRESETS = [
    {
        "rope_type": "llama3",
        "factor": f,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    for f in (8.0, 32.0, 16.0, 4.0)
]


def permute_qk(w: np.ndarray, heads: int) -> np.ndarray:
    """HF rotate-half rows -> llama.cpp's interleaved rows (per head)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of :func:`permute_qk`."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _layer_names(arch: str) -> dict[str, str]:
    if arch in GEMMA_ARCHS:
        return GEMMA_LAYER_NAMES
    if arch in ("qwen2moe", "qwen3moe"):
        return QWEN_MOE_LAYER_NAMES
    return {"phi3": PHI3_LAYER_NAMES, "llama": MIXTRAL_LAYER_NAMES}.get(arch, LAYER_NAMES)


def expert_of(name: str, arch: str) -> tuple[str, int] | None:
    """(GGUF name of the stacked tensor, expert index) of one expert's projection (HF name); None for
    any other tensor."""
    if arch not in EXPERTS:
        return None
    prefix, parts = EXPERTS[arch]
    m = re.fullmatch(rf"model\.layers\.(\d+)\.{re.escape(prefix)}\.(\d+)\.(\w+)\.weight", name)
    inverse = {v: k for k, v in parts.items()}
    if not m or m[3] not in inverse:
        return None
    return f"blk.{m[1]}.{inverse[m[3]]}.weight", int(m[2])


def expert_names(gguf_name: str, arch: str, experts: int) -> list[str] | None:
    """The HF names of the ``experts`` 2-D tensors stacked in GGUF tensor ``gguf_name``; None when it
    is not an expert stack."""
    m = re.fullmatch(r"blk\.(\d+)\.(ffn_(?:gate|up|down)_exps)\.weight", gguf_name)
    if not m or arch not in EXPERTS:
        return None
    prefix, parts = EXPERTS[arch]
    return [f"model.layers.{m[1]}.{prefix}.{e}.{parts[m[2]]}.weight" for e in range(experts)]


def hf_name(gguf_name: str, arch: str = "llama") -> str | None:
    base, _, kind = gguf_name.rpartition(".")
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    names = _layer_names(arch)
    if m and m[2] in names:
        return f"model.layers.{m[1]}.{names[m[2]]}.{kind}"
    if base in TOP_NAMES:
        return f"{TOP_NAMES[base]}.{kind}"
    return None


def gguf_name(name: str, arch: str = "llama") -> str:
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
    if m:
        inverse = {v: k for k, v in _layer_names(arch).items()}
        return f"blk.{m[1]}.{inverse[m[2]]}.{m[3]}"
    base, _, kind = name.rpartition(".")
    inverse = {v: k for k, v in TOP_NAMES.items()}
    return f"{inverse[base]}.{kind}"


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _config_from_gguf(reader, path: Path, tied: bool, vocab: int) -> dict:
    arch = _field(reader, "general.architecture")
    if arch not in HF_CLASS:
        raise FormatError(f"{path}: GGUF architecture {arch!r} is not supported (expected {', '.join(HF_CLASS)})")

    def need(key: str):
        value = _field(reader, f"{arch}.{key}")
        if value is None:
            raise FormatError(f"{path}: metadata key {arch}.{key} is missing")
        return value

    heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    head_dim = int(
        _field(reader, f"{arch}.attention.key_length")
        or _field(reader, f"{arch}.rope.dimension_count")
        or hidden // heads
    )
    config = {
        "architectures": [HF_CLASS[arch]],
        "model_type": MODEL_TYPE.get(arch, arch),
        "hidden_act": "gelu_pytorch_tanh" if arch in GEMMA_ARCHS else "silu",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, f"{arch}.attention.head_count_kv") or heads),
        "head_dim": head_dim,
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length", 2048)),
        "tie_word_embeddings": tied,
        "torch_dtype": "float32",
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
    }
    experts = int(_field(reader, f"{arch}.expert_count") or 0)
    if arch == "llama" and experts:  # Mixtral: llama's layers with a mixture of experts for the MLP
        config.update(architectures=["MixtralForCausalLM"], model_type="mixtral")
    elif arch in ("llama", "qwen3", "qwen3moe"):
        config.update(attention_bias=False, mlp_bias=False)
    if experts:
        config.update(num_experts_per_tok=int(need("expert_used_count")), router_aux_loss_coef=0.0)
        config["num_local_experts" if arch == "llama" else "num_experts"] = experts
    if arch in ("qwen2moe", "qwen3moe"):
        # every layer MoE, and the routing weights renormalised as llama.cpp's graphs do (Qwen2-MoE
        # never, Qwen3-MoE always)
        config.update(
            moe_intermediate_size=int(need("expert_feed_forward_length")),
            decoder_sparse_step=1,
            mlp_only_layers=[],
            norm_topk_prob=arch == "qwen3moe",
        )
    if arch == "qwen2moe":
        config.update(
            shared_expert_intermediate_size=int(need("expert_shared_feed_forward_length")),
            qkv_bias=any(t.name == "blk.0.attn_q.bias" for t in reader.tensors),
        )
    window = _field(reader, f"{arch}.attention.sliding_window")
    if arch in ("phi3", *GEMMA_ARCHS) and window:
        config["sliding_window"] = int(window)
    if arch in GEMMA_ARCHS:
        # llama.cpp scales scores by 1/sqrt(head dim): the query_pre_attn_scalar tunex exports
        config.update(query_pre_attn_scalar=head_dim, hidden_activation="gelu_pytorch_tanh")
    if arch == "gemma2":
        config.update(
            attn_logit_softcapping=_field(reader, "gemma2.attn_logit_softcapping"),
            final_logit_softcapping=_field(reader, "gemma2.final_logit_softcapping"),
        )
    if arch == "gemma3":
        # the sliding layers' base is llama.cpp's fixed 10000; every 6th layer is global unless the
        # file says otherwise
        pattern = _field(reader, "gemma3.attention.sliding_window_pattern", 6)
        config.update(rope_local_base_freq=10000.0, sliding_window_pattern=int(pattern))
    kind = _field(reader, f"{arch}.rope.scaling.type")
    if kind in ("linear", "yarn"):
        if kind != "linear":
            raise FormatError(f"{path}: rope scaling {kind!r} is not supported")
        config["rope_scaling"] = {"type": "linear", "factor": float(_field(reader, f"{arch}.rope.scaling.factor"))}
    return {k: v for k, v in config.items() if v is not None}


def _llama3_scaling(reader, config: dict, path: Path) -> dict | None:
    import gguf
    import torch

    from tunex.models.config import config_from_hf
    from tunex.models.decoder import rope_inv_freq

    t = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if t is None:
        return None
    factors = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)).flatten()
    plain, _ = rope_inv_freq(config_from_hf({**config, "rope_scaling": None}), 1)
    for preset in LLAMA3_ROPE_PRESETS:
        scaled, _ = rope_inv_freq(config_from_hf({**config, "rope_scaling": preset}), 1)
        if factors.shape == scaled.shape and torch.allclose(plain / scaled, factors, rtol=1e-4):
            return preset
    raise FormatError(
        f"{path}: rope_freqs.weight holds rope factors that match no known Llama 3 rope "
        "scaling (factor 4/8/16/32, low 1, high 4, original length 8192)"
    )


def read_gguf(path: str | Path):
    """A reader of the GGUF file ``path`` (metadata parsed, tensors memory-mapped); a damaged file
    is one FormatError naming it, never an allocation its counts ask for (tunex.gguf_checked)."""
    from tunex.gguf_checked import open_gguf

    with untrusted(Path(path)):
        return open_gguf(path)


@contextlib.contextmanager
def untrusted(path: Path) -> Iterator[None]:
    """Whatever a damaged GGUF file makes the `gguf` reader raise (IndexError, struct errors,
    ValueError, ...) becomes one FormatError naming the file; I/O errors stay OSErrors."""
    try:
        yield
    except (FormatError, OSError):
        raise
    except Exception as exc:  # noqa: BLE001 - any parse failure of an untrusted file
        detail = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
        raise FormatError(f"{path}: not a readable GGUF file ({detail})") from exc


def _write_tokenizer(reader, out: Path, context_length: int | None) -> None:
    from tunex.gguf_vocab import tokenizer_files_from_gguf

    for name, content in tokenizer_files_from_gguf(reader, context_length).items():
        (out / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


ROWS_PER_CHUNK = 4096  # dequantized at a time: gguf's temporaries stay a few MB, not a few tensors


def _dequantized(t, shape: list[int]) -> np.ndarray:
    """GGUF tensor ``t`` as a float32 array of ``shape`` (HF order), dequantized in row chunks into
    one preallocated array so that the peak is about one fp32 tensor."""
    import gguf

    data = t.data
    if data.ndim < 2 or len(shape) < 2:
        return gguf.quants.dequantize(data, t.tensor_type).astype(np.float32, copy=False).reshape(shape)
    out = np.empty(shape, dtype=np.float32)
    rows = out.reshape(-1, shape[-1])
    flat = data.reshape(-1, data.shape[-1])
    for i in range(0, flat.shape[0], ROWS_PER_CHUNK):
        part = gguf.quants.dequantize(flat[i : i + ROWS_PER_CHUNK], t.tensor_type)
        rows[i : i + part.shape[0]] = part.reshape(part.shape[0], -1)
    return out


def gguf_tokenizer_to_hf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Write only tokenizer.json and tokenizer_config.json rebuilt from a GGUF file's metadata."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_tokenizer(read_gguf(gguf_path), out, None)
    return out


def gguf_to_hf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Convert a llama (with experts: Mixtral) / qwen2 / qwen3 / qwen2moe / qwen3moe / phi3 / gemma2 /
    gemma3 GGUF file to an fp32 HF folder (config, weights, tokenizer).

    The folder is built beside ``out_dir`` and renamed into place whole (an existing ``out_dir`` is
    replaced in one step). Tensors are dequantized one at a time straight into the Rust shard
    writer, so memory holds about one fp32 tensor plus the pages of the memory-mapped GGUF.
    """
    from tunex.io.atomic import atomic_folder

    with atomic_folder(out_dir, overwrite=True) as tmp, untrusted(Path(gguf_path)):
        build_hf_folder(gguf_path, tmp)
    return Path(out_dir)


def build_hf_folder(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """:func:`gguf_to_hf` into ``out_dir`` as it is (created if missing; the caller makes it atomic)."""
    from tunex.io.sharded import stream_sharded

    path, out = Path(gguf_path), Path(out_dir)
    reader = read_gguf(path)
    names = {t.name for t in reader.tensors}
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise FormatError(f"{path}: no token_embd.weight tensor; not a decoder GGUF")
    config = _config_from_gguf(reader, path, "output.weight" not in names, int(embd.shape[-1]))
    arch = _field(reader, "general.architecture")
    scaling = _llama3_scaling(reader, config, path)
    if scaling is not None:
        config["rope_scaling"] = scaling
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    experts = int(config.get("num_local_experts") or config.get("num_experts") or 0)
    tensors = []  # (HF names, GGUF tensor, HF shape, stacked): an expert stack is one tensor per expert
    for t in reader.tensors:
        if t.name in SKIP:
            continue
        shape = [int(d) for d in reversed(t.shape)]  # GGUF: fastest-first
        names = expert_names(t.name, arch, experts) if experts else None
        if names is not None:
            if len(shape) != 3 or shape[0] != experts:
                raise FormatError(f"{path}: tensor {t.name!r} has shape {shape}; expected ({experts}, rows, columns)")
            tensors.append((names, t, shape, True))
            continue
        name = hf_name(t.name, arch)
        if name is None:
            raise FormatError(f"{path}: tensor {t.name!r} has no HF counterpart in a {config['model_type']} model")
        if name.endswith("shared_expert_gate.weight") and len(shape) == 1:
            shape = [1, shape[0]]  # a router to one output: HF keeps its row dimension
        tensors.append(([name], t, shape, False))
    specs = [(name, "F32", shape[1:] if stacked else shape) for names, _, shape, stacked in tensors for name in names]

    def dequantized():
        for names, t, shape, stacked in tensors:
            w = _dequantized(t, shape)
            if stacked:  # the experts, one by one
                for name, part in zip(names, w):
                    yield name, np.ascontiguousarray(part, dtype=np.float32)
                continue
            name = names[0]
            if arch in GEMMA_ARCHS and name.endswith("norm.weight"):
                w = w - 1.0  # GGUF stores Gemma's norm scale; HF the offset from one
            if arch == "llama" and name.endswith("q_proj.weight"):
                w = unpermute_qk(w, heads)
            elif arch == "llama" and name.endswith("k_proj.weight"):
                w = unpermute_qk(w, kv)
            w = np.ascontiguousarray(w, dtype=np.float32)
            yield name, w
            del w  # before the next tensor is dequantized: one in memory at a time, not two

    out.mkdir(parents=True, exist_ok=True)
    if "tokenizer.ggml.model" in reader.fields:  # GGUFs without a vocabulary exist (tests, LoRA)
        _write_tokenizer(reader, out, config.get("max_position_embeddings"))
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    stream_sharded(out, specs, dequantized())
    return out


OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m")
# outtype -> the block type of most 2-D weights (llama.cpp's default type of that file type)
BASE_TYPE = {"q8_0": "q8_0", "q6_k": "q6_k", "q5_k_m": "q5_k", "q4_k_m": "q4_k"}
BLOCK_ELEMS = {"q8_0": 32, "q5_0": 32, "q5_1": 32, "q4_k": 256, "q5_k": 256, "q6_k": 256}
# llama.cpp's stand-in when a row is not whole 256-value blocks (then F16 when not whole 32s)
K_FALLBACK = {"q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}


def _more_bits(i: int, n: int) -> bool:
    """llama.cpp's `use_more_bits`: the first and last eighth of the layers and every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_type(name: str, shape: tuple[int, ...], outtype: str, n_layers: int, tied: bool, experts: int = 0) -> str:
    """The GGUF type ("f32", "f16", "bf16" or a block type) of tensor ``name`` in an ``outtype`` file:
    the choice ``llama-quantize`` makes without an importance matrix. 1-D tensors and the MoE
    routers stay f32; the output projection (the token embedding when tied) gets Q6_K; in the _M
    mixes attn_v and ffn_down (the experts' and shared expert's too) of :func:`_more_bits` layers
    get Q6_K and Phi-3's fused attn_qkv one step more; a model of exactly 8 ``experts`` (Mixtral's
    special case in llama.cpp) gets Q8_0 for attn_k and attn_v and, in q4_k_m, Q5_K for
    attn_output; a row that is not whole blocks falls back to Q5_0 / Q5_1 / Q8_0 and then to f16."""
    if len(shape) == 1 or outtype == "f32" or ROUTER.fullmatch(name):
        return "f32"
    if outtype in ("f16", "bf16"):
        return outtype
    kind = BASE_TYPE[outtype]
    layer = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
    part = layer[2] if layer else None
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        kind = "q8_0" if shape[-1] % BLOCK_ELEMS[kind] else "q6_k" if kind != "q8_0" else kind
    elif experts == 8 and part in ("attn_k", "attn_v"):
        kind = "q8_0"
    elif experts == 8 and part == "attn_output" and outtype == "q4_k_m":
        kind = "q5_k"
    elif layer and outtype in ("q4_k_m", "q5_k_m"):
        if (part == "attn_v" or part.startswith("ffn_down")) and _more_bits(int(layer[1]), n_layers):
            kind = "q6_k"
        elif part == "attn_qkv":
            kind = "q5_k" if outtype == "q4_k_m" else "q6_k"
    if shape[-1] % BLOCK_ELEMS[kind]:
        kind = K_FALLBACK.get(kind, kind)
        if shape[-1] % BLOCK_ELEMS[kind]:
            kind = "f16"
    return kind


def _check_gemma_for_gguf(cfg, folder: Path) -> None:
    """What GGUF (llama.cpp's reading of it) cannot say about a Gemma model: refused, one line."""
    problem = None
    if cfg.query_pre_attn_scalar != cfg.head_dim:
        problem = f"query_pre_attn_scalar {cfg.query_pre_attn_scalar:g} differs from head_dim {cfg.head_dim}"
    elif cfg.family == "gemma3_text":
        pattern = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(cfg.num_layers)]
        if cfg.layer_types != pattern:
            problem = "layer_types other than every 6th layer global"
        elif cfg.rope_local_theta != 10000.0:
            problem = f"rope_local_base_freq {cfg.rope_local_theta:g} (llama.cpp uses 10000)"
    if problem:
        raise FormatError(f"{folder}/config.json: {problem} cannot be written to GGUF")


def _check_moe_for_gguf(cfg, folder: Path) -> None:
    """What llama.cpp's MoE architectures cannot say: dense MLP layers between the MoE layers, and
    a top-k renormalisation other than the one its graph hard-codes (Qwen2-MoE never renormalises,
    Qwen3-MoE always; Mixtral always does, as tunex's model)."""
    problem = None
    if not all(cfg.sparse_layers):
        dense = [i for i, sparse in enumerate(cfg.sparse_layers) if not sparse]
        problem = f"dense MLP layers {dense} (mlp_only_layers / decoder_sparse_step; llama.cpp makes every layer MoE)"
    elif cfg.family in ("qwen2_moe", "qwen3_moe") and cfg.norm_topk_prob != (cfg.family == "qwen3_moe"):
        problem = (
            f"norm_topk_prob {str(cfg.norm_topk_prob).lower()} (llama.cpp's {ARCH_OF_FAMILY[cfg.family]} "
            f"{'always' if cfg.family == 'qwen3_moe' else 'never'} renormalises the routing weights)"
        )
    if problem:
        raise FormatError(f"{folder}/config.json: {problem} cannot be written to GGUF")


def hf_to_gguf(
    model_dir: str | Path,
    out_path: str | Path,
    outtype: str = "f16",
    calibration: str | Path | None = None,
    importance: dict[str, np.ndarray] | None = None,
    gptq: bool = True,
) -> Path:
    """Write an HF folder (llama, mistral, internlm2 and mixtral as llama; qwen2, qwen3, qwen2_moe,
    qwen3_moe, phi3, gemma2, gemma3 text) as one GGUF file. ``calibration``: a UTF-8 text file the
    model is run over first; each layer's block-typed weights are then rounded by GPTQ against their
    inputs over that text (tunex.gguf_gptq), or with ``gptq=False`` each block type's search is
    only weighted by its columns' activations (llama.cpp's importance-matrix quantization, its bytes;
    see tunex.gguf_imatrix). Without it the blocks are llama.cpp's reference quantizer's.
    ``importance``: the statistics themselves ({GGUF tensor name: one value per input column}, what
    :func:`tunex.gguf_imatrix.collect_imatrix` returns), in place of ``calibration``: the weighted
    search."""
    import gguf

    from tunex.io.atomic import atomic_path
    from tunex.models.config import read_config
    from tunex.models.hub import resolve_model_path

    if outtype not in OUTTYPES:
        raise ValueError(f"outtype {outtype!r}: expected one of {', '.join(OUTTYPES)}")
    folder = resolve_model_path(model_dir)
    cfg = read_config(folder)
    if cfg.family not in ARCH_OF_FAMILY:
        raise FormatError(
            f"{folder}/config.json: model_type {cfg.family!r} cannot be exported to GGUF yet "
            f"(tunex writes {', '.join(ARCH_OF_FAMILY)})"
        )
    arch = ARCH_OF_FAMILY[cfg.family]
    if arch in GEMMA_ARCHS:
        _check_gemma_for_gguf(cfg, folder)
    if cfg.num_experts:
        _check_moe_for_gguf(cfg, folder)
    if calibration is not None and importance is not None:
        raise ValueError("pass calibration (a text file) or importance (collected statistics), not both")
    packed = None
    if calibration is not None:
        from tunex.gguf_imatrix import collect_imatrix, read_calibration_text

        read_calibration_text(calibration)  # a bad file fails before the model loads
        if outtype in BASE_TYPE and gptq:
            packed, importance = _gptq_tensors(folder, cfg, arch, outtype, calibration)
        elif outtype in BASE_TYPE:
            importance = collect_imatrix(folder, calibration)
    out = Path(out_path)
    with atomic_path(out) as tmp:  # written beside OUT and renamed: never a half GGUF under its name
        _write_gguf(gguf.GGUFWriter(str(tmp), arch), folder, cfg, arch, outtype, importance, packed)
    return out


def _gptq_tensors(folder: Path, cfg, arch: str, outtype: str, calibration) -> tuple[dict, dict]:
    """(GGUF name: GPTQ-packed bytes, GGUF name: importance of the rest) of an ``outtype`` export
    calibrated on ``calibration`` (tunex.gguf_gptq)."""
    from tunex.gguf_gptq import gptq_model

    kinds = {
        name: kind for name, _shape, kind in _gguf_layout(folder, cfg, arch, outtype, False) if kind in BLOCK_ELEMS
    }
    # the checkpoint's tensors by GGUF name (views of its memory maps; experts come as lists: left out)
    tensors = {g: (name, t) for g, name, t in _export_tensors(folder, cfg, arch) if not isinstance(t, list)}

    def weights(gname: str):
        if gname not in tensors or gname == "token_embd.weight":
            return None
        name, t = tensors[gname]
        return _gguf_values(name, t, cfg, arch)

    def to_module(gname: str, values: np.ndarray) -> np.ndarray:
        return _model_values(tensors[gname][0], values, cfg, arch)

    return gptq_model(folder, calibration, kinds, weights, to_module)


def _write_gguf(
    writer, folder: Path, cfg, arch: str, outtype: str, importance: dict | None = None, packed: dict | None = None
) -> None:
    import gguf
    import torch

    from tunex.gguf_vocab import add_tokenizer_to_gguf

    writer.add_name(folder.name)
    writer.add_block_count(cfg.num_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    if arch in ("phi3", *GEMMA_ARCHS) and cfg.sliding_window:
        writer.add_sliding_window(int(cfg.sliding_window))
    if cfg.num_experts:
        writer.add_expert_count(cfg.num_experts)
        writer.add_expert_used_count(cfg.experts_per_tok)
        if arch != "llama":  # Mixtral's experts are intermediate_size wide (feed_forward_length)
            writer.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        if cfg.shared_expert_intermediate_size:
            writer.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    if arch in GEMMA_ARCHS:
        if cfg.attn_softcap:
            writer.add_attn_logit_softcapping(float(cfg.attn_softcap))
        if cfg.final_softcap:
            writer.add_final_logit_softcapping(float(cfg.final_softcap))
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "q6_k": gguf.LlamaFileType.MOSTLY_Q6_K,
        "q5_k_m": gguf.LlamaFileType.MOSTLY_Q5_K_M,
        "q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M,
    }[outtype]
    writer.add_file_type(file_type)
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    elif kind == "llama3":
        from tunex.models.decoder import rope_inv_freq

        scaled, _ = rope_inv_freq(cfg, 1)
        plain = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim))
        rope_freqs = (plain / scaled).numpy().astype(np.float32)
    elif kind not in (None, "default"):
        raise FormatError(f"{folder}/config.json: rope scaling {kind!r} cannot be written to GGUF")
    if (folder / "tokenizer.json").is_file():
        add_tokenizer_to_gguf(writer, folder)

    def tensors():
        """(GGUF name, array) one at a time, in file order, read from the checkpoint as needed."""
        if kind == "llama3":
            yield "rope_freqs.weight", rope_freqs
        for gname, name, t in _export_tensors(folder, cfg, arch):
            shape = (len(t), *t[0].shape) if isinstance(t, list) else tuple(t.shape)
            kind_of = tensor_type(gname, shape, outtype, cfg.num_layers, cfg.tie_word_embeddings, cfg.num_experts)
            if packed and gname in packed:
                yield gname, packed.pop(gname)
                continue
            weights = (importance or {}).get(gname)
            yield gname, _gguf_array(name, gname, t, cfg, arch, kind_of, weights)

    # The header lists every tensor's shape and type before the data: a first pass reads only the
    # shapes (the checkpoint is memory-mapped), the second converts and writes one tensor at a time,
    # so memory holds one tensor however large the model is.
    for name, shape, kind_of in _gguf_layout(folder, cfg, arch, outtype, kind == "llama3"):
        if kind_of not in ("f32", "f16"):  # bf16 and the block types go as bytes of their GGML type
            raw = gguf.GGMLQuantizationType[kind_of.upper()]
            block, size = gguf.GGML_QUANT_SIZES[raw]
            byte_shape = [*shape[:-1], shape[-1] // block * size]
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=raw)
        else:
            dtype = np.dtype(np.float32 if kind_of == "f32" else np.float16)
            writer.add_tensor_info(name, shape, dtype, int(np.prod(shape)) * dtype.itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _name, array in tensors():
        writer.write_tensor_data(array)
        del array
    writer.close()


def _gguf_layout(folder: Path, cfg, arch: str, outtype: str, rope_freqs: bool) -> list[tuple[str, list[int], str]]:
    """(GGUF name, shape, :func:`tensor_type`) of every tensor :func:`hf_to_gguf` writes, in order."""
    layout = [("rope_freqs.weight", [cfg.head_dim // 2], "f32")] if rope_freqs else []
    for gname, _name, t in _export_tensors(folder, cfg, arch):
        shape = [len(t), *t[0].shape] if isinstance(t, list) else list(t.shape)
        kind_of = tensor_type(gname, tuple(shape), outtype, cfg.num_layers, cfg.tie_word_embeddings, cfg.num_experts)
        layout.append((gname, shape, kind_of))
    return layout


def _export_tensors(folder: Path, cfg, arch: str) -> Iterator[tuple[str, str, object]]:
    """(GGUF name, HF name, tensor) of every tensor GGUF gets, in checkpoint order. A layer's experts
    come as one entry, (stack name, the first expert's HF name, the experts' tensors in expert order),
    once the checkpoint has given all of them (the tensors are views of its memory maps: nothing is
    read until converted). An expert missing or shaped unlike the others is a FormatError."""
    from tunex.models.config import to_llama_names
    from tunex.models.loading import read_checkpoint

    pending: dict[str, dict[int, tuple[str, object]]] = {}
    for ckpt_name, tensor in read_checkpoint(folder):
        for name, t in to_llama_names(ckpt_name, tensor, cfg):
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            expert = expert_of(name, arch) if cfg.num_experts else None
            if expert is None:
                yield gguf_name(name, arch), name, t
                continue
            gname, index = expert
            group = pending.setdefault(gname, {})
            group[index] = (name, t)
            if len(group) < cfg.num_experts:
                continue
            del pending[gname]
            members = [group.get(e) for e in range(cfg.num_experts)]
            if any(m is None for m in members):  # an index past num_experts took a place
                raise FormatError(
                    f"{folder}: expert tensors of {gname} are numbered {sorted(group)}; "
                    f"config.json has num_experts {cfg.num_experts}"
                )
            shapes = {tuple(t.shape) for _, t in members}
            if len(shapes) > 1:
                raise FormatError(
                    f"{folder}: the experts of {gname} ({members[0][0]}, ...) differ in shape: {sorted(shapes)}"
                )
            yield gname, members[0][0], [t for _, t in members]
    for gname, group in pending.items():
        missing = sorted(set(range(cfg.num_experts)) - set(group))
        raise FormatError(
            f"{folder}: the checkpoint lacks experts {missing} of {gname} ({next(iter(group.values()))[0]}, ...); "
            f"config.json has num_experts {cfg.num_experts}"
        )


def _gguf_array(name: str, gname: str, t, cfg, arch: str, kind: str, importance=None) -> np.ndarray:
    """Tensor ``t`` (HF name ``name``; a list of tensors: the experts, stacked) as the bytes or values
    GGUF stores for type ``kind``; ``importance``: its columns' weights for the block search."""
    import torch

    if isinstance(t, list):
        return np.stack([_gguf_array(name, gname, x, cfg, arch, kind) for x in t])
    w = _gguf_values(name, t, cfg, arch)
    if kind == "f32":
        return w
    if kind == "f16":
        return w.astype(np.float16)
    if kind == "bf16":  # torch rounds to nearest even, as gguf's and llama.cpp's converters do
        return torch.from_numpy(w).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8)
    return quantize_blocks(w, kind, gname, importance)


def _gguf_values(name: str, t, cfg, arch: str) -> np.ndarray:
    """Tensor ``t`` (HF name ``name``) as the float32 values GGUF stores (llama's q / k rows
    permuted, Gemma's norms as scales)."""
    w = t.float().numpy()
    if arch in GEMMA_ARCHS and name.endswith("norm.weight"):
        w = w + 1.0  # HF stores Gemma's norm as the offset from one, GGUF the scale
    heads = _rope_heads(name, cfg, arch)
    if heads is not None:
        w = permute_qk(w, heads)
    return np.ascontiguousarray(w, dtype=np.float32)


def _model_values(name: str, w: np.ndarray, cfg, arch: str) -> np.ndarray:
    """A 2-D weight's GGUF values ``w`` back in the layout of the model's module (HF name ``name``)."""
    heads = _rope_heads(name, cfg, arch)
    if heads is not None:
        w = unpermute_qk(w, heads)
    return np.ascontiguousarray(w, dtype=np.float32)


def _rope_heads(name: str, cfg, arch: str) -> int | None:
    """The head count whose rows GGUF's llama layout permutes in weight ``name`` (q or k), else None."""
    if arch == "llama" and name.endswith("q_proj.weight"):
        return cfg.num_heads
    if arch == "llama" and name.endswith("k_proj.weight"):
        return cfg.num_kv_heads
    return None


def _block_bytes(kind: str) -> int:
    import gguf

    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind.upper()]][1]


def quantize_blocks(w: np.ndarray, kind: str, name: str = "tensor", importance=None) -> np.ndarray:
    """Rows of float32 ``w`` (last dimension) packed as GGUF block type ``kind`` (``q8_0``, ``q5_0``,
    ``q5_1``, ``q4_k``, ``q5_k``, ``q6_k``), the bytes llama.cpp's reference quantizer writes; shape
    ``(*w.shape[:-1], bytes per row)``. With ``importance`` (one non-negative value per column) the
    bytes llama.cpp writes with that importance matrix entry instead. A row that is not whole
    blocks, a NaN / inf, or an importance of the wrong length is a ValueError naming ``name``."""
    from tunex import _native

    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.ndim == 0 or kind not in BLOCK_ELEMS:
        raise ValueError(f"{name}: expected an array of rows and a type of {', '.join(BLOCK_ELEMS)}; got {kind!r}")
    cols = w.shape[-1]
    out = np.empty((*w.shape[:-1], cols // BLOCK_ELEMS[kind] * _block_bytes(kind)), dtype=np.uint8)
    if importance is None:
        _native.quantize_ggml(w.reshape(-1), cols, kind, name, out.reshape(-1))
    else:
        weights = np.ascontiguousarray(importance, dtype=np.float32).reshape(-1)
        _native.quantize_ggml_weighted(w.reshape(-1), cols, kind, name, weights, out.reshape(-1))
    return out
