"""Stream a HF model folder into a pre-quantized checkpoint in bitsandbytes' 4-bit layout.

The 2-D weights of the decoder layers (``...layers.N....weight``: attention and MLP projections)
are quantized; embeddings, norms, biases and the output head are copied unchanged. config.json
gains the ``quantization_config`` transformers expects for bitsandbytes 4-bit, so
``AutoModelForCausalLM.from_pretrained(out_dir)`` loads the folder as a 4-bit model.

Tensors are read, quantized and written one at a time through the Rust shard writer, so peak
memory is about one source tensor plus its packed form. The writer needs every output tensor's size
before the first byte is written; the quant-state JSON holds the double-quant offset (the mean of
the absmax), whose printed length is only known after quantizing, so with double quant each weight
is quantized twice: once to size it, once to write it (quantization runs at hundreds of millions
of elements per second; reading the model dominates).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch

from tunex import _native
from tunex.io.atomic import scratch_folder
from tunex.io.dtypes import to_safetensors, to_torch
from tunex.io.hf import SAFETENSORS_INDEX, bin_files, load_bin, non_weight_files, require_dir, weight_format
from tunex.io.safetensors import SafetensorsFile
from tunex.io.sharded import byte_view
from tunex.quant.codebooks import NESTED_BLOCKSIZE, check_quant_type
from tunex.quant.serialize import quant_state_payload, to_state_dict
from tunex.quant.weight import FLOAT_DTYPES, check_blocksize, quantize
from tunex.units import parse_size

_DECODER_LAYER = re.compile(r"(^|\.)layers\.\d+\.")


# the routers of mixture-of-experts layers stay dense, as QLoRA training keeps them (tunex.models.moe)
_ROUTERS = (".mlp.gate.weight", ".block_sparse_moe.gate.weight", ".shared_expert_gate.weight")


def is_quantized_weight(name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> bool:
    """A decoder-layer linear weight: 2-D ``.weight`` under ``layers.N.`` in a float dtype (not a
    MoE router)."""
    return (
        name.endswith(".weight")
        and bool(_DECODER_LAYER.search(name))
        and len(shape) == 2
        and dtype in FLOAT_DTYPES
        and not name.endswith(_ROUTERS)
    )


def quantization_config(quant_type: str, double_quant: bool, compute_dtype: str = "bfloat16") -> dict:
    """config.json's ``quantization_config`` for a bitsandbytes 4-bit checkpoint (transformers' keys)."""
    return {
        "quant_method": "bitsandbytes",
        "_load_in_8bit": False,
        "_load_in_4bit": True,
        "llm_int8_threshold": 6.0,
        "llm_int8_skip_modules": None,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": double_quant,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "load_in_4bit": True,
        "load_in_8bit": False,
    }


class _Source:
    """The tensors of a model folder in checkpoint order: (name, dtype, shape) without reading data,
    and each tensor on demand."""

    def __init__(self, folder: Path):
        self.where: dict[str, object] = {}
        self.meta: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
        if weight_format(folder) == "safetensors":
            index = folder / SAFETENSORS_INDEX
            names = (
                sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
                if index.is_file()
                else ["model.safetensors"]
            )
            for file_name in names:
                reader = SafetensorsFile(folder / file_name)
                for name in reader.keys():
                    tensor_dtype, shape = reader.info(name)
                    self._add(name, to_torch(tensor_dtype), shape, reader)
        else:
            for path in bin_files(folder):
                for name, tensor in load_bin(path).items():  # memory-mapped where possible
                    self._add(name, tensor.dtype, tuple(tensor.shape), tensor)

    def _add(self, name, dtype, shape, where):
        if name in self.where:
            raise ValueError(f"tensor {name!r} appears in two checkpoint files")
        self.where[name] = where
        self.meta.append((name, dtype, tuple(shape)))

    def get(self, name: str) -> torch.Tensor:
        where = self.where[name]
        return where.get(name) if isinstance(where, SafetensorsFile) else where


def _quantized_specs(
    name: str, shape: tuple[int, ...], quant_type: str, blocksize: int, payload: bytes, double_quant: bool
) -> list[tuple[str, str, list[int]]]:
    n = shape[0] * shape[1]
    blocks = -(-n // blocksize)
    specs = [
        (name, "U8", [(n + 1) // 2, 1]),
        (f"{name}.absmax", "U8" if double_quant else "F32", [blocks]),
        (f"{name}.quant_map", "F32", [16]),
    ]
    if double_quant:
        specs += [
            (f"{name}.nested_absmax", "F32", [-(-blocks // NESTED_BLOCKSIZE)]),
            (f"{name}.nested_quant_map", "F32", [256]),
        ]
    return specs + [(f"{name}.quant_state.bitsandbytes__{quant_type}", "U8", [len(payload)])]


def quantize_checkpoint(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    max_shard_size: str | int = "2GB",
    compute_dtype: str = "bfloat16",
    overwrite: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict:
    """Write the 4-bit version of the HF model in ``model_dir`` to the new folder ``out_dir``.

    Returns:
        dict with ``quantized`` (weights packed), ``kept`` (tensors copied), ``files`` and
        ``file_bytes`` of the written checkpoint.

    Raises:
        FileNotFoundError / NotADirectoryError: ``model_dir`` is not a model folder.
        FileExistsError: ``out_dir`` exists and ``overwrite`` is false.
        tunex.errors.DataError: a weight holds NaN or infinity (named).
    """
    check_quant_type(quant_type)
    check_blocksize(blocksize)
    folder = require_dir(model_dir, "model folder")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: a HF model folder needs its config.json")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if "quantization_config" in config:
        raise ValueError(
            f"{config_path} already has a quantization_config "
            f"({config['quantization_config'].get('quant_method', '?')}); quantize the original model"
        )
    source = _Source(folder)

    def quantized(name: str) -> dict[str, torch.Tensor]:
        return to_state_dict(quantize(source.get(name), quant_type, blocksize, double_quant, name=name), name)

    specs, targets = [], set()
    for name, dtype, shape in source.meta:
        if is_quantized_weight(name, dtype, shape):
            targets.add(name)
            entries = quantized(name) if double_quant else None
            payload = (
                bytes(entries[f"{name}.quant_state.bitsandbytes__{quant_type}"].numpy())
                if entries
                else quant_state_payload(quant_type, blocksize, dtype, shape, None)
            )
            specs += _quantized_specs(name, shape, quant_type, blocksize, payload, double_quant)
        else:
            specs.append((name, to_safetensors(dtype, name), list(shape)))
    if not targets:
        raise ValueError(
            f"{folder}: no decoder-layer linear weights (names with 'layers.N.' ending in '.weight') to quantize"
        )

    config["quantization_config"] = quantization_config(quant_type, double_quant, compute_dtype)
    with scratch_folder(Path(out_dir)) as tmp:
        new_config = tmp / "config.json"
        new_config.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        extra = [(str(new_config), "config.json")]
        extra += [(str(p), p.name) for p in non_weight_files(folder) if p.name != "config.json"]
        writer = _native.ShardWriter(
            os.fspath(out_dir), specs, parse_size(max_shard_size), [("format", "pt")], "model", "new", overwrite
        )
        try:
            for i, (name, _dtype, _shape) in enumerate(source.meta):
                for key, tensor in (quantized(name) if name in targets else {name: source.get(name)}).items():
                    writer.write(key, byte_view(tensor))
                if progress is not None:
                    progress(name, i + 1, len(source.meta))
            summary = writer.finish(extra)
        except BaseException:
            writer.abort()
            raise
    return {
        "quantized": len(targets),
        "kept": len(source.meta) - len(targets),
        "files": summary["files"],
        "file_bytes": summary["file_bytes"],
    }
