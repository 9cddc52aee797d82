"""Turning a config into the things the loop runs: the device, the model with its trainable part
(full / LoRA / QLoRA), the forward to final hidden states, and and the output head.

This is the one module that knows how a tunex model is called, so the loop stays model-agnostic.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from tunex.errors import TunexError
from tunex.peft import apply_lora

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def weights_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` = bfloat16 on CUDA, float32 on CPU (where bf16 element-wise work is slow; for bf16
    matmuls on the CPU, ``train.dtype = "bfloat16"`` keeps float32 weights, see ``autocast``)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def autocast(train_dtype: str, device: torch.device):
    """bf16/fp16 autocast on CUDA. On the CPU, ``bfloat16`` turns on CPU autocast, under which
    tunex's layers run their frozen-weight products in bf16 and everything else in float32
    (``tunex.kernels._dispatch.frozen_product_dtype``); otherwise the CPU trains in the weights' dtype."""
    if device.type != "cuda":
        if device.type == "cpu" and train_dtype == "bfloat16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()
    dtype = torch.float16 if train_dtype == "float16" else torch.bfloat16
    if train_dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype)


def preflight(cfg: Any, tokenizer) -> None:
    """What can be checked before any data is tokenized or file written: the model's config.json
    (a known architecture, every key its family needs), the tokenizer fitting the embedding, and the
    LoRA targets matching modules of the model (built on the meta device: no weights read).

    Raises:
        FormatError / TunexError: one line naming the file or key, what was expected and the fix.
    """
    from tunex.errors import ConfigError, TunexError
    from tunex.models import resolve_model_path
    from tunex.models.config import check_tokenizer_fits, tunex_targets
    from tunex.models.loading import meta_model
    from tunex.peft import select_targets

    folder = resolve_model_path(cfg.model.path)
    model_cfg = model_config(cfg)
    check_tokenizer_fits(tokenizer, model_cfg, folder, cfg.model.tokenizer)
    check_context(cfg, model_cfg)
    if cfg.train.router_aux_loss_coef and not model_cfg.num_experts:
        raise TunexError(
            f"{cfg.source}: train.router_aux_loss_coef: {model_cfg.family} has no router (only mixture-of-experts "
            "models do); set train.router_aux_loss_coef = 0"
        )
    if cfg.train.sequence_parallel > 1:
        from tunex.dist.sequence import check_model

        check_model(model_cfg, cfg.train.sequence_parallel, cfg.source)
    if cfg.method.kind != "full":
        try:
            select_targets(meta_model(model_cfg), tunex_targets(cfg.method.target_modules, model_cfg))
        except ConfigError as e:
            raise TunexError(f"{cfg.source}: method.target_modules: {e.problems[0]}") from None


def model_config(cfg: Any):
    """The model's config as the run trains it: for tunex's own decoder its
    :class:`tunex.models.ModelConfig` with ``model.rope_scaling`` in place of the checkpoint's rope
    scaling; for the transformers backend (``model.backend``) its ``HFConfig``, which takes no
    ``model.rope_scaling``.

    Raises:
        TunexError: a ``model.rope_scaling`` this model cannot take, naming the key.
    """
    from tunex.errors import FormatError
    from tunex.models import resolve_model_path
    from tunex.models.config import ModelConfig, with_rope_scaling
    from tunex.models.hf_backend import model_config as backend_config

    model_cfg = backend_config(resolve_model_path(cfg.model.path), cfg.model.backend)
    if not isinstance(model_cfg, ModelConfig):
        if cfg.model.rope_scaling:
            raise TunexError(
                f"{cfg.source}: model.rope_scaling: {model_cfg.family} runs through the transformers backend, "
                "which reads its rope scaling from config.json; set rope_scaling there and model.rope_scaling = {}"
            )
        return model_cfg
    try:
        return with_rope_scaling(model_cfg, cfg.model.rope_scaling, f"{cfg.source}: model.rope_scaling")
    except FormatError as e:
        raise TunexError(str(e)) from None


def check_context(cfg: Any, model_cfg) -> None:
    """Warn when ``data.max_length`` is longer than the context the model's RoPE settings are made
    for (positions past it are untrained), naming the key that extends it. tunex's own decoder only
    (a transformers-backend model's rope settings are transformers')."""
    import warnings

    from tunex.models.config import ModelConfig, rope_context

    if not isinstance(model_cfg, ModelConfig):
        return
    limit = rope_context(model_cfg)
    if cfg.data.max_length > limit:
        warnings.warn(
            f"{cfg.source}: data.max_length = {cfg.data.max_length} is longer than the {limit} positions the "
            f'model\'s RoPE settings cover; set model.rope_scaling (e.g. {{type = "yarn", factor = '
            f"{-(-cfg.data.max_length // limit)}.0}}) to extend the context (docs/TRAINING.md)",
            stacklevel=2,
        )


def build_model(cfg: Any, device: torch.device, load_device: torch.device | None = None) -> nn.Module:
    """Load ``cfg.model`` and make exactly the part ``cfg.method`` trains require grad.

    Full: every parameter. LoRA: adapters on the targets over the dense base. QLoRA: the base
    linears are quantized to NF4/FP4 while loading, adapters on top. Adapters are kept in fp32
    whatever the base dtype, so the optimizer's updates are not lost to bf16 rounding.
    """
    from tunex.train.multimodal import build_llava, is_multimodal

    if is_multimodal(cfg):  # [vision]: tower + projector around the LLM this function builds
        return build_llava(cfg, device, _build_llm, load_device)
    return _build_llm(cfg, device, load_device)


def _build_llm(cfg: Any, device: torch.device, load_device: torch.device | None = None) -> nn.Module:
    from tunex.models import load_model, resolve_model_path

    method = cfg.method
    path = resolve_model_path(cfg.model.path)
    dtype = weights_dtype(cfg.model.dtype, device)
    quantize = None
    if method.kind == "qlora":
        from tunex.quant import NF4Linear

        compute = weights_dtype(method.compute_dtype, device)

        def quantize(name: str, linear: nn.Linear) -> nn.Module:
            # called per decoder layer while loading, so the dense weights never all coexist
            return NF4Linear.from_linear(linear, method.quant_type, method.blocksize, method.double_quant, compute)

    # load_device: for FSDP2 the weights stay on the CPU (memory maps when the file's dtype is the
    # weights' dtype) and fully_shard moves one layer at a time to the GPU as it shards it
    model = load_model(
        path,
        dtype=dtype,
        device=load_device or device,
        quantize=quantize,
        backend=cfg.model.backend,
        rope_scaling=cfg.model.rope_scaling,
    )
    if cfg.train.router_aux_loss_coef:  # preflight refused it for models without routers
        model.router_aux_loss_coef = cfg.train.router_aux_loss_coef
    if method.kind == "full":
        model.requires_grad_(True)
    else:
        from tunex.models.config import tunex_targets

        targets = tunex_targets(method.target_modules, model.config)  # InternLM2's own names too
        apply_lora(model, targets, method.r, method.alpha, method.dropout, method.use_rslora, method.use_dora)
        # adapters in float32 (default) or bf16 (train.adapter_dtype; stepped by BF16AdamW or AdamW8bit)
        adapter = torch.bfloat16 if cfg.train.adapter_dtype == "bfloat16" else torch.float32
        for p in model.parameters():
            if p.requires_grad and p.dtype != adapter:
                p.data = p.data.to(adapter)
    return model


def enable_gradient_checkpointing(model: nn.Module, offload: bool = False) -> None:
    """Recompute each decoder layer's activations in backward (the model's own switch).

    Dropout masks are reproduced in the recomputation (the RNG state is preserved), so results
    equal a run without checkpointing. ``offload`` (``train.offload_checkpoints``): each layer's
    checkpointed input waits for backward in (pinned) CPU memory instead of on the GPU
    (tunex.runtime.offload.offloaded_checkpoint), the same gradients.
    """
    model.gradient_checkpointing = True
    if offload:
        decoder = getattr(model, "model", None)
        if decoder is None or not hasattr(decoder, "offload_checkpoints"):
            raise TunexError(
                f"train.offload_checkpoints: {type(model).__name__} is not a tunex decoder, which is what "
                "offloads checkpoints; set train.offload_checkpoints = false"
            )
        decoder.offload_checkpoints = True


def forward_hidden(
    model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor | None, pixel_values=None
) -> torch.Tensor:
    """Final (normed) hidden states (B, T, H) of a tunex causal LM (a LLaVA model takes the batch's
    images too)."""
    if pixel_values is not None:
        return model.hidden_states(input_ids, position_ids, pixel_values=pixel_values)
    return model.hidden_states(input_ids, position_ids)


def output_head(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight (V, H), bias or None) of the output projection (tied to the embedding or not)."""
    head = model.lm_head
    weight = head.weight if hasattr(head, "weight") and head.weight is not None else head.dense_weight()
    return weight, getattr(head, "bias", None)
