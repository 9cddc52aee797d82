"""``NF4Linear``: the frozen 4-bit base layer of QLoRA.

The weight is held packed (about 0.516 bytes per parameter with double quant at blocksize 64) and
dequantized on every forward into the compute dtype; the backward dequantizes again instead of
keeping the dense weight alive between forward and backward. Gradients flow to the input (and to
the bias, if someone unfroze it), never to the packed weight. LoRA adapters wrap this layer
(``tunex.peft.LoRALinear`` keeps it as ``base_layer``).

The state dict is bitsandbytes' ``Linear4bit`` layout (``weight``, ``bias``, ``weight.absmax``, ...;
see ``tunex.quant.serialize``), so either library loads the other's.

For FSDP2 (``train.fsdp``), ``shard_by_blocks`` turns the packed codes and the per-block absmax into
frozen parameters with one quantization block per row, (blocks, blocksize / 2) and (blocks,), so
that FSDP2's dim-0 sharding gives every rank whole blocks together with their own scales; the
codebooks and the double-quantization state (one float32 per 256 blocks, and the offset) stay
replicated buffers. See docs/SCALING.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tunex.kernels._dispatch import frozen_product_dtype, no_autocast
from tunex.quant.serialize import STATE_SUFFIXES, from_state_dict, quant_state_key, to_state_dict
from tunex.quant.weight import NestedAbsmax, QuantizedWeight, dequantize, quantize

# Buffers that hold the quantization state; they follow device moves but never dtype casts.
_STATE_BUFFERS = ("weight", "absmax", "quant_map", "nested_absmax", "nested_quant_map")


class _DequantLinear(torch.autograd.Function):
    """y = x @ dequant(W)^T + b; the backward dequantizes W again rather than saving it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, layer: NF4Linear, dtype: torch.dtype):
        ctx.layer, ctx.dtype = layer, dtype
        with no_autocast(x):  # x is in dtype already; the backward then gets gradients in it too
            return F.linear(x, layer.dequantize(dtype), bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ ctx.layer.dequantize(ctx.dtype)  # (..., out) @ (out, in)
        if ctx.needs_input_grad[1]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, grad_bias, None, None


class NF4Linear(nn.Module):
    """A linear layer whose weight is stored in 4 bits (NF4 or FP4) and frozen.

    Args:
        qweight: the quantized (out_features, in_features) weight.
        bias: optional (out_features,) bias, kept frozen.
        compute_dtype: dtype of the matmul; None means bfloat16 on CUDA and float32 elsewhere.
            The output is returned in the input's dtype.
    """

    def __init__(
        self, qweight: QuantizedWeight, bias: torch.Tensor | None = None, compute_dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        if len(qweight.shape) != 2:
            raise ValueError(
                f"NF4Linear needs a 2-D (out_features, in_features) weight, got shape {tuple(qweight.shape)}"
            )
        self.out_features, self.in_features = (int(d) for d in qweight.shape)
        self.compute_dtype = compute_dtype
        self._set_weight(qweight)
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({self.out_features},)")
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
        name: str = "weight",
    ) -> NF4Linear:
        """Quantize a dense ``nn.Linear`` (its weight dtype becomes the layer's ``weight_dtype``)."""
        qweight = quantize(linear.weight.detach(), quant_type, blocksize, double_quant, name=name)
        return cls(qweight, linear.bias, compute_dtype)

    @classmethod
    def from_state_dict(
        cls, state_dict, prefix: str = "", compute_dtype: torch.dtype | None = None, *, source: str = "state dict"
    ) -> NF4Linear:
        """Build the layer saved under ``prefix`` (``prefix + "weight"``, ``prefix + "weight.absmax"``,
        ..., optional ``prefix + "bias"``) in bitsandbytes' layout, e.g. from a ``tunex quantize``
        checkpoint. ``source`` names the file in errors."""
        weight = prefix + "weight"
        keys = {k: v for k, v in state_dict.items() if k == weight or k.startswith(weight + ".")}
        qweight = from_state_dict(keys, weight, source=source)
        return cls(qweight, state_dict.get(prefix + "bias"), compute_dtype)

    # -- the quantized weight, kept as buffers so .to(device) and buffers() see it -------------
    def _set_weight(self, qw: QuantizedWeight) -> None:
        self.quant_type, self.blocksize, self.weight_dtype = qw.quant_type, qw.blocksize, qw.dtype
        for name in ("weight", "absmax"):  # a new weight comes in bitsandbytes' flat layout, as buffers
            self._parameters.pop(name, None)
        self.register_buffer("weight", qw.packed, persistent=True)
        self.register_buffer("absmax", qw.absmax, persistent=False)
        self.register_buffer("quant_map", qw.code, persistent=False)
        nested = qw.nested
        self.register_buffer("nested_absmax", None if nested is None else nested.absmax, persistent=False)
        self.register_buffer("nested_quant_map", None if nested is None else nested.code, persistent=False)
        self.nested_offset = None if nested is None else nested.offset
        self.nested_blocksize = None if nested is None else nested.blocksize

    def shard_by_blocks(self) -> bool:
        """Make the packed codes and the absmax frozen parameters laid out one quantization block per
        row, for FSDP2 to shard along dim 0 (it shards parameters, never buffers): codes (blocks,
        blocksize / 2) uint8 and absmax (blocks,), so a rank's rows of both are the same whole
        blocks. False (and nothing changes) when the weight does not split into whole blocks.

        The layout changes no values: ``qweight`` reads both back flat, and the state dict keeps
        bitsandbytes' layout. Under a MixedPrecisionPolicy FSDP2 leaves the uint8 tensors alone but
        would cast a float32 absmax (no double quant) to the compute dtype, so adapter runs shard
        without one (``tunex.dist.wrap``).
        """
        blocks, rem = divmod(self.out_features * self.in_features, self.blocksize)
        if rem or not blocks or self.sharded_by_blocks:
            return False
        for name, shape in (("weight", (blocks, self.blocksize // 2)), ("absmax", (blocks,))):
            tensor = self._buffers.pop(name)
            self._non_persistent_buffers_set.discard(name)
            self.register_parameter(name, nn.Parameter(tensor.reshape(shape), requires_grad=False))
        return True

    @property
    def sharded_by_blocks(self) -> bool:
        """Whether ``shard_by_blocks`` made the codes and absmax parameters (for FSDP2)."""
        return "weight" in self._parameters

    @property
    def qweight(self) -> QuantizedWeight:
        nested = None
        if self.nested_absmax is not None:
            nested = NestedAbsmax(
                absmax=self.nested_absmax,
                code=self.nested_quant_map,
                offset=self.nested_offset,
                blocksize=self.nested_blocksize,
            )
        return QuantizedWeight(  # flat views: the layout of shard_by_blocks reads back as bitsandbytes'
            packed=self.weight.reshape(-1, 1),
            absmax=self.absmax.reshape(-1),
            shape=torch.Size((self.out_features, self.in_features)),
            dtype=self.weight_dtype,
            quant_type=self.quant_type,
            blocksize=self.blocksize,
            code=self.quant_map,
            nested=nested,
        )

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) / .half() would cast the float32 absmax and codebooks and corrupt them;
        # the quantization state only follows the device that `fn` moves tensors to.
        # (after shard_by_blocks the codes and absmax are frozen parameters: the same applies to them)
        state = {
            name: (where, where.pop(name))
            for name in _STATE_BUFFERS
            for where in (self._parameters if name in self._parameters else self._buffers,)
        }
        try:
            super()._apply(fn, recurse)
            device = fn(torch.empty(0, dtype=torch.uint8, device=state["weight"][1].device)).device
        finally:
            for name, (where, tensor) in state.items():
                where[name] = tensor
        for name, (where, tensor) in state.items():
            if isinstance(tensor, nn.Parameter):
                where[name] = nn.Parameter(tensor.to(device), requires_grad=False)
            elif tensor is not None:
                where[name] = tensor.to(device)
        return self

    def resolved_compute_dtype(self) -> torch.dtype:
        if self.compute_dtype is not None:
            return self.compute_dtype
        return torch.bfloat16 if self.weight.is_cuda else torch.float32

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense (out_features, in_features) weight in ``dtype`` (default: the compute dtype)."""
        # after shard_by_blocks FSDP2 owns the storage, which must stay resizable
        return dequantize(self.qweight, dtype or self.resolved_compute_dtype(), keep_resizable=self.sharded_by_blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # under CPU autocast the product runs in bf16, the output returns to x's float32
        dtype = frozen_product_dtype(x) or self.resolved_compute_dtype()
        bias = None if self.bias is None else self.bias.to(dtype)
        return _DequantLinear.apply(x.to(dtype), bias, self, dtype).to(x.dtype)

    # -- bitsandbytes' state-dict layout ------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # bitsandbytes' order: weight, bias, then the quantization state of the weight.
        entries = to_state_dict(self.qweight, prefix + "weight")
        destination[prefix + "weight"] = entries.pop(prefix + "weight")
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias
        destination.update(entries)
        if not keep_vars:
            for key in (prefix + "weight", prefix + "bias", *entries):
                if key in destination:
                    destination[key] = destination[key].detach()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        weight_prefix = prefix + "weight"
        if quant_state_key(state_dict, weight_prefix) is None:
            missing_keys.append(weight_prefix + ".quant_state.bitsandbytes__" + self.quant_type)
            return
        keys = [k for k in state_dict if k == weight_prefix or k.startswith(weight_prefix + ".")]
        try:
            qw = from_state_dict({k: state_dict[k] for k in keys}, weight_prefix, source="state dict")
        except ValueError as exc:
            error_msgs.append(str(exc))
            return
        if tuple(qw.shape) != (self.out_features, self.in_features):
            error_msgs.append(
                f"{weight_prefix}: shape {tuple(qw.shape)} in the checkpoint, "
                f"expected {(self.out_features, self.in_features)} for this layer"
            )
            return
        self._set_weight(qw.to(self.weight.device))
        bias_key = prefix + "bias"
        if self.bias is not None:
            if bias_key in state_dict:
                with torch.no_grad():
                    self.bias.copy_(state_dict[bias_key])
            else:
                missing_keys.append(bias_key)
        elif bias_key in state_dict:
            unexpected_keys.append(bias_key)
        known = {
            weight_prefix,
            bias_key,
            *(f"{weight_prefix}.{s}" for s in STATE_SUFFIXES),
            quant_state_key(state_dict, weight_prefix),
        }
        unexpected_keys.extend(k for k in keys if k not in known)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"quant_type={self.quant_type}, blocksize={self.blocksize}, double_quant={self.nested_absmax is not None}"
        )
