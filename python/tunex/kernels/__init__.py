"""GPU kernels with CPU fallbacks.

Each kernel is a torch reference, an autograd function with a hand-derived backward, and (except
the LoRA linear, whose matmuls belong to cuBLAS) a Triton implementation. Calls pick Triton for CUDA
tensors and torch elsewhere; ``backend=`` or ``TUNEX_KERNELS`` override that (see _dispatch.py).
Triton is imported only when a Triton path actually runs.
"""

from __future__ import annotations

from tunex.kernels.cross_entropy import chunked_cross_entropy, cross_entropy_reference
from tunex.kernels.lora import lora_linear, lora_linear_reference
from tunex.kernels.rmsnorm import rms_norm, rms_norm_reference
from tunex.kernels.rope import apply_rope, rope, rope_reference
from tunex.kernels.swiglu import swiglu, swiglu_reference

__all__ = [
    "apply_rope",
    "chunked_cross_entropy",
    "cross_entropy_reference",
    "lora_linear",
    "lora_linear_reference",
    "rms_norm",
    "rms_norm_reference",
    "rope",
    "rope_reference",
    "swiglu",
    "swiglu_reference",
]
