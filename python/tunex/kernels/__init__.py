"""The kernels: one module per op, each with its backends.

``<op>.py`` holds the op's torch reference (the tests' oracle), its autograd Function with a
hand-derived backward, and its torch and native (Rust, ``tunex._native``) paths; ``<op>_triton.py``
holds the Triton path, imported only when it runs. Which implementation runs for a call is the
registry's choice (registry.py: every op's implementations, their conditions, ``choose``), which
``tunex doctor`` prints. Kernels allocate the tensors they keep for backward through kept.py.
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
