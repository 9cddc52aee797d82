"""``model.rope_scaling``: a config key replacing the checkpoint's RoPE scaling. Logits of a model
loaded with each kind equal transformers' for the same checkpoint with that rope_scaling in its
config (the oracle), past the native length; bad tables are config errors naming the key; a full
fine-tune's exported config.json carries the scaling; a max_length past the RoPE context warns."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from _hf_families import hf_model
from test_train_helpers import make_data, make_tiny_model, write_config
from tunex.config import load_config, validate
from tunex.errors import ConfigError, TunexError
from tunex.models import load_model

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

NATIVE = 16  # max_position_embeddings of the checkpoint; the test sequence is longer
SCALINGS = {
    "linear": {"type": "linear", "factor": 4.0},
    "dynamic": {"type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "beta_fast": 16.0, "beta_slow": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
    "longrope": {
        "rope_type": "longrope",
        "factor": 4.0,
        "short_factor": [1.0, 1.1, 1.2, 1.3, 1.5, 1.8, 2.0, 2.5],
        "long_factor": [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 9.0],
    },
}


def _config_value(scaling: dict) -> dict:
    """The table as the config check normalises it (what tunex hands the loader)."""
    return validate({"model": {"path": "m", "rope_scaling": scaling}, "data": {"path": "d"}}).model.rope_scaling


@pytest.mark.parametrize("kind", sorted(SCALINGS))
def test_logits_equal_transformers_with_the_same_scaling(tmp_path, kind):
    plain = hf_model("llama2", max_position_embeddings=NATIVE)
    plain.save_pretrained(tmp_path / "base")
    scaled = hf_model("llama2", max_position_embeddings=NATIVE, rope_scaling=dict(SCALINGS[kind]))
    for (name, a), b in zip(plain.state_dict().items(), scaled.state_dict().values()):
        assert torch.equal(a, b), name  # one checkpoint; only the rope settings differ
    ids = torch.randint(0, 96, (1, 3 * NATIVE + 5), generator=torch.Generator().manual_seed(0))
    ours = load_model(tmp_path / "base", rope_scaling=_config_value(SCALINGS[kind]))
    unscaled = load_model(tmp_path / "base")
    with torch.no_grad():
        expected = scaled(ids).logits
        torch.testing.assert_close(ours(ids), expected, atol=1e-4, rtol=1e-4)
        # the override is what made them equal: the checkpoint's own rope gives other logits
        assert (unscaled(ids) - expected).abs().max() > 1e-3


def _raw(**model):
    return {"model": {"path": "m", **model}, "data": {"path": "d"}}


@pytest.mark.parametrize(
    ("table", "words"),
    [
        ({"type": "ntk"}, "a 'type' of 'linear', 'dynamic', 'yarn', 'longrope', 'llama3' (got type 'ntk')"),
        ({"type": "yarn"}, "the keys factor for type 'yarn' (missing: factor)"),
        ({"type": "llama3", "factor": 8.0}, "missing: low_freq_factor, high_freq_factor"),
        ({"type": "linear", "factor": 0.5}, "factor >= 1"),
        ({"type": "linear", "factor": 2.0, "beta_fast": 3}, "unknown: beta_fast"),
        ({"type": "longrope", "long_factor": [1, "x"], "short_factor": [1]}, "long_factor as a non-empty list"),
        ({"type": "linear", "rope_type": "yarn", "factor": 2.0}, "not two different kinds"),
        ("yarn", "a table such as"),
    ],
)
def test_bad_tables_are_config_errors_naming_the_key(table, words):
    with pytest.raises(ConfigError) as err:
        validate(_raw(rope_scaling=table))
    (problem,) = err.value.problems
    assert problem.startswith("model.rope_scaling: expected ") and words in problem


def test_the_key_round_trips_through_toml(tmp_path):
    cfg = validate(_raw(rope_scaling=SCALINGS["longrope"]))
    path = tmp_path / "c.toml"
    path.write_text(cfg.to_toml())
    assert load_config(path).model.rope_scaling == cfg.model.rope_scaling
    assert validate(_raw()).model.rope_scaling == {}  # default: the checkpoint's own


@pytest.fixture
def run(tmp_path):
    model = make_tiny_model(tmp_path / "model")  # head dim 8: four rotary frequencies
    data = make_data(tmp_path / "data", "pretrain")
    return tmp_path, model, data


def _cfg(run, *overrides: str):
    root, model, data = run
    path = write_config(root / "c.toml", model, data, "full", "pretrain", root / "work", max_steps=1, batch_size=1)
    return load_config(path, list(overrides))


def test_longrope_factors_must_fit_the_model(run):
    from tunex.tokenizer import load_tokenizer
    from tunex.train.build import preflight

    cfg = _cfg(run, 'model.rope_scaling={type="longrope", long_factor=[1, 2, 3], short_factor=[1, 1, 1]}')
    with pytest.raises(TunexError, match=r"model.rope_scaling: long_factor has 3 values; .* head_dim / 2 = 4"):
        preflight(cfg, load_tokenizer(cfg.model.path))


def test_max_length_past_the_rope_context_warns_naming_the_key(run):
    from tunex.tokenizer import load_tokenizer
    from tunex.train.build import preflight

    tok = load_tokenizer(_cfg(run).model.path)
    with pytest.warns(UserWarning, match=r"data.max_length = 512 .* 256 positions .* set model.rope_scaling"):
        preflight(_cfg(run, "data.max_length=512"), tok)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        preflight(_cfg(run, "data.max_length=512", 'model.rope_scaling={type="yarn", factor=2.0}'), tok)
        preflight(_cfg(run, "data.max_length=256"), tok)


def test_full_export_writes_the_scaling_into_config_json(run):
    from tunex.train.loop import train

    root = run[0]
    cfg = _cfg(run, 'model.rope_scaling={type="linear", factor=2.0}', "eval.prompts=[]")
    result = train(cfg)
    from tunex.train.export import convert_checkpoint

    convert_checkpoint(cfg, result.checkpoint, root / "hf", fp32=True)
    written = json.loads((root / "hf" / "config.json").read_text())
    scaling = written.get("rope_scaling") or written.get("rope_parameters")
    assert scaling["rope_type"] == "linear" and scaling["factor"] == 2.0
    hf = transformers.AutoModelForCausalLM.from_pretrained(root / "hf").eval()
    ids = torch.arange(3, 300).remainder(250)[None]
    with torch.no_grad():
        torch.testing.assert_close(load_model(root / "hf")(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)


def test_set_rope_scaling_keeps_the_file_layout():
    from tunex.models.config import set_rope_scaling

    s = {"rope_type": "yarn", "factor": 4.0}
    old = {"rope_theta": 1e6}
    set_rope_scaling(old, s)
    assert old == {"rope_theta": 1e6, "rope_scaling": s}
    new = {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}
    set_rope_scaling(new, s)
    assert new == {"rope_parameters": {"rope_theta": 1e6, **s}}
    gemma = {"rope_parameters": {"full_attention": {"rope_theta": 1e6}, "sliding_attention": {"rope_theta": 1e4}}}
    set_rope_scaling(gemma, s)
    assert gemma["rope_parameters"]["full_attention"] == {"rope_theta": 1e6, **s}
    assert gemma["rope_parameters"]["sliding_attention"] == {"rope_theta": 1e4}


def test_the_transformers_backend_refuses_the_key(run):
    """model.rope_scaling replaces the rope settings of tunex's own decoder; a model run through
    transformers reads its own from config.json, so the key is refused rather than ignored."""
    from tunex.tokenizer import load_tokenizer
    from tunex.train.build import preflight

    cfg = _cfg(run, 'model.backend="transformers"', 'model.rope_scaling={type="linear", factor=2.0}')
    with pytest.raises(TunexError, match=r"model.rope_scaling: llama runs through the transformers backend"):
        preflight(cfg, load_tokenizer(cfg.model.path))
    with pytest.raises(ValueError, match=r"transformers backend"):
        load_model(cfg.model.path, backend="transformers", rope_scaling=cfg.model.rope_scaling)
    preflight(_cfg(run, 'model.backend="transformers"'), load_tokenizer(cfg.model.path))  # without the key: fine


def test_a_lora_adapter_carries_the_scaling_into_merge_and_chat(run):
    """PEFT's adapter folder has no place for the base's rope_scaling; tunex keeps it beside the
    adapter (tunex_base_config.json), so the merged folder's config.json has it and the merged model
    equals the oracle: transformers + PEFT on the base with that scaling in its config.json."""
    peft = pytest.importorskip("peft")
    from tunex.merge import merge
    from tunex.models.adapter import apply_adapter
    from tunex.train.export import convert_checkpoint
    from tunex.train.loop import train

    root, model, data = run
    path = write_config(root / "c.toml", model, data, "lora", "pretrain", root / "work", max_steps=2, batch_size=1)
    cfg = load_config(path, ['model.rope_scaling={type="linear", factor=2.0}', "eval.prompts=[]", "method.dropout=0.0"])
    result = train(cfg)
    said = convert_checkpoint(cfg, result.checkpoint, root / "adapter", fp32=True)
    assert "tunex_base_config.json" in said
    assert json.loads((root / "adapter" / "tunex_base_config.json").read_text())["rope_scaling"]["factor"] == 2.0
    merge(model, root / "adapter", root / "merged")
    written = json.loads((root / "merged" / "config.json").read_text())
    scaling = written.get("rope_scaling") or written.get("rope_parameters")
    assert scaling["rope_type"] == "linear" and scaling["factor"] == 2.0

    scaled_base = root / "scaled-base"  # the oracle's base: the checkpoint with the scaling in config.json
    shutil.copytree(model, scaled_base)
    base_config = json.loads((scaled_base / "config.json").read_text())
    base_config["rope_scaling"] = {"type": "linear", "factor": 2.0}
    (scaled_base / "config.json").write_text(json.dumps(base_config))
    oracle = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(scaled_base), root / "adapter"
    ).eval()
    ids = torch.arange(3, 300).remainder(250)[None]  # past the 256 native positions
    with torch.no_grad():
        expected = oracle(ids).logits
        merged = transformers.AutoModelForCausalLM.from_pretrained(root / "merged").eval()
        torch.testing.assert_close(merged(ids).logits, expected, atol=1e-4, rtol=1e-4)
        # tunex chat --adapter: the base loaded with the adapter's scaling, the adapter unmerged
        from tunex.io.hf import base_config_changes

        lm = load_model(model, rope_scaling=base_config_changes(root / "adapter")["rope_scaling"])
        apply_adapter(lm, root / "adapter")
        torch.testing.assert_close(lm(ids), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "text, words",
    [
        ("{", r"not valid JSON"),
        ("[1]", r"expected a JSON object of config.json keys, got list"),
        ('{"rope_theta": 5}', r"unknown key 'rope_theta'; expected only rope_scaling"),
        ('{"rope_scaling": 2}', r"rope_scaling must be a JSON object, got int"),
    ],
)
def test_a_bad_base_config_side_file_is_named(tmp_path, text, words):
    from tunex.errors import FormatError
    from tunex.io.hf import base_config_changes

    (tmp_path / "tunex_base_config.json").write_text(text)
    with pytest.raises(FormatError, match=rf"tunex_base_config.json: {words}"):
        base_config_changes(tmp_path)
    assert base_config_changes(tmp_path / "absent") == {}
