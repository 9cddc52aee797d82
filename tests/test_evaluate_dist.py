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
