"""What the board shows of a work dir, read from the files training writes (never from the trainer)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tunex.train.best import read_best
from tunex.train.metrics import METRICS_FILE, read_metrics

MARKERS = (METRICS_FILE, "config.toml")


def is_run(folder: Path) -> bool:
    return any((folder / name).is_file() for name in MARKERS)


def find_runs(root: str | os.PathLike) -> dict[str, Path]:
    """name -> work dir: ``root`` itself when it is a work dir, else its sub-folders (and theirs)
    that are, named by their path under ``root``."""
    root = Path(root)
    if is_run(root):
        return {root.resolve().name: root}
    found = {}
    if root.is_dir():
        for child in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if is_run(child):
                found[child.name] = child
            else:
                for grandchild in sorted(p for p in child.iterdir() if p.is_dir() and is_run(p)):
                    found[f"{child.name}/{grandchild.name}"] = grandchild
    return found


def _eval_answers(work: Path) -> list[dict[str, Any]]:
    path = work / "eval.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line being written, or cut short by a crash
            continue
        if isinstance(record, dict) and {"step", "prompt", "answer"} <= set(record):
            out.append({k: record[k] for k in ("step", "prompt", "answer")})
    return out


def _checkpoints(work: Path) -> list[dict[str, Any]]:
    from tunex.train import checkpoint

    found = [(step, path) for step, path in checkpoint.checkpoints(work)]
    found += [(None, work / name) for name in ("best.pth", "best.shards") if (work / name).exists()]
    out = []
    for step, path in found:
        try:
            stat = path.stat()
            size = stat.st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        except OSError:  # pruned meanwhile
            continue
        out.append({"name": path.name, "step": step, "bytes": size, "modified": stat.st_mtime})
    return out


def run_view(work: Path) -> dict[str, Any]:
    """Everything the page shows of one work dir, as JSON-ready values."""
    problems = []
    try:
        records = read_metrics(work)
    except ValueError as e:  # a corrupt line in the middle: show the rest of the page and say why
        records = []
        problems.append(str(e))
    config = work / "config.toml"
    return {
        "metrics": [r for r in records if isinstance(r, dict) and "step" in r],
        "answers": _eval_answers(work),
        "config": config.read_text(encoding="utf-8", errors="replace") if config.is_file() else "",
        "checkpoints": _checkpoints(work),
        "best": read_best(work),
        "problems": problems,
    }
