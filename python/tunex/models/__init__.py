"""tunex's own decoder models (llama family), their loading, and text generation.

model = load_model("path/to/hf_folder_or.gguf", dtype=torch.float32)
logits = model(input_ids)                      # (B, T, V)
h = model.hidden_states(input_ids, position_ids)  # (B, T, C); model.lm_head.weight is (V, C)
new_ids = generate(model, prompt_ids, max_new_tokens=64)
"""

from __future__ import annotations

from tunex.models.config import ModelConfig, config_from_hf, read_config, to_checkpoint_names
from tunex.models.decoder import CausalLM, KVCache
from tunex.models.generate import GenerationConfig, generate, generate_text
from tunex.models.hub import resolve_model_path
from tunex.models.loading import load_model, read_safetensors

__all__ = [
    "CausalLM",
    "GenerationConfig",
    "KVCache",
    "ModelConfig",
    "config_from_hf",
    "generate",
    "generate_text",
    "load_model",
    "read_config",
    "read_safetensors",
    "resolve_model_path",
    "to_checkpoint_names",
]
