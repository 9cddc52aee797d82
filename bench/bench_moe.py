#!/usr/bin/env python3
"""Mixture of experts and a newer dense family: tunex vs transformers + PEFT, side by side.

1. LoRA training tokens/s and peak RSS on a small-but-real MoE shape (Mixtral layout: 8 experts,
   top-2, hidden 512, expert intermediate 1024, 4 layers, 8 heads of 64, vocab 8192) and on a Qwen3
   model of the same size (hidden 512, intermediate 2048, 4 layers), random weights saved by
   transformers. LoRA r=16 alpha=32, no dropout, AdamW, fp32, batch 4 x 256 random tokens, CPU.
   tunex adapts every linear ("all-linear": attention and each expert's w1/w3/w2); PEFT the same
   projections (attention by name, transformers 5's stacked experts through ``target_parameters``).
2. Forward + backward of one MoE block (router + experts, frozen weights, gradient of the input)
   against transformers' ``MixtralSparseMoeBlock`` (as its model builds it) with the same weights,
   on the batch's 1024 tokens.

Each training contender runs in its own process (as bench_train.py: after a warm-up step they take
turns, one step each, so all see the same machine load; peak RSS is each process's own). The
speed ratio is given as the median over rounds of (baseline step time / tunex step time), with its
range. The block benchmark alternates the two implementations in one process, round by round.

Usage: python bench/bench_moe.py [--rounds N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from _interleave import serve_steps, spread, take_turns  # this script's folder is on sys.path

B, T = (int(v) for v in os.environ.get("TUNEX_BENCH_SHAPE", "4x256").split("x"))
VOCAB = 8192
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=512,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=4096,
)
SHAPES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(intermediate_size=1024, num_local_experts=8)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(intermediate_size=2048, head_dim=64)),
}


def make_model(family: str, folder: str) -> None:
    import torch
    import transformers

    cfg_cls, model_cls, extra = SHAPES[family]
    torch.manual_seed(0)
    config = getattr(transformers, cfg_cls)(
        **COMMON, **extra, **({"num_experts_per_tok": 2} if extra.get("num_local_experts") else {})
    )
    getattr(transformers, model_cls)(config).save_pretrained(folder)


def build_tunex(folder: str):
    import torch
    from tunex.config import validate
    from tunex.dist.env import init_distributed
    from tunex.dist.wrap import wrap_for_training
    from tunex.train.build import build_model
    from tunex.train.loop import _micro_step
    from tunex.train.optim import build_optimizer

    torch.manual_seed(0)
    cfg = validate(
        {
            "model": {"path": folder, "dtype": "float32"},
            "data": {"path": "-"},
            "method": {"kind": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
            "train": {"dtype": "float32", "gradient_checkpointing": False, "batch_size": B, "grad_accum": 1},
        }
    )
    model = build_model(cfg, torch.device("cpu"))
    step_module = wrap_for_training(model, "lora", init_distributed(), torch.device("cpu"), "float32")
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


def build_hf(folder: str):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    moe = m.config.model_type == "mixtral"
    lora = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"] if moe else "all-linear",
        target_parameters=["experts.gate_up_proj", "experts.down_proj"] if moe else None,
    )
    m = get_peft_model(m, lora)
    m.train()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-4)
    x = torch.randint(0, VOCAB, (B, T))

    def step():
        out = m(input_ids=x, labels=x)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        return out.loss.item()

    return step


def worker(who: str, folder: str) -> None:
    serve_steps(build_tunex(folder) if who == "tunex" else build_hf(folder))


def train_pair(folder: str, rounds: int) -> dict:
    """Step seconds per round and peak RSS of tunex and transformers+PEFT, taking turns."""
    return take_turns({who: [__file__, "--child", who, folder] for who in ("tunex", "hf")}, rounds)


def ratio_cell(ours: list[float], theirs: list[float]) -> str:
    """median (min-max) over rounds of baseline time / tunex time."""
    ratios = [t / o for o, t in zip(ours, theirs)]
    return spread(ratios, 2, "x") if ratios else "n/a"


def block_bench(rounds: int, tokens: int = B * T) -> tuple[list[float], list[float]]:
    """Seconds per forward + backward of one MoE block: (tunex, transformers), round by round."""
    import torch
    import transformers
    from tunex.models.config import config_from_hf
    from tunex.models.moe import RouterStats, SparseMoE

    torch.manual_seed(0)
    hf_cfg = transformers.MixtralConfig(
        **{**COMMON, "num_hidden_layers": 1}, **SHAPES["mixtral"][2], num_experts_per_tok=2
    )
    # the block as the model holds it (the model picks transformers' default experts implementation)
    theirs = transformers.MixtralForCausalLM(hf_cfg).model.layers[0].mlp
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.02)
    raw = {**hf_cfg.to_dict(), "model_type": "mixtral"}
    ours = SparseMoE(config_from_hf(raw), RouterStats())
    with torch.no_grad():  # the same weights: transformers' stacked experts -> tunex's per-expert linears
        ours.gate.weight.copy_(theirs.gate.weight)
        inter = hf_cfg.intermediate_size
        for e, expert in enumerate(ours.experts):
            expert.w1.weight.copy_(theirs.experts.gate_up_proj[e, :inter])
            expert.w3.weight.copy_(theirs.experts.gate_up_proj[e, inter:])
            expert.w2.weight.copy_(theirs.experts.down_proj[e])
    ours.requires_grad_(False)
    theirs.requires_grad_(False)
    x = torch.randn(1, tokens, hf_cfg.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5)

    def run(block):
        xi = x.clone().requires_grad_(True)
        started = time.perf_counter()
        block(xi).square().mean().backward()
        return time.perf_counter() - started

    run(ours), run(theirs)  # warm-up
    mine, base = [], []
    for _ in range(rounds):
        mine.append(run(ours))
        base.append(run(theirs))
    return mine, base


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--child", nargs="+")
    args = parser.parse_args()
    if args.child:
        worker(*args.child[:2])
        return
    load_before = os.getloadavg()[0]
    rows = [
        "| model | tunex tokens/s | baseline tokens/s | speed ratio, median (range) | tunex peak RSS MB | "
        "baseline peak RSS MB | RSS ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory(prefix="tunex-bench-moe-") as tmp:
        for family, label in (
            ("mixtral", "MoE (Mixtral layout, 8 experts top-2, hidden 512, 4 layers) LoRA"),
            ("qwen3", "Qwen3 (hidden 512, 4 layers) LoRA"),
        ):
            folder = os.path.join(tmp, family)
            make_model(family, folder)
            res = train_pair(folder, args.rounds)
            ours, theirs = res.get("tunex", {}), res.get("hf", {})

            def tps(d):
                return (
                    f"{B * T * len(d['times']) / sum(d['times']):.0f}"
                    if d.get("times")
                    else f"n/a ({d.get('error', '?')})"
                )

            rss = (
                f"{ours['peak_rss_mb'] / theirs['peak_rss_mb']:.2f}"
                if "peak_rss_mb" in ours and "peak_rss_mb" in theirs
                else "n/a"
            )
            rows.append(
                f"| {label} | {tps(ours)} | {tps(theirs)} | {ratio_cell(ours.get('times', []), theirs.get('times', []))} | "
                f"{ours.get('peak_rss_mb', 0):.0f} | {theirs.get('peak_rss_mb', 0):.0f} | {rss} |"
            )
    mine, base = block_bench(args.rounds)
    rows.append(
        f"| one MoE block forward + backward ({B * T} tokens) vs transformers' MixtralSparseMoeBlock | "
        f"{statistics.median(mine) * 1e3:.1f} ms | {statistics.median(base) * 1e3:.1f} ms | "
        f"{ratio_cell(mine, base)} | - | - | - |"
    )
    print(
        f"LoRA r=16 alpha=32 (no dropout), AdamW, fp32, batch {B} x {T} random tokens on the CPU, random weights. "
        f"{args.rounds} rounds after a warm-up step; each training contender in its own process, taking turns "
        "step by step. Speed ratio: baseline time / tunex time per round, median and range. Baseline: "
        "transformers + PEFT (MoE experts through target_parameters). Machine load average "
        f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after.\n"
    )
    print("\n".join(rows))


if __name__ == "__main__":
    main()
