"""The LoRA linear layer: a frozen base projection plus a trainable low-rank update.

``y = base(x) + s * B(A(dropout(x)))`` with ``s = alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA).
DoRA rescales the adapted weight row-wise to a learned magnitude vector.

Over a dense ``nn.Linear`` the layer keeps the base tensors at its top level as ``weight`` and
``bias`` (the torchtune layout), so a base checkpoint's keys still load into the wrapped model. Over a
quantized base layer (QLoRA's NF4 linear) the packed weight has its own key set that no dense
checkpoint shares, so that layer is kept whole as the child ``base_layer``.

Adapter tensor names (``lora_A.weight`` (r, in), ``lora_B.weight`` (out, r),
``lora_magnitude_vector`` (out,)) are PEFT's, so exporting an adapter is a key prefix away.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tunex.kernels import lora_linear, registry
from tunex.kernels.gemv import linear, linear_facts


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    """PEFT's scaling: alpha / r, or alpha / sqrt(r) for rank-stabilised LoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class LoRALinear(nn.Module):
    """A frozen linear layer with a trainable low-rank adapter.

    Args:
        base: the layer to adapt: an ``nn.Linear`` or a quantized linear exposing ``in_features``,
            ``out_features``, ``bias`` and ``dequantize()`` (the NF4 base layer).
        r: adapter rank.
        alpha: scaling numerator.
        dropout: dropout probability on the adapter's input (training only).
        use_rslora: scale by ``alpha / sqrt(r)`` instead of ``alpha / r``.
        use_dora: learn a per-output-row magnitude (DoRA); initialised to the base weight's row norms.
    """

    def __init__(
        self,
        base: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
    ) -> None:
        super().__init__()
        self.in_features = int(base.in_features)
        self.out_features = int(base.out_features)
        self.r = r
        self.alpha = alpha
        self.scaling = lora_scaling(r, alpha, use_rslora)
        self.use_dora = use_dora
        if isinstance(base, nn.Linear):
            base.weight.requires_grad_(False)
            self.weight = base.weight
            self.bias = base.bias
            if self.bias is not None:
                self.bias.requires_grad_(False)
            self.base_layer = None
        else:
            base.requires_grad_(False)
            self.base_layer = base
        weight_like = self._adapter_reference(base)
        factory = {"device": weight_like.device, "dtype": weight_like.dtype}
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **factory)
        self.reset_adapter()
        if use_dora:
            self.lora_magnitude_vector = nn.Parameter(self.dense_weight().norm(p=2, dim=1).to(**factory))
        else:
            self.lora_magnitude_vector = None

    @staticmethod
    def _adapter_reference(base: nn.Module) -> torch.Tensor:
        """A tensor whose device and dtype the adapter takes: the base weight, or for a quantized
        base its compute dtype (adapters train in floating point next to an int4 base)."""
        if isinstance(base, nn.Linear):
            return base.weight
        dtype = getattr(base, "compute_dtype", None) or torch.float32
        device = next(iter(base.buffers()), next(iter(base.parameters()), torch.empty(0))).device
        return torch.empty(0, dtype=dtype, device=device)

    def reset_adapter(self) -> None:
        """A as nn.Linear's default (Kaiming uniform), B zero: the adapted layer starts as the base."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def dense_weight(self) -> torch.Tensor:
        """The base weight as a dense (out, in) tensor, dequantized for a quantized base."""
        if self.base_layer is None:
            return self.weight
        return self.base_layer.dequantize()

    def delta_weight(self) -> torch.Tensor:
        """``s * B @ A``, shape (out, in)."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.base_layer is None:
            return F.linear(x, self.weight, self.bias)
        return self.base_layer(x)

    def _base_bias(self) -> torch.Tensor | None:
        return self.bias if self.base_layer is None else getattr(self.base_layer, "bias", None)

    # the decoder may pass ``x_recompute`` and ``kept`` (see tunex.kernels.lora_linear) to save memory
    recomputes_input = True

    def forward(self, x: torch.Tensor, x_recompute=None, kept: bool = False) -> torch.Tensor:
        if self._decodes(x):
            # Decoding one token on the CPU with the adapter unmerged (chat --adapter, the eval
            # hook): the multi-core GEMV for the base, two small products for the adapter.
            # (bf16 adapters, train.adapter_dtype, are cast to x's dtype; a no-op otherwise)
            lora = linear(linear(x, self.lora_A.weight.to(x.dtype)), self.lora_B.weight.to(x.dtype))
            return linear(x, self.weight, self.bias).add_(lora, alpha=self.scaling)
        if self.lora_magnitude_vector is None:
            # One autograd node for base + adapter (tunex.kernels): it keeps only x and the
            # (tokens, r) projection for backward, not a dropped copy of x per adapted module,
            # and re-dequantizes a 4-bit base in backward instead of holding the dense weight.
            base = self.weight if self.base_layer is None else self.base_layer.dequantize
            p = self.lora_dropout.p if isinstance(self.lora_dropout, nn.Dropout) else 0.0
            return lora_linear(
                x,
                base,
                self.lora_A.weight,
                self.lora_B.weight,
                self.scaling,
                bias=self._base_bias(),
                dropout=p,
                training=self.training,
                x_recompute=x_recompute,
                kept=kept,
            )
        out = self._base_forward(x)
        dropped = self.lora_dropout(x)
        a = self.lora_A.weight
        b = self.lora_B.weight
        lora = F.linear(F.linear(dropped.to(a.dtype), a), b) * self.scaling  # (..., out)
        return out + self._dora_term(x, dropped, out, lora).to(out.dtype)

    def _decodes(self, x: torch.Tensor) -> bool:
        """Whether the registry's lora_linear row is "gemv" for ``x``: one float32 CPU row without
        autograd through an unmerged adapter over a dense base, in eval mode, no DoRA."""
        if self.training or self.lora_magnitude_vector is not None or self.base_layer is not None:
            return False
        facts = linear_facts(x, self.weight, self.bias)
        facts.grad = torch.is_grad_enabled()
        return registry.choose("lora_linear", facts) == "gemv"

    def _dora_term(self, x: torch.Tensor, dropped: torch.Tensor, out: torch.Tensor, lora: torch.Tensor) -> torch.Tensor:
        """DoRA's correction on top of the base output, as PEFT computes it.

        The row norm of ``W + dW`` is treated as a constant (detached), as in the DoRA paper
        (section 4.3): it saves the backward through the full weight.
        """
        weight = self.dense_weight().to(lora.dtype)
        norm = (weight + self.delta_weight()).norm(p=2, dim=1).detach()  # (out,)
        scale = self.lora_magnitude_vector / norm  # (out,)
        if not (self.training and isinstance(self.lora_dropout, nn.Dropout)):
            bias = self._base_bias()
            base = out.to(lora.dtype) if bias is None else out.to(lora.dtype) - bias.to(lora.dtype)
        else:
            # With dropout PEFT applies the magnitude to the base projection of the dropped input.
            base = F.linear(dropped.to(lora.dtype), weight)
        return (scale - 1) * base + scale * lora

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"alpha={self.alpha}, dora={self.use_dora}, quantized={self.base_layer is not None}"
        )
