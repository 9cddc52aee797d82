"""Fixtures for the multimodal tests: a small random CLIP tower folder (with its image processor's
config) and images of coloured shapes with questions about them."""

from __future__ import annotations

import json
import random
from pathlib import Path

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220)}
SHAPES = ("circle", "square", "triangle")


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
    (folder / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "CLIPImageProcessor",
                "do_resize": True,
                "size": {"shortest_edge": image_size},
                "resample": 3,
                "do_center_crop": True,
                "crop_size": {"height": image_size, "width": image_size},
                "do_rescale": True,
                "rescale_factor": 1 / 255,
                "do_normalize": True,
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
                "do_convert_rgb": True,
            }
        )
    )
    return folder


def draw(colour: str, shape: str, size: tuple[int, int] = (40, 32), jitter: random.Random | None = None):
    """A white image with one filled shape of ``colour`` near its centre."""
    from PIL import Image, ImageDraw

    w, h = size
    img = Image.new("RGB", size, (255, 255, 255))
    d = ImageDraw.Draw(img)
    r = min(w, h) // 3
    dx, dy = (jitter.randint(-2, 2), jitter.randint(-2, 2)) if jitter else (0, 0)
    cx, cy = w // 2 + dx, h // 2 + dy
    fill = COLOURS[colour]
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


QUESTIONS = {"colour": "What colour is the shape?", "shape": "What shape is it?"}


def answer(kind: str, colour: str, shape: str) -> str:
    return colour if kind == "colour" else shape


def make_shapes(folder: Path, n: int, seed: int = 0, fmt: str = "llava") -> tuple[Path, list[dict]]:
    """``n`` images of coloured shapes with one question each, as LLaVA JSON (or openai JSONL)
    records; returns the data file and the (image, kind, colour, shape) truths."""
    rng = random.Random(seed)
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    records, truths = [], []
    for i in range(n):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        kind = rng.choice(list(QUESTIONS))
        name = f"img_{seed}_{i}.png"
        draw(colour, shape, jitter=rng).save(images / name)
        reply = answer(kind, colour, shape)
        if fmt == "llava":
            records.append(
                {
                    "id": str(i),
                    "image": name,
                    "conversations": [
                        {"from": "human", "value": "<image>\n" + QUESTIONS[kind]},
                        {"from": "gpt", "value": reply},
                    ],
                }
            )
        else:
            records.append(
                {
                    "messages": [
                        {
                            "role": "user",
                            "content": [
                                {"type": "image_url", "image_url": {"url": name}},
                                {"type": "text", "text": QUESTIONS[kind]},
                            ],
                        },
                        {"role": "assistant", "content": reply},
                    ]
                }
            )
        truths.append({"image": images / name, "kind": kind, "colour": colour, "shape": shape})
    if fmt == "llava":
        path = folder / "data.json"
        path.write_text(json.dumps(records))
    else:
        path = folder / "data.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path, truths


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
