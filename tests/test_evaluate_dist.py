"""Held-out evaluation under torchrun (2 CPU processes, gloo): DDP ranks split the eval batches and
sum their figures, FSDP ranks evaluate together; both equal the lone run's, and best.pth follows."""

from __future__ import annotations

import pytest
import torch
from test_dist import NO_DROPOUT, ONE, TWO, torchrun
from test_train_helpers import make_data, make_tiny_model, write_config
from tunex.config import load_config
from tunex.train import checkpoint
from tunex.train.best import read_best
from tunex.train.loop import train
from tunex.train.metrics import read_metrics

pytest.importorskip("transformers")
pytestmark = [
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed"),
    pytest.mark.usefixtures("one_thread"),
]

EVAL = ["eval.split=0.34", "eval.every_n_steps=2", 'save.best_metric="eval_loss"']


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_eval_under_two_processes_equals_one(tmp_path, kind):
    model = make_tiny_model(tmp_path / "model", tied=False)
    data = make_data(tmp_path / "data", "pretrain")
    cfg = write_config(
        tmp_path / "c.toml",
        model,
        data,
        kind,
        "pretrain",
        tmp_path / "unused",
        save_steps=3,
        max_steps=4,
        batch_size=1,
        grad_accum=2,
        lr=3e-3 if kind == "full" else 2e-2,
    )
    ref, two = tmp_path / "ref", tmp_path / "two"
    train(load_config(cfg, [*ONE, NO_DROPOUT, *EVAL]), work_dir=str(ref))
    options = [x for o in EVAL for x in ("-o", o)]
    torchrun(str(cfg), "--work-dir", str(two), *TWO, "-o", NO_DROPOUT, *options)
    evals = {w: [r for r in read_metrics(w) if "eval_loss" in r] for w in (ref, two)}
    assert [r["step"] for r in evals[two]] == [2, 4]
    for a, b in zip(evals[ref], evals[two]):
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-5)
        assert b["eval_tokens"] == a["eval_tokens"]
    best = read_best(two)
    assert best["step"] == read_best(ref)["step"]
    name = "best.shards" if kind == "full" else "best.pth"
    assert checkpoint.load(two / name)["step"] == best["step"]


@pytest.mark.parametrize("kind", ["lora", "full"])  # DDP splits the eval batches; FSDP2 ranks run them together
def test_preference_eval_under_two_processes_equals_one(tmp_path, kind):
    import json

    from test_train_helpers import QA
    from tunex.train.preference import METRICS

    model = make_tiny_model(tmp_path / "model", tied=False)
    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": q, "chosen": a, "rejected": " ".join(reversed(a.split()))} for q, a in QA]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = write_config(
        tmp_path / "c.toml",
        model,
        data,
        kind,
        "preference",
        tmp_path / "unused",
        save_steps=3,
        max_steps=4,
        batch_size=1,
        grad_accum=2,
        lr=3e-3 if kind == "full" else 2e-2,
    )
    # three held-out pairs in batches of one: the ranks' shares differ (2 and 1)
    pref = ['train.objective="dpo"', "eval.split=0.5", "eval.every_n_steps=2", "eval.batch_size=1"]
    pref.append('save.best_metric="eval_rewards/margins"')
    ref, two = tmp_path / "ref", tmp_path / "two"
    train(load_config(cfg, [*ONE, NO_DROPOUT, *pref]), work_dir=str(ref))
    options = [x for o in pref for x in ("-o", o)]
    torchrun(str(cfg), "--work-dir", str(two), *TWO, "-o", NO_DROPOUT, *options)
    evals = {w: [r for r in read_metrics(w) if "eval_loss" in r] for w in (ref, two)}
    assert [r["step"] for r in evals[two]] == [2, 4] == [r["step"] for r in evals[ref]]
    for a, b in zip(evals[ref], evals[two]):
        assert b["eval_pairs"] == a["eval_pairs"] == 3
        # the two runs' weights differ by float rounding: 1e-5 of a side's log-prob (~100 nats), times beta
        # (0.1) for the rewards; the loss and the accuracies barely move
        slack = 1e-5 * max(1.0, abs(a["eval_logps/chosen"]), abs(a["eval_logps/rejected"]))
        for key in ("eval_loss", *(f"eval_{m}" for m in METRICS)):
            tol = slack if key.startswith("eval_logps") else 0.1 * slack if key.startswith("eval_rewards") else 1e-5
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=tol), key
    assert read_best(two)["step"] == read_best(ref)["step"]
