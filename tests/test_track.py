"""[log] trackers: what a tiny training run leaves in a real wandb offline run and a real MLflow
sqlite store, read back through their own formats and APIs (no mocks), and the config errors."""

from __future__ import annotations

import json
import struct
import sys

import pytest
from click.testing import CliRunner
from test_train_helpers import QA, make_data, make_tiny_model, write_config
from tunex.cli import cli
from tunex.config import load_config
from tunex.errors import ConfigError
from tunex.train.metrics import read_metrics

pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "m")


def run_cli(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _options(*backends: str) -> list[str]:
    pairs = [
        f"log.backends={json.dumps(list(backends))}",
        'log.project="tunex-test"',
        'log.run_name="tiny-run"',
        "eval.split=0.34",
        "eval.every_n_steps=3",
    ]
    return [x for p in pairs for x in ("-o", p)]


def wandb_records(path):
    """The protobuf records of a wandb transaction log (``run-ID.wandb``): a 7-byte header, then
    LevelDB-style chunks (crc32, length, type) in 32 KiB blocks, each record a wandb ``Record``."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 2):  # full, first
            pending = chunk
        elif kind in (3, 4):  # middle, last
            pending += chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def test_wandb_offline_run_holds_config_curves_and_answers(tmp_path, model, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    work = tmp_path / "work"
    cfg = write_config(tmp_path / "c.toml", model, make_data(tmp_path / "d", "instruct"), "lora", "openai", work)
    run_cli("train", str(cfg), "--max-steps", "4", *_options("wandb"))
    run_cli("train", str(cfg), "--resume", "auto", "--max-steps", "6", *_options("wandb"))  # the same run goes on
    run_id = json.loads((work / "trackers.json").read_text())["wandb"]
    logs = sorted(work.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(logs) == 2  # one log per process, both of the one run
    history: dict[str, dict[int, float]] = {}
    config = {}
    for log in logs:
        for record in wandb_records(log):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                assert record.run.run_id == run_id and record.run.project == "tunex-test"
                assert record.run.display_name == "tiny-run"
                config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
            elif kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                for key, value in items.items():
                    if key.startswith(("train/", "eval/")) and not isinstance(value, dict):
                        history.setdefault(key, {})[items["_step"]] = value
    assert config["train"]["lr"] == pytest.approx(1e-2) and config["log"]["backends"] == ["wandb"]
    metrics = read_metrics(work)
    assert history["train/loss"] == {r["step"]: pytest.approx(r["loss"]) for r in metrics if "loss" in r}
    assert sorted(history["train/loss"]) == list(range(1, 7))
    assert history["eval/loss"] == {r["step"]: pytest.approx(r["eval_loss"]) for r in metrics if "eval_loss" in r}
    assert sorted(history["eval/loss"]) == [3, 4, 6]
    tables = sorted(work.glob(f"wandb/offline-run-*-{run_id}/files/media/table/eval/answers_*.table.json"))
    assert tables
    last = json.loads(tables[-1].read_text())
    assert last["columns"] == ["step", "prompt", "answer"]
    assert [row[0] for row in last["data"]] == [6] and last["data"][0][1] == QA[0][0]


def test_mlflow_store_holds_params_curves_and_answers(tmp_path, model):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    work = tmp_path / "runs" / "work"
    cfg = write_config(tmp_path / "c.toml", model, make_data(tmp_path / "d", "instruct"), "lora", "openai", work)
    run_cli("train", str(cfg), "--max-steps", "4", *_options("mlflow"))
    run_cli("train", str(cfg), "--resume", "auto", "--max-steps", "6", *_options("mlflow"))
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tunex-test")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1  # the resumed run logged into the same MLflow run
    run = runs[0]
    assert run.info.run_name == "tiny-run" and run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == "0.01" and run.data.params["method.kind"] == "lora"
    assert json.loads(run.data.params["log.backends"]) == ["mlflow"]
    metrics = read_metrics(work)
    loss = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert loss == {r["step"]: pytest.approx(r["loss"]) for r in metrics if "loss" in r}
    assert sorted(loss) == list(range(1, 7))
    evals = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "eval/loss")}
    assert evals == {r["step"]: pytest.approx(r["eval_loss"]) for r in metrics if "eval_loss" in r}
    perplexity = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "eval/perplexity")}
    assert sorted(perplexity) == [3, 4, 6]
    table = client.load_table(experiment.experiment_id, "eval_answers.json", run_ids=[run.info.run_id])
    assert list(table["step"]) == [3, 4, 6] and set(table["prompt"]) == {QA[0][0]}
    assert (tmp_path / "runs" / "mlruns").is_dir()  # artifacts beside the database, not in the cwd


def test_tensorboard_events(tmp_path, model):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    work = tmp_path / "work"
    cfg = write_config(tmp_path / "c.toml", model, make_data(tmp_path / "d", "instruct"), "lora", "openai", work)
    run_cli("train", str(cfg), "--max-steps", "3", *_options("tensorboard"))
    events = EventAccumulator(str(work / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]
    assert [e.step for e in events.Scalars("eval/loss")] == [3]


@pytest.mark.parametrize("backend", ["wandb", "mlflow", "tensorboard"])
def test_missing_package_is_a_config_error(tmp_path, model, monkeypatch, backend):
    cfg = write_config(tmp_path / "c.toml", model, make_data(tmp_path / "d", "instruct"), "lora", "openai", tmp_path)
    monkeypatch.setitem(sys.modules, backend, None)  # as if not installed: find_spec gives None
    with pytest.raises(ConfigError, match=rf"log.backends: '{backend}' needs the {backend} package; install it with"):
        load_config(cfg, [f'log.backends=["{backend}"]'])


def test_bad_backends_are_config_errors(tmp_path, model):
    cfg = write_config(tmp_path / "c.toml", model, make_data(tmp_path / "d", "instruct"), "lora", "openai", tmp_path)
    for value in ('["neptune"]', '"wandb"', '["mlflow", "mlflow"]'):
        with pytest.raises(ConfigError, match="log.backends: expected a list of distinct names from"):
            load_config(cfg, [f"log.backends={value}"])
    with pytest.raises(ConfigError, match="log.project: expected a string"):
        load_config(cfg, ["log.project=3"])


def test_a_diverged_run_is_marked_failed(tmp_path, model):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient
    from tunex.train.loop import TrainingDiverged, train

    work = tmp_path / "runs" / "work"
    cfg = write_config(
        tmp_path / "c.toml",
        model,
        make_data(tmp_path / "d", "pretrain"),
        "full",
        "pretrain",
        work,
        max_steps=20,
        lr=1e30,
        max_norm=0.0,
    )
    with pytest.raises(TrainingDiverged):
        train(load_config(cfg, ['log.backends=["mlflow"]', 'log.project="diverged"']))
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("diverged").experiment_id])
    assert run.info.status == "FAILED"
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == len(read_metrics(work))
