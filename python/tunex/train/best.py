"""``save.best_metric``: keep the checkpoint of the best evaluation beside the latest ones.

``work_dir/best.pth`` (``best.shards`` for a sharded run) is a hard link to the ``iter_N.pth`` of
the best evaluation so far (a copy where the file system has no hard links), so pruning the
``iter_N`` files never removes it; ``best.json`` says which step and value it holds. A resumed run
reads ``best.json`` and replaces the best only with a better evaluation.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

from tunex.io.atomic import atomic_folder, atomic_path, write_text
from tunex.train.evaluate import BEST_METRICS

BEST_JSON = "best.json"


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # no hard links here (another file system, FAT, ...): a copy
        shutil.copy2(src, dst)


class BestCheckpoint:
    """Tracks the best value of ``metric`` in ``work_dir`` and keeps its checkpoint.

    Args:
        work_dir: the run's work dir.
        metric: a key of :data:`BEST_METRICS` (``""`` = off).
        enabled: False on ranks that write no files (they still decide, from the same reduced
            figures, so every rank saves the same checkpoints).
    """

    def __init__(self, work_dir: Path, metric: str, enabled: bool = True) -> None:
        self.work = Path(work_dir)
        self.metric = metric
        self.enabled = enabled
        self.value: float | None = None
        self.step: int | None = None
        info = read_best(self.work) if metric else None
        if info is not None and info.get("metric") == metric:
            self.value, self.step = float(info["value"]), int(info["step"])

    @property
    def active(self) -> bool:
        return bool(self.metric)

    def improves(self, record: dict[str, Any]) -> bool:
        """Whether ``record`` (an eval record) beats the best so far."""
        if not self.metric or not isinstance(record.get(self.metric), (int, float)):
            return False
        value = float(record[self.metric])
        if not math.isfinite(value):
            return False
        if self.value is None:
            return True
        return value < self.value if BEST_METRICS[self.metric] == "min" else value > self.value

    def keep(self, checkpoint: Path, step: int, value: float) -> Path | None:
        """Make ``checkpoint`` (just written for ``step``) the best; returns the best path."""
        self.value, self.step = float(value), int(step)
        if not self.enabled:
            return None
        target = self.work / ("best.shards" if checkpoint.is_dir() else "best.pth")
        if checkpoint.is_dir():
            with atomic_folder(target, overwrite=True) as tmp:
                shutil.copytree(checkpoint, tmp, copy_function=_link_or_copy, dirs_exist_ok=True)
        else:
            with atomic_path(target) as tmp:
                _link_or_copy(os.fspath(checkpoint), os.fspath(tmp))
        info = {"metric": self.metric, "value": self.value, "step": self.step, "checkpoint": checkpoint.name}
        write_text(self.work / BEST_JSON, json.dumps(info) + "\n")
        return target


def read_best(work_dir: str | os.PathLike) -> dict[str, Any] | None:
    """``best.json`` of a work dir (None when there is none or it is unreadable)."""
    path = Path(work_dir) / BEST_JSON
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and {"metric", "value", "step"} <= set(info) else None
