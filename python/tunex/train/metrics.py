"""Where training numbers go: ``work_dir/metrics.jsonl`` (one JSON object per optimizer step, and
one per held-out evaluation) and the trackers of ``[log]`` (tunex.track); the progress line is
tunex.train.progress, loss.png tunex.train.plot."""

from __future__ import annotations

import json
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
        text = "".join(json.dumps(r) + "\n" for r in kept)
        write_text(self.path, text)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self._size = len(text.encode("utf-8"))  # the whole lines so far

    def write(self, record: dict[str, Any]) -> None:
        """Append one line. A failed append (a full disk) is cut off again, so the file holds only
        whole lines, and raised as one OSError naming the file."""
        if not self.enabled:
            return
        line = (json.dumps(record) + "\n").encode("utf-8")
        try:
            done = 0
            while done < len(line):  # a full disk can take part of it, then fail
                done += os.write(self._fd, line[done:])
        except OSError as e:
            try:
                os.ftruncate(self._fd, self._size)
            except OSError:
                pass  # then read_metrics and the next resume drop the torn line
            step = record.get("step", "?")
            reason = e.strerror or str(e)
            raise OSError(e.errno, f"{reason} while appending step {step} to {self.path}", str(self.path)) from e
        self._size += len(line)
        if self.trackers is not None:
            self.trackers.log_metrics(record)

    def close(self) -> None:
        if not self.enabled:
            return
        os.close(self._fd)
        if self.trackers is not None:  # called from the loop's `finally`: an error in flight = a failed run
            self.trackers.close(failed=sys.exc_info()[0] is not None)
