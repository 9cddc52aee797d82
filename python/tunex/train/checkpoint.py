"""Training checkpoints: ``work_dir/iter_N.pth``, written atomically, loadable with
``torch.load(weights_only=True)``.

A checkpoint holds everything a resumed run needs to continue exactly where the stopped one was:
the trainable weights (adapters, or the whole model for a full fine-tune) by their model names, the
optimizer and scheduler states, every RNG state, the data position and the config. Only plain
containers, numbers, strings and tensors go in, so no code runs on load.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import torch

from tunex.errors import FormatError

FORMAT = "tunex-train-checkpoint"
VERSION = 1
# iter_N.pth files; iter_N.shards folders are the sharded checkpoints of FSDP runs (tunex.dist.ckpt);
# iter_N.dcp folders (torch.distributed.checkpoint, older tunex) are listed so that resuming from one
# is refused with a reason instead of silently starting over
_NAME = re.compile(r"^iter_(\d+)\.(pth|shards|dcp)$")


def rng_state() -> dict[str, Any]:
    """Python's, torch's CPU and CUDA generators (numpy's is not used by tunex)."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal.tolist()), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoints(work_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every ``iter_N.pth`` file and ``iter_N.shards`` (or legacy ``.dcp``) folder in
    ``work_dir``, oldest first."""
    found = []
    folder = Path(work_dir)
    if folder.is_dir():
        for p in folder.iterdir():
            m = _NAME.match(p.name)
            if m and (p.is_file() if m.group(2) == "pth" else p.is_dir()):
                found.append((int(m.group(1)), p))
    return sorted(found)


def latest(work_dir: str | os.PathLike) -> Path | None:
    found = checkpoints(work_dir)
    return found[-1][1] if found else None


class _KeepsWriteErrors:
    """A file's ``write`` and ``flush`` for torch.save, keeping the OSError a failed write raised:
    torch.save reports it as a RuntimeError that names no file and no reason."""

    def __init__(self, f: Any) -> None:
        self.f, self.error = f, None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def save(work_dir: str | os.PathLike, step: int, payload: dict[str, Any], keep: int) -> Path:
    """Write ``iter_{step}.pth`` atomically (temp file, fsync, rename) and prune to ``keep`` files.

    ``keep`` = 0 keeps every checkpoint.
    """
    from tunex.io.atomic import atomic_file

    folder = Path(work_dir)
    target = folder / f"iter_{step}.pth"
    data = {"format": FORMAT, "version": VERSION, "step": step, **payload}
    with atomic_file(target) as f:
        sink = _KeepsWriteErrors(f)
        try:
            torch.save(data, sink)
        except RuntimeError:
            if sink.error is None:
                raise
            raise sink.error from None  # the disk's error (ENOSPC, EFBIG), not torch's wrapper of it
    if keep > 0:
        prune(folder, keep)
    return target


def prune(work_dir: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (files or sharded folders)."""
    import shutil

    for _, old in checkpoints(work_dir)[:-keep]:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint safely (``weights_only=True``).

    Raises:
        FileNotFoundError: no such file.
        FormatError: not a tunex training checkpoint, or an unsupported version.
    """
    p = Path(path)
    if p.is_dir():
        from tunex.dist.ckpt import load_consolidated

        return load_consolidated(p)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such checkpoint file")
    try:
        data = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a corrupt or foreign pickle: say which file
        raise FormatError(f"{p}: not a loadable training checkpoint ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise FormatError(
            f"{p}: not a tunex training checkpoint (expected a dict with "
            f"format={FORMAT!r}; write one with `tunex train`)"
        )
    if data.get("version") != VERSION:
        raise FormatError(f"{p}: checkpoint version {data.get('version')!r}, this tunex reads {VERSION}")
    return data


def resolve_resume(resume: str | None, work_dir: str | os.PathLike) -> Path | None:
    """``--resume``: None = fresh run, "auto" = the newest checkpoint in work_dir (fresh if none),
    else a checkpoint path."""
    if not resume:
        return None
    if resume == "auto":
        return latest(work_dir)
    p = Path(resume)
    if not (p.is_file() or p.is_dir()):
        raise FileNotFoundError(
            f"--resume {resume}: no such checkpoint file or iter_N.shards folder "
            f"(use --resume auto to take the newest one in {work_dir})"
        )
    return p
