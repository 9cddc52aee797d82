#!/usr/bin/env python3
"""The GPU device check: kernel correctness on CUDA, then 7B QLoRA tokens/s and peak memory.

1. Every tunex kernel's Triton path against its torch reference on CUDA tensors at Llama-2-7B
   sizes (fp32 within 1e-5 relative, bf16 within 1e-2), with forward+backward times of the Triton
   and torch paths.
2. A Llama-2-7B-shaped checkpoint with random bf16 weights is written to a temporary folder (no
   download), then each contender loads it quantizing at load (NF4, double quant, blocksize 64) and
   trains QLoRA r=64 alpha=16 dropout 0.1 on all linear layers, gradient checkpointing, seq 2048,
   batch 1, bf16 compute, AdamW: tunex, and transformers+PEFT+bitsandbytes when importable. Each runs
   in its own subprocess so ``torch.cuda.max_memory_allocated`` is its own. ``tunex estimate``'s
   prediction for the same plan is printed next to tunex's measured peak.
3. The memory options, each a tunex run of its own (``--runs``, in this order by default): fp32
   adapters + AdamW (the baseline's settings), bf16 adapters + 8-bit AdamW (issue 23's goal
   settings), bf16 adapters + AdamW with the model sharded by FSDP2 as ``train.fsdp`` does (one
   process: the NF4 codes and absmax laid out by blocks, gathered by NCCL before each layer), and
   bf16 adapters + paged 8-bit AdamW. A run that would start after ``--budget`` is skipped.

Prints one markdown table. Budget: under 8 minutes on one H200 (most of it writing and loading the
13.5 GB checkpoint). ``--tiny`` runs the same code on a 2-layer model (CPU allowed, kernels through
triton's interpreter) to check the script itself.

Usage: python bench/gpu_check.py [--tiny] [--steps N] [--no-baseline] [--keep DIR] [--runs SPECS] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LLAMA2_7B = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "bfloat16",
}
TINY = {
    **LLAMA2_7B,
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "vocab_size": 256,
}
LORA = {"r": 64, "alpha": 16, "dropout": 0.1}
WARMUP = 2
# tunex runs: ADAPTER_DTYPE:OPTIMIZER[:fsdp], the first measured plain, offloaded and plain again
RUNS = "float32:adamw,bfloat16:adamw_8bit,bfloat16:adamw:fsdp,bfloat16:paged_adamw_8bit"


def parse_runs(text: str) -> list[tuple[str, str, bool]]:
    """``--runs``: (adapter dtype, optimizer, FSDP2) per comma-separated ADAPTER_DTYPE:OPTIMIZER[:fsdp]."""
    runs = []
    for spec in filter(None, (s.strip() for s in text.split(","))):
        parts = spec.split(":")
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "fsdp"):
            raise SystemExit(f"--runs: {spec!r} is not ADAPTER_DTYPE:OPTIMIZER[:fsdp] (e.g. bfloat16:adamw_8bit)")
        if parts[0] not in ("float32", "bfloat16") or parts[1] not in ("adamw", "adamw_8bit", "paged_adamw_8bit"):
            raise SystemExit(f"--runs: {spec!r}: float32|bfloat16 : adamw|adamw_8bit|paged_adamw_8bit")
        runs.append((parts[0], parts[1], len(parts) == 3))
    return runs


def run_name(adapter_dtype: str, optimizer: str, fsdp: bool) -> str:
    tag = "" if adapter_dtype == "float32" else f", {adapter_dtype} adapters"
    tag += "" if optimizer == "adamw" else f", {optimizer}"
    return "tunex" + tag + (", FSDP2 (1 process)" if fsdp else "")


# ---- 1. kernels -----------------------------------------------------------------------------------


def _rel(a, b) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _timed(fn, device, repeat: int = 5) -> float:
    import torch

    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat * 1e3


def kernel_rows(device, tiny: bool) -> list[list[str]]:
    import torch
    from tunex import kernels

    n, h, i, v, heads = (64, 64, 160, 256, 4) if tiny else (2048, 4096, 11008, 32000, 32)
    d = h // heads
    rows = []

    def case(name, dtype, make, run, ref):
        torch.manual_seed(0)
        inputs = make(dtype)
        worst = 0.0
        outs = {}
        for backend in ("triton", "torch"):
            leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
            out = run(leaves, backend)
            out.backward(torch.ones_like(out) if out.dim() else None)
            outs[backend] = [out] + [t.grad for t in leaves if t.requires_grad]
        leaves = [t.detach().float().clone().requires_grad_(t.is_floating_point()) for t in inputs]
        out = ref(leaves)
        out.backward(torch.ones_like(out) if out.dim() else None)
        expected = [out] + [t.grad for t in leaves if t.requires_grad]
        worst = max(_rel(a, b) for a, b in zip(outs["triton"], expected))
        tol = 1e-5 if dtype == torch.float32 else 1e-2

        def step(backend):
            leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in inputs]
            out = run(leaves, backend)
            out.backward(torch.ones_like(out) if out.dim() else None)

        t_triton = _timed(lambda: step("triton"), device)
        t_torch = _timed(lambda: step("torch"), device)
        rows.append(
            [
                f"kernel {name} {str(dtype)[6:]}",
                "pass" if worst <= tol else "FAIL",
                f"{worst:.2e}",
                f"{t_triton:.3f} ms",
                f"{t_torch:.3f} ms",
                f"{t_torch / t_triton:.2f}x",
            ]
        )

    for dtype in (torch.float32, torch.bfloat16):
        case(
            "rms_norm",
            dtype,
            lambda dt: [torch.randn(n, h, dtype=dt, device=device), torch.randn(h, dtype=dt, device=device)],
            lambda t, b: kernels.rms_norm(t[0], t[1], 1e-5, backend=b),
            lambda t: kernels.rms_norm_reference(t[0], t[1], 1e-5),
        )
        cos, sin = torch.randn(n, d, dtype=dtype, device=device), torch.randn(n, d, dtype=dtype, device=device)
        case(
            "rope",
            dtype,
            lambda dt: [torch.randn(1, heads, n, d, dtype=dt, device=device)],
            lambda t, b: kernels.apply_rope(t[0], cos, sin, backend=b),
            lambda t: kernels.rope_reference(t[0], cos.float(), sin.float()),
        )
        case(
            "swiglu",
            dtype,
            lambda dt: [torch.randn(n, i, dtype=dt, device=device), torch.randn(n, i, dtype=dt, device=device)],
            lambda t, b: kernels.swiglu(t[0], t[1], backend=b),
            lambda t: kernels.swiglu_reference(t[0], t[1]),
        )
        labels = torch.randint(0, v, (n,), device=device)
        case(
            "cross_entropy",
            dtype,
            lambda dt: [torch.randn(n, h, dtype=dt, device=device), torch.randn(v, h, dtype=dt, device=device) * 0.02],
            lambda t, b: kernels.chunked_cross_entropy(t[0], t[1], labels, backend=b),
            lambda t: kernels.cross_entropy_reference(t[0], t[1], labels),
        )
    rows += lora_rows(device, n, h, i)
    rows += nf4_rows(device, h, i)
    return rows


def lora_rows(device, n: int, h: int, i: int) -> list[list[str]]:
    """The fused LoRA linear (dropout 0.1) vs plain autograd with the same mask, over a base weight
    produced by a callable that allocates a fresh tensor, as a 4-bit dequantization does: error of
    the torch-dropout and the Triton-dropout paths, time and peak memory of the default path."""
    import torch
    from tunex.kernels import lora_linear, lora_linear_reference, lora_triton
    from tunex.kernels.lora import _draw_seed

    p, s = 0.1, 0.25
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        x = torch.randn(n, h, dtype=dtype, device=device)
        w = torch.randn(i, h, dtype=dtype, device=device) * 0.02
        a = torch.randn(64, h, device=device) * 0.02
        b = torch.randn(i, 64, device=device) * 0.02

        def triton_mask_reference(x_, base, a_, b_, scale, dropout):
            torch.manual_seed(1)  # the seed the fused call drew
            keep = lora_triton.dropout(torch.ones_like(x_.detach()), dropout, _draw_seed())
            return x_ @ base(x_.dtype).T + scale * ((x_ * keep) @ a_.to(dtype).T) @ b_.to(dtype).T

        def run(fn, backend=None):
            leaves = [t.clone().requires_grad_() for t in (x, a, b)]
            torch.manual_seed(1)
            extra = {} if backend is None else {"backend": backend}
            out = fn(leaves[0], lambda dtype: w.clone(), leaves[1], leaves[2], s, dropout=p, **extra)
            out.backward(torch.ones_like(out))
            return [out] + [t.grad for t in leaves]

        # the reference draws its mask the way "auto" would (Triton's on CUDA): pin it to torch's here
        before = os.environ.get("TUNEX_KERNELS")
        os.environ["TUNEX_KERNELS"] = "torch"
        try:
            expected_torch = run(lora_linear_reference)
        finally:
            os.environ.pop("TUNEX_KERNELS") if before is None else os.environ.__setitem__("TUNEX_KERNELS", before)
        err_torch = max(_rel(u, v) for u, v in zip(run(lora_linear, "torch"), expected_torch))
        err_triton = max(_rel(u, v) for u, v in zip(run(lora_linear, "triton"), run(triton_mask_reference)))
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        peaks = []
        for fn in (lora_linear, lora_linear_reference):
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
                run(fn)
                peaks.append((torch.cuda.max_memory_allocated(device) - base) / 2**20)
        t_fused, t_ref = _timed(lambda: run(lora_linear), device), _timed(lambda: run(lora_linear_reference), device)
        memory = f", peak {peaks[0]:.0f} vs {peaks[1]:.0f} MiB" if peaks else ""
        ok = err_torch <= tol and err_triton <= tol
        rows.append(
            [
                f"kernel lora_linear {str(dtype)[6:]} (fused vs autograd)",
                "pass" if ok else "FAIL",
                f"{err_torch:.2e} (torch mask) / {err_triton:.2e} (Triton mask)",
                f"{t_fused:.3f} ms",
                f"{t_ref:.3f} ms",
                f"{t_ref / t_fused:.2f}x{memory}",
            ]
        )
    return rows


def nf4_rows(device, h: int, i: int) -> list[list[str]]:
    """4-bit dequantization on ``device`` (the Triton kernel of tunex.kernels.nf4_dequant on CUDA)
    vs the Rust CPU dequantization of the same packed weight: bit-exact expected."""
    import torch

    try:
        from tunex import quant
    except ImportError as exc:
        return [["kernel nf4 dequantize", "skipped", f"({exc})", "", "", ""]]
    rows = []
    for quant_type in ("nf4", "fp4"):
        w = torch.randn(i, h, dtype=torch.bfloat16)
        qw = quant.quantize(w, quant_type, 64, True)
        expected = quant.dequantize(qw, torch.bfloat16)
        on_device = qw.to(device)
        got = quant.dequantize(on_device, torch.bfloat16).cpu()
        exact = torch.equal(got, expected)
        t = _timed(lambda: quant.dequantize(on_device, torch.bfloat16), device)
        t_torch = ratio = ""
        try:  # the same dequantization through the kernel module's torch path
            from tunex.kernels.nf4_dequant import dequantize_4bit

            absmax = on_device.absmax_f32()
            ms = _timed(
                lambda: dequantize_4bit(
                    on_device.packed, absmax, quant_type, 64, on_device.shape, torch.bfloat16, backend="torch"
                ),
                device,
            )
            t_torch, ratio = f"{ms:.3f} ms", f"{ms / t:.2f}x"
        except ImportError:
            pass
        rows.append(
            [
                f"kernel {quant_type} dequantize bf16 ({i}x{h}, double quant)",
                "pass" if exact else "FAIL",
                "bit-exact" if exact else f"{_rel(got, expected):.2e}",
                f"{t:.3f} ms",
                t_torch,
                ratio,
            ]
        )
    return rows


# ---- 2. training ----------------------------------------------------------------------------------


def write_checkpoint(folder: Path, config: dict) -> None:
    """Random bf16 weights (std 0.02, norms 1) in HF Llama names, one safetensors shard per layer."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    h, i, v, layers = (config[k] for k in ("hidden_size", "intermediate_size", "vocab_size", "num_hidden_layers"))
    # 6.7 B normal samples: drawn on the GPU when there is one (seconds instead of minutes)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device).manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=gen, device=device) * 0.02).to(torch.bfloat16).cpu()

    kv = config["num_key_value_heads"] * h // config["num_attention_heads"]

    def ones():
        return torch.ones(h, dtype=torch.bfloat16)

    def shards():  # made one at a time, so host memory holds one layer
        yield {"model.embed_tokens.weight": rand(v, h), "model.norm.weight": ones(), "lm_head.weight": rand(v, h)}
        for n in range(layers):
            p = f"model.layers.{n}."
            yield {
                p + "self_attn.q_proj.weight": rand(h, h),
                p + "self_attn.k_proj.weight": rand(kv, h),
                p + "self_attn.v_proj.weight": rand(kv, h),
                p + "self_attn.o_proj.weight": rand(h, h),
                p + "mlp.gate_proj.weight": rand(i, h),
                p + "mlp.up_proj.weight": rand(i, h),
                p + "mlp.down_proj.weight": rand(h, i),
                p + "input_layernorm.weight": ones(),
                p + "post_attention_layernorm.weight": ones(),
            }

    weight_map, total = {}, 0
    for k, shard in enumerate(shards()):
        name = f"model-{k + 1:05d}-of-{layers + 1:05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update({t: name for t in shard})
        total += sum(t.numel() * t.element_size() for t in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _measure(step, device, seq: int, steps: int) -> dict:
    import torch

    load_peak = None
    if device.type == "cuda":  # the training peak, not the loading one (reported apart)
        torch.cuda.synchronize()
        load_peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(WARMUP):  # allocator, optimizer state, Triton compilation
        loss = step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    out = {"tokens_per_s": seq * steps / elapsed, "loss": float(loss)}
    if device.type == "cuda":
        out["peak_allocated"] = torch.cuda.max_memory_allocated(device)
        out["peak_reserved"] = torch.cuda.max_memory_reserved(device)
        out["load_peak"] = load_peak
    return out


def profile_step(step, device, title: str) -> None:
    """With GPU_CHECK_PROFILE=1 on CUDA: torch.profiler's top kernels of one step, to stderr."""
    import torch

    if os.environ.get("GPU_CHECK_PROFILE") != "1" or device.type != "cuda":
        return
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=50)
    print(f"--- profile of one step, {title} ---\n{table}", file=sys.stderr)


def _one_process_group(device) -> None:
    """A process group of one (NCCL on CUDA, gloo on the CPU), for FSDP2 without torchrun."""
    import socket

    import torch.distributed as dist

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def child_tunex(
    folder: str,
    seq: int,
    steps: int,
    device_name: str,
    adapter_dtype: str = "float32",
    optimizer: str = "adamw",
    fsdp: bool = False,
    again: bool = True,
) -> dict:
    import torch
    from tunex.config import validate
    from tunex.train.build import autocast, build_model, enable_gradient_checkpointing
    from tunex.train.loss import linear_cross_entropy, shifted
    from tunex.train.optim import build_optimizer

    device = torch.device(device_name)
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    cfg = validate(
        {
            "model": {"path": folder, "dtype": dtype},
            "data": {"path": "-", "max_length": seq},
            "method": {
                "kind": "qlora",
                "target_modules": "all-linear",
                "quant_type": "nf4",
                "blocksize": 64,
                "double_quant": True,
                "compute_dtype": dtype,
                **LORA,
            },
            "train": {
                "dtype": dtype,
                "gradient_checkpointing": True,
                "batch_size": 1,
                "grad_accum": 1,
                "adapter_dtype": adapter_dtype,
                "optimizer": optimizer,
                "fsdp": fsdp,
            },
        }
    )
    torch.manual_seed(0)
    started = time.perf_counter()
    # train.fsdp: built on the host, then FSDP2 moves each layer's shards to the device (as the trainer does)
    model = build_model(cfg, device, load_device=torch.device("cpu") if fsdp else None)
    enable_gradient_checkpointing(model)
    loss_module = None
    if fsdp:
        from tunex.dist.env import DistEnv
        from tunex.dist.wrap import LossModule, nf4_layers, shard_full_model

        _one_process_group(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        shard_full_model(model, DistEnv(0, 0, 1, backend), device, cfg.train.dtype, adapters=True)
        loss_module = LossModule(model)
        done, layers, mine, every = nf4_layers(model)
        print(f"FSDP2: {done} of {layers} NF4 base layers sharded by blocks ({mine} of {every} bytes)", file=sys.stderr)
    load_s = time.perf_counter() - started
    model.train()
    bf16 = adapter_dtype == "bfloat16"
    params = [p for p in model.parameters() if p.requires_grad]  # after sharding: FSDP2's shards
    opt = build_optimizer(params, 2e-4, (0.9, 0.999), 0.0, bf16_adapters=bf16, kind=optimizer, seed=0)
    x = torch.randint(0, model.config.vocab_size, (1, seq), device=device)
    positions = torch.arange(seq, device=device)[None]

    def step():  # what the trainer's micro-step does, without its data and distributed plumbing
        with autocast(cfg.train.dtype, device):
            if loss_module is not None:  # the trainer's FSDP2 path: the root gathers around hidden_states
                loss = loss_module(x, x, positions)
            else:
                hidden, labels = shifted(model.hidden_states(x, positions), x)
                loss = linear_cross_entropy(hidden, model.lm_head.weight, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    plain = {**_measure(step, device, seq, steps), "load_s": load_s}
    profile_step(step, device, "plain checkpoints")
    model.model.offload_checkpoints = True  # same model, checkpoints in pinned CPU memory
    offloaded = {**_measure(step, device, seq, steps), "load_s": load_s}
    profile_step(step, device, "offloaded checkpoints")
    offloaded.pop("load_peak", None)
    if not again:
        return {"plain": plain, "offloaded": offloaded}
    model.model.offload_checkpoints = False  # plain again: does the order of the runs matter?
    repeat = {**_measure(step, device, seq, steps), "load_s": load_s}
    repeat.pop("load_peak", None)
    return {"plain": plain, "offloaded": offloaded, "again": repeat}


def child_hf(folder: str, seq: int, steps: int, device_name: str) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    device = torch.device(device_name)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    started = time.perf_counter()
    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
    )
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, quantization_config=quant, device_map={"": device}
    )
    load_s = time.perf_counter() - started
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(
        model,
        LoraConfig(
            r=LORA["r"],
            lora_alpha=LORA["alpha"],
            lora_dropout=LORA["dropout"],
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        ),
    )
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    fused = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.AdamW(params, lr=2e-4, **fused)
    x = torch.randint(0, model.config.vocab_size, (1, seq), device=device)
    amp = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )

    def step():
        with amp:
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return {**_measure(step, device, seq, steps), "load_s": load_s}


def run_child(
    which: str,
    folder: Path,
    seq: int,
    steps: int,
    device: str,
    timeout: float,
    adapter_dtype: str = "float32",
    optimizer: str = "adamw",
    fsdp: bool = False,
    again: bool = True,
) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        which,
        "--folder",
        str(folder),
        "--seq",
        str(seq),
        "--steps",
        str(steps),
        "--device",
        device,
        "--adapter-dtype",
        adapter_dtype,
        "--optimizer",
        optimizer,
    ]
    cmd += (["--fsdp"] if fsdp else []) + ([] if again else ["--no-again"])
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    sys.stderr.write(done.stderr[-12000:])
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:]
        return {"error": (" ".join(tail) or f"exit {done.returncode}").replace("|", "/")}
    return json.loads(done.stdout.strip().splitlines()[-1])


def estimate_peak(
    config: dict, seq: int, offload: bool, adapter_dtype: str = "float32", optimizer: str = "adamw"
) -> int:
    from tunex.estimate import Plan, estimate_memory, shape_from_config_json

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(config))
        shape = shape_from_config_json(tmp)
    plan = Plan(
        kind="qlora",
        seq_len=seq,
        batch=1,
        r=LORA["r"],
        dropout=LORA["dropout"],
        offload_checkpoints=offload,
        adapter_bytes=2 if adapter_dtype == "bfloat16" else 4,
        optimizer=optimizer,
    )
    return estimate_memory(shape, plan).peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="2-layer model: check the script itself")
    ap.add_argument("--steps", type=int, default=5, help="measured training steps (after 2 warm-up steps)")
    ap.add_argument("--no-baseline", action="store_true", help="skip transformers+PEFT+bitsandbytes")
    ap.add_argument("--keep", type=Path, default=None, help="write the random checkpoint here and keep it")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", type=Path, default=None, help="also write the table here, after each section")
    ap.add_argument(
        "--budget", type=float, default=420.0, help="seconds; a training run that would start later is skipped"
    )
    ap.add_argument("--no-kernels", action="store_true", help="skip the kernel rows")
    ap.add_argument(
        "--runs",
        default=RUNS,
        help="tunex runs, comma-separated ADAPTER_DTYPE:OPTIMIZER[:fsdp] (default %(default)s)",
    )
    ap.add_argument(
        "--adapter-dtypes",
        default=None,
        help="comma-separated train.adapter_dtype values, one AdamW tunex run each (instead of --runs)",
    )
    ap.add_argument("--adapter-dtype", default="float32", help=argparse.SUPPRESS)
    ap.add_argument("--optimizer", default="adamw", help=argparse.SUPPRESS)
    ap.add_argument("--fsdp", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--no-again", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child", choices=["tunex", "hf"], help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--seq", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        if args.child == "tunex":
            got = child_tunex(
                args.folder,
                args.seq,
                args.steps,
                args.device,
                args.adapter_dtype,
                args.optimizer,
                args.fsdp,
                again=not args.no_again,
            )
        else:
            got = child_hf(args.folder, args.seq, args.steps, args.device)
        print(json.dumps(got))
        return

    import torch

    if args.adapter_dtypes:
        runs = [(dtype.strip(), "adamw", False) for dtype in args.adapter_dtypes.split(",") if dtype.strip()]
    else:
        runs = parse_runs(args.runs)
    device_name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_name == "cpu":
        if not args.tiny:
            # Recorded by `python bench/run.py gpu_check` on a machine without a GPU, so
            # BENCHMARKS.md says plainly that the GPU table is still to be made.
            print(
                "No GPU on the machine that ran this, so no GPU table yet. The device check is ready: "
                "`python bench/gpu_check.py` on a CUDA machine (under 8 minutes on one H200; see "
                "docs/GPU.md for running it through the device tool). `--tiny` runs the same code on a "
                "2-layer model on the CPU."
            )
            return
        os.environ["TRITON_INTERPRET"] = "1"  # before the first Triton kernel is imported
    device = torch.device(device_name)
    config = TINY if args.tiny else LLAMA2_7B
    seq = 64 if args.tiny else 2048
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (triton interpreter)"
    print(f"device: {gpu}; torch {torch.__version__}", file=sys.stderr)

    deadline = time.monotonic() + args.budget
    header = (
        f"GPU: {gpu}; torch {torch.__version__}, CUDA {torch.version.cuda}. Kernels: Triton vs torch path, "
        f"forward+backward at Llama-2-7B sizes (2048 tokens). Training: "
        f"{'tiny 2-layer' if args.tiny else 'Llama-2-7B-shaped'} random model, QLoRA NF4+double quant, r=64 "
        f"all-linear, dropout 0.1, seq {seq}, batch 1, gradient checkpointing, {args.steps} steps after "
        f"{WARMUP} warm-up.\n"
    )
    rows: list[list[str]] = []
    results: dict[str, dict] = {}

    def report() -> None:
        """Print the table so far (and write it to --out): a time-out or crash later keeps what ran."""
        text = table(header, rows, results, config, seq)
        if args.out is not None:
            args.out.write_text(text)
        print(text, file=sys.stderr)

    try:
        rows += [] if args.no_kernels else kernel_rows(device, args.tiny)
    except Exception as exc:  # a failing kernel section must not cost the training rows
        rows.append(["kernel section", "error", f"{type(exc).__name__}: {exc}"[:160].replace("|", "/"), "", "", ""])
    report()
    torch.cuda.empty_cache() if device.type == "cuda" else None
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp) / "llama2-7b-random"
        started = time.perf_counter()
        write_checkpoint(folder, config)
        print(f"random checkpoint written in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        # the first tunex run, then the baseline (the same settings), then the other memory options
        children = [("tunex", run_name(*run), run) for run in runs[:1]]
        children += [] if args.no_baseline else [("hf", "transformers+PEFT+bnb", ("float32", "adamw", False))]
        children += [("tunex", run_name(*run), run) for run in runs[1:]]
        for k, (which, name, (adapter_dtype, optimizer, fsdp)) in enumerate(children):
            left = deadline - time.monotonic()
            if left < 30:
                results[name] = {"error": f"skipped: the {args.budget:.0f} s budget was spent"}
                continue
            got = run_child(
                which,
                folder,
                seq,
                args.steps,
                device_name,
                timeout=left,
                adapter_dtype=adapter_dtype,
                optimizer=optimizer,
                fsdp=fsdp,
                again=k == 0,
            )
            if which == "tunex":
                plan = {"adapter_dtype": adapter_dtype, "optimizer": optimizer, "fsdp": fsdp}
                results[name] = {**got.get("plain", got), "plan": {**plan, "offload": False}}
                results[f"{name}, offloaded checkpoints"] = {
                    **got.get("offloaded", got),
                    "plan": {**plan, "offload": True},
                }
                if "again" in got:
                    results[f"{name} (plain, measured again after the offloaded run)"] = got["again"]
            else:
                results[name] = got
            report()
    print(table(header, rows, results, config, seq))


def table(header: str, rows: list[list[str]], results: dict[str, dict], config: dict, seq: int) -> str:
    base = results.get("transformers+PEFT+bnb", {})
    lines = [
        header,
        "| check | result | max rel err / tokens/s | Triton / peak allocated | torch / peak reserved | ratio |",
    ]
    lines.append("|---|---|---|---|---|---|")
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| train {name} | error | {r['error'][:160]} | | | |")
            continue
        ratio = ""
        if name.startswith("tunex") and "tokens_per_s" in base:
            ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x tokens/s"
            if "peak_allocated" in base and "peak_allocated" in r:
                ratio += f", {r['peak_allocated'] / base['peak_allocated']:.2f}x memory"
        gib = lambda k: f"{r[k] / 2**30:.2f} GiB" if k in r else "n/a"
        load = f", load peak {r['load_peak'] / 2**30:.2f} GiB" if r.get("load_peak") else ""
        lines.append(
            f"| train {name} | loss {r['loss']:.3f}, load {r['load_s']:.0f} s{load} | {r['tokens_per_s']:.0f} tok/s "
            f"| {gib('peak_allocated')} | {gib('peak_reserved')} | {ratio} |"
        )
    for name, r in results.items():
        plan = r.get("plan")
        if plan is None:
            continue
        if plan["fsdp"]:  # one process under FSDP2 holds its whole model twice (shards + gathered root/layers)
            lines.append(f"| tunex estimate, {name} | not modelled | the estimate models FSDP2 over 2+ GPUs | | | |")
            continue
        try:
            predicted = estimate_peak(config, seq, plan["offload"], plan["adapter_dtype"], plan["optimizer"])
        except Exception as exc:
            lines.append(f"| tunex estimate, {name} | error | {type(exc).__name__}: {exc} | | | |")
            continue
        measured = r.get("peak_allocated")
        vs = f" (measured {measured / 2**30:.2f} GiB: {measured / predicted:.2f}x)" if measured else ""
        lines.append(f"| tunex estimate, {name} | predicted peak | {predicted / 2**30:.2f} GiB{vs} | | | |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
