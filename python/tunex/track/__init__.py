"""Experiment trackers: where a run's numbers go besides ``metrics.jsonl``.

``[log] backends`` picks them: TensorBoard (``tensorboard/`` in the work dir; also written whenever
the package is installed, as before trackers were configurable), Weights & Biases (``wandb``;
``WANDB_MODE=offline`` keeps the run in ``work_dir/wandb``) and MLflow (a local sqlite store by
default, or ``log.tracking_uri``). Each gets the config as parameters, every step's figures, the
held-out eval figures and the eval prompts' answers as a table. A resumed run continues the same
wandb / MLflow run (their ids are kept in ``work_dir/trackers.json``).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

# backend -> (module to import, how to install it)
PACKAGES = {
    "tensorboard": ("tensorboard", "pip install tensorboard"),
    "wandb": ("wandb", "pip install 'tunex[wandb]'"),
    "mlflow": ("mlflow", "pip install 'tunex[mlflow]'"),
}
IDS_FILE = "trackers.json"


def missing_packages(backends: list[str]) -> list[tuple[str, str]]:
    """(backend, install command) of each listed backend whose package is not installed."""
    out = []
    for name in backends:
        module, install = PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            out.append((name, install))
    return out


def metric_name(key: str) -> str:
    """A metrics.jsonl key as a tracker's metric name: eval figures under ``eval/``, the rest under
    ``train/`` (``eval_loss`` -> ``eval/loss``, ``loss`` -> ``train/loss``)."""
    return "eval/" + key[len("eval_") :] if key.startswith("eval_") else f"train/{key}"


def numbers(record: dict[str, Any]) -> dict[str, float]:
    """The tracker metrics of one metrics.jsonl record (its numbers, without the step)."""
    return {
        metric_name(k): float(v)
        for k, v in record.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def flat_params(config: dict[str, dict[str, Any]]) -> dict[str, str]:
    """``{"train": {"lr": 1e-4}}`` -> ``{"train.lr": "0.0001"}`` (lists as JSON)."""
    out = {}
    for section, values in config.items():
        for key, value in values.items():
            out[f"{section}.{key}"] = json.dumps(value, ensure_ascii=False) if isinstance(value, list) else str(value)
    return out


class Trackers:
    """Every configured tracker behind one interface; does nothing on ranks that do not log."""

    def __init__(self, trackers: list[Any]) -> None:
        self.trackers = trackers

    def log_metrics(self, record: dict[str, Any]) -> None:
        values = numbers(record)
        if values:
            for t in self.trackers:
                t.log_metrics(values, int(record["step"]))

    def log_answers(self, step: int, answers: list[dict[str, Any]]) -> None:
        if answers:
            for t in self.trackers:
                t.log_answers(step, answers)

    def close(self, failed: bool = False) -> None:
        """End every tracker's run, marked failed when training stopped on an error."""
        for t in self.trackers:
            t.close(failed)


def open_trackers(cfg: Any, work_dir: Path, resumed: bool, enabled: bool = True) -> Trackers:
    """The trackers ``cfg.log`` asks for (TensorBoard also when merely installed), opened on the
    run's work dir; the config is logged as parameters. ``resumed``: continue the runs whose ids
    ``work_dir/trackers.json`` kept, else start new ones."""
    if not enabled:
        return Trackers([])
    log = cfg.log
    work_dir = Path(work_dir)
    name = log.run_name or work_dir.name
    project = log.project or "tunex"
    config = cfg.to_dict()
    ids = _read_ids(work_dir) if resumed else {}
    opened: list[Any] = []
    if "tensorboard" in log.backends:
        from tunex.track.tensorboard import TensorBoardTracker

        opened.append(TensorBoardTracker(work_dir, config))
    elif importlib.util.find_spec("tensorboard") is not None:
        try:  # not asked for: a TensorBoard that fails to start is left out, as it always was
            from tunex.track.tensorboard import TensorBoardTracker

            opened.append(TensorBoardTracker(work_dir, config))
        except Exception:  # noqa: BLE001 - optional
            pass
    if "wandb" in log.backends:
        from tunex.track.wandb import WandbTracker

        opened.append(WandbTracker(work_dir, project, name, config, ids.get("wandb")))
    if "mlflow" in log.backends:
        from tunex.track.mlflow import MlflowTracker

        opened.append(MlflowTracker(work_dir, project, name, config, log.tracking_uri, ids.get("mlflow")))
    new_ids = {t.kind: t.run_id for t in opened if getattr(t, "run_id", None)}
    if new_ids:
        from tunex.io.atomic import write_text

        write_text(work_dir / IDS_FILE, json.dumps(new_ids) + "\n")
    return Trackers(opened)


def _read_ids(work_dir: Path) -> dict[str, str]:
    try:
        ids = json.loads((work_dir / IDS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in ids.items() if isinstance(v, str)} if isinstance(ids, dict) else {}
