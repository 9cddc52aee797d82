"""The console side of training: what start-up is doing (loading, tokenizing), a rich progress bar
(step, loss, lr, tokens/s, ETA) and a log line every ``log_steps`` steps, so the loss is readable in
a terminal and in a captured log alike.

Bars are drawn on a terminal only; in a log every line is printed whole (never wrapped at the
console's width), so a line can be searched for and parsed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def plural(n: int, word: str, many: str | None = None) -> str:
    """``"1 process"``, ``"2 processes"``."""
    return f"{n} {word if n == 1 else (many or word + 's')}"


class StartupLog:
    """Says what training does before its first step (main process only).

    Args:
        enabled: False on the other ranks of a distributed run: prints nothing.
    """

    def __init__(self, enabled: bool, console: Console | None = None) -> None:
        self.enabled = enabled
        self.console = console or Console(stderr=True)

    def echo(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    @contextlib.contextmanager
    def tokenizing(self) -> Iterator[Callable[[int, int], None]]:
        """Yields a ``progress(chunks_done, chunks_total)`` callback for ``build_dataset``: a bar on
        a terminal, nothing in a log (the caller says the outcome in a line of its own)."""
        bar = Progress(
            TextColumn("[bold]tokenizing"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("chunks"),
            console=self.console,
            transient=True,
            disable=not (self.enabled and self.console.is_terminal),
        )
        task = bar.add_task("tokenize", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        with bar:
            yield progress


class TrainProgress:
    def __init__(self, total: int, start: int, enabled: bool, console: Console | None = None) -> None:
        self.enabled = enabled
        self.console = console or Console(stderr=True)
        self._progress: Progress | None = None
        self._logged = False
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
            self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def update(self, record: dict[str, Any], total: int, log: bool) -> None:
        """Advance the bar to ``record``; print its log line when ``log`` or when it is this run's
        first step (the loss before training has moved the weights much, and proof the loop runs)."""
        if self._progress is None:
            return
        self._progress.update(
            self._task,
            completed=record["step"],
            loss=f"{record['loss']:.4f}",
            lr=f"{record['lr']:.2e}",
            tps=f"{record['tokens_per_s']:.0f}",
        )
        if log or not self._logged:
            self._logged = True
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
