"""Predict the peak GPU memory of a training config before launching it; no weights are loaded.

The prediction is arithmetic over the model's shape (from its config.json, its GGUF metadata, or a
built-in preset for the shipped 7B configs) and the config's method/train settings. It models what
``torch.cuda.max_memory_allocated`` reports for tunex's training step in its steady state (after the
first optimizer step, inside gradient accumulation):

* weights: NF4 (+ double quant, ~4.127 bits/param) for the decoder's linears under QLoRA, the
  compute dtype for everything else;
* adapter and its gradients in the adapter's dtype (``train.adapter_dtype``: fp32 by default,
  or bf16), AdamW's two moments in fp32 (bf16 adapters are stepped by BF16AdamW, which keeps
  fp32 moments); for a full fine-tune all four in the weights' dtype for every parameter;
  ``train.optimizer = "adamw_8bit"``: one byte per moment and element plus one fp32 absmax per
  256 elements for each tensor of at least 4096 elements (smaller ones keep fp32 moments);
  ``"paged_adamw_8bit"``: only the largest tensor's 8-bit state (the reused device buffer);
* activations: with gradient checkpointing one (tokens, hidden) checkpoint per layer plus one
  recomputed layer; without it every layer's saved tensors (see ``_saved_per_token``);
* the largest transient: either the chunked cross-entropy's logits at the end of forward, or the
  gradients and the dequantized weight inside one layer's backward.

It does not count the CUDA context or the caching allocator's slack (``memory_reserved`` is
typically 5-15% above the allocated peak).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from tunex.pkgpath import local_path

NF4_CODE_BYTES = 16 * 4
NESTED_CODE_BYTES = 256 * 4
NESTED_BLOCKSIZE = 256
# Tokens per chunk of tunex.kernels.chunked_cross_entropy (its DEFAULT_CHUNK), the loss tunex
# trains with on CUDA; repeated here so the estimate needs no torch import (a test keeps them equal).
CE_CHUNK_TOKENS = 1024
# tunex.train.adamw_8bit's BLOCK and MIN_8BIT_SIZE (bitsandbytes' values), repeated for the same
# reason; a test keeps them equal.
OPTIM_BLOCK = 256
OPTIM_MIN_8BIT = 4096
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a llama-family decoder that decide its memory."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tie_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases (Qwen2)
    o_bias: bool = False  # output-projection bias (InternLM2's and Llama's bias switches)
    mlp_bias: bool = False
    fused_qkv: bool = False  # one q/k/v projection (Phi-3's qkv_proj, InternLM2's wqkv)
    fused_gate_up: bool = False  # one gate/up projection (Phi-3's gate_up_proj)
    qk_norm: bool = False  # per-head q/k RMSNorm weights (Qwen3, Gemma 3)
    norms_per_layer: int = 2  # Gemma's sandwich norms: 4
    # mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE; every layer MoE): experts per layer, experts
    # per token, each expert's intermediate size, Qwen2-MoE's shared expert, and the checkpoint's
    # naming ("mixtral": block_sparse_moe.experts.N.w1/w3/w2, else mlp.experts.N.gate/up/down_proj)
    experts: int = 0
    experts_per_tok: int = 0
    moe_intermediate: int = 0
    shared_intermediate: int = 0
    moe_names: str = ""

    def linears(self) -> list[tuple[str, int, int]]:
        """(module name relative to a layer, in_features, out_features) of one decoder layer.

        Names are tunex's (HF Llama's; InternLM2's w1/w3/w2/wo are renamed gate/up/down/o and its
        wqkv is ``self_attn.qkv_proj``), so one layout serves every family; fused projections are
        one linear each, as LoRA adapts them.
        """
        h, i, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim
        attn = (
            [("self_attn.qkv_proj", h, q + 2 * kv)]
            if self.fused_qkv
            else [("self_attn.q_proj", h, q), ("self_attn.k_proj", h, kv), ("self_attn.v_proj", h, kv)]
        )
        if self.experts:
            return [*attn, ("self_attn.o_proj", q, h), *self._expert_linears()]
        mlp = (
            [("mlp.gate_up_proj", h, 2 * i)] if self.fused_gate_up else [("mlp.gate_proj", h, i), ("mlp.up_proj", h, i)]
        )
        return [*attn, ("self_attn.o_proj", q, h), *mlp, ("mlp.down_proj", i, h)]

    def _expert_linears(self) -> list[tuple[str, int, int]]:
        h, m = self.hidden, self.moe_intermediate
        block, (g, u, d) = (
            ("block_sparse_moe", ("w1", "w3", "w2"))
            if self.moe_names == "mixtral"
            else ("mlp", ("gate_proj", "up_proj", "down_proj"))
        )
        rows = []
        for e in range(self.experts):
            rows += [(f"{block}.experts.{e}.{g}", h, m), (f"{block}.experts.{e}.{u}", h, m)]
            rows.append((f"{block}.experts.{e}.{d}", m, h))
        if self.shared_intermediate:
            si = self.shared_intermediate
            rows += [(f"{block}.shared_expert.{n}", h, si) for n in (g, u)] + [(f"{block}.shared_expert.{d}", si, h)]
        return rows

    def router_params(self) -> int:
        """Per layer: the router (hidden -> experts) and Qwen2-MoE's shared-expert gate (hidden -> 1)."""
        if not self.experts:
            return 0
        return self.experts * self.hidden + (self.hidden if self.shared_intermediate else 0)

    @property
    def ffn_width(self) -> int:
        """Intermediate activations one token makes in a layer's MLP: the k experts' (and the shared
        expert's) for MoE."""
        if self.experts:
            return self.experts_per_tok * self.moe_intermediate + self.shared_intermediate
        return self.intermediate

    def active_params(self) -> int:
        """Parameters one token uses (MoE: its k experts of each layer, not all of them)."""
        if not self.experts:
            return self.params()
        h, m = self.hidden, self.moe_intermediate
        idle = self.layers * (self.experts - self.experts_per_tok) * 3 * h * m
        return self.params() - idle

    def linear_params(self) -> int:
        return self.layers * sum(i * o for _, i, o in self.linears())

    def other_params(self) -> int:
        """Embeddings, head, norms and biases: everything that is not a decoder linear weight."""
        embed = self.vocab * self.hidden * (1 if self.tie_embeddings else 2)
        norms = self.layers * (self.norms_per_layer * self.hidden + (2 * self.head_dim if self.qk_norm else 0))
        norms += self.hidden
        per_layer = (self.heads + 2 * self.kv_heads) * self.head_dim if self.attention_bias else 0
        per_layer += self.hidden if self.o_bias else 0
        per_layer += 2 * self.intermediate + self.hidden if self.mlp_bias else 0
        per_layer += self.router_params()
        return embed + norms + self.layers * per_layer

    def params(self) -> int:
        return self.linear_params() + self.other_params()


# Shapes of the models behind the shipped 7B/8B configs and of the 70B-class models (from their
# published config.json files).
PRESETS: dict[str, ModelShape] = {
    "llama2-7b": ModelShape(4096, 11008, 32, 32, 32, 128, 32000),
    "llama3-8b": ModelShape(4096, 14336, 32, 32, 8, 128, 128256),
    "internlm2-7b": ModelShape(4096, 14336, 32, 32, 8, 128, 92544, fused_qkv=True),
    "qwen2-7b": ModelShape(3584, 18944, 28, 28, 4, 128, 152064, attention_bias=True),
    "mistral-7b": ModelShape(4096, 14336, 32, 32, 8, 128, 32000),
    "smollm2-135m": ModelShape(576, 1536, 30, 9, 3, 64, 49152, tie_embeddings=True),
    "llama2-70b": ModelShape(8192, 28672, 80, 64, 8, 128, 32000),
    "qwen2-72b": ModelShape(8192, 29568, 80, 64, 8, 128, 152064, attention_bias=True),
    "qwen3-8b": ModelShape(4096, 12288, 36, 32, 8, 128, 151936, qk_norm=True),
    "gemma2-9b": ModelShape(3584, 14336, 42, 16, 8, 256, 256000, tie_embeddings=True, norms_per_layer=4),
    "gemma3-1b": ModelShape(1152, 6912, 26, 4, 1, 256, 262144, tie_embeddings=True, qk_norm=True, norms_per_layer=4),
    "phi3-mini": ModelShape(3072, 8192, 32, 32, 32, 96, 32064, fused_qkv=True, fused_gate_up=True),
    "mixtral-8x7b": ModelShape(
        4096, 14336, 32, 32, 8, 128, 32000, experts=8, experts_per_tok=2, moe_intermediate=14336, moe_names="mixtral"
    ),
    "qwen1.5-moe-a2.7b": ModelShape(
        2048,
        5632,
        24,
        16,
        16,
        128,
        151936,
        attention_bias=True,
        experts=60,
        experts_per_tok=4,
        moe_intermediate=1408,
        shared_intermediate=5632,
    ),
    "qwen3-30b-a3b": ModelShape(
        2048, 6144, 48, 32, 4, 128, 151936, qk_norm=True, experts=128, experts_per_tok=8, moe_intermediate=768
    ),
}
HUB_PRESETS = {
    "meta-llama/llama-2-7b-hf": "llama2-7b",
    "meta-llama/llama-2-7b-chat-hf": "llama2-7b",
    "meta-llama/meta-llama-3-8b": "llama3-8b",
    "meta-llama/meta-llama-3-8b-instruct": "llama3-8b",
    "internlm/internlm2-7b": "internlm2-7b",
    "internlm/internlm2-chat-7b": "internlm2-7b",
    "internlm/internlm2-chat-7b-sft": "internlm2-7b",
    "qwen/qwen2-7b": "qwen2-7b",
    "qwen/qwen2-7b-instruct": "qwen2-7b",
    "mistralai/mistral-7b-v0.1": "mistral-7b",
    "mistralai/mistral-7b-instruct-v0.2": "mistral-7b",
    "meta-llama/llama-2-70b-hf": "llama2-70b",
    "meta-llama/llama-2-70b-chat-hf": "llama2-70b",
    "qwen/qwen2-72b": "qwen2-72b",
    "qwen/qwen2-72b-instruct": "qwen2-72b",
    "meta-llama/llama-3.1-8b": "llama3-8b",
    "meta-llama/llama-3.1-8b-instruct": "llama3-8b",
    "qwen/qwen2.5-7b": "qwen2-7b",
    "qwen/qwen2.5-7b-instruct": "qwen2-7b",
    "qwen/qwen3-8b": "qwen3-8b",
    "google/gemma-2-9b": "gemma2-9b",
    "google/gemma-2-9b-it": "gemma2-9b",
    "google/gemma-3-1b-pt": "gemma3-1b",
    "google/gemma-3-1b-it": "gemma3-1b",
    "microsoft/phi-3-mini-4k-instruct": "phi3-mini",
    "microsoft/phi-3.5-mini-instruct": "phi3-mini",
    "mistralai/mixtral-8x7b-v0.1": "mixtral-8x7b",
    "mistralai/mixtral-8x7b-instruct-v0.1": "mixtral-8x7b",
    "qwen/qwen1.5-moe-a2.7b": "qwen1.5-moe-a2.7b",
    "qwen/qwen1.5-moe-a2.7b-chat": "qwen1.5-moe-a2.7b",
    "qwen/qwen3-30b-a3b": "qwen3-30b-a3b",
}


def shape_from_config_json(path: str | Path) -> ModelShape:
    """Read a ModelShape from an HF config.json (a file, or a folder holding one), interpreted by
    tunex.models' own config reader, so the estimate sees the model the loader would build."""
    from tunex.models.config import GEMMA, read_config

    cfg = read_config(Path(path))
    if cfg.num_experts and not all(cfg.sparse_layers):
        raise ValueError(
            f"{path}: the estimate assumes every layer is MoE; this model has dense layers (mlp_only_layers / "
            "decoder_sparse_step)"
        )
    return ModelShape(
        hidden=cfg.hidden_size,
        intermediate=cfg.intermediate_size,
        layers=cfg.num_layers,
        heads=cfg.num_heads,
        kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        vocab=cfg.vocab_size,
        tie_embeddings=cfg.tie_word_embeddings,
        attention_bias=cfg.qkv_bias,
        o_bias=cfg.o_bias,
        mlp_bias=cfg.mlp_bias,
        fused_qkv=cfg.fused_qkv,
        fused_gate_up=cfg.fused_gate_up,
        qk_norm=cfg.qk_norm,
        norms_per_layer=4 if cfg.family in GEMMA else 2,
        experts=cfg.num_experts,
        experts_per_tok=cfg.experts_per_tok,
        moe_intermediate=cfg.moe_intermediate_size,
        shared_intermediate=cfg.shared_expert_intermediate_size,
        moe_names="mixtral" if cfg.family == "mixtral" else "",
    )


def shape_from_gguf(path: str | Path) -> ModelShape:
    """Read a ModelShape from a GGUF file's metadata (the tensors are not read)."""
    from tunex.gguf_io import read_gguf

    reader = read_gguf(path)

    def value(key: str):
        f = reader.fields.get(key)
        if f is None:
            raise ValueError(f"{path}: GGUF metadata has no {key!r}; expected a llama-family model")
        part = f.parts[f.data[0]]
        return bytes(part).decode() if f.types and f.types[0].name == "STRING" else int(part[0])

    arch = value("general.architecture")
    heads = value(f"{arch}.attention.head_count")
    if heads <= 0:
        raise ValueError(f"{path}: GGUF metadata {arch}.attention.head_count is {heads}; expected a positive count")
    hidden = value(f"{arch}.embedding_length")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = len(tokens.data) if tokens is not None else value(f"{arch}.vocab_size")
    kv_key = f"{arch}.attention.head_count_kv"
    return ModelShape(
        hidden=hidden,
        intermediate=value(f"{arch}.feed_forward_length"),
        layers=value(f"{arch}.block_count"),
        heads=heads,
        kv_heads=value(kv_key) if kv_key in reader.fields else heads,
        head_dim=hidden // heads,
        vocab=vocab,
        tie_embeddings=not any(t.name == "output.weight" for t in reader.tensors),
        attention_bias=arch == "qwen2",
    )


def resolve_shape(model_path: str, model_config: str | None = None, preset: str | None = None) -> ModelShape:
    """The shape of the model a config names, without loading weights.

    Order: an explicit ``preset`` or ``model_config``; then model_path as a folder, config.json,
    GGUF file or ``pkg://`` file; then a known hub id; then the local HF hub cache.
    """
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        return PRESETS[preset]
    if model_config is not None:
        return shape_from_config_json(model_config)
    text = str(model_path)
    path = local_path(text)
    if path.is_dir() or path.name == "config.json":
        return shape_from_config_json(path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return shape_from_gguf(path)
    if text.lower() in HUB_PRESETS:
        return PRESETS[HUB_PRESETS[text.lower()]]
    snapshot = _cached_snapshot(text)
    if snapshot is not None:
        return shape_from_config_json(snapshot)
    raise FileNotFoundError(
        f"cannot find the shape of model {text!r}: not a local folder, config.json or "
        f"GGUF file, not a known hub id, not in the HF cache; pass --model-config "
        f"path/to/config.json or --preset NAME ({', '.join(PRESETS)})"
    )


def _cached_snapshot(hub_id: str) -> Path | None:
    try:
        from tunex.models.hub import HUB_ID, _find_in_caches
    except ImportError:
        return None
    if not HUB_ID.match(hub_id):
        return None
    found, _ = _find_in_caches(hub_id)
    return found


@dataclass(frozen=True)
class Plan:
    """What the estimate assumes about one training step (filled from a config by ``plan_from_config``)."""

    kind: str = "qlora"  # full | lora | qlora
    seq_len: int = 2048
    batch: int = 1
    dtype_bytes: int = 2  # compute dtype: bf16
    adapter_bytes: int = 4  # train.adapter_dtype: adapter weights and grads (AdamW's moments stay fp32)
    optimizer: str = "adamw"  # train.optimizer: adamw | adamw_8bit | paged_adamw_8bit
    r: int = 64
    target_modules: str | list[str] = "all-linear"
    dropout: float = 0.1
    blocksize: int = 64
    double_quant: bool = True
    checkpointing: bool = True
    offload_checkpoints: bool = False
    fused_lora: bool = True  # tunex.kernels.lora_linear: no dropped copy of x is saved
    dora: bool = False
    sequence_parallel: int = 1  # train.sequence_parallel: each rank holds seq_len / this tokens of a sequence
    pair_rows: bool = False  # preference data: a row holds a pair's chosen and rejected sides, each <= max_length
    fsdp: bool = False  # train.fsdp: LoRA/QLoRA sharded by FSDP2 (modelled per GPU when gpus > 1)
    gpus: int = 1  # processes (one GPU each) the FSDP2 shards are spread over


def plan_from_config(cfg, **overrides) -> Plan:
    """A Plan from a tunex Config (train dtype "auto" means bf16: the estimate is for a GPU)."""
    from tunex.config import PREFERENCE_FORMATS

    dtype = cfg.train.dtype if cfg.train.dtype != "auto" else "bfloat16"
    pairs = cfg.data.format in PREFERENCE_FORMATS  # one forward over both sides of each pair
    values = dict(
        kind=cfg.method.kind,
        seq_len=cfg.data.max_length * (2 if pairs else 1),
        pair_rows=pairs,
        batch=cfg.train.batch_size,
        dtype_bytes=DTYPE_BYTES[dtype],
        adapter_bytes=DTYPE_BYTES[cfg.train.adapter_dtype],
        r=cfg.method.r,
        target_modules=cfg.method.target_modules,
        dropout=cfg.method.dropout,
        blocksize=cfg.method.blocksize,
        double_quant=cfg.method.double_quant,
        checkpointing=cfg.train.gradient_checkpointing,
        offload_checkpoints=cfg.train.offload_checkpoints,
        optimizer=cfg.train.optimizer,
        dora=cfg.method.use_dora,
        sequence_parallel=cfg.train.sequence_parallel,
        fsdp=cfg.train.fsdp,
    )
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Plan(**values)


def quantized_bytes(numel: int, blocksize: int, double_quant: bool) -> int:
    """Bytes of one 4-bit weight: packed nibbles, absmax (8-bit + nested fp32 with double quant), codes."""
    blocks = math.ceil(numel / blocksize)
    packed = (numel + 1) // 2
    if double_quant:
        return packed + blocks + 4 * math.ceil(blocks / NESTED_BLOCKSIZE) + NESTED_CODE_BYTES + 4 + NF4_CODE_BYTES
    return packed + 4 * blocks + NF4_CODE_BYTES


def sharded_quantized_bytes(numel: int, blocksize: int, double_quant: bool, gpus: int) -> int:
    """One GPU's bytes of a 4-bit weight sharded by FSDP2 over ``gpus`` (``NF4Linear.shard_by_blocks``):
    ceil(blocks / gpus) rows of packed codes and of absmax; the nested absmax and the code tables
    replicated. A weight that is not whole blocks stays replicated."""
    blocks, rem = divmod(numel, blocksize)
    if rem or gpus == 1:
        return quantized_bytes(numel, blocksize, double_quant)
    rows = -(-blocks // gpus)
    if double_quant:
        nested = 4 * math.ceil(blocks / NESTED_BLOCKSIZE) + NESTED_CODE_BYTES + 4
        return rows * blocksize // 2 + rows + nested + NF4_CODE_BYTES
    return rows * blocksize // 2 + 4 * rows + NF4_CODE_BYTES


def _rows(rows: int, cols: int, gpus: int) -> int:
    """Elements of one GPU's dim-0 shard of a (rows, cols) tensor (FSDP2 pads rows to ceil(rows / gpus))."""
    return -(-rows // gpus) * cols


def _layer_frozen_bytes(shape: ModelShape, plan: Plan, gpus: int) -> int:
    """One GPU's bytes of one decoder layer's frozen weights under FSDP2 (gpus=1: the whole layer)."""
    c = plan.dtype_bytes
    if plan.kind == "qlora":
        total = sum(
            sharded_quantized_bytes(i * o, plan.blocksize, plan.double_quant, gpus) for _, i, o in shape.linears()
        )
    else:
        total = sum(_rows(o, i, gpus) for _, i, o in shape.linears()) * c
    other = (shape.other_params() - _root_params(shape)) // shape.layers  # norms, biases, routers
    return total + -(-other // gpus) * c


def _root_params(shape: ModelShape) -> int:
    """Parameters of FSDP2's root unit: the embeddings, the head (unless tied) and the final norm."""
    return shape.vocab * shape.hidden * (1 if shape.tie_embeddings else 2) + shape.hidden


def _layer_adapter_elems(shape: ModelShape, plan: Plan, adapted: list[tuple[str, int, int]], gpus: int) -> int:
    """One GPU's elements of one decoder layer's adapters: A (r, in) and B (out, r) by rows."""
    return sum(
        _rows(plan.r, i, gpus) + _rows(o, plan.r, gpus) + (_rows(o, 1, gpus) if plan.dora else 0) for _, i, o in adapted
    )


@dataclass
class Estimate:
    """Predicted peak GPU memory and its parts, in bytes."""

    shape: ModelShape
    plan: Plan
    params: int
    trainable: int
    parts: dict[str, int] = field(default_factory=dict)  # static parts, always resident
    phases: dict[str, dict[str, int]] = field(default_factory=dict)  # transient parts per phase
    peak_phase: str = ""

    @property
    def peak(self) -> int:
        return sum(self.parts.values()) + sum(self.phases[self.peak_phase].values())


def adapted_linears(shape: ModelShape, target: str | list[str]) -> list[tuple[str, int, int]]:
    """The decoder linears (per layer) that get an adapter; the output head never does."""
    if target == "all-linear":
        return shape.linears()
    from tunex.peft.targets import select

    linears = shape.linears()
    hits = select([f"model.layers.0.{n}" for n, _, _ in linears], target)
    return [row for row, hit in zip(linears, hits) if hit]


def trainable_tensors(shape: ModelShape, plan: Plan, adapted: list[tuple[str, int, int]]) -> list[int]:
    """The element count of every trainable tensor (what the optimizer keeps state for)."""
    if plan.kind != "full":
        per_layer = []
        for _, fan_in, fan_out in adapted:
            per_layer += [plan.r * fan_in, fan_out * plan.r] + ([fan_out] if plan.dora else [])
        return per_layer * shape.layers
    h, i = shape.hidden, shape.intermediate
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    per_layer = [fan_in * fan_out for _, fan_in, fan_out in shape.linears()] + [h, h]
    per_layer += [q, kv, kv] if shape.attention_bias else []
    per_layer += [h] if shape.o_bias else []
    per_layer += [i, i, h] if shape.mlp_bias else []
    per_layer += [shape.experts * h] + ([h] if shape.shared_intermediate else []) if shape.experts else []
    embeds = [shape.vocab * h] * (1 if shape.tie_embeddings else 2)
    return per_layer * shape.layers + embeds + [h]


def optimizer_bytes(tensors: list[int], plan: Plan, moment_bytes: int) -> tuple[str, int]:
    """(name, device bytes) of the optimizer state for trainable tensors of these sizes; float
    moments take ``moment_bytes`` each."""
    if plan.optimizer == "adamw":
        return "optimizer (AdamW m, v)", 2 * moment_bytes * sum(tensors)

    def quantized(n: int) -> int:  # two 1-byte codes per element, two fp32 absmax per block
        return 2 * n + 2 * 4 * math.ceil(n / OPTIM_BLOCK)

    small = sum(8 * n for n in tensors if n < OPTIM_MIN_8BIT)  # float32 moments, on the device
    big = [quantized(n) for n in tensors if n >= OPTIM_MIN_8BIT]
    tables = 2 * 256 * 4 if big else 0
    if plan.optimizer == "paged_adamw_8bit":
        return "optimizer (paged: one tensor's 8-bit m, v)", small + max(big, default=0) + tables
    return "optimizer (8-bit m, v + absmax)", small + sum(big) + tables


def _saved_per_token(shape: ModelShape, plan: Plan, adapted: list[tuple[str, int, int]]) -> int:
    """Bytes one token leaves saved for backward inside one decoder layer (its input excluded).

    Saved tensors: the two norm outputs (shared by the projections that read them), rotated q and
    k, v and the attention output (SDPA keeps them and an fp32 log-sum-exp per head), the
    attention output again as the contiguous (tokens, heads * head_dim) copy o_proj reads, the
    residual sum, gate, up and their SwiGLU product, one fp32 rstd per norm, and per adapted linear
    its (tokens, r) product ``dropout(x) @ A.T``. Without the fused LoRA function, dropout also
    keeps a dropped copy of the input (and a 1-byte mask) per adapted module. A test counts the
    tensors a real tunex decoder layer saves and checks this sum.
    """
    c = plan.dtype_bytes
    h, i = shape.hidden, shape.ffn_width
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    # n1, n2, h1 | q_rot, SDPA's output, o_proj's copy of it | k_rot, v | gate, up, act
    elems = 3 * h + 3 * q + 2 * kv + 3 * i
    extra = 4 * (2 + shape.heads)
    if shape.experts:  # each of a token's k experts keeps its gathered input; fp32 router probabilities
        elems += shape.experts_per_tok * h
        extra += 4 * shape.experts
    if plan.kind != "full" and shape.experts:  # a token passes k of each expert linear's E copies
        per_expert = [n for n, _, _ in adapted if ".experts." in n]
        elems += plan.r * (len(adapted) - len(per_expert) + len(per_expert) * shape.experts_per_tok // shape.experts)
    elif plan.kind != "full":
        elems += plan.r * len(adapted)
        if not plan.fused_lora and plan.dropout > 0:
            extra += sum(fan_in * (c + 1) for _, fan_in, _ in adapted)
    return elems * c + extra


def estimate_memory(shape: ModelShape, plan: Plan) -> Estimate:
    """Predict the peak of ``torch.cuda.max_memory_allocated`` for one training step of ``plan``."""
    c, layers = plan.dtype_bytes, shape.layers
    # with sequence parallelism a rank keeps its slice of each sequence (attention sees the whole
    # sequence with heads / N heads: the same bytes per token)
    tokens = plan.seq_len * plan.batch // plan.sequence_parallel
    adapted = adapted_linears(shape, plan.target_modules) if plan.kind != "full" else []
    if plan.kind != "full" and not adapted:
        raise ValueError(
            f"method.target_modules {plan.target_modules!r} selects none of "
            f"{', '.join(n for n, _, _ in shape.linears())}"
        )
    sharded = plan.gpus > 1
    if sharded and (plan.kind == "full" or not plan.fsdp):
        raise ValueError(
            f"{plan.gpus} GPUs: per-GPU memory over several GPUs is modelled for LoRA/QLoRA sharded by FSDP2 "
            "(train.fsdp = true); a DDP process holds what one process holds (estimate without the GPU "
            "count), and a full fine-tune's FSDP2 sharding is not modelled"
        )
    if sharded and plan.optimizer != "adamw":
        raise ValueError(f"train.optimizer {plan.optimizer!r} does not step FSDP2 shards (train.fsdp); use 'adamw'")
    params = shape.params()
    if plan.kind == "full":
        trainable = params
    else:
        trainable = layers * sum(plan.r * (i + o) + (o if plan.dora else 0) for _, i, o in adapted)
    if plan.kind == "qlora":
        weights = (
            layers * sum(quantized_bytes(i * o, plan.blocksize, plan.double_quant) for _, i, o in shape.linears())
            + shape.other_params() * c
        )
    else:
        weights = params * c
    est = Estimate(shape, plan, params, trainable)
    est.parts = {"weights": weights}
    t = c if plan.kind == "full" else plan.adapter_bytes
    if sharded:
        _estimate_sharded(est, adapted)
        return est
    if plan.kind != "full":  # a full fine-tune trains the weights themselves
        est.parts["adapter"] = trainable * t
    est.parts["gradients"] = trainable * t
    name, state = optimizer_bytes(trainable_tensors(shape, plan, adapted), plan, c if plan.kind == "full" else 4)
    est.parts[name] = state

    h, vocab = shape.hidden, shape.vocab
    checkpoint = tokens * h * c
    per_layer = tokens * _saved_per_token(shape, plan, adapted)
    if plan.checkpointing:
        stored = 2 * checkpoint if plan.offload_checkpoints else layers * checkpoint
        stored_name = "checkpoints (offloaded: 2 on GPU)" if plan.offload_checkpoints else "checkpoints"
        layer_recompute = per_layer
    else:
        stored, stored_name, layer_recompute = layers * (per_layer + checkpoint), "activations", 0
    dequant = max(i * o for _, i, o in shape.linears()) * c if plan.kind == "qlora" else 0
    # The Triton loss overwrites one chunk of logits with its gradient in place: one buffer.
    ce = {
        stored_name: stored,
        "final hidden + its gradient": 2 * tokens * h * c,
        "logits chunk": min(tokens, CE_CHUNK_TOKENS) * vocab * c,
    }
    if plan.kind == "full":
        ce["head gradient (fp32 + one product)"] = vocab * h * (4 + c)
    backward = {
        stored_name: stored,
        "hidden gradient": tokens * h * c,
        "recomputed layer": layer_recompute,
        "layer backward gradients": tokens * (3 * shape.ffn_width + 2 * h) * c,
        "dequantized weight": dequant,
    }
    est.phases = {"end of forward (loss)": ce, "backward of the last layer": backward}
    est.peak_phase = max(est.phases, key=lambda k: sum(est.phases[k].values()))
    return est


def _estimate_sharded(est: Estimate, adapted: list[tuple[str, int, int]]) -> None:
    """The parts and phases of one GPU of an adapter run sharded by FSDP2 over ``plan.gpus``.

    Resident: this GPU's shards of the frozen base (NF4 codes and absmax by blocks, the rest by
    rows), of the adapters, their gradients and AdamW moments, and the root unit (embeddings, head,
    final norm) gathered whole, as FSDP2 keeps the root's parameters from forward to the end of
    backward. Transient: whole decoder layers gathered (at the loss the last layer, which is not
    resharded after forward; in backward the layer being recomputed and the previous one prefetched)
    and one layer's unsharded adapter gradients before their reduce-scatter. Activations are those
    of one process (each rank runs its own micro-batches).
    """
    shape, plan = est.shape, est.plan
    n, c, t, layers = plan.gpus, plan.dtype_bytes, plan.adapter_bytes, shape.layers
    embeds = (1 if shape.tie_embeddings else 2) * _rows(shape.vocab, shape.hidden, n) + _rows(shape.hidden, 1, n)
    est.parts = {
        "weights (this GPU's shards)": layers * _layer_frozen_bytes(shape, plan, n) + embeds * c,
        "gathered embeddings, head, norm": _root_params(shape) * c,
    }
    local = layers * _layer_adapter_elems(shape, plan, adapted, n)
    est.parts["adapter (shards)"] = local * t
    est.parts["gradients (shards)"] = local * t
    est.parts["optimizer (AdamW m, v; shards)"] = 8 * local
    whole = _layer_frozen_bytes(shape, plan, 1) + _layer_adapter_elems(shape, plan, adapted, 1) * t
    # the phases of one process, plus what FSDP2 gathers
    single = estimate_memory(shape, replace(plan, gpus=1))
    est.phases = {phase: dict(items) for phase, items in single.phases.items()}
    est.phases["end of forward (loss)"]["gathered layer (FSDP2)"] = whole
    backward = est.phases["backward of the last layer"]
    backward["gathered layers (2, FSDP2)"] = 2 * whole
    backward["unsharded layer adapter gradients"] = _layer_adapter_elems(shape, plan, adapted, 1) * t
    est.peak_phase = max(est.phases, key=lambda k: sum(est.phases[k].values()))


def format_estimate(est: Estimate) -> str:
    """A plain-text table of the estimate in GiB."""

    def gib(n: int) -> str:
        return f"{n / 2**30:8.3f} GiB"

    s, p = est.shape, est.plan
    lines = [
        f"model: {s.layers} layers, hidden {s.hidden}, intermediate {s.intermediate}, heads {s.heads}/"
        f"{s.kv_heads}, vocab {s.vocab}; {est.params / 1e9:.3f} B params, "
        f"{est.trainable / 1e6:.2f} M trainable"
        + (
            f"; {s.experts} experts, {s.experts_per_tok} per token (intermediate {s.moe_intermediate}"
            + (f", shared expert {s.shared_intermediate}" if s.shared_intermediate else "")
            + f"), {s.active_params() / 1e9:.3f} B active params, routers {s.router_params() * s.layers / 1e6:.2f} M"
            if s.experts
            else ""
        ),
        f"plan: {p.kind}, seq {p.seq_len}{' (a pair: chosen + rejected)' if p.pair_rows else ''} x batch {p.batch}, "
        f"{8 * p.dtype_bytes}-bit compute, "
        f"gradient checkpointing {'on' if p.checkpointing else 'off'}"
        + (", checkpoints offloaded" if p.offload_checkpoints and p.checkpointing else "")
        + f", optimizer {p.optimizer}"
        + (f"; FSDP2 over {p.gpus} GPUs, per GPU" if p.gpus > 1 else ""),
        "",
    ]
    for name, value in est.parts.items():
        lines.append(f"  {name:<36}{gib(value)}")
    for phase, items in est.phases.items():
        mark = "  <- peak" if phase == est.peak_phase else ""
        lines.append(f"  during {phase}:{mark}")
        for name, value in items.items():
            if value:
                lines.append(f"    {name:<34}{gib(value)}")
    lines += [
        "",
        f"  predicted peak (max_memory_allocated) {gib(est.peak)}",
        "  (plus the CUDA context, ~0.3-0.5 GiB, and allocator slack)",
    ]
    return "\n".join(lines)


# What a device needs beyond the allocated peak: the CUDA context and the caching allocator's slack.
CONTEXT_BYTES = 512 * 2**20
SLACK = 0.10


def device_need(est: Estimate) -> int:
    """Device memory to plan for: the allocated peak plus allocator slack and the CUDA context."""
    return int(est.peak * (1 + SLACK)) + CONTEXT_BYTES


def advise(shape: ModelShape, plan: Plan, budget: int) -> list[str]:
    """Lines saying whether ``plan`` fits a device of ``budget`` bytes and, if not, which single
    changes would (each re-estimated, not guessed)."""
    est = estimate_memory(shape, plan)
    need = device_need(est)
    gib = 2**30
    if need <= budget:
        return [f"fits: needs about {need / gib:.2f} GiB of the {budget / gib:.2f} GiB budget"]
    lines = [f"does not fit: needs about {need / gib:.2f} GiB, the budget is {budget / gib:.2f} GiB"]
    options = []
    if not plan.checkpointing:
        options.append(
            ("gradient checkpointing on (train.gradient_checkpointing = true)", replace(plan, checkpointing=True))
        )
    elif not plan.offload_checkpoints:
        options.append(
            (
                "checkpoints offloaded to CPU memory (train.offload_checkpoints = true)",
                replace(plan, offload_checkpoints=True),
            )
        )
    if plan.kind != "full" and plan.adapter_bytes > 2:
        options.append(('bf16 adapters (train.adapter_dtype = "bfloat16")', replace(plan, adapter_bytes=2)))
    if plan.optimizer == "adamw" and plan.gpus == 1:  # 8-bit AdamW does not step FSDP2 shards
        options.append(('8-bit AdamW (train.optimizer = "adamw_8bit")', replace(plan, optimizer="adamw_8bit")))
    if plan.kind == "lora":
        options.append(('QLoRA (method.kind = "qlora")', replace(plan, kind="qlora")))
    if plan.gpus > 1:
        options.append((f"{2 * plan.gpus} GPUs (FSDP2 shards)", replace(plan, gpus=2 * plan.gpus)))
    if plan.kind != "full" and plan.r > 8:
        options.append((f"rank {plan.r // 2} (method.r)", replace(plan, r=plan.r // 2)))
    if plan.seq_len > 256:
        fewer = replace(plan, seq_len=plan.seq_len // 2)
        if plan.pair_rows:
            options.append((f"{plan.seq_len // 4} tokens per side of a pair (data.max_length)", fewer))
        else:
            options.append((f"{plan.seq_len // 2} tokens per sequence (data.max_length)", fewer))
    if plan.batch > 1:
        options.append(
            (
                f"batch {plan.batch // 2} (train.batch_size; raise train.grad_accum)",
                replace(plan, batch=plan.batch // 2),
            )
        )
    for text, changed in options:
        alt = device_need(estimate_memory(shape, changed))
        mark = "fits" if alt <= budget else "still over"
        lines.append(f"  with {text}: about {alt / gib:.2f} GiB ({mark})")
    return lines
