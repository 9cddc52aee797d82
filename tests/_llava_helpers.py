"""Fixtures for the multimodal tests: a small random CLIP tower folder (with its image processor's
config) and images of coloured shapes with questions about them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

# the task's images and records, and its tower, are the script's (the built-in shapes configs' data)
from make_llava_shapes import (  # noqa: E402
    COLOURS,
    QUESTIONS,
    SHAPES,
    answer,
    draw,
    make_shapes,
    write_clip_preprocessor,
)
from make_llava_shapes import make_tower as shapes_tower  # noqa: E402

__all__ = ["COLOURS", "QUESTIONS", "SHAPES", "answer", "draw", "make_shapes", "shapes_tower"]


def make_tower(folder: Path, *, image_size: int = 32, patch_size: int = 8, layers: int = 2, seed: int = 0) -> Path:
    """A random CLIP vision tower (hidden 32, head dim 16) saved as transformers saves one, plus a
    preprocessor_config.json (resize the short side to ``image_size``, center crop, CLIP's mean/std)."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
    )
    CLIPVisionModel(cfg).save_pretrained(folder)
    write_clip_preprocessor(folder, image_size)
    return folder


def llava_config(path: Path, llm: Path, tower: Path, data: Path, work: Path, stage: str, **extra) -> Path:
    """A TOML config of a tiny LLaVA run; ``extra`` maps "section.key" to values."""
    sections: dict[str, dict] = {
        "model": {"path": str(llm), "dtype": "float32"},
        "data": {
            "path": str(data),
            "format": "llava",
            "image_folder": str(data.parent / "images"),
            "max_length": 64,
            "pack_to_max_length": False,
        },
        "method": {"kind": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "train": {
            "batch_size": 2,
            "grad_accum": 1,
            "max_steps": 4,
            "lr": 1e-2,
            "warmup_ratio": 0.0,
            "dtype": "float32",
            "gradient_checkpointing": False,
            "log_steps": 1,
        },
        "eval": {"prompts": [], "every_n_steps": 0},
        "save": {"work_dir": str(work), "save_steps": 100, "save_total_limit": 1},
        "vision": {"path": str(tower), "stage": stage},
    }
    for key, value in extra.items():
        section, name = key.split(".")
        sections[section][name] = value
    text = "".join(
        f"[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in body.items()) + "\n"
        for name, body in sections.items()
    )
    path.write_text(text)
    return path
