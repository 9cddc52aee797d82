"""Checkpoints of multi-process runs.

A full fine-tune sharded by FSDP2 writes ``work_dir/iter_N.dcp/`` with torch.distributed.checkpoint:
every rank writes its own shards of the weights and AdamW state in parallel (``__R_0.distcp``
files plus DCP's ``.metadata``), and rank 0 adds ``meta.pt`` (step, scheduler, data position, every
rank's RNG state, config). DCP stores each tensor with its global shape, so the folder loads on any
world size, a single process without a process group included.

Adapter runs (DDP) keep writing ``iter_N.pth`` from rank 0: their trainable state is replicated
on every rank, so there is nothing to shard (DCP would write the same single file), and the .pth is
what ``tunex convert`` reads. Both formats resume on any world size; ``tunex.train.checkpoint.load``
reads an ``iter_N.dcp`` folder as the same dict as a .pth (for converting it).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunex.dist.env import DistEnv, barrier, broadcast_object, gather_objects, rank_seed, seed_all
from tunex.errors import FormatError

SHARDED_SUFFIX = ".dcp"
META_FILE = "meta.pt"


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / ".metadata").is_file()


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


def save_sharded(work_dir: str | os.PathLike, step: int, lm: nn.Module, optimizer: torch.optim.Optimizer,
                 meta: dict[str, Any], keep: int, env: DistEnv) -> Path:
    """Write ``iter_{step}.dcp`` collectively (every rank calls this); returns its path.

    Written into a hidden temporary folder first and renamed by rank 0 once every rank's shards
    and the metadata are on disk, so a crash never leaves a half checkpoint under the real name.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from tunex.train.checkpoint import FORMAT, VERSION, prune

    folder = Path(work_dir)
    target = folder / f"iter_{step}{SHARDED_SUFFIX}"
    tmp = folder / f".iter_{step}{SHARDED_SUFFIX}.tmp"
    rng = rng_payload(env)
    if env.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    barrier(env)
    model_sd, optim_sd = get_state_dict(lm, optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp))
    if env.is_main:
        payload = {"format": FORMAT, "version": VERSION, "step": step, **meta, **rng}
        torch.save(payload, tmp / META_FILE)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        if keep > 0:
            prune(folder, keep)
    barrier(env)
    return target


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """``meta.pt`` of a sharded checkpoint folder (everything but the tensors)."""
    from tunex.train.checkpoint import FORMAT, VERSION

    p = Path(path)
    meta_path = p / META_FILE
    if not meta_path.is_file():
        raise FormatError(f"{p}: a checkpoint folder without {META_FILE}; it was not finished "
                          "(pick an earlier iter_N checkpoint)")
    meta = torch.load(meta_path, map_location="cpu", weights_only=True)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise FormatError(f"{meta_path}: not a tunex training checkpoint")
    if meta.get("version") != VERSION:
        raise FormatError(f"{meta_path}: checkpoint version {meta.get('version')!r}, this tunex reads {VERSION}")
    return meta


def load_consolidated(path: str | os.PathLike) -> dict[str, Any]:
    """A sharded checkpoint as one in-memory dict shaped like a .pth checkpoint (full tensors;
    the optimizer state keyed by parameter name). For converting, not for resuming."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    p = Path(path)
    meta = read_meta(p)
    with tempfile.TemporaryDirectory(prefix=".consolidate-", dir=p.parent) as tmp:
        out = Path(tmp) / "full.pth"
        dcp_to_torch_save(str(p), str(out))
        tensors = torch.load(out, map_location="cpu", weights_only=True)
    return {**meta, "model": tensors["model"], "optimizer": tensors.get("optimizer")}


def restore(path: Path, state: dict[str, Any] | None, lm: nn.Module, optimizer: torch.optim.Optimizer,
            kind: str) -> None:
    """Load a checkpoint's weights and optimizer state into a live model, FSDP2-sharded or plain.

    Args:
        path: an ``iter_N.dcp`` folder, or the ``iter_N.pth`` file that ``state`` was read from.
        state: the .pth's dict (full tensors; each rank keeps its shards of them), None for a folder.
        lm: the model.
        optimizer: built over ``lm``'s trainable parameters in their order.
        kind: the config's method.kind.
    """
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict,
                                                         set_state_dict)

    if state is None:
        import torch.distributed.checkpoint as dcp

        meta = read_meta(path)
        if meta.get("method", kind) != kind:
            raise FormatError(f"{path}: written by a {meta.get('method')} run but the config says "
                              f"method.kind = {kind!r}; resume with the config that wrote it")
        model_sd, optim_sd = get_state_dict(lm, optimizer)
        alone = not (torch.distributed.is_available() and torch.distributed.is_initialized())
        with warnings.catch_warnings():
            # loading alone is intended (resuming a sharded run on one process); DCP warns anyway
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(path), no_dist=alone)
        set_state_dict(lm, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
        return
    full = StateDictOptions(full_state_dict=True, strict=kind == "full")
    set_model_state_dict(lm, state["model"], options=full)
    set_optimizer_state_dict(lm, optimizer, _by_name(state["optimizer"], _trainable_names(lm)), options=full)


def share_path(env: DistEnv, path: Path | None) -> Path | None:
    """Rank 0's choice of checkpoint (``--resume auto`` looks at the file system once)."""
    chosen = broadcast_object(env, None if path is None else str(path))
    return None if chosen is None else Path(chosen)
