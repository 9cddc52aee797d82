"""The merge arithmetic in torch (for ``device="cuda"``), driven by the Rust merge plan and written
through the Rust shard writer, so planning, checks and output are the same as on the CPU path."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunex import _native
from tunex.errors import DataError
from tunex.io.dtypes import to_torch
from tunex.io.safetensors import SafetensorsFile
from tunex.io.sharded import byte_view


def _merged(item: dict, source: Any, adapter: SafetensorsFile, device: str) -> Any:
    import torch

    w = source.to(device=device, dtype=torch.float32)
    lora = item["lora"]
    if lora is not None:
        a = adapter.get(lora["a"]).to(device=device, dtype=torch.float32)  # (r, in)
        b = adapter.get(lora["b"]).to(device=device, dtype=torch.float32)  # (out, r)
        delta = b @ a
        w.add_(delta.T if lora["transposed"] else delta, alpha=lora["scaling"])
        if lora["magnitude"] is not None:
            m = adapter.get(lora["magnitude"]).to(device=device, dtype=torch.float32)
            # DoRA: each output feature (row; column when transposed) rescaled to its magnitude
            dim = 0 if lora["transposed"] else 1
            norm = w.double().norm(dim=dim).float()
            w.mul_((m / norm).unsqueeze(dim))
    if item["bias"] is not None:
        name, scaling = item["bias"]
        w.add_(adapter.get(name).to(device=device, dtype=torch.float32), alpha=scaling)
    if not torch.isfinite(w).all():
        raise DataError(
            f"merging into {item['name']} produced NaN or infinity: the adapter or the base holds non-finite values"
        )
    return w


def merge_on_device(
    plan: list[dict],
    adapter_weights: str,
    out: Path,
    max_shard_size: int,
    overwrite: bool,
    extra: list[tuple[str, str]],
    device: str,
    progress: Callable[[str, int, int, int, int], Any] | None,
    fsync: bool = True,
) -> dict:
    """Execute ``plan`` (from ``_native.merge_plan``) with torch on ``device``."""
    adapter = SafetensorsFile(adapter_weights)
    readers: dict[str, SafetensorsFile] = {}
    specs = [(p["name"], p["dtype"], list(p["shape"])) for p in plan]
    total = sum(_nbytes(p) for p in plan)
    writer = _native.ShardWriter(str(out), specs, max_shard_size, [("format", "pt")], "model", "new", overwrite, fsync)
    merged = replaced = done = 0
    try:
        for i, item in enumerate(plan):
            if item["source"] == "adapter":
                source = adapter.get(item["source_name"])
                replaced += 1
            else:
                reader = readers.setdefault(item["source"], SafetensorsFile(item["source"]))
                source = reader.get(item["source_name"])
            out_dtype = to_torch(item["dtype"])
            if item["lora"] is not None or item["bias"] is not None:
                result = _merged(item, source, adapter, device).to(out_dtype).cpu()
                merged += 1
            else:
                result = source.to(out_dtype)
            writer.write(item["name"], byte_view(result))
            done += _nbytes(item)
            if progress is not None:
                progress(item["name"], i + 1, len(plan), done, total)
        summary = writer.finish(extra)
    except BaseException:
        writer.abort()
        raise
    return {
        "tensors": summary["tensors"],
        "merged": merged,
        "replaced": replaced,
        "bytes_written": summary["file_bytes"],
        "files": summary["files"],
        "io": summary["io"],
    }


def _nbytes(item: dict) -> int:
    n = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "U64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2}.get(
        item["dtype"], 1
    )
    for d in item["shape"]:
        n *= d
    return n
