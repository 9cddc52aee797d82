"""Bad models, tokenizers and LoRA targets: `tunex train` and `tunex chat` stop with one line naming
the file or key, what was expected and the fix, before anything is written."""

from __future__ import annotations

import json

import pytest
from _hf_families import hf_model
from click.testing import CliRunner
from test_train_helpers import make_data, make_tiny_model, write_config
from tunex.cli import cli
from tunex.errors import FormatError
from tunex.models import load_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def setup(tmp_path):
    model = make_tiny_model(tmp_path / "m")
    data = make_data(tmp_path / "d", "instruct")
    return tmp_path, model, data


def edit_config(model, **changes):
    path = model / "config.json"
    raw = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    path.write_text(json.dumps(raw))


def train_fails(root, model, data, **method) -> str:
    cfg = write_config(root / "c.toml", model, data, "lora", "openai", root / "w")
    if method:
        text = cfg.read_text().replace('target_modules = "all-linear"', f"target_modules = {method['targets']}")
        cfg.write_text(text)
    result = CliRunner().invoke(cli, ["train", str(cfg)])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert not (root / "w").exists() and not (root / "cache").exists()  # nothing written
    return lines[0]


def test_unknown_architecture(setup):
    root, model, data = setup
    # (gpt_neox, the name used before, now trains through the transformers backend: test_hf_backend.py)
    edit_config(model, model_type="no_such_arch")
    line = train_fails(root, model, data)
    assert f"{model / 'config.json'}: model_type 'no_such_arch' is not supported" in line
    assert "llama" in line and "gemma2" in line and "phi3" in line  # the families it does load


@pytest.mark.parametrize(
    "family, key",
    [("llama2", "intermediate_size"), ("gemma2", "query_pre_attn_scalar"), ("gemma3", "sliding_window")],
)
def test_config_missing_a_key_the_family_needs(tmp_path, family, key):
    hf_model(family).save_pretrained(tmp_path)
    edit_config(tmp_path, **{key: None})
    with pytest.raises(FormatError) as info:
        load_model(tmp_path)
    assert str(info.value) == (
        f"{tmp_path / 'config.json'}: missing key {key!r} (needed for a {json.loads((tmp_path / 'config.json').read_text())['model_type']} model)"
    )


@pytest.mark.parametrize("key", ["attn_logit_softcapping", "final_logit_softcapping"])
@pytest.mark.parametrize("value", [0, -30.0, "50", True, float("inf"), float("nan")])
def test_a_softcap_that_is_not_a_positive_finite_number_is_named(tmp_path, key, value):
    hf_model("gemma2").save_pretrained(tmp_path)
    edit_config(tmp_path, **{key: value})
    with pytest.raises(FormatError) as info:
        load_model(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'config.json'}: {key} = {value!r}; expected a positive finite number")
    assert "null for no soft-capping" in message and "\n" not in message


def test_a_null_softcap_is_none(tmp_path):
    hf_model("gemma2").save_pretrained(tmp_path)
    edit_config(tmp_path, attn_logit_softcapping=None)  # removed: as null, no soft-capping
    assert load_model(tmp_path).config.attn_softcap is None


def test_config_missing_a_key_stops_training(setup):
    root, model, data = setup
    edit_config(model, num_hidden_layers=None)
    assert "missing key 'num_hidden_layers'" in train_fails(root, model, data)


def test_unsupported_rope_scaling_is_named(tmp_path):
    hf_model("llama2").save_pretrained(tmp_path)
    edit_config(tmp_path, rope_scaling={"rope_type": "mrope", "factor": 2.0})
    with pytest.raises(FormatError, match="rope_scaling type 'mrope' is not supported"):
        load_model(tmp_path)
    edit_config(tmp_path, rope_scaling={"rope_type": "llama3", "factor": 8.0})
    with pytest.raises(FormatError, match="rope_scaling of type 'llama3' lacks 'low_freq_factor'"):
        load_model(tmp_path)


def test_qwen_sliding_window_layers_are_refused(tmp_path):
    hf_model("qwen3").save_pretrained(tmp_path)
    edit_config(tmp_path, use_sliding_window=True)
    with pytest.raises(FormatError, match="use_sliding_window true .* is not supported"):
        load_model(tmp_path)


def test_tokenizer_larger_than_the_embedding(setup):
    root, model, data = setup
    from tunex.tokenizer import load_tokenizer

    n = load_tokenizer(model).vocab_size
    edit_config(model, vocab_size=n - 10)
    line = train_fails(root, model, data)
    assert f"the tokenizer has {n} tokens but the model's embedding" in line and f"has {n - 10} rows" in line
    result = CliRunner().invoke(cli, ["chat", str(model), "--prompt", "Hi", "--temperature", "0"])
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert f"has {n - 10} rows" in result.output


def test_lora_target_that_matches_nothing_lists_the_modules(setup):
    root, model, data = setup
    line = train_fails(root, model, data, targets='["query", "value"]')
    assert "method.target_modules" in line and "['query', 'value'] selects no linear layer" in line
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert name in line
