#!/usr/bin/env python3
"""CUDA: Gemma 2's soft-capped attention through FlexAttention (``flex-softcap``: the cap as its
score_mod, documents and sliding window as its block mask) against the torch ops over the whole
score matrix with a dense mask (``softcap-eager``), the two CUDA rows of the kernel registry for
soft-capped logits.

1. Each row's forward and backward against the other: float32 without TF32 and bfloat16, head dims
   128 and 256 (Gemma 2's), grouped query heads, unpacked rows, packed documents (length 1 too) and
   packed documents through a sliding window.
2. A tiny Gemma 2 training step takes flex-softcap through the registry on its global and sliding
   layers, and its loss and weight gradients equal the step with FlexAttention switched off.
3. 12 packed batches of new lengths around 8k: each must reuse the compiled kernel.
4. Time and peak memory of one forward + backward at 2k / 8k / 32k tokens, bfloat16, 16 query heads
   and 8 key/value heads of 256 (Gemma-2-9B's attention), cap 50, packed chat-sized documents, global
   and 4096-token windowed; softcap-eager where its score matrices fit (else "skipped").

Usage: python bench/bench_flex_softcap.py [--out FILE]   (needs a CUDA device)
       python bench/bench_flex_softcap.py --smoke          (sections 1-3 at tiny sizes on the CPU, eager
                                                            FlexAttention: checks the script, not the kernel)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

DEVICE = "cuda"
CAP = 50.0


def packed(t: int, lo: int, hi: int, rows: int, seed: int, window: int | None = None):
    """Documents of rows packed with documents of random lengths in [lo, hi] (the last cut short),
    seen through ``window``."""
    from tunex.kernels.attention import Documents

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(rows):
        pos: list[int] = []
        while len(pos) < t:
            n = int(torch.randint(lo, hi + 1, (1,), generator=g))
            pos += list(range(min(n, t - len(pos))))
        out.append(pos)
    docs = Documents.of(torch.tensor(out, device=DEVICE)) or Documents.rows(rows, t, DEVICE)
    return docs if window is None else docs.windowed(window)


def heads(b, h, kv, t, d, dtype, seed, scale=1.0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    q = (torch.randn(b, h, t, d, device=DEVICE, dtype=dtype, generator=g) * scale).requires_grad_()
    k, v = (torch.randn(b, kv, t, d, device=DEVICE, dtype=dtype, generator=g).requires_grad_() for _ in range(2))
    return q, k, v


def flex(q, k, v, docs, cap):
    from tunex.kernels.attention import flex_softcapped

    return flex_softcapped(q, k, v, docs, q.shape[1] != k.shape[1], cap)


def eager(q, k, v, docs, cap):
    from tunex.kernels.attention import softcapped

    return softcapped(q, k, v, docs, docs is None, cap)


def run(fn, q, k, v, docs, grad, cap=CAP):
    out = fn(q, k, v, docs, cap)
    return (out, *torch.autograd.grad(out, (q, k, v), grad))


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def check(report, t: int) -> bool:
    torch.backends.cuda.matmul.allow_tf32 = False
    ok_all = True
    for dtype, d, tol in ((torch.float32, 128, 2e-5), (torch.bfloat16, 256, 2e-2)):
        cases = (("rows", None), ("packed", packed(t, 1, t // 6, 2, seed=1)))
        cases += (("packed, window 64", packed(t, 1, t // 3, 2, seed=2, window=64)),)
        for what, docs in cases:
            q, k, v = heads(2, 8, 4, t, d, dtype, seed=3, scale=4.0)  # scores of several units: a cap of 5 bites
            grad = torch.randn_like(q)
            ref = run(eager, q, k, v, docs, grad, cap=5.0)
            got = run(flex, q, k, v, docs, grad, cap=5.0)
            errs = [float((a - b).float().abs().max() / b.float().abs().max()) for a, b in zip(got, ref)]
            ok = all(e <= tol for e in errs)
            ok_all &= ok
            report(
                f"check {str(dtype).removeprefix('torch.')} D={d}, {what}: max error / max |value| of out, dq, dk, "
                f"dv = {', '.join(f'{e:.1e}' for e in errs)} (tolerance {tol:g}): {'ok' if ok else 'FAILED'}"
            )
    return ok_all


def model(report, t: int) -> bool:
    """A tiny Gemma 2 (global and sliding layers, window shorter than the documents) on a packed
    batch: flex-softcap through the registry, against the same step with FlexAttention off."""
    from tunex.kernels import registry
    from tunex.models.config import ModelConfig
    from tunex.models.gemma import GemmaCausalLM

    torch.manual_seed(0)
    cfg = ModelConfig(
        "gemma2",
        128,
        256,
        512,
        2,
        4,
        2,
        64,
        tie_word_embeddings=True,
        sliding_window=t // 8,
        layer_types=["sliding_attention", "full_attention"],
        attn_softcap=5.0,
        final_softcap=30.0,
        query_pre_attn_scalar=64,
    )
    lm = GemmaCausalLM(cfg).to(DEVICE).train()
    lengths = [t // 4 + 3, t // 2 - 1, 1, t - (t // 4 + 3) - (t // 2 - 1) - 1]
    pos = torch.cat([torch.arange(n) for n in lengths])[None].to(DEVICE)
    ids = torch.randint(0, 128, pos.shape, device=DEVICE)
    seen: list[str] = []
    choose, available = registry.choose, registry._flex_available

    def spy(op, facts):
        if op == "attention" and DEVICE == "cpu":  # the smoke run: asked as for CUDA (conditions are pure)
            facts = registry.Facts("cuda", facts.dtype, **{k: getattr(facts, k) for k in facts.__slots__[2:]})
        impl = choose(op, facts)
        if op == "attention":
            seen.append(impl)
        return impl

    registry.choose = spy
    results = []
    try:
        for on in (True, False):
            registry._flex_available = available if on else (lambda: False)
            lm.zero_grad()
            logits = lm(ids, pos)
            logits.float().square().mean().backward()
            results.append((logits.detach().float(), [p.grad.float() for p in lm.parameters()]))
    finally:
        registry.choose, registry._flex_available = choose, available
    (a, ga), (b, gb) = results
    err = float((a - b).abs().max() / b.abs().max())
    gerr = max(float((x - y).abs().max() / y.abs().max()) for x, y in zip(ga, gb))
    want = ["flex-softcap"] * 2 + ["softcap-eager"] * 2
    ok = seen == want and err < 1e-4 and gerr < 1e-3
    report(
        f"tiny Gemma 2 step, float32, packed documents {lengths}: attention chose {seen}; logits vs softcap-eager "
        f"{err:.1e}, gradients {gerr:.1e}: {'ok' if ok else 'FAILED'}"
    )
    return ok


def lengths(report, base: int, d: int) -> None:
    """Packed batches vary in length: each new length must reuse the compiled kernel (dynamic
    shapes), not recompile until torch.compile's limit sends it to the eager path."""
    spent = []
    for i, dt in enumerate((0, -192, -255, -92, -415, -142, -193, -1, -302, -182, -392, -69)):
        t = base + dt
        docs = packed(t, 20, 300, 1, seed=i)
        q, k, v = heads(1, 16, 8, t, d, torch.bfloat16, seed=i)
        grad = torch.randn_like(q)
        sync()
        started = time.perf_counter()
        run(flex, q, k, v, docs, grad)
        sync()
        spent.append(time.perf_counter() - started)
    report(
        f"flex-softcap, 12 batches of {base - 415}-{base} tokens (each length new): seconds of each first call: "
        + ", ".join(f"{s:.2f}" for s in spent)
    )


def measured(fn, q, k, v, docs, grad, reps: int = 5) -> tuple[float, float]:
    """(median seconds of forward + backward, peak GiB allocated above the inputs)."""
    run(fn, q, k, v, docs, grad)
    times = []
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    for _ in range(reps):
        torch.cuda.synchronize()
        started = time.perf_counter()
        run(fn, q, k, v, docs, grad)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times), (torch.cuda.max_memory_allocated() - base) / 2**30


def timing(report) -> None:
    h, kv, d = 16, 8, 256
    free = torch.cuda.mem_get_info()[0]
    report(
        "| tokens | attention | softcap-eager ms | softcap-eager peak GiB | flex-softcap ms | flex-softcap peak GiB |"
    )
    report("|---|---|---|---|---|---|")
    for t in (2048, 8192, 32768):
        for window in (None, 4096):
            docs = packed(t, 20, 300, 1, seed=t, window=window)
            q, k, v = heads(1, h, kv, t, d, torch.bfloat16, seed=4)
            grad = torch.randn_like(q)
            flex_ms, flex_gib = measured(flex, q, k, v, docs, grad)
            # the eager path holds a few (H, T, T) score matrices (bf16 scores, fp32 softmax, their grads)
            if 12 * h * t * t < free * 0.8:
                eager_ms, eager_gib = measured(eager, q, k, v, docs, grad)
                eager_cells = f"{eager_ms * 1e3:.1f} | {eager_gib:.2f}"
            else:
                eager_cells = "skipped (scores do not fit) | -"
            what = "global" if window is None or docs.window is None else f"window {window}"
            report(
                f"| {t} | {what}, {len(docs.spans)} documents | {eager_cells} | {flex_ms * 1e3:.1f} | {flex_gib:.2f} |"
            )


def main() -> None:
    global DEVICE
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: checks the script only")
    args = parser.parse_args()
    lines: list[str] = []

    def report(line: str) -> None:
        print(line, flush=True)
        lines.append(line)
        if args.out:
            with open(args.out, "w") as f:
                f.write("\n".join(lines) + "\n")

    if args.smoke:
        import torch.nn.attention.flex_attention as fa

        # torch refuses CPU inputs needing gradients up front; its eager backward is device-agnostic
        real = fa._validate_device
        fa._validate_device = lambda q, k, v: real(q.detach(), k.detach(), v.detach())
        DEVICE = "cpu"
        torch.set_num_threads(1)
        report(f"smoke run on the CPU (eager FlexAttention), torch {torch.__version__}")
        ok = check(report, 40) & model(report, 48)
        lengths(report, 600, 16)
        raise SystemExit(0 if ok else 1)
    if not torch.cuda.is_available():  # `python bench/run.py` (all benchmarks) on a machine without one
        print(
            "No CUDA device on the machine that ran this, so no table: `python bench/bench_flex_softcap.py` on a "
            "CUDA machine."
        )
        return
    report(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    # each section starts with torch.compile's caches empty: together they ask for more variants (dtype,
    # head dim, mask, grouped heads) than its recompilation limit, past which calls would run eagerly
    ok = check(report, 1024)
    torch._dynamo.reset()
    ok &= model(report, 512)
    torch._dynamo.reset()
    lengths(report, 8192, 256)
    torch._dynamo.reset()
    timing(report)
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
