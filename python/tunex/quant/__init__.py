"""4-bit (NF4 / FP4) quantization bit-exact with bitsandbytes, and the QLoRA base layer.

    qw = tunex.quant.quantize(weight, "nf4", blocksize=64, double_quant=True)
    w = tunex.quant.dequantize(qw, torch.bfloat16)
    layer = tunex.quant.NF4Linear.from_linear(linear)      # frozen 4-bit base for LoRA

State dicts use bitsandbytes' serialized keys (``weight``, ``weight.absmax``, ``weight.quant_map``,
``weight.nested_absmax``, ``weight.nested_quant_map``, ``weight.quant_state.bitsandbytes__nf4``), so
bitsandbytes' Linear4bit and transformers load them and tunex loads theirs. See docs/QUANT.md.
"""

from __future__ import annotations

from tunex.quant.codebooks import code, dynamic_map
from tunex.quant.linear import NF4Linear
from tunex.quant.serialize import from_state_dict, to_state_dict
from tunex.quant.weight import NestedAbsmax, QuantizedWeight, dequantize, quantize

__all__ = [
    "NF4Linear",
    "NestedAbsmax",
    "QuantizedWeight",
    "code",
    "dequantize",
    "dynamic_map",
    "from_state_dict",
    "quantize",
    "to_state_dict",
]
