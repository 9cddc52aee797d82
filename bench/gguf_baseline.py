"""The baseline of bench_gguf.py: HF <-> GGUF for llama models done the way a script on gguf-py does
it (llama.cpp's convert_hf_to_gguf.py writes through ``GGUFWriter``, transformers' GGUF loading reads
through ``GGUFReader`` and ``gguf.quants.dequantize``; the tokenizer is transformers' conversion of the
GGUF vocabulary). Not used by tunex."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_to_gguf_q8_0(model_dir: str, out_path: str) -> None:
    """A llama HF folder as a Q8_0 GGUF (1-D tensors and rows not a multiple of 32 in f32 / f16),
    every tensor held by the writer until it writes them all."""
    from safetensors import safe_open

    folder = Path(model_dir)
    cfg = json.loads((folder / "config.json").read_text())
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg["num_hidden_layers"])
    writer = gguf.GGUFWriter(out_path, "llama")
    writer.add_name(folder.name)
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(cfg.get("rope_theta", 10000.0))
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_vocab_size(cfg["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="np") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                w = f.get_tensor(name).astype(np.float32)
                if name.endswith("q_proj.weight"):
                    w = _permute(w, heads)
                elif name.endswith("k_proj.weight"):
                    w = _permute(w, kv)
                new = names.get_name(name, try_suffixes=(".weight", ".bias"))
                if new is None:
                    raise ValueError(f"{file}: no GGUF name for {name}")
                if w.ndim == 1:
                    writer.add_tensor(new, w)
                elif w.shape[-1] % 32:
                    writer.add_tensor(new, w.astype(np.float16))
                else:
                    q8 = gguf.GGMLQuantizationType.Q8_0
                    writer.add_tensor(new, gguf.quants.quantize(w, q8), raw_dtype=q8)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _field(reader: gguf.GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.parts[field.data[0]]
    if field.types and field.types[0] == gguf.GGUFValueType.STRING:
        return bytes(value).decode()
    return value.item() if value.size == 1 else value.tolist()


def gguf_to_hf(gguf_path: str, out_dir: str) -> None:
    """A llama GGUF as an fp32 HF folder (config.json, one model.safetensors, and the tokenizer when
    the GGUF has one): every tensor dequantized into one state dict, then saved."""
    from safetensors.numpy import save_file

    reader = gguf.GGUFReader(gguf_path)
    blocks = int(_field(reader, "llama.block_count"))
    heads = int(_field(reader, "llama.attention.head_count"))
    kv = int(_field(reader, "llama.attention.head_count_kv", heads))
    inverse = {}
    for hf, (_, name) in gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, blocks).mapping.items():
        if hf.startswith(("model.", "lm_head")) and name not in inverse:
            inverse[name] = hf
    state = {}
    for t in reader.tensors:
        base, _, suffix = t.name.rpartition(".")
        hf = f"{inverse[base]}.{suffix}"
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape([int(d) for d in reversed(t.shape)])
        if hf.endswith("q_proj.weight"):
            w = _unpermute(w, heads)
        elif hf.endswith("k_proj.weight"):
            w = _unpermute(w, kv)
        state[hf] = np.ascontiguousarray(w)
    embd = state["model.embed_tokens.weight"]
    hidden = int(_field(reader, "llama.embedding_length"))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(embd.shape[0]),
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": blocks,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "rms_norm_eps": float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_field(reader, "llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_field(reader, "llama.context_length", 2048)),
        "tie_word_embeddings": "lm_head.weight" not in state,
        "torch_dtype": "float32",
    }
    out = Path(out_dir)
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    if "tokenizer.ggml.model" in reader.fields:  # transformers' GGUF tokenizer conversion (on gguf-py)
        from transformers import AutoTokenizer

        source = Path(gguf_path)
        AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name).save_pretrained(str(out))
