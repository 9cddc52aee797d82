"""Load HF checkpoints into the decoder: meta-device init, then weights filled in place.

Safetensors files are memory-mapped (copy-on-write) and each tensor becomes a view of the map,
so a checkpoint already in the model's dtype costs no copy at all: pages are read on first use
and shared with the page cache. Other dtypes are converted tensor by tensor. The model is first
built on the meta device, so no random initialisation runs and no second set of weights exists.

``quantize`` (for QLoRA) is called on each decoder layer as soon as that layer's weights are
loaded, so peak memory stays near the packed size plus one layer. Pages of the map that were read
only to be converted or quantized are then given back (``madvise(MADV_DONTNEED)``): they stay in
the page cache but no longer count in the process's RSS (for SmolLM2 QLoRA: ~370 MB of fp32 weights
the NF4 layers no longer need).
"""

from __future__ import annotations

import ctypes
import functools
import json
import mmap
import re
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from tunex.errors import FormatError
from tunex.models.config import GEMMA, MOE, ModelConfig, read_config, to_tunex_names, with_rope_scaling
from tunex.models.decoder import CausalLM
from tunex.models.hub import resolve_model_path

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
LAYER = re.compile(r"^model\.layers\.(\d+)\.")

# A quantize hook gets (module name, nn.Linear) and returns the module to put in its place.
QuantizeHook = Callable[[str, nn.Linear], nn.Module]


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one .safetensors file as views of a private memory map (nothing is read yet).

    The file is opened and its header checked by tunex's Rust reader (``_native.SafeMap``: offsets
    in range, back to back and without overlaps, no duplicate keys, dtype/shape/length agreement);
    a corrupt file raises ``tunex.FormatError`` naming the file and the tensor. Each tensor views the
    copy-on-write map (an in-place op on a weight never reaches the file) and keeps it alive.
    """
    from tunex import _native

    smap = _native.SafeMap(str(path))
    tensors = smap.tensors()
    data = torch.from_numpy(smap.data()) if any(end > begin for *_, begin, end in tensors) else None
    if data is not None:
        _register_map(smap)
    out = {}
    for name, dtype_name, shape, begin, end in tensors:
        dtype = DTYPES.get(dtype_name)
        if dtype is None:
            raise FormatError(f"{path}: tensor {name!r} has dtype {dtype_name}, which tunex cannot load into torch")
        if end == begin or data is None:
            out[name] = torch.empty(shape, dtype=dtype)
            continue
        raw = data[begin:end]
        if begin % dtype.itemsize:  # misaligned: copy instead of viewing
            raw = raw.clone()
        out[name] = raw.view(dtype).view(shape)
    return out


# Address ranges of the live checkpoint maps read_safetensors made (start, end, weak map), for
# _release; a dead map's range may hold other memory later, so it no longer counts.
_maps: list[tuple[int, int, weakref.ref]] = []
_maps_lock = threading.Lock()
_MADV_DONTNEED = 4
_PAGE = mmap.PAGESIZE


def _register_map(smap) -> None:
    start, length = smap.address()
    with _maps_lock:
        _maps[:] = [entry for entry in _maps if _alive(entry[2])]
        _maps.append((start, start + length, weakref.ref(smap)))


def _alive(ref: weakref.ref) -> bool:
    return ref() is not None


def _release(tensor: torch.Tensor) -> None:
    """Give back the resident pages of a checkpoint tensor that nothing will read again.

    Only whole pages inside the tensor's bytes, and only inside one of read_safetensors' private
    file maps: there a dropped page is simply read from the file again if touched (never anonymous
    memory, where it would read back as zeros). Does nothing elsewhere (other OSes included).
    """
    if tensor.device.type != "cpu" or tensor.numel() == 0:
        return
    first = tensor.data_ptr()
    last = first + tensor.numel() * tensor.element_size()
    start, end = -(-first // _PAGE) * _PAGE, last // _PAGE * _PAGE
    if end <= start:
        return
    with _maps_lock:
        # the tensor holds its map alive, so a live map whose range holds it is that map
        inside = any(lo <= first and last <= hi and _alive(ref) for lo, hi, ref in _maps)
    if not inside:
        return
    madvise = _madvise()
    if madvise is not None:
        madvise(start, end - start, _MADV_DONTNEED)


@functools.lru_cache(maxsize=1)
def _madvise():
    """libc's madvise, looked up once; None where the process has none (not POSIX)."""
    try:
        fn = ctypes.CDLL(None).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return fn


def checkpoint_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise FormatError(f"{index}: expected {{'weight_map': {{name: file}}}}: {exc}") from exc
        return [folder / f for f in dict.fromkeys(weight_map.values())]
    # "model*.safetensors" first: Mistral repos also ship consolidated.safetensors (other names)
    files = sorted(folder.glob("model*.safetensors")) or sorted(folder.glob("*.safetensors"))
    if files:
        return files
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if bins:
        return bins
    raise FileNotFoundError(f"{folder} has no *.safetensors (or pytorch_model*.bin) weights")


def read_checkpoint(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the checkpoint in ``folder``, file by file."""
    for file in checkpoint_files(folder):
        if not file.is_file():
            raise FileNotFoundError(f"{file} is listed in the index but missing")
        if file.suffix == ".bin":
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        else:
            state = read_safetensors(file)
        yield from state.items()


def _place(model: nn.Module, name: str, tensor: torch.Tensor, dtype, device) -> None:
    owner, _, attr = name.rpartition(".")
    module = model.get_submodule(owner)
    old = module._parameters.get(attr)
    if old is None:
        raise KeyError(name)
    if tuple(old.shape) != tuple(tensor.shape):
        raise FormatError(
            f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}; the config implies {tuple(old.shape)}"
        )
    target = dtype if tensor.is_floating_point() else tensor.dtype
    placed = tensor.to(device=device, dtype=target)
    if placed.data_ptr() != tensor.data_ptr():  # converted or moved: the map's copy is not needed
        _release(tensor)
    module._parameters[attr] = nn.Parameter(placed, requires_grad=False)


def _layer_linears(model: CausalLM, index: int) -> list[tuple[str, nn.Module]]:
    layer = model.model.layers[index]
    prefix = f"model.layers.{index}."
    # routers (models/moe.py) stay dense: a few rows whose rounding would move every token's experts
    return [
        (prefix + n, m)
        for n, m in layer.named_modules()
        if isinstance(m, nn.Linear) and not getattr(m, "router", False)
    ]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    owner, _, attr = name.rpartition(".")
    setattr(model.get_submodule(owner), attr, new)


@contextmanager
def _no_init():
    """Skip nn.Linear / nn.Embedding random init while building on the meta device.

    Initialising meta tensors is pointless (they are replaced) and not free: the first call pulls
    in torch's Python decompositions, seconds of imports.
    """
    saved = nn.Linear.reset_parameters, nn.Embedding.reset_parameters
    nn.Linear.reset_parameters = nn.Embedding.reset_parameters = lambda self: None
    try:
        with torch.device("meta"):
            yield
    finally:
        nn.Linear.reset_parameters, nn.Embedding.reset_parameters = saved


QUANT_STATE = ".weight.quant_state.bitsandbytes__"


def _load_prequantized(model: nn.Module, state: dict, dtype, device, folder: Path) -> None:
    """Put NF4/FP4 layers (bitsandbytes' serialized keys, as `tunex quantize` writes) in place.

    Consumes their keys from ``state``.
    """
    prefixes = sorted({k.split(QUANT_STATE)[0] for k in state if QUANT_STATE in k})
    if not prefixes:
        return
    from tunex.quant import NF4Linear, from_state_dict

    for prefix in prefixes:
        keys = [k for k in state if k == prefix + ".bias" or k.startswith(prefix + ".weight")]
        part = {k: state.pop(k) for k in keys}
        try:
            model.get_submodule(prefix)
        except AttributeError:
            raise FormatError(f"{folder}: quantized tensor {prefix}.weight has no place in this model") from None
        qweight = from_state_dict(part, prefix + ".weight", source=str(folder))
        bias = part.get(prefix + ".bias")
        layer = NF4Linear(qweight, None if bias is None else bias.to(dtype), compute_dtype=dtype).to(device)
        _replace(model, prefix, layer)


def _as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in names:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(names)} or a torch.dtype")
    return names[dtype]


def new_model(cfg: ModelConfig) -> CausalLM:
    """The model class of ``cfg``'s family, built (weights uninitialised on the meta device when
    called under ``_no_init``)."""
    if cfg.family in GEMMA:
        from tunex.models.gemma import GemmaCausalLM

        return GemmaCausalLM(cfg)
    if cfg.family in MOE:
        from tunex.models.moe import MoECausalLM

        return MoECausalLM(cfg)
    return CausalLM(cfg)


def meta_model(cfg: ModelConfig) -> CausalLM:
    """The model of ``cfg`` on the meta device (module names and shapes, no memory, no weights)."""
    if getattr(cfg, "backend", "tunex") == "transformers":  # an HFConfig (models/hf_backend.py)
        from tunex.models.hf_backend import meta_hf_model

        return meta_hf_model(cfg)
    with _no_init():
        return new_model(cfg)


def load_model(
    path,
    *,
    dtype=torch.float32,
    device="cpu",
    quantize: QuantizeHook | None = None,
    backend: str = "auto",
    rope_scaling: dict | None = None,
) -> CausalLM:
    """Load a model folder (or GGUF / pkg:// / hub snapshot; see ``resolve_model_path``).

    Args:
        path: anything :func:`tunex.models.resolve_model_path` accepts.
        dtype: floating dtype of the weights (torch.dtype or "float32"/"bfloat16"/"float16").
        device: where the weights go.
        quantize: optional hook ``(name, nn.Linear) -> nn.Module`` applied to every decoder linear
            right after its layer is loaded (e.g. an NF4 packer for QLoRA). The output head and the
            embeddings are never passed to it.
        backend: ``model.backend``: "auto" (tunex's decoder for its families, transformers for other
            architectures), "tunex" or "transformers" (see tunex.models.hf_backend).
        rope_scaling: a config.json-style rope_scaling replacing the checkpoint's (``model.rope_scaling``;
            see :func:`tunex.models.config.with_rope_scaling`); None or empty: the checkpoint's own.
            tunex's decoder only: a transformers-backend model with one raises ValueError.

    Returns:
        A :class:`CausalLM` in eval mode; parameters have ``requires_grad=False`` (the trainer
        decides what trains).
    """
    folder = resolve_model_path(path)
    dtype = _as_dtype(dtype)
    if backend != "tunex":
        from tunex.models.hf_backend import choose_backend, load_hf_model

        if choose_backend(folder, backend) == "transformers":
            if rope_scaling:
                raise ValueError(
                    f"{folder}: rope_scaling replaces the rope settings of tunex's own decoder; this model runs "
                    "through the transformers backend, which reads its rope_scaling from config.json"
                )
            return load_hf_model(folder, dtype=dtype, device=device, quantize=quantize)
    cfg: ModelConfig = with_rope_scaling(read_config(folder), rope_scaling)
    with _no_init():
        model = new_model(cfg)
    unexpected: list[str] = []

    def finish_layer(index: int) -> None:
        if quantize is None:
            return
        for name, linear in _layer_linears(model, index):
            if linear.weight.is_meta:
                return  # weights missing: reported below
            _replace(model, name, quantize(name, linear))
            _release(linear.weight)  # packed now: the dense pages the packer read go back

    state = dict(read_checkpoint(folder))  # views of memory maps: nothing is read yet
    _load_prequantized(model, state, dtype, device, folder)
    meta_left = {i: sum(p.is_meta for p in model.model.layers[i].parameters()) for i in range(cfg.num_layers)}
    for ckpt_name, tensor in state.items():
        for name, part in to_tunex_names(ckpt_name, tensor, cfg):
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue  # the head is the embedding
            if name.endswith("rotary_emb.inv_freq"):
                continue  # recomputed from the config
            try:
                _place(model, name, part, dtype, device)
            except (KeyError, AttributeError):
                unexpected.append(ckpt_name)
                continue
            m = LAYER.match(name)
            if m:
                i = int(m[1])
                meta_left[i] -= 1
                if meta_left[i] == 0:
                    finish_layer(i)
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"missing {len(missing)} tensors, e.g. {', '.join(missing[:4])}")
        if unexpected:
            problems.append(f"{len(unexpected)} tensors the config does not use, e.g. {', '.join(unexpected[:4])}")
        raise FormatError(
            f"{folder}: checkpoint does not match config.json ({cfg.family}, "
            f"{cfg.num_layers} layers): " + "; ".join(problems)
        )
    return model.eval()
