"""Tiny random models of every family tunex's decoder loads, made and saved by transformers (the
test oracle); shared by the model tests. Head dim 16, so tunex's native CPU kernels take them."""

from __future__ import annotations

import json

import torch

BASE = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
FAMILIES = {
    "llama2": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=4, rms_norm_eps=1e-5)),
    "llama3": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        ),
    ),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
    "mistral_window": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=6)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict()),
    "smollm2": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True, num_key_value_heads=1)),
    # Qwen2.5's small models: tied head, one kv head, theta 1e6, YaRN as its model cards suggest
    "qwen2_5": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(
            tie_word_embeddings=True,
            num_key_value_heads=1,
            rope_theta=1000000.0,
            rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
        ),
    ),
    # Qwen3: q/k norms, an explicit head dim wider than hidden / heads
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32, rope_theta=1000000.0)),
    # Gemma 2: soft-capping (attention 50 is far above these scores: 5 makes it bite), a window
    # smaller than the test sequences, sliding and global layers alternating
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(
            num_hidden_layers=3,
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=6,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=3.0,
        ),
    ),
    # Gemma 3 text: q/k norms, local and global RoPE bases, linear scaling on the global layers
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(
            num_hidden_layers=3,
            head_dim=32,
            query_pre_attn_scalar=20,
            sliding_window=5,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0},
            },
        ),
    ),
    # Phi-3: fused qkv_proj and gate_up_proj, a sliding window
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(sliding_window=7, pad_token_id=0)),
    # Phi-3.5 / Phi-3-128k: LongRoPE (short factors up to 16 positions, long ones past them)
    "phi3_longrope": (
        "Phi3Config",
        "Phi3ForCausalLM",
        dict(
            pad_token_id=0,
            max_position_embeddings=64,
            original_max_position_embeddings=16,
            rope_parameters={
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "short_factor": [1.0, 1.1, 1.2, 1.3, 1.5, 1.8, 2.0, 2.5],
                "long_factor": [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 9.0],
                "original_max_position_embeddings": 16,
            },
        ),
    ),
    "llama_linear": ("LlamaConfig", "LlamaForCausalLM", dict(rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "llama_dynamic": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(max_position_embeddings=12, rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
    ),
    "llama_yarn": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            rope_scaling={
                "rope_type": "yarn",
                "factor": 8.0,
                "original_max_position_embeddings": 16,
                "beta_fast": 16,
                "beta_slow": 2,
            }
        ),
    ),
}

# the mixture-of-experts families (test_models_moe.py), on the same base sizes
MOE = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
    # a shared expert, a dense middle layer (mlp_only_layers), top-k not renormalised
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            num_hidden_layers=3,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            mlp_only_layers=[1],
        ),
    ),
    # q/k norms, a head dim wider than hidden / heads, top-k renormalised, 5 experts top-3
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(num_experts=5, num_experts_per_tok=3, moe_intermediate_size=32, head_dim=32, norm_topk_prob=True),
    ),
}


def hf_model(family: str, seed: int = 0, **overrides):
    """A random transformers model of ``family`` (of FAMILIES or MOE; eval mode); biases and norm
    weights are moved off their zero/one initialisation, which would hide a bug in how they are
    applied. MoE routers get unit-scale weights, so routing is decided by clear margins (no
    near-ties for rounding to flip)."""
    import transformers

    cfg_cls, model_cls, extra = MOE[family] if family in MOE else FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, cfg_cls)(**{**BASE, **extra, **overrides})
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif family in MOE and (name.endswith("mlp.gate.weight") or name.endswith("shared_expert_gate.weight")):
                p.normal_()
    return model


def make_hf(tmp_path_factory, family: str):
    """(folder the model was saved to, the transformers model)."""
    model = hf_model(family)
    out = tmp_path_factory.mktemp(family)
    model.save_pretrained(out)
    return out, model


def fuse_grouped(q, k, v, heads: int, kv: int, d: int) -> torch.Tensor:
    """q/k/v rows in InternLM2's fused wqkv order: per kv head, its query heads, then k, then v."""
    per = heads // kv
    rows = []
    for g in range(kv):
        for j in range(per):
            rows.append(q[(g * per + j) * d : (g * per + j + 1) * d])
        rows.append(k[g * d : (g + 1) * d])
        rows.append(v[g * d : (g + 1) * d])
    return torch.cat(rows)


def internlm2_checkpoint(hf_state: dict, heads: int, kv: int, d: int) -> dict:
    """Build InternLM2's fused layout from Llama weights, written from its published description:
    wqkv rows are grouped per kv head as [q heads of the group..., k, v]."""
    out = {}
    for name, t in hf_state.items():
        if ".self_attn.q_proj." in name:
            q, k, v = (hf_state[name.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj"))
            out[name.replace("self_attn.q_proj", "attention.wqkv")] = fuse_grouped(q, k, v, heads, kv, d)
        elif ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
            continue
        else:
            renamed = (
                name.replace("model.embed_tokens", "model.tok_embeddings")
                .replace("self_attn.o_proj", "attention.wo")
                .replace("mlp.gate_proj", "feed_forward.w1")
                .replace("mlp.up_proj", "feed_forward.w3")
                .replace("mlp.down_proj", "feed_forward.w2")
                .replace("input_layernorm", "attention_norm")
                .replace("post_attention_layernorm", "ffn_norm")
            )
            out["output.weight" if name == "lm_head.weight" else renamed] = t
    return out


def make_internlm2(folder, heads: int = 4, kv: int = 2, seed: int = 3):
    """An InternLM2 folder (fused ``wqkv``, its own names) whose model is a transformers Llama's:
    returns (its checkpoint tensors, that Llama, the oracle). transformers has no InternLM2 class."""
    import transformers
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        **{**BASE, "num_attention_heads": heads, "num_key_value_heads": kv}, rope_theta=10000.0
    )
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    d = BASE["hidden_size"] // heads
    ckpt = internlm2_checkpoint({k: v.contiguous() for k, v in hf.state_dict().items()}, heads, kv, d)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(ckpt, folder / "model.safetensors")
    (folder / "config.json").write_text(
        json.dumps(
            {
                "model_type": "internlm2",
                "architectures": ["InternLM2ForCausalLM"],
                "vocab_size": BASE["vocab_size"],
                "hidden_size": BASE["hidden_size"],
                "intermediate_size": BASE["intermediate_size"],
                "num_hidden_layers": BASE["num_hidden_layers"],
                "num_attention_heads": heads,
                "num_key_value_heads": kv,
                "rms_norm_eps": config.rms_norm_eps,
                "rope_theta": 10000.0,
                "bias": False,
                "max_position_embeddings": BASE["max_position_embeddings"],
                "tie_word_embeddings": False,
            }
        )
    )
    return ckpt, hf
