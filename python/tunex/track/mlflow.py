"""MLflow: one run per training run (continued on resume) in the experiment ``log.project``; the
config as parameters (``train.lr``, ...), figures as metrics, the eval answers as the table
artifact ``eval_answers.json``.

The store is ``log.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else a sqlite database beside the
work dirs (``<work dir's parent>/mlflow.db``, artifacts in ``<work dir's parent>/mlruns``), so the
runs of one folder of work dirs share one store: ``mlflow ui --backend-store-uri sqlite:///...``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

# MLflow refuses longer parameter values (its own limit is larger in recent versions; this fits all)
MAX_PARAM = 500
BATCH = 100  # parameters per log_batch call (MLflow's limit)
TABLE = "eval_answers.json"


def default_uri(work_dir: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(work_dir).resolve().parent / 'mlflow.db'}"


class MlflowTracker:
    kind = "mlflow"

    def __init__(
        self, work_dir: Path, project: str, name: str, config: dict[str, Any], uri: str, run_id: str | None
    ) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        from tunex.track import flat_params

        self.uri = uri or default_uri(work_dir)
        self.client = MlflowClient(tracking_uri=self.uri)
        if run_id is not None and self._exists(run_id):
            self.run_id = run_id
            return
        experiment = self.client.get_experiment_by_name(project)
        if experiment is None:
            location = None
            if self.uri.startswith("sqlite:///"):  # artifacts beside the database, not in the cwd
                location = (Path(self.uri[len("sqlite:///") :]).parent / "mlruns").as_uri()
            experiment_id = self.client.create_experiment(project, artifact_location=location)
        else:
            experiment_id = experiment.experiment_id
        self.run_id = self.client.create_run(experiment_id, run_name=name).info.run_id
        params = [Param(k, v[:MAX_PARAM]) for k, v in flat_params(config).items()]
        for i in range(0, len(params), BATCH):
            self.client.log_batch(self.run_id, params=params[i : i + BATCH])

    def _exists(self, run_id: str) -> bool:
        try:
            self.client.get_run(run_id)
        except Exception:  # noqa: BLE001 - MlflowException: the store no longer has it
            return False
        return True

    def log_metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def log_answers(self, step: int, answers: list[dict[str, Any]]) -> None:
        # MLflow appends these rows to the table artifact, which so holds every answer so far
        rows = {"step": [step] * len(answers), "prompt": [a["prompt"] for a in answers]}
        rows["answer"] = [a["answer"] for a in answers]
        self.client.log_table(self.run_id, data=rows, artifact_file=TABLE)

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")
