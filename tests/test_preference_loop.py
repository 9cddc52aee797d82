"""Preference objectives through ``tunex train`` on a tiny random model: TRL-named metrics, the
reference (adapters off for LoRA/QLoRA, the on-disk cache for a full fine-tune), exact resume,
gradient checkpointing, and 2 processes over gloo against one process."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from test_train_helpers import QA, make_tiny_model, write_config
from tunex.config import load_config
from tunex.train import reference
from tunex.train.loop import train
from tunex.train.metrics import read_metrics
from tunex.train.preference import METRICS

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

LR = {"full": 3e-3, "lora": 2e-2, "qlora": 2e-2}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pref_loop")
    model = make_tiny_model(root / "m")
    data = root / "pairs.jsonl"
    rows = [{"prompt": q, "chosen": a, "rejected": " ".join(reversed(a.split()))} for q, a in QA]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, model, data


def config(setup, tmp_path, kind="lora", objective="dpo", *overrides, **train_keys):
    root, model, data = setup
    tmp_path.mkdir(parents=True, exist_ok=True)
    work = tmp_path / f"w_{kind}_{objective}"
    path = write_config(
        tmp_path / f"{kind}_{objective}.toml", model, data, kind, "preference", work, lr=LR[kind], **train_keys
    )
    return load_config(path, [f'train.objective="{objective}"', "eval.every_n_steps=0", *overrides])


def curve(work) -> list[dict]:
    return read_metrics(work)


def same_curves(a, b, keys=("loss", "grad_norm", *METRICS), tol=1e-5):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        for k in keys:
            assert abs(x[k] - y[k]) <= tol * max(1.0, abs(x[k])), (x["step"], k, x[k], y[k])


def test_lora_dpo_logs_trl_metrics_and_learns_the_preference(setup, tmp_path, capsys):
    cfg = config(setup, tmp_path, "lora", "dpo", max_steps=8, log_steps=1)
    train(cfg)
    records = curve(cfg.save.work_dir)
    assert all(set(METRICS) <= set(r) for r in records)
    # LoRA starts as its base (B = 0): the policy is the reference, every log-ratio 0, loss ln 2
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert abs(records[0]["rewards/margins"]) < 1e-4
    assert records[-1]["rewards/accuracies"] == 1.0 and records[-1]["loss"] < 0.3
    assert records[-1]["rewards/margins"] > 1.0
    assert "rewards/accuracies 1.000" in capsys.readouterr().err


def test_qlora_reference_is_its_quantized_base(setup, tmp_path):
    pytest.importorskip("tunex.quant")
    cfg = config(setup, tmp_path, "qlora", "dpo", max_steps=2)
    train(cfg)
    assert curve(cfg.save.work_dir)[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)


@pytest.mark.parametrize("objective", ["dpo", "simpo"])
def test_lora_resume_continues_exactly(setup, tmp_path, objective):
    whole = config(setup, tmp_path / "a", "lora", objective, max_steps=6, save_steps=3)
    train(whole)
    parted = config(setup, tmp_path / "b", "lora", objective, max_steps=6, save_steps=3)
    train(parted, stop_after=3)
    train(parted, resume="auto")
    same_curves(curve(whole.save.work_dir), curve(parted.save.work_dir))


def test_full_dpo_caches_the_reference_beside_the_tokens_and_resumes(setup, tmp_path, monkeypatch):
    whole = config(setup, tmp_path / "a", "full", "dpo", max_steps=4, save_steps=2)
    train(whole)
    records = curve(whole.save.work_dir)
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # the reference is the start
    assert records[-1]["rewards/margins"] > records[0]["rewards/margins"]
    cache = tmp_path / "a" / "cache"
    files = list(cache.glob("*/reference-*.f32"))
    assert len(files) == 1 and (files[0].parent / "ids.bin").is_file()  # in the token store's folder
    assert files[0].stat().st_size == len(QA) * 2 * 4

    # a run stopped at step 2 and resumed reuses the cache: nothing is computed again
    parted = config(setup, tmp_path / "a", "full", "dpo", max_steps=4, save_steps=2)
    parted.save.work_dir = str(tmp_path / "a" / "parted")
    train(parted, stop_after=2)

    def no_second_pass(*args, **kwargs):
        raise AssertionError("the cached reference log-probs should have been read")

    monkeypatch.setattr(reference, "compute", no_second_pass)
    train(parted, resume="auto")
    same_curves(records, curve(parted.save.work_dir))


def test_gradient_checkpointing_gives_the_same_steps(setup, tmp_path):
    plain = config(setup, tmp_path / "a", "lora", "ipo", "method.dropout=0.0", max_steps=3)
    train(plain)
    ckpt = config(setup, tmp_path / "b", "lora", "ipo", "method.dropout=0.0", max_steps=3, gradient_checkpointing=True)
    train(ckpt)
    same_curves(curve(plain.save.work_dir), curve(ckpt.save.work_dir))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed")
@pytest.mark.parametrize("kind", ["lora", "full"])  # DDP, reference with adapters off; FSDP2, the cached pass
def test_two_gloo_processes_equal_one_with_the_same_global_batch(setup, tmp_path, kind):
    import os

    extra = ["train.batch_size=1"] + (["method.dropout=0.0"] if kind == "lora" else [])
    lone = config(setup, tmp_path / "a", kind, "dpo", *extra, max_steps=3)
    lone.train.grad_accum = 4
    train(lone)
    cfg_path = tmp_path / "two.toml"
    two = config(setup, tmp_path / "b", kind, "dpo", *extra, max_steps=3)  # its own cache: computed by both ranks
    cfg_path.write_text(two.to_toml())
    env = dict(os.environ, OMP_NUM_THREADS="1", TUNEX_DIST_TIMEOUT="60", PYTHONUNBUFFERED="1")
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "tunex", "train", str(cfg_path), "-o", "train.grad_accum=2"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    same_curves(curve(lone.save.work_dir), curve(two.save.work_dir))
    if kind == "full":
        assert len(list((tmp_path / "b" / "cache").glob("*/reference-*.f32"))) == 1
