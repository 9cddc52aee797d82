"""``tunex.merge``: fold a LoRA adapter into its base model, streaming tensor by tensor.

The CPU path is Rust end to end (mmap read, f32 GEMM, round once, sharded atomic write) with the
GIL released. The CUDA path uses the same Rust plan, reader and writer and runs only the arithmetic
in torch on the GPU. Either way memory holds about one tensor, not the model.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunex import _native
from tunex.errors import DataError
from tunex.io.atomic import scratch_folder
from tunex.io.hf import base_config_changes, bin_to_safetensors, missing, non_weight_files, require_dir, weight_format
from tunex.units import parse_size

ProgressFn = Callable[[str, int, int, int, int], Any]
_DTYPES = {
    "bf16": "bf16",
    "bfloat16": "bf16",
    "fp16": "fp16",
    "float16": "fp16",
    "half": "fp16",
    "fp32": "fp32",
    "float32": "fp32",
    "float": "fp32",
}
_CONFIG_DTYPE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclass(frozen=True)
class MergeReport:
    """What a merge did. ``bytes_written`` counts the weight files, headers included."""

    out: str
    device: str
    tensors: int
    merged: int
    replaced: int
    bytes_written: int
    seconds: float
    files: list[str] = field(default_factory=list)
    io: str = ""  # how the shards were written: "direct I/O" or "buffered writes (why)"


def _dtype_name(dtype: Any) -> str | None:
    if dtype is None:
        return None
    key = str(dtype).replace("torch.", "").lower()
    if key not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; expected one of bf16, fp16, fp32 (or None to keep the base's)")
    return _DTYPES[key]


def _may_have_cuda() -> bool:
    return any(os.path.exists(p) for p in ("/dev/nvidiactl", "/proc/driver/nvidia", "/dev/dxg"))


def _resolve_device(device: str) -> str:
    if device not in ("auto", "cpu") and not str(device).startswith("cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda' (optionally 'cuda:N'), not {device!r}")
    if device == "cpu":
        return "cpu"
    if device == "auto" and not _may_have_cuda():
        return "cpu"  # skips importing torch (a second or two) on machines without an NVIDIA driver
    import torch

    if torch.cuda.is_available():
        return "cuda" if device == "auto" else device
    if device == "auto":
        return "cpu"
    raise ValueError(f"device {device!r} requested but CUDA is not available; use --device cpu or auto")


def _adapter_weights(adapter: Path, tmp: Path) -> Path:
    st = adapter / "adapter_model.safetensors"
    if st.is_file():
        return st
    legacy = adapter / "adapter_model.bin"
    if not legacy.is_file():
        raise missing(st, "adapter weights (adapter_model.safetensors or adapter_model.bin)")
    from tunex.io.hf import load_bin
    from tunex.io.sharded import save_sharded

    save_sharded(load_bin(legacy), tmp, max_shard_size=2**62, prefix="adapter_model")
    return tmp / "adapter_model.safetensors"


def _extra_files(
    base: Path, is_clip: bool, dtype: str | None, tmp: Path, template: str, changes: dict
) -> list[tuple[str, str]]:
    """(source, name) of every non-weight file to copy; config.json rewritten if the dtype changes or
    the adapter's run changed base config keys (``changes``: its tunex_base_config.json, e.g. the
    rope_scaling it trained with), generation_config.json with the end-of-turn token of the chat
    ``template`` the adapter trained."""
    pairs = []
    if not is_clip and (base / "config.json").is_file():
        from tunex.io.generation import FILE, write_generation_config

        pairs.append((str(write_generation_config(tmp, base, base, template)), FILE))
    for f in non_weight_files(base, is_clip):
        if pairs and f.name == pairs[0][1]:
            continue
        if f.name == "config.json" and (dtype is not None or changes):
            config = json.loads(f.read_text(encoding="utf-8"))
            for key in ("torch_dtype", "dtype") if dtype is not None else ():
                if key in config or key == "torch_dtype":
                    config[key] = _CONFIG_DTYPE[dtype]
            if "rope_scaling" in changes:
                from tunex.models.config import set_rope_scaling

                set_rope_scaling(config, changes["rope_scaling"])
            patched = tmp / "config.json"
            patched.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            f = patched
        pairs.append((str(f), f.name))
    return pairs


def merge(
    base: str | os.PathLike,
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    *,
    max_shard_size: str | int = "2GB",
    dtype: Any = None,
    device: str = "auto",
    is_clip: bool = False,
    template: str = "auto",
    overwrite: bool = False,
    progress: ProgressFn | None = None,
    fsync: bool = True,
) -> MergeReport:
    """Merge the PEFT LoRA adapter folder ``adapter`` into the HF model folder ``base``, writing a
    sharded HF model to ``out``.

    Handles LoRA, rsLoRA, rank/alpha patterns, fan_in_fan_out, DoRA, embedding LoRA, lora_bias and
    modules_to_save. Weights are accumulated in float32 and rounded once to the output dtype.
    ``out`` appears only when complete; an existing ``out`` is refused unless ``overwrite``.

    Args:
        base: HF model folder (safetensors, or legacy pytorch_model*.bin).
        adapter: folder with adapter_config.json and adapter_model.safetensors (or .bin).
        out: the output folder.
        max_shard_size: e.g. ``"2GB"`` (decimal, as HF) or ``"500MiB"``.
        dtype: output dtype for floating tensors (``"bf16"``, ``torch.float16``, ...); None keeps the base's.
        device: ``"cpu"`` (Rust), ``"cuda"`` (torch on the GPU) or ``"auto"`` (cuda when available).
        is_clip: the base is a CLIP model; keep its vision tower and preprocessor config.
        template: the chat template the adapter was trained with (``"auto"``: the base's own, or a
            built-in name); its end-of-turn token joins ``eos_token_id`` in the output's
            generation_config.json (tunex.io.generation), so transformers' generate stops there.
        overwrite: replace an existing ``out``.
        progress: ``progress(name, done, total, bytes_done, bytes_total)`` after each tensor.
        fsync: flush every file to disk before the final rename (power-loss safe). False skips it;
            ``out`` still appears only when complete.

    Raises:
        FileNotFoundError: a folder or required file is missing (``filename`` is set).
        FileExistsError: ``out`` exists and ``overwrite`` is False.
        tunex.errors.DataError: adapter modules without a base tensor (all listed), shape mismatches.
        tunex.errors.FormatError: a corrupt safetensors file, index or adapter config.
        ValueError: a bad size, dtype or device.
    """
    start = time.perf_counter()
    base_dir = require_dir(base, "base model folder")
    adapter_dir = require_dir(adapter, "adapter folder")
    config = adapter_dir / "adapter_config.json"
    if not config.is_file():
        raise missing(config, "adapter_config.json (is this a PEFT adapter folder?)")
    out_dir = Path(out)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(
            17, f"output folder {out_dir} already exists; pass --overwrite (overwrite=True) to replace it", str(out_dir)
        )
    limit = parse_size(max_shard_size)
    out_dtype = _dtype_name(dtype)
    dev = _resolve_device(device)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Scratch (a converted legacy .bin base can be as large as the model) lives next to the output,
    # on the filesystem that must have room for the result anyway; owner-stamped, so a killed
    # merge's is swept by the next writer there.
    with scratch_folder(out_dir) as tmp:
        weights = _adapter_weights(adapter_dir, tmp)
        if weight_format(base_dir) == "bin":
            (tmp / "base").mkdir()
            weights_dir = bin_to_safetensors(base_dir, tmp / "base")
        else:
            weights_dir = base_dir
        extra = _extra_files(base_dir, is_clip, out_dtype, tmp, template, base_config_changes(adapter_dir))
        if dev == "cpu":
            r = _native.merge_lora(
                str(weights_dir),
                str(config),
                str(weights),
                str(out_dir),
                limit,
                out_dtype,
                overwrite,
                is_clip,
                extra,
                progress,
                fsync,
            )
        else:
            from tunex.merge_torch import merge_on_device

            plan = _native.merge_plan(str(weights_dir), str(config), str(weights), out_dtype, is_clip)
            r = merge_on_device(plan, str(weights), out_dir, limit, overwrite, extra, dev, progress, fsync)
    return MergeReport(
        out=str(out_dir),
        device=dev,
        tensors=r["tensors"],
        merged=r["merged"],
        replaced=r["replaced"],
        bytes_written=r["bytes_written"],
        seconds=time.perf_counter() - start,
        files=list(r["files"]),
        io=r.get("io", ""),
    )


__all__ = ["MergeReport", "merge", "DataError"]
