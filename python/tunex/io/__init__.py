"""Weight files in and out: safetensors through tunex's Rust reader and sharded writer, HF model
folders, and legacy ``pytorch_model.bin`` checkpoints (read with ``torch.load(weights_only=True)``).

torch is imported inside the functions, so importing this package stays cheap.
"""

from __future__ import annotations

from tunex.io.hf import load_state_dict, non_weight_files, weight_format
from tunex.io.safetensors import SafetensorsFile
from tunex.io.sharded import save_sharded

__all__ = ["SafetensorsFile", "load_state_dict", "non_weight_files", "save_sharded", "weight_format"]
