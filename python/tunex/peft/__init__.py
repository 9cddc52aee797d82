"""LoRA / DoRA / QLoRA adapters: the layer, choosing target modules, PEFT-format export."""

from tunex.io.hf import base_config_changes
from tunex.peft.export import adapter_config, export_adapter, peft_tensors, write_adapter
from tunex.peft.lora import LoRALinear, lora_scaling
from tunex.peft.targets import apply_lora, is_linear, lora_modules, select_targets, trainable_state_dict

__all__ = [
    "LoRALinear",
    "adapter_config",
    "apply_lora",
    "base_config_changes",
    "export_adapter",
    "is_linear",
    "lora_modules",
    "lora_scaling",
    "peft_tensors",
    "select_targets",
    "trainable_state_dict",
    "write_adapter",
]
