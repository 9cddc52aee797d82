#!/usr/bin/env python3
"""CUDA: packed documents' attention through FlexAttention (``flex-docs``) against torch's SDPA on
each document (``sdpa-docs``), the two CUDA rows of the kernel registry for packed batches.

First each row's forward and backward against the other on random packed batches (documents of
length 1 too, grouped query heads; float32 without TF32 and bfloat16), then the time of one
forward + backward at 2k / 8k / 32k tokens (after 12 batches of lengths around 8k, each new, to
see that a new length reuses the compiled kernel) with short (chat-sized) and long documents, bfloat16,
32 query heads and 8 key/value heads of 128 (Llama-3-8B's attention). flex-docs is timed with its
block mask built in each step (the documents change every batch); its compilation is timed apart.

Usage: python bench/bench_flex_docs.py [--out FILE]   (needs a CUDA device)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def packed(t: int, lo: int, hi: int, rows: int, seed: int):
    """(B, T) position ids of rows packed with documents of random lengths in [lo, hi] (the last cut short)."""
    from tunex.kernels.attention import Documents

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(rows):
        pos: list[int] = []
        while len(pos) < t:
            n = int(torch.randint(lo, hi + 1, (1,), generator=g))
            pos += list(range(min(n, t - len(pos))))
        out.append(pos)
    return Documents.of(torch.tensor(out, device="cuda"))


def heads(b, h, kv, t, d, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, h, t, d, device="cuda", dtype=dtype, generator=g).requires_grad_()
    k, v = (torch.randn(b, kv, t, d, device="cuda", dtype=dtype, generator=g).requires_grad_() for _ in range(2))
    return q, k, v


def run(fn, q, k, v, docs, grad):
    out = fn(q, k, v, docs, q.shape[1] != k.shape[1])
    return (out, *torch.autograd.grad(out, (q, k, v), grad))


def check(report) -> None:
    from tunex.kernels.attention import flex_per_document, sdpa_per_document

    torch.backends.cuda.matmul.allow_tf32 = False
    for dtype, d, tol in ((torch.float32, 64, 2e-5), (torch.bfloat16, 128, 2e-2)):
        docs = packed(1024, 1, 160, 2, seed=1)
        q, k, v = heads(2, 8, 2, 1024, d, dtype, seed=2)
        grad = torch.randn(2, 8, 1024, d, device="cuda", dtype=dtype)
        ref = run(sdpa_per_document, q, k, v, docs, grad)
        got = run(flex_per_document, q, k, v, docs, grad)
        errs = [float((a - b).detach().float().abs().max() / b.detach().float().abs().max()) for a, b in zip(got, ref)]
        ok = all(e <= tol for e in errs)
        report(
            f"check {str(dtype).removeprefix('torch.')} D={d}, {len(docs.spans)} documents: "
            f"max error / max |value| of out, dq, dk, dv = {', '.join(f'{e:.1e}' for e in errs)} "
            f"(tolerance {tol:g}): {'ok' if ok else 'FAILED'}"
        )


def timed(fn, q, k, v, docs, grad, reps: int = 5) -> float:
    run(fn, q, k, v, docs, grad)
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        started = time.perf_counter()
        run(fn, q, k, v, docs, grad)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def timing(report) -> None:
    from tunex.kernels.attention import flex_per_document, sdpa_per_document

    report("| tokens | documents | sdpa-docs ms | flex-docs ms (block mask included) | first flex call s |")
    report("|---|---|---|---|---|")
    for t in (2048, 8192, 32768):
        for lo, hi, what in ((20, 300, "chat-sized (20-300)"), (t // 8, t // 2, f"long ({t // 8}-{t // 2})")):
            docs = packed(t, lo, hi, 1, seed=t + lo)
            q, k, v = heads(1, 32, 8, t, 128, torch.bfloat16, seed=3)
            grad = torch.randn_like(q)
            torch.cuda.synchronize()
            started = time.perf_counter()
            run(flex_per_document, q, k, v, docs, grad)
            torch.cuda.synchronize()
            first = time.perf_counter() - started
            sdpa = timed(sdpa_per_document, q, k, v, docs, grad)
            flex = timed(flex_per_document, q, k, v, docs, grad)
            report(f"| {t} | {len(docs.spans)} {what} | {sdpa * 1e3:.1f} | {flex * 1e3:.1f} | {first:.1f} |")


def model(report) -> None:
    """A tiny decoder's training step on a packed batch of 40 documents takes flex-docs through the
    registry, and its logits and LoRA-free weight gradients equal the sdpa-docs step's."""
    from tunex.kernels import registry
    from tunex.models.config import ModelConfig
    from tunex.models.decoder import CausalLM

    torch.manual_seed(0)
    cfg = ModelConfig("llama", 128, 256, 512, 2, 4, 2, 64)
    lm = CausalLM(cfg).cuda().to(torch.bfloat16).train()
    pos = torch.cat([torch.arange(n) for n in [20 + (i * 7) % 23 for i in range(40)]])[None].cuda()
    ids = torch.randint(0, 128, pos.shape, device="cuda")
    seen = []
    choose = registry.choose

    def spy(op, facts):
        impl = choose(op, facts)
        if op == "attention":
            seen.append(impl)
        return impl

    registry.choose = spy
    results = {}
    for limit in (registry.FLEX_MIN_DOCUMENTS, 10**9):
        registry.FLEX_MIN_DOCUMENTS = limit
        lm.zero_grad()
        logits = lm(ids, pos)
        logits.float().square().mean().backward()
        results[limit] = (logits.detach().float(), [p.grad.float() for p in lm.parameters()])
    registry.choose = choose
    (a, ga), (b, gb) = results.values()
    err = float((a - b).abs().max() / b.abs().max())
    gerr = max(float((x - y).abs().max() / y.abs().max()) for x, y in zip(ga, gb))
    ok = seen[:2] == ["flex-docs", "flex-docs"] and seen[-1] == "sdpa-docs" and err < 2e-2 and gerr < 5e-2
    report(
        f"model step, 40 packed documents: attention chose {sorted(set(seen))}; logits vs sdpa-docs {err:.1e}, "
        f"gradients {gerr:.1e}: {'ok' if ok else 'FAILED'}"
    )


def lengths(report) -> None:
    """Packed batches vary in length: each new length must reuse the compiled kernel (dynamic
    shapes), not recompile until torch.compile's limit sends it to the eager path."""
    from tunex.kernels.attention import flex_per_document

    spent = []
    for i, t in enumerate((8192, 8000, 7937, 8100, 7777, 8050, 7999, 8191, 7890, 8010, 7800, 8123)):
        docs = packed(t, 20, 300, 1, seed=i)
        q, k, v = heads(1, 32, 8, t, 128, torch.bfloat16, seed=i)
        grad = torch.randn_like(q)
        torch.cuda.synchronize()
        started = time.perf_counter()
        run(flex_per_document, q, k, v, docs, grad)
        torch.cuda.synchronize()
        spent.append(time.perf_counter() - started)
    report(
        "flex-docs, 12 batches of 7777-8192 tokens (each length new): seconds of each first call: "
        + ", ".join(f"{s:.2f}" for s in spent)
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    lines: list[str] = []

    def report(line: str) -> None:
        print(line, flush=True)
        lines.append(line)
        if args.out:
            with open(args.out, "w") as f:
                f.write("\n".join(lines) + "\n")

    if not torch.cuda.is_available():  # `python bench/run.py` (all benchmarks) on a machine without one
        print(
            "No CUDA device on the machine that ran this, so no table: `python bench/bench_flex_docs.py` on a "
            "CUDA machine (about two minutes on one H200)."
        )
        return
    report(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    check(report)
    model(report)
    lengths(report)
    timing(report)


if __name__ == "__main__":
    main()
