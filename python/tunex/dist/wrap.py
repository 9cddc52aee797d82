"""Wrapping a built model for data-parallel training.

The loop trains through a :class:`LossModule`: a module whose forward returns the loss, because
DDP and FSDP2 act when a module's forward runs (DDP prepares its gradient reducer, FSDP2 gathers
parameter shards), and the loss needs the output head, which lives outside the decoder's forward.

- Alone: the plain LossModule.
- LoRA / QLoRA: DDP over the trainable parameters only. The frozen base (dense or NF4) is listed
  in ``_ddp_params_and_buffers_to_ignore``: DDP builds no gradient buckets for it and does not
  broadcast it at start-up (every rank loaded the same weights from the same files).
- Full fine-tune: FSDP2 (``fully_shard``) on each decoder layer, then on the model as root:
  parameters, gradients and AdamW state are sharded across ranks (ZeRO-3-like). On CUDA a
  MixedPrecisionPolicy gathers parameters in the compute dtype and reduces gradients in fp32.
- LoRA / QLoRA with ``train.fsdp``: the same FSDP2 units over the frozen base too, for models whose
  base does not fit one device. A QLoRA base's packed NF4 codes and absmax become frozen uint8 (or
  float32) parameters one quantization block per row (``NF4Linear.shard_by_blocks``), so each rank
  holds whole blocks with their scales; the codebooks and double-quant state stay replicated
  buffers. No MixedPrecisionPolicy: parameters are gathered as stored (a policy would cast a float32
  absmax to bf16) and gradients reduced in the adapters' dtype, as DDP does; the compute dtype comes
  from autocast and the NF4 layer's dequantization, as in a DDP run.
- A LLaVA model (``[vision]``), whatever the method: DDP over its trainable part (projector, adapters
  or the whole LLM); a micro-batch without images leaves the projector unused, which DDP is told to
  look for.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from tunex.dist.env import DistEnv


class LossModule(nn.Module):
    """``forward(input_ids, labels, position_ids, denom=None) -> token loss`` of a tunex causal LM:
    the summed token loss over ``denom`` (None: over the batch's own target tokens, its mean).
    A LLaVA model takes the batch's images too (``pixel_values``)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor | None,
        denom: float | None = None,
        pixel_values: torch.Tensor | None = None,
    ) -> torch.Tensor:
        from tunex.train.build import forward_hidden, output_head
        from tunex.train.loss import linear_cross_entropy, shifted, softcapped_cross_entropy

        hidden = forward_hidden(self.lm, input_ids, position_ids, pixel_values)  # (B, T, H)
        weight, bias = output_head(self.lm)
        h, y = shifted(hidden, labels)
        cap = getattr(self.lm, "logit_softcap", None)
        if cap:  # soft-capped logits (Gemma 2): chunk by chunk, then torch's cross-entropy
            loss = softcapped_cross_entropy(h, weight, y, bias, cap, denom=denom)
        else:
            loss = linear_cross_entropy(h, weight, y, bias, denom=denom)
        aux = getattr(self.lm, "router_aux_loss", None)  # MoE models: the routers' load-balancing loss
        extra = aux() if callable(aux) else None
        if extra is None:
            return loss
        if denom is not None:  # this micro-batch's share of the global batch's tokens: a token-weighted mean
            extra = extra * (int((y != -100).sum()) / denom)
        return loss + extra


def _fsdp():
    """FSDP2's public home (torch >= 2.6), else where torch 2.4-2.5 kept it."""
    try:
        from torch.distributed import fsdp as api

        api.fully_shard  # noqa: B018 - the attribute decides which home this torch has
    except (ImportError, AttributeError):
        from torch.distributed._composable import fsdp as api
    return api


def strategy(kind: str, env: DistEnv, fsdp: bool = False, multimodal: bool = False) -> str:
    """ "single", "ddp" (adapters) or "fsdp" (full fine-tune, or adapters with ``train.fsdp``).

    ``multimodal``: a LLaVA model (``[vision]``), which trains under DDP whatever the method: each
    process holds the whole model (FSDP2's units are decoder layers of a plain LM).
    """
    if not env.enabled:
        return "single"
    if multimodal:
        return "ddp"
    return "fsdp" if kind == "full" or fsdp else "ddp"


def _frozen_names(module: nn.Module) -> list[str]:
    names = [n for n, p in module.named_parameters() if not p.requires_grad]
    return names + [n for n, _ in module.named_buffers()]


def _decoder_layers(lm: nn.Module) -> list[nn.Module]:
    inner = getattr(lm, "model", lm)
    return list(getattr(inner, "layers", []))


def mixed_precision(train_dtype: str, device: torch.device):
    """FSDP2's policy on CUDA: gather params in the compute dtype, reduce grads in fp32; None on CPU
    or for fp32 training (the sharded parameters keep the weights' dtype)."""
    if device.type != "cuda" or train_dtype == "float32":
        return None
    compute = torch.float16 if train_dtype == "float16" else torch.bfloat16
    return _fsdp().MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)


def shard_nf4_bases(lm: nn.Module) -> None:
    """Lay out every NF4 base layer's codes and absmax for FSDP2 (``NF4Linear.shard_by_blocks``;
    a weight that is not whole blocks stays a replicated buffer)."""
    from tunex.quant import NF4Linear

    for m in lm.modules():
        if isinstance(m, NF4Linear):
            m.shard_by_blocks()


def nf4_layers(lm: nn.Module) -> tuple[int, int, int, int]:
    """(NF4 base layers sharded by blocks, all NF4 base layers, bytes of the sharded layers' codes
    and absmax this rank holds, bytes of them all) of ``lm``."""
    from tunex.quant import NF4Linear

    layers = [m for m in lm.modules() if isinstance(m, NF4Linear)]
    sharded = [m for m in layers if m.sharded_by_blocks]

    def nbytes(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    mine = sum(nbytes(local_tensor(m.weight)) + nbytes(local_tensor(m.absmax)) for m in sharded)
    every = sum(nbytes(m.weight) + nbytes(m.absmax) for m in sharded)  # a DTensor counts its global shape
    return len(sharded), len(layers), mine, every


def shard_full_model(
    lm: nn.Module, env: DistEnv, device: torch.device, train_dtype: str, adapters: bool = False
) -> nn.Module:
    """FSDP2 on every decoder layer, then the root; ``hidden_states`` counts as a forward.

    ``adapters``: a LoRA / QLoRA model (``train.fsdp``): NF4 bases are laid out by blocks first and
    no MixedPrecisionPolicy is used (see the module docstring).
    """
    from torch.distributed.device_mesh import init_device_mesh

    api = _fsdp()
    if adapters:
        shard_nf4_bases(lm)
    mesh = init_device_mesh(device.type, (env.world_size,))
    options: dict[str, Any] = {"mesh": mesh}
    policy = None if adapters else mixed_precision(train_dtype, device)
    if policy is not None:
        options["mp_policy"] = policy
    layers = _decoder_layers(lm)
    for i, layer in enumerate(layers):
        # the last layer's shards would be gathered again at once by backward: keep them
        api.fully_shard(layer, reshard_after_forward=i < len(layers) - 1, **options)
    api.fully_shard(lm, **options)
    # the loop calls lm.hidden_states, not lm.forward: it must gather the root's shards too
    api.register_fsdp_forward_method(lm, "hidden_states")
    # FSDP2 warns that the root returns a view (in-place ops on it would skip its backward hook);
    # the loss only slices and reads the hidden states, and generation runs without autograd.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    return lm


def wrap_for_training(
    lm: nn.Module,
    kind: str,
    env: DistEnv,
    device: torch.device,
    train_dtype: str = "float32",
    make_loss: Any = None,
    sequence=None,
    fsdp: bool = False,
) -> nn.Module:
    """The module the loop calls for a micro-batch's loss (see the module docstring).

    ``make_loss``: lm -> the loss module (default :class:`LossModule`; the preference objectives
    pass theirs). ``sequence``: a :class:`tunex.dist.sequence.SequenceGroup` for sequence
    parallelism (the loss module then runs this rank's slice of each sequence); None: each rank its
    whole micro-batches. ``fsdp``: ``train.fsdp`` (adapter runs sharded by FSDP2 instead of DDP).

    Collect the optimizer's parameters from ``lm`` *after* this call: FSDP2 replaces them by
    sharded ones.
    """
    make_loss = make_loss or LossModule
    if device.type == "cpu":  # the heap is kept mapped between steps instead of faulted in again
        from tunex.runtime.malloc import tune_malloc

        tune_malloc()
    multimodal = getattr(lm, "vision_tower", None) is not None
    how = strategy(kind, env, fsdp, multimodal)

    def loss_module(model: nn.Module) -> nn.Module:
        if sequence is None:
            return make_loss(model)
        if make_loss is not LossModule:  # refused at config load (preference objectives split no sequences)
            raise ValueError("sequence parallelism runs the token loss only, not a preference objective's loss")
        from tunex.dist.sequence import SequenceLossModule

        return SequenceLossModule(model, sequence)

    if how == "fsdp":
        return loss_module(shard_full_model(lm, env, device, train_dtype, adapters=kind != "full"))
    loss = loss_module(lm)
    if how == "single":
        return loss
    from torch.nn.parallel import DistributedDataParallel

    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(loss, _frozen_names(loss))
    ids = [device.index if device.index is not None else 0] if device.type == "cuda" else None
    # A LLaVA model's projector (and tower adapters) take no part in a micro-batch without images:
    # DDP then has to find them unused (left without a gradient where no rank used them, as alone).
    # every buffer is in the ignore list too, so DDP has no buffers to sync before forward
    return DistributedDataParallel(loss, device_ids=ids, find_unused_parameters=multimodal)


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` (a wrap_for_training result) trains FSDP2-sharded."""
    if not torch.distributed.is_available():
        return False
    inner = getattr(module, "lm", module)
    return isinstance(inner, _fsdp().FSDPModule)


@contextlib.contextmanager
def gradient_sync(module: nn.Module, last: bool) -> Iterator[None]:
    """Around one micro-batch's forward+backward: reduce gradients across ranks only on ``last``.

    DDP skips the all-reduce (``no_sync``) on all but the last micro-batch of a step. FSDP2
    reduce-scatters every micro-batch: holding unsharded gradients until the last one would cost
    a full model of gradient memory per rank, which sharding exists to avoid.
    """
    if isinstance(module, nn.parallel.DistributedDataParallel) and not last:
        with module.no_sync():
            yield
    else:
        yield


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's shard on this rank (a plain tensor is its own shard)."""
    return t.to_local() if hasattr(t, "to_local") else t


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered whole (a plain tensor as it is)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def clip_gradients(params: list[torch.Tensor], max_norm: float) -> float:
    """Total gradient 2-norm (before clipping) over all ranks' shards; clips when ``max_norm`` > 0."""
    grads = [p.grad for p in params if p.grad is not None]
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    elif not grads:
        norm = torch.zeros(())
    elif hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6; sharded gradients too
        norm = torch.nn.utils.get_total_norm(grads)
    else:
        norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
    return float(full_value(norm))


def after_eval(module: nn.Module) -> None:
    """Free the gathered parameters that an eval forward (no backward to reshard them) left behind."""
    if is_sharded(module):
        for sub in module.lm.modules():
            if isinstance(sub, _fsdp().FSDPModule):
                sub.reshard()
