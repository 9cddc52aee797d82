"""Reward models: a scalar head on each side's last token trained with the Bradley-Terry loss
(full and LoRA), exported by ``convert pth_to_hf`` as a folder that transformers'
AutoModelForSequenceClassification loads and scores exactly as tunex does."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from test_train_helpers import QA, make_tiny_model, write_config
from tunex.config import load_config
from tunex.data import collate
from tunex.data.dataset import build_dataset
from tunex.models import load_model
from tunex.peft import apply_lora
from tunex.tokenizer import load_tokenizer
from tunex.train.export import convert_checkpoint
from tunex.train.loop import train
from tunex.train.metrics import read_metrics
from tunex.train.preference import RewardLoss, add_reward_head

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward")
    model = make_tiny_model(root / "m", tied=False)
    data = root / "pairs.jsonl"
    rows = [{"prompt": q, "chosen": a, "rejected": " ".join(reversed(a.split()))} for q, a in QA]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, model, data


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_reward_model_trains_and_exports_for_sequence_classification(setup, tmp_path, kind):
    root, folder, data = setup
    work = tmp_path / "w"
    path = write_config(
        tmp_path / "c.toml", folder, data, kind, "preference", work, lr=3e-3 if kind == "full" else 2e-2, max_steps=8
    )
    cfg = load_config(path, ['train.objective="reward"', "eval.prompts=[]", "method.dropout=0.0"])
    result = train(cfg)
    records = read_metrics(work)
    assert {"rewards/chosen", "rewards/accuracies", "rewards/margins"} <= set(records[0])
    assert "logps/chosen" not in records[0]
    assert records[-1]["loss"] < records[0]["loss"] and records[-1]["rewards/accuracies"] == 1.0

    # tunex's scores of every pair with the trained weights
    ours = load_model(folder)
    if kind == "lora":
        m = cfg.method
        apply_lora(ours, m.target_modules, m.r, m.alpha, 0.0, m.use_rslora, m.use_dora)
    add_reward_head(ours, torch.float32)
    ours.load_state_dict(torch.load(result.checkpoint, weights_only=True)["model"], strict=kind == "full")
    ds = build_dataset(cfg.data, load_tokenizer(folder), seed=0, cache_dir=tmp_path / "cache2")
    batch = collate([ds[i] for i in range(len(ds))], pad_id=ds.pad_id)
    scorer = RewardLoss(ours.eval())
    with torch.no_grad():
        chosen, rejected = scorer.rewards(batch["input_ids"], batch["position_ids"])
        loss, _ = scorer(batch["input_ids"], batch["labels"], batch["position_ids"])

    out = tmp_path / "hf"
    assert convert_checkpoint(cfg, result.checkpoint, out, fp32=True) == "a HF reward model"
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(str(out), dtype=torch.float32).eval()
    assert theirs.config.num_labels == 1 and type(theirs).__name__ == "LlamaForSequenceClassification"
    scores = []
    with torch.no_grad():
        for k in range(2 * len(ds)):
            ids, _ = ds.store.sample(k)
            scores.append(float(theirs(input_ids=torch.tensor(ids, dtype=torch.long)[None]).logits[0, 0]))
    hf_c, hf_r = torch.tensor(scores[0::2]), torch.tensor(scores[1::2])
    torch.testing.assert_close(chosen, hf_c, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rejected, hf_r, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss, -F.logsigmoid(hf_c - hf_r).mean(), rtol=1e-4, atol=1e-5)
    # padded on the right with the pad token, as a batch: the same scores (the last real token)
    ids = [torch.tensor(ds.store.sample(k)[0], dtype=torch.long) for k in range(2)]
    width = max(len(x) for x in ids)
    padded = torch.full((2, width), theirs.config.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(padded)
    for row, x in enumerate(ids):
        padded[row, : len(x)], mask[row, : len(x)] = x, 1
    with torch.no_grad():
        both = theirs(input_ids=padded, attention_mask=mask).logits[:, 0]
    torch.testing.assert_close(both, torch.tensor(scores[:2]), rtol=1e-4, atol=1e-4)


def test_reward_objective_config_errors(setup, tmp_path):
    from tunex.errors import ConfigError

    root, folder, data = setup
    path = write_config(tmp_path / "c.toml", folder, data, "lora", "preference", tmp_path / "w")
    with pytest.raises(ConfigError) as info:
        load_config(
            path, ['train.objective="reward"', 'preference.reference="model"', "preference.label_smoothing=0.1"]
        )
    assert sorted(p.split(":")[0] for p in info.value.problems) == [
        "preference.label_smoothing",
        "preference.reference",
    ]
