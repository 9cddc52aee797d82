"""TensorBoard: scalars under ``train/`` and ``eval/``, the config and the eval answers as text."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _markdown_table(answers: list[dict[str, Any]]) -> str:
    def cell(text: Any) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    rows = [f"| {cell(a['prompt'])} | {cell(a['answer'])} |" for a in answers]
    return "\n".join(["| prompt | answer |", "|---|---|", *rows])


class TensorBoardTracker:
    kind = "tensorboard"

    def __init__(self, work_dir: Path, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        from tunex.track import flat_params

        self.writer = SummaryWriter(str(Path(work_dir) / "tensorboard"))
        params = flat_params(config)
        self.writer.add_text("config", "\n".join(f"    {k} = {v}" for k, v in params.items()), 0)

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def log_answers(self, step: int, answers: list[dict[str, Any]]) -> None:
        self.writer.add_text("eval/answers", _markdown_table(answers), step)

    def close(self, failed: bool = False) -> None:
        self.writer.close()
