#!/usr/bin/env python3
"""GGUF export's quantization of a 1B-shaped model: tunex's Rust packing against gguf-py (the ``gguf``
package, llama.cpp's Python library).

The model has Llama-3.2-1B's shapes (hidden 2048, MLP 8192, 32 query and 8 key/value heads of 64,
16 layers, a vocabulary of 128256, tied embeddings: 1.24 billion weights in matrices). Each
``--outtype`` (q8_0, q6_k, q5_k_m, q4_k_m) gives every matrix the block type ``hf_to_gguf`` gives it
(``tunex.gguf_io.tensor_type``, llama-quantize's choice). The timed step packs every matrix of the
model once, which is what ``hf_to_gguf --outtype`` spends on quantizing (reading the checkpoint and
writing the file are not timed). So as not to hold 5 GB of float32, the values are random
(normal, std 0.02) and repeat: one layer's seven matrices are made once and packed for each of the
16 layers with that layer's types, and the embedding is made as one eighth of its rows and packed
eight times; the work is the whole model's, block for block.

The baseline is gguf-py where it can quantize the type (Q8_0, and the Q5_0 / Q5_1 / Q8_0 fallbacks
of rows that are not whole 256-value blocks: none at this width), with ``gguf.quants.quantize``;
gguf-py has no quantizer for Q4_K, Q5_K and Q6_K, so for those the baseline is its dequantizer,
``gguf.quants.dequantize``, on tunex's blocks of the same matrices (the issue's stand-in: the
reference library's throughput on the same data). Each row says which it is. tunex packs on all
cores (rayon); gguf-py runs numpy on one.

Each side is a worker process (bench/_interleave.py): both build their inputs, then take turns
packing the model, ``--rounds`` times; the ratio is per round, reported as the median and range.
Before the timing the parent checks the outputs on layer 0's matrices: tunex's bytes against
gguf-py's where gguf-py quantizes, and gguf-py's dequantization of tunex's blocks against the weights
(relative RMS error) where it does not.

Usage: python bench/bench_kquant.py [--rounds N] [--outtypes q8_0,q6_k,q5_k_m,q4_k_m] [--small]
       (--small: layers 0 and 1 and 1/32 of every matrix's rows, a smoke run)
Needs: numpy, gguf (the baseline).
"""

from __future__ import annotations

import argparse
import os

from _interleave import serve_steps, spread, take_turns  # this script's folder is on sys.path

# Llama-3.2-1B's shapes
HIDDEN, FFN, HEADS, KV_HEADS, HEAD_DIM, LAYERS, VOCAB = 2048, 8192, 32, 8, 64, 16, 128256
EMBED_PARTS = 8  # the embedding is made as 1/EMBED_PARTS of its rows and packed EMBED_PARTS times
SMALL_ROWS = 32  # --small: 1/SMALL_ROWS of every matrix's rows, layers 0 and 1 only
OUTTYPES = ("q8_0", "q6_k", "q5_k_m", "q4_k_m")
GGUF_QUANTIZES = ("q8_0", "q5_0", "q5_1")  # the block types gguf-py can quantize


def layer_shapes(rows_div: int = 1) -> dict[str, tuple[int, int]]:
    """One layer's matrices as GGUF stores them, (rows, values per row); ``rows_div``: 1/n of the rows."""
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    shapes = {
        "attn_q": (q, HIDDEN),
        "attn_k": (kv, HIDDEN),
        "attn_v": (kv, HIDDEN),
        "attn_output": (HIDDEN, q),
        "ffn_gate": (FFN, HIDDEN),
        "ffn_up": (FFN, HIDDEN),
        "ffn_down": (HIDDEN, FFN),
    }
    return {k: (r // rows_div, c) for k, (r, c) in shapes.items()}


def plan(outtype: str, small: bool) -> tuple[dict[str, tuple[int, int]], list[tuple[str, str, int]]]:
    """(the shapes of the matrices made, [(matrix, block type, times packed)]) for one step over the
    model. The block types are those of the full-size model (``tensor_type`` of the real shapes)."""
    from tunex.gguf_io import tensor_type

    rows_div = SMALL_ROWS if small else 1
    shapes = {**layer_shapes(rows_div), "token_embd": (VOCAB // EMBED_PARTS // rows_div, HIDDEN)}
    steps = []
    for i in range(2 if small else LAYERS):
        for part, shape in layer_shapes().items():
            steps.append((part, tensor_type(f"blk.{i}.{part}.weight", shape, outtype, LAYERS, True), 1))
    embed = tensor_type("token_embd.weight", (VOCAB, HIDDEN), outtype, LAYERS, True)
    steps.append(("token_embd", embed, EMBED_PARTS))
    return shapes, steps


def values_per_step(outtype: str, small: bool) -> int:
    shapes, steps = plan(outtype, small)
    return sum(shapes[k][0] * shapes[k][1] * times for k, _, times in steps)


def type_counts(outtype: str, small: bool) -> list[tuple[str, int]]:
    """(block type, matrices of that type), the embedding counted once."""
    counts: dict[str, int] = {}
    for _, kind, _ in plan(outtype, small)[1]:
        counts[kind] = counts.get(kind, 0) + 1
    return sorted(counts.items())


def child(who: str, outtype: str, small: bool) -> None:
    import gguf
    import numpy as np
    from tunex.gguf_io import quantize_blocks

    shapes, steps = plan(outtype, small)
    rng = np.random.default_rng(0)
    weights = {k: rng.standard_normal(s, dtype=np.float32) * 0.02 for k, s in shapes.items()}
    if who == "tunex":

        def step():
            for key, kind, times in steps:
                for _ in range(times):
                    quantize_blocks(weights[key], kind, key)

    else:
        # the dequantizer's input: tunex's blocks of the same matrices (made once, not timed)
        packed = {(k, t): quantize_blocks(weights[k], t, k) for k, t, _ in steps if t not in GGUF_QUANTIZES}
        quantized = {k for k, t, _ in steps if t in GGUF_QUANTIZES}
        weights = {k: w for k, w in weights.items() if k in quantized}  # the rest is read as blocks only

        def step():
            for key, kind, times in steps:
                qtype = gguf.GGMLQuantizationType[kind.upper()]
                for _ in range(times):
                    if kind in GGUF_QUANTIZES:
                        gguf.quants.quantize(weights[key], qtype)
                    else:
                        gguf.quants.dequantize(packed[(key, kind)], qtype)

    serve_steps(step)


def check(outtype: str, small: bool) -> str:
    """On layer 0's matrices: tunex's bytes against gguf-py's where gguf-py quantizes the type, and the
    largest relative RMS error of gguf-py's dequantization of tunex's blocks where it does not."""
    import gguf
    import numpy as np
    from tunex.gguf_io import quantize_blocks, tensor_type

    rng = np.random.default_rng(1)
    same, errors = [], []
    for part, shape in layer_shapes(SMALL_ROWS if small else 1).items():
        kind = tensor_type(f"blk.0.{part}.weight", layer_shapes()[part], outtype, LAYERS, True)
        w = rng.standard_normal(shape, dtype=np.float32) * 0.02
        ours = quantize_blocks(w, kind, part)
        qtype = gguf.GGMLQuantizationType[kind.upper()]
        if kind in GGUF_QUANTIZES:
            same.append(np.array_equal(ours, gguf.quants.quantize(w, qtype)))
        else:
            back = gguf.quants.dequantize(ours, qtype)
            errors.append(float(np.sqrt(np.mean((back - w) ** 2)) / np.sqrt(np.mean(w**2))))
    found = []
    if same:
        found.append(f"bytes equal to gguf-py's: {'yes' if all(same) else 'NO'}")
    if errors:
        found.append(f"gguf-py reads tunex's blocks back, rel. RMS error <= {max(errors):.4f}")
    return "; ".join(found)


def row(outtype: str, small: bool, results: dict, checked: str) -> str:
    values = values_per_step(outtype, small)
    counts = type_counts(outtype, small)
    ours, theirs = results["tunex"], results["gguf-py"]
    kinds = ", ".join(f"{k.upper()} x{n}" for k, n in counts)
    ops = sorted({"quantize" if k in GGUF_QUANTIZES else "dequantize" for k, _ in counts}, reverse=True)
    baseline = " + ".join(f"gguf-py {op}" for op in ops)

    def seconds(d: dict) -> str:
        return spread(d["times"], 2) if d.get("times") else f"n/a ({d.get('error', '?')})"

    def rate(d: dict) -> str:
        return spread([values / 1e6 / t for t in d["times"]], 1) if d.get("times") else "n/a"

    both = ours.get("times") and theirs.get("times")
    ratio = spread([t / o for o, t in zip(ours["times"], theirs["times"])], 2, "x") if both else "n/a"
    rss = " / ".join(f"{d['peak_rss_mb']:.0f}" if "peak_rss_mb" in d else "n/a" for d in (ours, theirs))
    return (
        f"| {outtype} | {kinds} | {baseline} | {seconds(ours)} | {seconds(theirs)} | {rate(ours)} | {rate(theirs)} "
        f"| {ratio} | {rss} | {checked} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--outtypes", default=",".join(OUTTYPES), help="comma-separated, of " + ",".join(OUTTYPES))
    ap.add_argument("--small", action="store_true", help="layers 0 and 1, 1/32 of every matrix's rows: a smoke run")
    ap.add_argument("--child", nargs=2, metavar=("WHO", "OUTTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child, args.small)
        return

    outtypes = args.outtypes.split(",")
    unknown = sorted(set(outtypes) - set(OUTTYPES))
    if unknown:
        raise SystemExit(f"error: --outtypes {','.join(unknown)}: expected some of {','.join(OUTTYPES)}")
    small = ["--small"] if args.small else []
    rows = []
    for outtype in outtypes:
        checked = check(outtype, args.small)
        contenders = {who: [__file__, "--child", who, outtype, *small] for who in ("tunex", "gguf-py")}
        rows.append(row(outtype, args.small, take_turns(contenders, args.rounds), checked))
    values = values_per_step(outtypes[0], args.small)
    what = (
        f"a smoke-run subset (layers 0 and 1, 1/32 of every matrix's rows: {values / 1e6:.1f}M values)"
        if args.small
        else f"every matrix ({values / 1e9:.2f}B values)"
    )
    print(
        f"GGUF export quantization of a Llama-3.2-1B-shaped model, {what}, random values; CPU, "
        f"{os.cpu_count()} cores (tunex's packing uses all, gguf-py's numpy one); {args.rounds} interleaved "
        "rounds, median (range). Baseline: gguf-py's reference quantizer where it has one for the type, else "
        "its dequantizer on the same blocks (gguf-py cannot make Q4_K, Q5_K or Q6_K).\n"
    )
    print(
        "| outtype | block types (matrices) | baseline | tunex s | baseline s | tunex M values/s "
        "| baseline M values/s | tunex advantage, median (range) | peak RSS MB tunex / baseline | check |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
