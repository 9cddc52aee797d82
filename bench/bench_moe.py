#!/usr/bin/env python3
"""Mixture of experts and a newer dense family: tunex vs transformers + PEFT, side by side.

1. LoRA training tokens/s and peak RSS on a small-but-real MoE shape (Mixtral layout: 8 experts,
   top-2, hidden 512, expert intermediate 1024, 4 layers, 8 heads of 64, vocab 8192) and on a Qwen3
   model of the same size (hidden 512, intermediate 2048, 4 layers), random weights saved by
   transformers. LoRA r=16 alpha=32, no dropout, AdamW, fp32, batch 4 x 256 random tokens, CPU.
   tunex adapts every linear ("all-linear": attention and each expert's w1/w3/w2); PEFT the same
   projections (attention by name, transformers 5's stacked experts through ``target_parameters``).
   The same two models (vocabulary widened to the tokenizer's 49152) also train on what users run,
   as bench_train.py measures the Llama family: the quick start's chatterbot conversations packed by
   tunex's pipeline into 4 x 256, and transformers + PEFT on the same conversations as a padded
   batch (one per row, padding masked); tokens/s count real tokens only, so both do the same work.
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


CHAT_VOCAB = 49152  # SmolLM2's tokenizer, which bench_longctx's packed conversations use


def make_model(family: str, folder: str, vocab: int = VOCAB) -> None:
    import torch
    import transformers

    cfg_cls, model_cls, extra = SHAPES[family]
    torch.manual_seed(0)
    config = getattr(transformers, cfg_cls)(
        **{**COMMON, "vocab_size": vocab},
        **extra,
        **({"num_experts_per_tok": 2} if extra.get("num_local_experts") else {}),
    )
    getattr(transformers, model_cls)(config).save_pretrained(folder)


def chat_batch():
    """The quick start's conversations packed into B x T by tunex's pipeline, and their real tokens."""
    from bench_longctx import packed_batch  # this script's folder is on sys.path

    return packed_batch(T, B)


def tunex_parts(folder: str, data: str):
    """tunex's contender, built: (its config, the model, the module a step calls, the optimizer, the
    batch). bench/train_memory.py builds the same."""
    import torch
    from tunex.config import validate
    from tunex.dist.env import init_distributed
    from tunex.dist.wrap import wrap_for_training
    from tunex.train.build import build_model
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
    if data == "chat":
        batch, _ = chat_batch()
    else:
        x = torch.randint(0, VOCAB, (B, T))
        batch = {"input_ids": x, "labels": x, "position_ids": torch.arange(T).expand(B, T)}
    return cfg, model, step_module, opt, batch


def build_tunex(folder: str, data: str):
    import torch
    from tunex.train.loop import _micro_step

    cfg, _, step_module, opt, batch = tunex_parts(folder, data)

    def step():
        loss, _ = _micro_step(step_module, batch, torch.device("cpu"), cfg, 1)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return step


def hf_parts(folder: str, data: str):
    """transformers + PEFT's contender, built: (the model, the optimizer, input ids, labels, attention
    mask or None). bench/train_memory.py builds the same."""
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
    if data == "chat":
        from bench_longctx import padded_documents

        x, labels, mask = padded_documents(chat_batch()[0])
    else:
        x = labels = torch.randint(0, VOCAB, (B, T))
        mask = None
    return m, opt, x, labels, mask


def build_hf(folder: str, data: str):
    m, opt, x, labels, mask = hf_parts(folder, data)

    def step():
        out = m(input_ids=x, attention_mask=mask, labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        return out.loss.item()

    return step


def worker(who: str, folder: str, data: str) -> None:
    """One contender in its own process, reporting the real tokens of its step."""
    step = build_tunex(folder, data) if who == "tunex" else build_hf(folder, data)
    serve_steps(step, {"tokens": chat_batch()[1] if data == "chat" else B * T})


def train_pair(folder: str, rounds: int, data: str) -> dict:
    """Step seconds per round and peak RSS of tunex and transformers+PEFT, taking turns."""
    return take_turns({who: [__file__, "--child", who, folder, data] for who in ("tunex", "hf")}, rounds)


def train_floor(label: str, folder: str, ours: list[float], theirs: list[float]) -> str:
    """The random-token row's matmul floor (bench_train.matmul_floor, in a fresh process) against
    both contenders' median step times, as a sentence."""
    from bench_train import run_child  # this script's folder is on sys.path

    floor = run_child(["floor", folder]).get("seconds")
    if not floor:
        return f"{label}: n/a"
    mine, base = statistics.median(ours), statistics.median(theirs)
    return (
        f"{label} {B * T / floor:.0f} tokens/s, tunex at {floor / mine:.0%} of it, the baseline at "
        f"{floor / base:.0%}: the floor is {base / floor:.2f}x the baseline"
    )


def ratio_cell(ours: list[float], theirs: list[float]) -> str:
    """median (min-max) over rounds of baseline time / tunex time."""
    ratios = [t / o for o, t in zip(ours, theirs)]
    return spread(ratios, 2, "x") if ratios else "n/a"


def block_bench(rounds: int, tokens: int = B * T) -> tuple[list[float], list[float], float]:
    """Seconds per forward + backward of one MoE block: (tunex, transformers), round by round, and
    the block's matmul floor (:func:`expert_matmul_floor`)."""
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
    with torch.no_grad():
        chosen = (x[0] @ ours.gate.weight.T).topk(hf_cfg.num_experts_per_tok, dim=-1).indices
    rows = torch.bincount(chosen.flatten(), minlength=hf_cfg.num_local_experts).tolist()
    return mine, base, expert_matmul_floor(rows, hf_cfg.hidden_size, inter, rounds)


def expert_matmul_floor(rows: list[int], hidden: int, inter: int, rounds: int) -> float:
    """Seconds the block's forward + backward would take if it did nothing but its expert matmuls,
    each on the faster of torch.mm (MKL) and oneDNN in this run: per expert, with its routed row
    count, gate and up (hidden -> inter) and down (inter -> hidden) forward, and the three input
    gradients in backward (frozen weights: no weight gradient). Both implementations do at least
    these products, so baseline time / floor bounds the speed-up any fp32 implementation can show.
    """
    import torch
    from tunex.kernels import _dispatch

    engines = {"torch": lambda a, w: a @ w.T, "onednn": _dispatch.matmul_nt}
    gate, down = torch.randn(inter, hidden), torch.randn(hidden, inter)
    gate_t, down_t = gate.T.contiguous(), down.T.contiguous()  # (a @ w.T) with w.T: a @ w
    inputs = [torch.randn(n, hidden) for n in rows]  # made before the clock starts
    best: dict[str, float] = {}
    with torch.no_grad():
        for name, mm in engines.items():
            for _ in range(rounds + 1):
                started = time.perf_counter()
                for xs in inputs:
                    g, u = mm(xs, gate), mm(xs, gate)  # gate and up
                    y = mm(g, down)  # down
                    dh = mm(y, down_t)  # backward: gradient of the down product's input
                    mm(dh, gate_t), mm(u, gate_t)  # ... and of the gate and up products' input
                spent = time.perf_counter() - started
                best[name] = min(best.get(name, spent), spent)
    return min(best.values())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--child", nargs="+")
    args = parser.parse_args()
    if args.child:
        worker(*args.child[:3])
        return
    load_before = os.getloadavg()[0]
    rows = [
        "| model | tunex tokens/s | baseline tokens/s | speed ratio, median (range) | tunex peak RSS MB | "
        "baseline peak RSS MB | RSS ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    floors: list[str] = []
    with tempfile.TemporaryDirectory(prefix="tunex-bench-moe-") as tmp:
        for family, label, data in (
            ("mixtral", "MoE (Mixtral layout, 8 experts top-2, hidden 512, 4 layers) LoRA", "random"),
            ("qwen3", "Qwen3 (hidden 512, 4 layers) LoRA", "random"),
            ("mixtral", "the MoE on the quick start's conversations (packed vs padded)", "chat"),
            ("qwen3", "Qwen3 on the quick start's conversations (packed vs padded)", "chat"),
        ):
            folder = os.path.join(tmp, f"{family}-{data}")
            if not os.path.isdir(folder):
                make_model(family, folder, CHAT_VOCAB if data == "chat" else VOCAB)
            res = train_pair(folder, args.rounds, data)
            ours, theirs = res.get("tunex", {}), res.get("hf", {})

            def tps(d):
                return (
                    f"{d['tokens'] * len(d['times']) / sum(d['times']):.0f}"
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
            if data == "random" and ours.get("times") and theirs.get("times"):
                floors.append(train_floor(label.split(" (")[0], folder, ours["times"], theirs["times"]))
    mine, base, floor = block_bench(args.rounds)
    rows.append(
        f"| one MoE block forward + backward ({B * T} tokens) vs transformers' MixtralSparseMoeBlock | "
        f"{statistics.median(mine) * 1e3:.1f} ms | {statistics.median(base) * 1e3:.1f} ms | "
        f"{ratio_cell(mine, base)} | - | - | - |"
    )
    block_floor = (
        f"\nBlock matmul floor (the block's expert products alone, forward and input gradients, each engine's best "
        f"of {args.rounds + 1}, the faster engine): {floor * 1e3:.1f} ms. tunex's block runs at "
        f"{floor / statistics.median(mine):.0%} of it, transformers' at {floor / statistics.median(base):.0%}; "
        f"the floor is {statistics.median(base) / floor:.2f}x the baseline, the largest speed-up any fp32 "
        "implementation of the block could show here."
    )
    print(
        f"LoRA r=16 alpha=32 (no dropout), AdamW, fp32, batch {B} x {T} random tokens on the CPU, random weights; "
        f"the last two training rows: the quick start's conversations ({chat_batch()[1]} real tokens) packed "
        "into the same batch for tunex, as a padded batch (one per row) for transformers + PEFT, tokens/s of "
        "real tokens (bench_train.py's method for the Llama family). "
        f"{args.rounds} rounds after a warm-up step; each training contender in its own process, taking turns "
        "step by step. Speed ratio: baseline time / tunex time per round, median and range. Baseline: "
        "transformers + PEFT (MoE experts through target_parameters). Machine load average "
        f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after.\n"
    )
    print("\n".join(rows))
    print(block_floor)
    if floors:
        print(
            "\nTraining matmul floor of the random-token rows (the frozen-weight fp32 matmuls of one LoRA step "
            "and nothing else, forward and input gradient, each shape on the faster of MKL and oneDNN, as "
            "bench_train.py measures it; the MoE's routed experts counted as one dense product of top-2 x their "
            "intermediate size, no slower than the eight smaller ones): " + "; ".join(floors) + "."
        )


if __name__ == "__main__":
    main()
