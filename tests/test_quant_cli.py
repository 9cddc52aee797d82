"""``tunex quantize``: the pre-quantized checkpoint loads in transformers (bitsandbytes 4-bit on the
CPU) and equals, byte for byte and in logits, the same model quantized by transformers itself."""

from __future__ import annotations

import json

import pytest
import torch
import tunex.quant as tq
from click.testing import CliRunner
from tunex.cli import cli

transformers = pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")

from _bnb_oracle import _eager_bitsandbytes, bits  # noqa: E402,F401


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    path = tmp_path_factory.mktemp("tiny") / "src"
    model.save_pretrained(path)
    return path


def run(*args):
    result = CliRunner().invoke(cli, ["quantize", *map(str, args)])
    return result.exit_code, result.output


def load_4bit(path, **kwargs):
    return transformers.AutoModelForCausalLM.from_pretrained(path, device_map="cpu", **kwargs)


def test_checkpoint_equals_transformers_own_quantization(tiny_llama, tmp_path):
    out = tmp_path / "nf4"
    code, text = run(tiny_llama, out, "--compute-dtype", "float32")
    assert code == 0, text
    assert "quantized 14 weights to nf4" in text
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert (out / "generation_config.json").is_file()

    ours = load_4bit(out)
    bnb_config = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    theirs = load_4bit(tiny_llama, quantization_config=bnb_config)
    assert type(ours.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, theirs(ids).logits)
    sd_ours, sd_theirs = ours.state_dict(), theirs.state_dict()
    assert set(sd_ours) == set(sd_theirs)
    for key in sd_theirs:
        assert torch.equal(bits(sd_ours[key]), bits(sd_theirs[key])), key


def test_fp4_sharded_without_double_quant(tiny_llama, tmp_path):
    out = tmp_path / "fp4"
    code, text = run(
        tiny_llama, out, "--quant-type", "fp4", "--blocksize", "128", "--no-double-quant", "--max-shard-size", "60KB"
    )
    assert code == 0, text
    assert (out / "model.safetensors.index.json").is_file()
    model = load_4bit(out)
    src = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama)
    import bitsandbytes.functional as F

    for name in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"):
        layer = model.get_submodule(name)
        weight = src.get_submodule(name).weight
        want = tq.dequantize(tq.quantize(weight, "fp4", 128, False))
        got = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        assert layer.weight.quant_state.blocksize == 128 and not layer.weight.quant_state.nested
        torch.testing.assert_close(got.float().view(-1), want.float().view(-1), rtol=0, atol=0)
    # embeddings and norms are kept as they were
    assert torch.equal(model.model.embed_tokens.weight, src.model.embed_tokens.weight)


def test_legacy_bin_checkpoint(tiny_llama, tmp_path):
    import shutil

    src = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama)
    (tmp_path / "bin").mkdir()
    torch.save(src.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    shutil.copy(tiny_llama / "config.json", tmp_path / "bin" / "config.json")
    code, text = run(tmp_path / "bin", tmp_path / "out")
    assert code == 0, text
    model = load_4bit(tmp_path / "out")
    layer = model.model.layers[1].self_attn.o_proj
    want = tq.quantize(src.model.layers[1].self_attn.o_proj.weight, "nf4", 64, True)
    assert torch.equal(layer.weight.data.view(-1), want.packed.view(-1))


def test_errors_are_one_line(tiny_llama, tmp_path):
    code, text = run(tmp_path / "missing", tmp_path / "out")
    assert code == 1 and "model folder not found" in text
    out = tmp_path / "done"
    assert run(tiny_llama, out)[0] == 0
    code, text = run(tiny_llama, out)
    assert code == 1 and "error:" in text and "exists" in text
    assert run(tiny_llama, out, "--overwrite")[0] == 0
    code, text = run(out, tmp_path / "again")
    assert code == 1 and "already has a quantization_config" in text
    code, text = run(tiny_llama, tmp_path / "x", "--max-shard-size", "2XB")
    assert code == 1 and "bad size" in text


def test_nan_weight_is_named(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.model.layers[0].mlp.gate_proj.weight[3, 5] = float("nan")
    model.save_pretrained(tmp_path / "src")
    code, text = run(tmp_path / "src", tmp_path / "out")
    assert code == 1 and "model.layers.0.mlp.gate_proj.weight" in text and "NaN" in text
    assert not (tmp_path / "out").exists()
