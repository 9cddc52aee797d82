"""Weights & Biases: one run per training run (continued on resume), the config as its config,
figures as history, the eval answers as a ``wandb.Table`` (every answer so far, per eval)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class WandbTracker:
    kind = "wandb"

    def __init__(self, work_dir: Path, project: str, name: str, config: dict[str, Any], run_id: str | None) -> None:
        import wandb

        self._wandb = wandb
        self.run = wandb.init(
            project=project,
            name=name,
            dir=str(work_dir),
            config=config,
            id=run_id,
            resume="allow" if run_id else None,
        )
        self.run_id = self.run.id
        self.rows: list[list[Any]] = []

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def log_answers(self, step: int, answers: list[dict[str, Any]]) -> None:
        self.rows += [[step, a["prompt"], a["answer"]] for a in answers]
        table = self._wandb.Table(columns=["step", "prompt", "answer"], data=[list(r) for r in self.rows])
        self.run.log({"eval/answers": table}, step=step)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)
