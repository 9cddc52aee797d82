"""Make the tiny offline LLaVA task of the built-in ``llava_smollm2_135m_shapes_*`` configs.

    python scripts/make_llava_shapes.py work_dirs/shapes

writes ``tower/`` (a small random CLIP vision tower in the hub's layout: config.json,
model.safetensors with ``vision_model.*`` names, preprocessor_config.json), ``captions/`` (images of
coloured shapes with "Describe the image." -> "red circle", the pretrain stage's data),
``questions/`` ("What colour is the shape?" -> "red", "What shape is it?" -> "circle", the finetune
stage's) and ``held_out/`` (new images with questions, to try the trained model on). Each data folder
holds ``data.json`` (LLaVA's format) and ``images/``. Needs tunex (torch, Pillow) only.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220)}
SHAPES = ("circle", "square", "triangle")
QUESTIONS = {"colour": "What colour is the shape?", "shape": "What shape is it?"}
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def make_tower(
    folder: Path, *, image_size: int = 32, patch_size: int = 16, layers: int = 2, hidden: int = 64, seed: int = 0
) -> Path:
    """A random CLIP vision tower (head dim 16), initialised as CLIP initialises one, saved as the hub
    keeps CLIP checkpoints, with a preprocessor_config.json (short side to ``image_size``, center
    crop, CLIP's mean/std)."""
    import torch
    from safetensors.torch import save_file
    from tunex.models.vision import VisionTower, vision_config_from_hf

    raw = {
        "model_type": "clip_vision_model",
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": hidden // 16,
        "image_size": image_size,
        "patch_size": patch_size,
        "num_channels": 3,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": hidden,
    }
    torch.manual_seed(seed)
    tower = VisionTower(vision_config_from_hf(raw))
    width = hidden**-0.5
    std = {  # CLIP's initialisation (factor 1)
        "q_proj": width * (2 * layers) ** -0.5,
        "k_proj": width * (2 * layers) ** -0.5,
        "v_proj": width * (2 * layers) ** -0.5,
        "out_proj": width,
        "fc1": (2 * hidden) ** -0.5,
        "fc2": width * (2 * layers) ** -0.5,
    }
    with torch.no_grad():
        for name, p in tower.named_parameters():
            owner = name.rsplit(".", 2)[-2]
            if "norm" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                p.zero_()
            elif name.endswith("class_embedding"):
                p.normal_(0, width)
            else:
                p.normal_(0, std.get(owner, 0.02))
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in tower.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), {"format": "pt"})
    (folder / "config.json").write_text(json.dumps({**raw, "architectures": ["CLIPVisionModel"]}, indent=2))
    write_clip_preprocessor(folder, image_size)
    return folder


def write_clip_preprocessor(folder: Path, image_size: int) -> None:
    """``folder``/preprocessor_config.json of a CLIP image processor: short side to ``image_size``,
    center crop, CLIP's mean/std."""
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
                "image_mean": CLIP_MEAN,
                "image_std": CLIP_STD,
                "do_convert_rgb": True,
            },
            indent=2,
        )
    )


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


def answer(kind: str, colour: str, shape: str) -> str:
    return colour if kind == "colour" else shape


def make_shapes(
    folder: Path, n: int, seed: int = 0, fmt: str = "llava", captions: bool = False
) -> tuple[Path, list[dict]]:
    """``n`` images of coloured shapes with one question each (``captions``: "Describe the image." ->
    "red circle"), as LLaVA JSON (or openai JSONL) records; returns the data file and the truths
    (image, kind, colour, shape) of each record."""
    rng = random.Random(seed)
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    records, truths = [], []
    for i in range(n):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        kind = rng.choice(list(QUESTIONS))
        name = f"img_{seed}_{i}.png"
        draw(colour, shape, jitter=rng).save(images / name)
        question, reply = QUESTIONS[kind], answer(kind, colour, shape)
        if captions:
            kind, question, reply = "caption", "Describe the image.", f"{colour} {shape}"
        if fmt == "llava":
            turns = [{"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": reply}]
            records.append({"id": str(i), "image": name, "conversations": turns})
        else:
            parts = [{"type": "image_url", "image_url": {"url": name}}, {"type": "text", "text": question}]
            records.append({"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": reply}]})
        truths.append({"image": images / name, "kind": kind, "colour": colour, "shape": shape})
    if fmt == "llava":
        path = folder / "data.json"
        path.write_text(json.dumps(records, indent=1))
    else:
        path = folder / "data.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path, truths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to write tower/, captions/, questions/, held_out/ into")
    parser.add_argument("--train", type=int, default=256, help="records of each training stage")
    parser.add_argument("--held-out", type=int, default=40, help="records to evaluate on")
    args = parser.parse_args()
    make_tower(args.out / "tower")
    make_shapes(args.out / "captions", args.train, seed=1, captions=True)
    make_shapes(args.out / "questions", args.train, seed=2)
    make_shapes(args.out / "held_out", args.held_out, seed=3)
    print(f"wrote {args.out}/tower, captions, questions and held_out")


if __name__ == "__main__":
    main()
