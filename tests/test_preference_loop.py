"""Preference objectives through ``tunex train`` on a tiny random model: TRL-named metrics, the
reference (adapters off for LoRA/QLoRA, the on-disk cache for a full fine-tune), exact resume,
gradient checkpointing, and 2 processes over gloo against one process."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train_helpers import QA, make_tiny_model, write_config
from tunex.config import load_config
from tunex.train import reference
from tunex.train.loop import train
from tunex.train.metrics import read_metrics
from tunex.train.preference import METRICS, Objective, PreferenceLoss

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


def test_lora_dpo_killed_mid_run_resumes_with_the_same_curve(setup, tmp_path):
    """``tunex train`` of a DPO LoRA run killed with SIGKILL after its first checkpoint, then run
    again with ``--resume auto``: the logged curve equals an uninterrupted run's."""
    whole = config(setup, tmp_path / "a", "lora", "dpo", max_steps=30, save_steps=3)
    train(whole)
    cfg = config(setup, tmp_path / "b", "lora", "dpo", max_steps=30, save_steps=3)
    work = Path(cfg.save.work_dir)
    path = next((tmp_path / "b").glob("*.toml"))
    command = [sys.executable, "-m", "tunex", "train", str(path), "-o", 'train.objective="dpo"', "-o"]
    command += ["eval.every_n_steps=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 300
    while not (work / "iter_3.pth").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (work / "iter_30.pth").exists()
    done = subprocess.run([*command, "--resume", "auto"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    same_curves(curve(whole.save.work_dir), curve(work))


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


def held_out_and_trained(cfg):
    """The (training, held-out) pairs of eval.split, checked to be whole pairs on one side only."""
    from tunex.data.dataset import build_dataset
    from tunex.tokenizer import load_tokenizer
    from tunex.train.evaluate import hold_out

    full = build_dataset(cfg.data, load_tokenizer(cfg.model.path), seed=cfg.train.seed, cache_dir=cfg.data.cache_dir)
    trained, held = hold_out(full, cfg.data, cfg.eval.split, cfg.train.seed)
    rows = [{tuple(ds.arrays(i)[0].tolist()) for i in range(len(ds))} for ds in (trained, held)]
    assert len(held) + len(trained) == len(full) == len(QA) and rows[0].isdisjoint(rows[1])
    return trained, held


def loaded(cfg, checkpoint_path):
    from tunex.train import checkpoint
    from tunex.train.build import build_model
    from tunex.train.loop import load_trainable

    lm = build_model(cfg, torch.device("cpu"))
    if checkpoint_path is not None:
        load_trainable(lm, checkpoint.load(checkpoint_path)["model"], checkpoint_path)
    return lm.eval()


def test_held_out_pairs_give_trl_named_eval_metrics_and_the_best_checkpoint(setup, tmp_path, capsys):
    from tunex.data import collate
    from tunex.train.best import read_best

    metric = "eval_rewards/accuracies"
    cfg = config(
        setup,
        tmp_path,
        "lora",
        "dpo",
        "eval.split=0.5",
        "eval.every_n_steps=2",
        f'save.best_metric="{metric}"',
        max_steps=6,
        save_steps=100,
    )
    train(cfg)
    work = Path(cfg.save.work_dir)
    evals = [r for r in curve(work) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4, 6]
    assert all({f"eval_{m}" for m in METRICS} <= set(r) and r["eval_pairs"] == 3 for r in evals)
    err = capsys.readouterr().err
    assert "[eval step 2] eval_loss" in err and "eval_rewards/accuracies" in err and "(3 pairs)" in err
    assert "3 pairs held out for eval" in err
    values = [r[metric] for r in evals]  # higher is better; the first of equal values stays
    best = read_best(work)
    assert best["metric"] == metric and best["value"] == max(values)
    assert best["step"] == evals[values.index(max(values))]["step"] and (work / "best.pth").is_file()
    if importlib.util.find_spec("tensorboard") is not None:  # written whenever the package is installed
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(work / "tensorboard"))
        events.Reload()
        assert [e.value for e in events.Scalars("eval/rewards/accuracies")] == pytest.approx(values)
        assert [e.step for e in events.Scalars("train/rewards/accuracies")] == [1, 2, 3, 4, 5, 6]

    # the last figures again: the final checkpoint on the held-out pairs, in one batch
    _, held = held_out_and_trained(cfg)
    lm = loaded(cfg, work / "iter_6.pth")
    batch = collate([held[i] for i in range(len(held))], pad_id=held.pad_id)
    with torch.no_grad():
        loss, stats = PreferenceLoss(lm, Objective.of(cfg))(batch["input_ids"], batch["labels"], batch["position_ids"])
    assert evals[-1]["eval_loss"] == pytest.approx(float(loss), rel=1e-5)
    for i, name in enumerate(METRICS):
        assert evals[-1][f"eval_{name}"] == pytest.approx(float(stats[i] / stats[-1]), rel=1e-4, abs=1e-6), name

    # tunex eval on the config and checkpoint prints the same figures
    from click.testing import CliRunner
    from tunex.cli import cli

    saved = tmp_path / "saved.toml"
    saved.write_text(cfg.to_toml())
    args = ["eval", str(saved), "--adapter", str(work / "iter_6.pth"), "--json"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output.strip().splitlines()[-1])
    assert figures["eval_pairs"] == 3
    for key in ("eval_loss", *(f"eval_{m}" for m in METRICS)):
        assert figures[key] == pytest.approx(evals[-1][key], rel=1e-5, abs=1e-6), key


def test_full_dpo_held_out_pairs_read_their_reference_from_the_shared_cache(setup, tmp_path):
    cfg = config(setup, tmp_path, "full", "dpo", "eval.split=0.5", 'save.best_metric="eval_loss"', max_steps=2)
    train(cfg)
    files = list((tmp_path / "cache").glob("*/reference-*.f32"))
    assert len(files) == 1 and files[0].stat().st_size == len(QA) * 2 * 4  # every pair of the store, once
    last = [r for r in curve(cfg.save.work_dir) if "eval_loss" in r][-1]

    # the policy is the checkpoint, the reference the starting model: both scored here, in one batch
    from tunex.data import collate

    _, held = held_out_and_trained(cfg)
    batch = collate([held[i] for i in range(len(held))], pad_id=held.pad_id)
    args = (batch["input_ids"], batch["labels"], batch["position_ids"])
    objective = Objective.of(cfg)
    with torch.no_grad():
        chosen, rejected, _, _ = PreferenceLoss(
            loaded(cfg, Path(cfg.save.work_dir) / "iter_2.pth"), objective
        ).sequence_logps(*args)
        ref_c, ref_r, _, _ = PreferenceLoss(loaded(cfg, None), objective).sequence_logps(*args)
        loss, r_c, r_r = objective.loss(chosen, rejected, ref_c, ref_r)
    assert last["eval_loss"] == pytest.approx(float(loss), rel=1e-5)
    assert last["eval_rewards/margins"] == pytest.approx(float((r_c - r_r).mean()), rel=1e-4, abs=1e-6)
    assert abs(last["eval_rewards/margins"]) > 1e-4  # the policy moved away from the reference


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
