"""The console side of training: a rich progress bar (step, loss, lr, tokens/s, ETA) and a log line
every ``log_steps`` steps, so the loss is readable in a terminal and in a captured log alike."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class TrainProgress:
    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.enabled = enabled
        self.console = Console(stderr=True)
        self._progress: Progress | None = None
        if not enabled:
            return
        self._progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("lr {task.fields[lr]}"),
            TextColumn("{task.fields[tps]} tok/s"),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
            disable=not self.console.is_terminal,
        )
        self._task = self._progress.add_task("train", total=total, completed=start, loss="-", lr="-", tps="-")
        self._progress.start()

    def echo(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, markup=False, highlight=False)

    def update(self, record: dict[str, Any], total: int, log: bool) -> None:
        if self._progress is None:
            return
        self._progress.update(
            self._task,
            completed=record["step"],
            loss=f"{record['loss']:.4f}",
            lr=f"{record['lr']:.2e}",
            tps=f"{record['tokens_per_s']:.0f}",
        )
        if log:
            self.echo(
                f"step {record['step']}/{total}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
                f"grad_norm {record['grad_norm']:.3f}  {record['tokens_per_s']:.0f} tok/s" + _preference_part(record)
            )

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()


def _preference_part(record: dict[str, Any]) -> str:
    """The preference objectives' metrics (TRL's names) for the log line, when the step has them."""
    if "rewards/accuracies" not in record:
        return ""
    text = f"  rewards/accuracies {record['rewards/accuracies']:.3f}  rewards/margins {record['rewards/margins']:.4f}"
    if "logps/chosen" in record:
        text += f"  logps/chosen {record['logps/chosen']:.2f}  logps/rejected {record['logps/rejected']:.2f}"
    return text
