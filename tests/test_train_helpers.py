"""Fixtures for the training tests: a tiny random Llama folder with a small BPE tokenizer and a
ChatML template, and small memorisable datasets. (The file's one test checks the fixture itself.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QA = [
    ("What is the capital of France?", "Paris is the capital."),
    ("What colour is the sky?", "The sky is blue."),
    ("How many legs has a cat?", "A cat has four legs."),
    ("Who wrote Hamlet?", "Shakespeare wrote it."),
    ("What do bees make?", "Bees make honey."),
    ("Is ice cold?", "Yes, ice is cold."),
]
TEXTS = [
    "the quick brown fox jumps over the lazy dog. " * 3,
    "a stitch in time saves nine, and nine saves a stitch. " * 3,
    "rain in spain falls mainly on the plain of spain. " * 3,
]


def make_tokenizer(folder: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [q + " " + a for q, a in QA] + TEXTS + ["user assistant system"]
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": None,
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "chat_template": CHATML,
                "tokenizer_class": "PreTrainedTokenizerFast",
            }
        )
    )
    return tok.get_vocab_size()


def make_tiny_model(folder: Path, tied: bool = True, seed: int = 0) -> Path:
    """A random 2-layer Llama (hidden 32) as an fp32 HF folder with its tokenizer."""
    import torch
    import transformers

    vocab = make_tokenizer(folder)
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        initializer_range=0.3,
        eos_token_id=2,
        bos_token_id=None,
        pad_token_id=0,
    )
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def make_data(folder: Path, kind: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "pretrain":
        path = folder / "text.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    else:
        path = folder / "chat.jsonl"
        path.write_text(
            "".join(
                json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
                for q, a in QA
            )
        )
    return path


def write_config(
    path: Path, model: Path, data: Path, kind: str, fmt: str, work_dir: Path, save_steps: int = 4, **train
) -> Path:
    """A TOML config for the tiny model; ``train`` overrides [train] keys."""
    settings = {
        "batch_size": 2,
        "grad_accum": 2,
        "max_steps": 12,
        "lr": 1e-2,
        "warmup_ratio": 0.1,
        "dtype": "float32",
        "gradient_checkpointing": False,
        "log_steps": 4,
        "seed": 0,
    }
    settings.update(train)
    method = {"kind": kind}
    if kind != "full":
        method.update({"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": "all-linear"})
    if kind == "qlora":
        method.update({"blocksize": 32, "compute_dtype": "float32"})
    sections = {
        "model": {"path": str(model), "dtype": "float32"},
        "data": {
            "path": str(data),
            "format": fmt,
            "template": "auto",
            "max_length": 64,
            "pack_to_max_length": fmt == "pretrain",
            "cache_dir": str(work_dir.parent / "cache"),
        },
        "method": method,
        "train": settings,
        "eval": {"prompts": [QA[0][0]], "every_n_steps": 6, "max_new_tokens": 8},
        "save": {"work_dir": str(work_dir), "save_steps": save_steps, "save_total_limit": 2},
    }

    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        return json.dumps(v)

    text = "".join(
        f"[{name}]\n" + "".join(f"{k} = {value(v)}\n" for k, v in body.items()) + "\n"
        for name, body in sections.items()
    )
    path.write_text(text)
    return path


def test_tiny_model_fixture_loads_in_tunex(tmp_path):
    pytest.importorskip("transformers")
    from tunex.models.loading import load_model
    from tunex.tokenizer import load_tokenizer

    folder = make_tiny_model(tmp_path / "m")
    model = load_model(folder)
    tok = load_tokenizer(folder)
    assert tok.eos_token == "<|im_end|>" and tok.token_to_id("<|im_end|>") == 2
    assert model.model.embed_tokens.weight.shape[0] == tok.vocab_size
