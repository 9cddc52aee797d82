"""Where training numbers go: ``work_dir/metrics.jsonl`` (one JSON object per optimizer step, and
one per held-out evaluation), the trackers of ``[log]`` (tunex.track), a rich progress line, and the
loss-curve PNG at the end."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from tunex.io.atomic import write_text

METRICS_FILE = "metrics.jsonl"


def read_metrics(work_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every record of ``work_dir/metrics.jsonl`` (empty list when there is none); a last line cut
    short by a crash (no newline, not JSON) is left out."""
    return _read(Path(work_dir) / METRICS_FILE)[0]


def _read(path: Path) -> tuple[list[dict[str, Any]], int | None]:
    """(records, the line number of a torn last line or None)."""
    if not path.is_file():
        return [], None
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    records, torn = [], None
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                if number == len(lines):  # the last line has no newline: a write cut short
                    torn = number
                    break
                raise ValueError(f"{path}:{number}: not a JSON line ({e}); fix or delete that line") from None
    return records, torn


class MetricsWriter:
    """Appends step records to metrics.jsonl; on resume first drops records past the resumed step,
    so the file reads as if the run had never stopped."""

    def __init__(
        self, work_dir: str | os.PathLike, resume_step: int = 0, enabled: bool = True, trackers: Any = None
    ) -> None:
        self.enabled = enabled
        self.path = Path(work_dir) / METRICS_FILE
        self.trackers = trackers  # tunex.track.Trackers: TensorBoard, wandb, MLflow
        self.notice: str | None = None  # said once on resume when a torn last line was dropped
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept: list[dict[str, Any]] = []
        if resume_step:
            records, torn = _read(self.path)
            kept = [r for r in records if r.get("step", 0) <= resume_step]
            if torn is not None:
                self.notice = f"{self.path}:{torn}: dropped a line cut short by the crash of the previous run"
        write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.trackers is not None:
            self.trackers.log_metrics(record)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self.trackers is not None:  # called from the loop's `finally`: an error in flight = a failed run
            self.trackers.close(failed=sys.exc_info()[0] is not None)


def plot_loss(work_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Draw the loss curve of ``work_dir/metrics.jsonl`` to ``loss.png`` (or ``out``).

    Uses matplotlib when installed, else tunex's own small rasteriser (axes and the curve only).

    Raises:
        FileNotFoundError: when the folder has no metrics.jsonl with loss values.
    """
    points = [
        (r["step"], r["loss"])
        for r in read_metrics(work_dir)
        if isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])
    ]
    if not points:
        raise FileNotFoundError(
            f"{Path(work_dir) / METRICS_FILE}: no loss values to plot (is this the work_dir of a `tunex train` run?)"
        )
    target = Path(out) if out else Path(work_dir) / "loss.png"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from tunex.train.png import line_plot_png

        target.write_bytes(line_plot_png(points))
        return target
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot([p[0] for p in points], [p[1] for p in points])
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(target)
    plt.close(fig)
    return target
