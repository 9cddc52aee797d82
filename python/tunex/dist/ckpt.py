"""Checkpoints of multi-process runs.

A full fine-tune sharded by FSDP2 writes ``work_dir/iter_N.shards/``, a format read without
pickle: every rank writes its own part of the weights and AdamW state (``rank_R.safetensors``,
through the Rust shard writer) in parallel, and rank 0 adds ``manifest.json``: the step, scheduler,
data position, config, where each tensor's rows live (which rank holds which rows of dim 0) and a
JSON skeleton of the state whose tensors (every rank's RNG state too) sit in the safetensors files.
Each tensor is stored by its global shape, so the folder loads on any world size, a single process
without a process group included. The folder is built under an owner-stamped partial name and
renamed into place whole once every rank's file and the manifest are on disk.

Folders written by torch.distributed.checkpoint (``iter_N.dcp``, older tunex) are refused: their
metadata is a pickle, and reading it can run code from whoever made the folder.

Adapter runs under DDP keep writing ``iter_N.pth`` from rank 0: their trainable state is replicated
on every rank, so there is nothing to shard, and the .pth (read with ``weights_only=True``) is what
``tunex convert`` reads. Adapter runs sharded by FSDP2 (``train.fsdp``) write ``iter_N.shards``
with the adapters and their optimizer state only (the frozen base is never saved). Both formats resume on any world size; ``tunex.train.checkpoint.load``
reads an ``iter_N.shards`` folder as the same dict as a .pth (for converting it).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunex.dist.env import DistEnv, barrier, broadcast_object, gather_objects, rank_seed, seed_all
from tunex.errors import FormatError

SHARDED_SUFFIX = ".shards"
LEGACY_SUFFIX = ".dcp"
MANIFEST = "manifest.json"
FORMAT = "tunex-sharded-checkpoint"
VERSION = 1


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / MANIFEST).is_file()


def check_folder(path: str | os.PathLike) -> Path:
    """``path`` as a sharded checkpoint folder, or a FormatError saying why it is not one."""
    p = Path(path)
    if p.name.endswith(LEGACY_SUFFIX) or (p / ".metadata").is_file():
        raise FormatError(
            f"{p}: a torch.distributed.checkpoint folder; its .metadata is a pickle, which can run code "
            "when read, so tunex does not read it. Resume from an iter_N.pth or iter_N.shards checkpoint "
            "(or convert this one with the tunex version that wrote it)"
        )
    if not (p / MANIFEST).is_file():
        raise FormatError(f"{p}: a checkpoint folder without {MANIFEST}; it was not finished (pick an earlier iter_N)")
    return p


def _encode(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON skeleton of ``obj``; each tensor becomes {"__tensor__": its key in ``tensors``}."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj
        return {"__tensor__": path}
    if isinstance(obj, dict):
        bad = [k for k in obj if not isinstance(k, str)]
        if bad:  # positions (an optimizer's own state_dict) must be turned into names first
            raise TypeError(f"checkpoint state {path}: key {bad[0]!r} is not a string")
        return {k: _encode(v, f"{path}/{k}", tensors) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"checkpoint state {path}: a {type(obj).__name__} cannot be stored without pickle")


def _decode(skeleton: Any, tensors: dict[str, torch.Tensor], where: Path) -> Any:
    if isinstance(skeleton, dict):
        if set(skeleton) == {"__tensor__"}:
            key = skeleton["__tensor__"]
            if key not in tensors:
                raise FormatError(f"{where}: the manifest names tensor {key!r}, which no rank file holds")
            return tensors[key]
        if set(skeleton) == {"__tuple__"}:
            return tuple(_decode(v, tensors, where) for v in skeleton["__tuple__"])
        return {k: _decode(v, tensors, where) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [_decode(v, tensors, where) for v in skeleton]
    return skeleton


def _local(t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(this rank's rows, whether the tensor is sharded across ranks on dim 0)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not isinstance(t, DTensor):
        return t, False
    if all(isinstance(p, Replicate) for p in t.placements):
        return t.to_local(), False
    if len(t.placements) == 1 and isinstance(t.placements[0], Shard) and t.placements[0].dim == 0:
        return t.to_local(), True
    raise ValueError(f"a tensor placed as {t.placements}: tunex's sharded checkpoints store dim-0 shards only")


def _trainable_names(lm: nn.Module) -> list[str]:
    """Parameter names in the order the optimizer got them (``model.parameters()`` order)."""
    return [n for n, p in lm.named_parameters() if p.requires_grad]


def _by_name(osd: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """An ``optimizer.state_dict()`` (parameters as positions) keyed by parameter names instead,
    the form torch.distributed.checkpoint.state_dict reads."""
    state = {names[i]: v for i, v in osd["state"].items()}
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in osd["param_groups"]]
    return {"state": state, "param_groups": groups}


def rng_payload(env: DistEnv) -> dict[str, Any]:
    """Rank 0's RNG state (what a lone run restores) and every rank's (a same-size resume)."""
    from tunex.train.checkpoint import rng_state

    mine = rng_state()
    every = gather_objects(env, mine)
    return {"rng": every[0], "rng_ranks": every, "world_size": env.world_size}


def restore_rng(state: dict[str, Any], env: DistEnv, seed: int, step: int) -> None:
    """Continue each rank's random stream when the world size is unchanged; otherwise start a new
    deterministic one per rank (dropout masks cannot continue across a different world size)."""
    from tunex.train.checkpoint import set_rng_state

    ranks = state.get("rng_ranks")
    if ranks is not None and len(ranks) == env.world_size:
        set_rng_state(ranks[env.rank])
    elif ranks is None and env.world_size == 1 and "rng" in state:
        set_rng_state(state["rng"])
    else:
        seed_all(rank_seed(seed, env.rank) + 7919 * step)


def save_sharded(
    work_dir: str | os.PathLike,
    step: int,
    lm: nn.Module,
    optimizer: torch.optim.Optimizer,
    meta: dict[str, Any],
    keep: int,
    env: DistEnv,
) -> Path:
    """Write ``iter_{step}.shards`` collectively (every rank calls this); returns its path."""
    from tunex.io.atomic import errors_naming, make_partial_dir, partial_path, publish, sweep
    from tunex.train.checkpoint import prune

    folder = Path(work_dir)
    target = folder / f"iter_{step}{SHARDED_SUFFIX}"
    rng = rng_payload(env)
    tmp = None
    if env.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        sweep(folder)
        tmp = partial_path(target)
        make_partial_dir(tmp, target)
    tmp = Path(broadcast_object(env, None if tmp is None else str(tmp)))
    with errors_naming(target):  # a full disk names the checkpoint, not the hidden partial it hit
        try:
            _write_rank(tmp, target, step, lm, optimizer, meta, rng, env)
            if env.is_main:
                publish(tmp, target, overwrite=True)
        except BaseException:
            if env.is_main:  # a failed write (a full disk) leaves no partial behind; a killed one is swept
                shutil.rmtree(tmp, ignore_errors=True)
            raise
    if env.is_main and keep > 0:
        prune(folder, keep)
    barrier(env)
    return target


def _write_rank(
    tmp: Path,
    target: Path,
    step: int,
    lm: nn.Module,
    optimizer: torch.optim.Optimizer,
    meta: dict[str, Any],
    rng: dict[str, Any],
    env: DistEnv,
) -> None:
    """This rank's part of ``save_sharded`` into the partial folder ``tmp``: its shard file, and on
    rank 0 the manifest; returns once every rank's file is in place."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, get_state_dict

    from tunex.io.atomic import naming
    from tunex.io.sharded import save_sharded as write_shards

    if meta.get("method", "full") == "full":
        model_sd, optim_sd = get_state_dict(lm, optimizer)
    else:  # adapters (train.fsdp): the trainable shards only, never the frozen base (nor its NF4 state)
        model_sd = {n: p.detach() for n, p in lm.named_parameters() if p.requires_grad}
        optim_sd = get_optimizer_state_dict(lm, optimizer)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode({"model": model_sd, "optimizer": optim_sd}, "", tensors)
    mine, rows = {}, {}
    for key, t in tensors.items():
        local, split = _local(t)
        if split:
            rows[key] = int(local.shape[0]) if local.dim() else 1
        if split or env.is_main:
            mine[key] = local.detach().cpu().contiguous()
    meta_tensors: dict[str, torch.Tensor] = {}
    meta_skeleton = _encode({"step": step, **meta, **rng}, "meta", meta_tensors) if env.is_main else None
    if env.is_main:
        mine.update(meta_tensors)
    write_shards(mine, tmp, max_shard_size=1 << 62, prefix=f"rank_{env.rank}")
    every_rows = gather_objects(env, rows)
    if env.is_main:
        layout = {}
        for key, t in tensors.items():
            if key in rows:
                layout[key] = {"shape": list(t.shape), "rows": [r.get(key, 0) for r in every_rows]}
            else:
                layout[key] = {"shape": list(t.shape), "rows": None}
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "step": step,
            "world_size": env.world_size,
            "tensors": layout,
            "meta_tensors": sorted(meta_tensors),
            "state": skeleton,
            "meta": meta_skeleton,
        }
        try:
            (tmp / MANIFEST).write_text(json.dumps(manifest) + "\n", encoding="utf-8")
        except OSError as e:
            raise naming(e, target) from e
    barrier(env)  # every rank's file is in place


def _manifest(p: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((p / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise FormatError(f"{p / MANIFEST}: not readable JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise FormatError(f"{p / MANIFEST}: not a tunex sharded checkpoint (format {FORMAT!r} expected)")
    if manifest.get("version") != VERSION:
        raise FormatError(f"{p / MANIFEST}: checkpoint version {manifest.get('version')!r}, this tunex reads {VERSION}")
    return manifest


def _rank_files(p: Path, manifest: dict[str, Any]) -> list[Any]:
    from tunex.io.safetensors import SafetensorsFile

    world = manifest.get("world_size")
    if not isinstance(world, int) or world < 1:
        raise FormatError(f"{p / MANIFEST}: world_size {world!r} is not a positive integer")
    files = []
    for r in range(world):
        f = p / f"rank_{r}.safetensors"
        if not f.is_file():
            raise FormatError(f"{p}: rank_{r}.safetensors is missing (the run had {world} ranks)")
        files.append(SafetensorsFile(f))
    return files


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """A sharded checkpoint's state other than the weights and optimizer (step, scheduler, RNG, ...)."""
    p = check_folder(path)
    manifest = _manifest(p)
    files = _rank_files(p, manifest)
    tensors = {k: files[0].get(k) for k in manifest.get("meta_tensors", [])}
    meta = _decode(manifest.get("meta"), tensors, p)
    if not isinstance(meta, dict):
        raise FormatError(f"{p / MANIFEST}: no meta section")
    from tunex.train.checkpoint import FORMAT as PTH_FORMAT
    from tunex.train.checkpoint import VERSION as PTH_VERSION

    return {"format": PTH_FORMAT, "version": PTH_VERSION, **meta, "world_size": manifest["world_size"]}


def _full_state(p: Path) -> dict[str, Any]:
    """{"model", "optimizer"} with full tensors, put together from every rank's rows."""
    manifest = _manifest(p)
    files = _rank_files(p, manifest)
    tensors = {}
    for key, lay in manifest["tensors"].items():
        shape = tuple(lay["shape"])
        if lay["rows"] is None:
            t = files[0].get(key)
        else:
            pieces = [files[r].get(key) for r, n in enumerate(lay["rows"]) if n]
            t = torch.cat(pieces, 0) if pieces else torch.empty(shape)
        if tuple(t.shape) != shape and not (shape == () and t.numel() == 1):
            raise FormatError(
                f"{p}: tensor {key!r} has shape {tuple(t.shape)} in the rank files, the manifest says {shape}"
            )
        tensors[key] = t.reshape(shape)
    return _decode(manifest["state"], tensors, p)


def load_consolidated(path: str | os.PathLike) -> dict[str, Any]:
    """A sharded checkpoint as one in-memory dict shaped like a .pth checkpoint (full tensors;
    the optimizer state keyed by parameter name). For converting and resuming."""
    p = check_folder(path)
    return {**read_meta(p), **_full_state(p)}


def restore(
    path: Path, state: dict[str, Any] | None, lm: nn.Module, optimizer: torch.optim.Optimizer, kind: str
) -> None:
    """Load a checkpoint's weights and optimizer state into a live model, FSDP2-sharded or plain.

    Args:
        path: an ``iter_N.shards`` folder, or the ``iter_N.pth`` file that ``state`` was read from.
        state: the .pth's dict (full tensors; each rank keeps its shards of them), None for a folder.
        lm: the model.
        optimizer: built over ``lm``'s trainable parameters in their order.
        kind: the config's method.kind.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    full = StateDictOptions(full_state_dict=True, strict=kind == "full")
    if state is None:
        meta = read_meta(path)
        if meta.get("method", kind) != kind:
            raise FormatError(
                f"{path}: written by a {meta.get('method')} run but the config says "
                f"method.kind = {kind!r}; resume with the config that wrote it"
            )
        saved = _full_state(check_folder(path))
        set_model_state_dict(lm, saved["model"], options=full)
        set_optimizer_state_dict(lm, optimizer, saved["optimizer"], options=full)
        return
    set_model_state_dict(lm, state["model"], options=full)
    set_optimizer_state_dict(lm, optimizer, _by_name(state["optimizer"], _trainable_names(lm)), options=full)


def share_path(env: DistEnv, path: Path | None) -> Path | None:
    """Rank 0's choice of checkpoint (``--resume auto`` looks at the file system once)."""
    chosen = broadcast_object(env, None if path is None else str(path))
    return None if chosen is None else Path(chosen)
