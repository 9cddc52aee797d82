"""Reference log-probs of a full fine-tune's preference objective, computed once and kept on disk.

A full fine-tune changes every weight, so the reference (the starting model) cannot be had by
switching adapters off; holding a second copy would double the model's memory. Instead, before
training, one pass without grad over every pair computes the starting model's (chosen, rejected)
log-probs; they are written beside the pairs' token store as ``reference-<key>.f32`` (float32,
pairs x 2) and read back memory-mapped. The key hashes the model's files (names, sizes, mtimes),
the dtypes, the objective's length normalisation and the store, so a resumed run and later runs
with the same data and model reuse the file, and anything else computes its own.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import torch

REFERENCE_VERSION = "1"


class WithReference:
    """A pair dataset whose items also carry ``reference``: (2,) float32 reference log-probs.

    ``values``: (pairs of the store, 2); item k of ``dataset`` is the store's pair ``rows[k]``.
    """

    def __init__(self, dataset: Any, values: np.ndarray, rows: np.ndarray) -> None:
        self.dataset, self.values, self.rows = dataset, values, rows

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.dataset[index])
        item["reference"] = torch.from_numpy(np.array(self.values[self.rows[index]], dtype=np.float32))
        return item

    def __getattr__(self, name: str) -> Any:  # lengths, packed, pad_id, stats, arrays, store
        return getattr(self.dataset, name)


def cache_key(cfg: Any, store_folder: Any) -> str:
    from tunex.models import resolve_model_path

    folder = resolve_model_path(cfg.model.path)
    files = sorted(folder.iterdir()) if folder.is_dir() else [folder]
    stamp = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]
    parts = [
        REFERENCE_VERSION,
        str(folder.resolve()),
        json.dumps(stamp),
        cfg.model.dtype,
        cfg.train.dtype,
        str(cfg.preference.normalizes(cfg.train.objective)),
        str(store_folder),
    ]
    return hashlib.blake2b("\0".join(parts).encode(), digest_size=12).hexdigest()


def with_reference(dataset: Any, model: torch.nn.Module, cfg: Any, device: torch.device, env: Any, progress_echo=None):
    """``dataset`` with each pair's reference log-probs: read from the cache, or computed now by
    ``model`` (the starting weights; under FSDP2 every rank takes part) and cached.

    The cache holds every pair of ``dataset``'s token store, so the training pairs and the pairs
    ``eval.split`` holds out of the same store share one file."""
    from tunex.data.dataset import TokenDataset
    from tunex.io.atomic import write_bytes

    store = dataset.store
    pairs = len(store.lengths) // 2
    whole = TokenDataset(
        store,
        np.arange(2 * pairs, dtype=np.int64),
        np.arange(0, 2 * pairs + 1, 2, dtype=np.int64),
        packed=False,
        pad_id=dataset.pad_id,
    )
    rows = dataset.members[dataset.starts[:-1]] // 2  # item k -> its pair in the store
    path = store.folder / f"reference-{cache_key(cfg, store.folder)}.f32"
    have = path.is_file() and path.stat().st_size == pairs * 8
    if env.enabled:  # every rank computes or none does (the forwards are collective under FSDP2)
        import torch.distributed as dist

        flag = torch.tensor([1 if have else 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        have = bool(flag.item())
    if not have:
        if progress_echo:
            progress_echo(f"reference log-probs: one pass over {pairs} pairs (cached in {path.name})")
        values = compute(whole, model, cfg, device)
        if env.rank == 0:
            write_bytes(path, values.astype(np.float32).tobytes())
        if env.enabled:
            from tunex.dist.env import barrier

            barrier(env)
        return WithReference(dataset, values, rows)
    return WithReference(dataset, np.memmap(path, dtype=np.float32, mode="r").reshape(pairs, 2), rows)


def compute(dataset: Any, model: torch.nn.Module, cfg: Any, device: torch.device) -> np.ndarray:
    """(pairs, 2) float32 (chosen, rejected) log-probs of every pair under ``model``, without grad."""
    from tunex.data import collate
    from tunex.train.build import autocast
    from tunex.train.preference import Objective, PreferenceLoss

    objective = Objective.of(cfg)
    scorer = PreferenceLoss(model, objective)
    out = np.zeros((len(dataset), 2), dtype=np.float32)
    size = cfg.train.batch_size
    pad_id = getattr(dataset, "pad_id", 0)
    with torch.no_grad():
        for start in range(0, len(dataset), size):
            batch = collate([dataset[i] for i in range(start, min(start + size, len(dataset)))], pad_id=pad_id)
            with autocast(cfg.train.dtype, device):
                chosen, rejected, _, _ = scorer.sequence_logps(
                    batch["input_ids"].to(device), batch["labels"].to(device), batch["position_ids"].to(device)
                )
            out[start : start + len(chosen), 0] = chosen.float().cpu().numpy()
            out[start : start + len(chosen), 1] = rejected.float().cpu().numpy()
    return out
