#!/usr/bin/env python3
"""LoRA merge: ``tunex convert merge`` vs the PEFT path XTuner's ``convert merge`` uses vs ``cp -r``.

Fixture (made here, seeded, the shape of /work/shared/anchors/make_base.py): a TinyLlama-1.1B-shaped
random bf16 base (hidden 2048, intermediate 5632, 32 heads / 4 KV heads, vocab 32000, 22 layers,
2GB shards) and a random r=64, alpha=16 all-linear PEFT adapter (bf16). A second base with fewer
layers shows whether peak memory grows with model size.

Each tool runs as its own subprocess; wall time is the whole command (interpreter start and imports
included, as a user sees it) and peak RSS is that process's ru_maxrss (os.wait4). The PEFT path:
from_pretrained(bf16, low_cpu_mem_usage) -> PeftModel -> merge_and_unload -> save_pretrained(2GB).
tunex fsyncs its output before the atomic rename by default; PEFT and cp do not, so the like-for-like
row is ``--no-fsync`` (the output still appears atomically) and "cp && sync" shows the disk's own
speed for the fsync row. "GEMM" is the time torch
needs for all B @ A products in fp32 on this machine: the compute floor of any merge.

Usage: python bench/bench_merge.py [--layers 22] [--small-layers 6] [--workdir DIR] [--skip-peft]
Needs: torch; transformers + peft for the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HIDDEN, INTER, HEADS, KV_HEADS, VOCAB, RANK, ALPHA = 2048, 5632, 32, 4, 32000, 64, 16
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def shapes(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    kv = HIDDEN // HEADS * KV_HEADS
    out = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [
            (p + "self_attn.q_proj.weight", (HIDDEN, HIDDEN)),
            (p + "self_attn.k_proj.weight", (kv, HIDDEN)),
            (p + "self_attn.v_proj.weight", (kv, HIDDEN)),
            (p + "self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
            (p + "mlp.gate_proj.weight", (INTER, HIDDEN)),
            (p + "mlp.up_proj.weight", (INTER, HIDDEN)),
            (p + "mlp.down_proj.weight", (HIDDEN, INTER)),
            (p + "input_layernorm.weight", (HIDDEN,)),
            (p + "post_attention_layernorm.weight", (HIDDEN,)),
        ]
    return out + [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]


def make_fixture(root: Path, layers: int) -> tuple[Path, Path]:
    """Base + adapter folders under root (reused when already there)."""
    import torch
    from tunex import save_sharded

    base, adapter = root / "base", root / "adapter"
    if (base / "config.json").is_file() and (adapter / "adapter_config.json").is_file():
        return base, adapter
    shutil.rmtree(root, ignore_errors=True)
    torch.manual_seed(0)
    state = {}
    for name, shape in shapes(layers):
        state[name] = (torch.ones(shape) if len(shape) == 1 else torch.randn(shape) * 0.02).to(torch.bfloat16)
    save_sharded(state, base, max_shard_size="2GB")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "vocab_size": VOCAB,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    (base / "config.json").write_text(json.dumps(config, indent=2))
    (base / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    lora = {}
    for name, shape in shapes(layers):
        module = name[: -len(".weight")]
        if module.rsplit(".", 1)[-1] in LINEARS and module.startswith("model.layers."):
            out_f, in_f = shape
            lora[f"base_model.model.{module}.lora_A.weight"] = ((torch.rand(RANK, in_f) - 0.5) / in_f**0.5).to(
                torch.bfloat16
            )
            lora[f"base_model.model.{module}.lora_B.weight"] = (torch.randn(out_f, RANK) * 0.02).to(torch.bfloat16)
    save_sharded(lora, adapter, max_shard_size=2**62, prefix="adapter_model")
    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": RANK,
        "lora_alpha": ALPHA,
        "lora_dropout": 0.0,
        "target_modules": list(LINEARS),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "base_model_name_or_path": str(base),
        "init_lora_weights": True,
    }
    (adapter / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return base, adapter


TUNEX = "tunex convert merge --device cpu --no-fsync"
PEFT_CHILD = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
m = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.bfloat16, low_cpu_mem_usage=True)
m = PeftModel.from_pretrained(m, adapter)
m = m.merge_and_unload()
m.save_pretrained(out, max_shard_size="2GB", safe_serialization=True)
"""


def run(cmd: list[str]) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds user+sys, peak RSS MB) of one command. /usr/bin/time measures:
    Linux carries a parent's RSS high-water mark into a forked child, so this (large) process
    cannot read the child's itself. Dirty pages are flushed first so no run pays for the previous
    one's writeback."""
    os.sync()
    start = time.perf_counter()
    proc = subprocess.run(
        ["/usr/bin/time", "-f", "TUNEX_TIME %M %U %S", *cmd],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    kb, user, sys_ = [line for line in proc.stderr.splitlines() if line.startswith("TUNEX_TIME")][-1].split()[1:]
    return wall, float(user) + float(sys_), int(kb) / 1024


def gemm_seconds(adapter: Path) -> float:
    """fp32 B @ A for every module of the adapter, with torch: the merge's compute floor."""
    import torch
    from tunex.io import SafetensorsFile

    f = SafetensorsFile(adapter / "adapter_model.safetensors")
    pairs = [(f.get(k).float(), f.get(k.replace("lora_A", "lora_B")).float()) for k in f.keys() if "lora_A" in k]
    torch.mm(pairs[0][1], pairs[0][0])
    start = time.perf_counter()
    for a, b in pairs:
        torch.mm(b, a)
    return time.perf_counter() - start


def max_ulp_diff(a_dir: Path, b_dir: Path, names: list[str]) -> int:
    from tunex.io import load_state_dict

    a, b = load_state_dict(a_dir), load_state_dict(b_dir)
    return max(
        int(
            (a[n].view(dtype=__import__("torch").int16).int() - b[n].view(dtype=__import__("torch").int16).int())
            .abs()
            .max()
        )
        for n in names
    )


def bench_size(root: Path, layers: int, skip_peft: bool) -> list[dict]:
    base, adapter = make_fixture(root / f"l{layers}", layers)
    rows = []
    out = root / "out"

    def fresh() -> Path:
        shutil.rmtree(out, ignore_errors=True)
        return out

    # Warm the page cache the same way for everyone: one untimed read of the base.
    for f in base.iterdir():
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass
    wall, cpu, rss = run(["cp", "-r", str(base), str(fresh())])
    rows.append({"tool": "cp -r base", "wall": wall, "cpu": cpu, "rss": rss})
    wall, cpu, rss = run(["sh", "-c", f"cp -r '{base}' '{fresh()}' && sync '{out}'/*"])
    rows.append({"tool": "cp -r base && sync (disk floor)", "wall": wall, "cpu": cpu, "rss": rss})
    merge_cmd = [
        sys.executable,
        "-m",
        "tunex",
        "convert",
        "merge",
        str(base),
        str(adapter),
        str(fresh()),
        "--device",
        "cpu",
        "--max-shard-size",
        "2GB",
        "-q",
    ]
    wall, cpu, rss = run(merge_cmd)
    rows.append({"tool": "tunex convert merge --device cpu (fsync, default)", "wall": wall, "cpu": cpu, "rss": rss})
    fresh()
    wall, cpu, rss = run(merge_cmd + ["--no-fsync"])
    rows.append({"tool": TUNEX, "wall": wall, "cpu": cpu, "rss": rss})
    if not skip_peft:
        tunex_out = root / "out_tunex"
        shutil.rmtree(tunex_out, ignore_errors=True)
        out.rename(tunex_out)
        wall, cpu, rss = run([sys.executable, "-c", PEFT_CHILD, str(base), str(adapter), str(fresh())])
        rows.append({"tool": "PEFT merge_and_unload + save_pretrained", "wall": wall, "cpu": cpu, "rss": rss})
        checked = [n for n, _ in shapes(layers) if n.endswith(("q_proj.weight", "down_proj.weight"))][:4]
        rows.append(
            {
                "note": f"max bf16 ulp difference tunex vs PEFT on {len(checked)} merged tensors: "
                f"{max_ulp_diff(tunex_out, out, checked)}"
            }
        )
        shutil.rmtree(tunex_out, ignore_errors=True)
    rows.append(
        {"tool": "GEMM floor (torch fp32 B@A, in-process)", "wall": gemm_seconds(adapter), "cpu": None, "rss": None}
    )
    shutil.rmtree(out, ignore_errors=True)
    return rows


def table(results: dict[int, list[dict]]) -> str:
    lines = [
        "| layers | tool | wall s | CPU s (user+sys) | peak RSS MB | PEFT / tool (wall) | PEFT / tool (CPU) |",
        "|---|---|---|---|---|---|---|",
    ]
    notes = []
    for layers, rows in results.items():
        peft = next((r for r in rows if r.get("tool", "").startswith("PEFT")), None)
        for r in rows:
            if "note" in r:
                notes.append(f"- {layers} layers: {r['note']}")
                continue
            timed = peft is not None and r["cpu"] is not None
            ratio = f"{peft['wall'] / r['wall']:.1f}x" if timed else ""
            cpu_ratio = f"{peft['cpu'] / max(r['cpu'], 0.01):.1f}x" if timed else ""
            rss = f"{r['rss']:.0f}" if r["rss"] is not None else ""
            cpu = f"{r['cpu']:.2f}" if r["cpu"] is not None else ""
            lines.append(f"| {layers} | {r['tool']} | {r['wall']:.2f} | {cpu} | {rss} | {ratio} | {cpu_ratio} |")
        t = {r["tool"]: r["wall"] for r in rows if "tool" in r}
        floor = t["cp -r base"] + t["GEMM floor (torch fp32 B@A, in-process)"]
        notes.append(f"- {layers} layers: tunex --no-fsync / (cp + GEMM) = {t[TUNEX] / floor:.2f}")
    return "\n".join(lines + [""] + notes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--small-layers", type=int, default=6, help="second model size (0 to skip)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "tunex-bench-merge")
    ap.add_argument("--skip-peft", action="store_true")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = {}
    for layers in [args.small_layers, args.layers]:
        if layers > 0:
            print(f"benchmarking {layers} layers ...", file=sys.stderr)
            results[layers] = bench_size(args.workdir, layers, args.skip_peft)
    load = os.getloadavg()[0]
    print(table(results))
    print(
        f"- load average (1 min) at the end: {load:.1f} on {os.cpu_count()} cores: other jobs shared the "
        "machine, so compare rows within one run (the CPU-time column is the steadier one)"
    )


if __name__ == "__main__":
    main()
