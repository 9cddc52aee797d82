"""The decoder against transformers (test oracle): tiny random models of every family, fp32."""

from __future__ import annotations

import json

import pytest
import torch
from _hf_families import BASE, FAMILIES, internlm2_checkpoint, make_hf
from _model_checks import assert_greedy_matches_generate, assert_packed_rows_match_documents
from tunex.errors import FormatError
from tunex.models import load_model, to_checkpoint_names

TOL = 1e-4


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request, tmp_path_factory):
    folder, hf = make_hf(tmp_path_factory, request.param)
    return folder, hf, load_model(folder)


def test_logits_match_transformers(pair):
    folder, hf, ours = pair
    ids = torch.randint(0, BASE["vocab_size"], (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=TOL, rtol=TOL)


def test_packed_batch_matches_documents_one_by_one(pair):
    _, hf, ours = pair
    assert_packed_rows_match_documents(hf, ours, BASE["vocab_size"])


def test_state_dict_keys_are_the_checkpoint_keys(pair):
    folder, hf, ours = pair
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert set(ours.state_dict()) == keys
    assert ours.config.tie_word_embeddings == hf.config.tie_word_embeddings
    attn = ours.model.layers[0].self_attn
    q = attn.qkv_proj if ours.config.fused_qkv else attn.q_proj  # Phi-3's is fused, as in its checkpoints
    assert isinstance(q, torch.nn.Linear)  # LoRA and NF4 replace it


def test_kv_cache_greedy_matches_transformers_generate(pair):
    _, hf, ours = pair
    assert_greedy_matches_generate(hf, ours)


def test_internlm2_fused_layout_loads_as_llama_and_exports_back(tmp_path):
    import transformers
    from safetensors.torch import save_file

    torch.manual_seed(3)
    config = transformers.LlamaConfig(
        **{**BASE, "num_attention_heads": 8, "num_key_value_heads": 2}, rope_theta=10000.0
    )
    hf = transformers.LlamaForCausalLM(config).eval()
    ckpt = internlm2_checkpoint({k: v.contiguous() for k, v in hf.state_dict().items()}, 8, 2, 8)
    save_file(ckpt, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "internlm2",
                "architectures": ["InternLM2ForCausalLM"],
                "vocab_size": 96,
                "hidden_size": 64,
                "intermediate_size": 112,
                "num_hidden_layers": 2,
                "num_attention_heads": 8,
                "num_key_value_heads": 2,
                "rms_norm_eps": config.rms_norm_eps,
                "rope_theta": 10000.0,
                "bias": False,
                "max_position_embeddings": 256,
                "tie_word_embeddings": False,
            }
        )
    )
    ours = load_model(tmp_path)
    ids = torch.randint(0, 96, (1, 15), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=TOL, rtol=TOL)
    back = to_checkpoint_names(ours.state_dict(), ours.config)
    assert set(back) == set(ckpt)
    for k, v in ckpt.items():
        assert torch.equal(back[k], v), k


def test_quantize_hook_replaces_decoder_linears_layer_by_layer(tmp_path_factory):
    folder, hf = make_hf(tmp_path_factory, "qwen2")
    seen = []

    class Wrapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    def hook(name, linear):
        assert not linear.weight.is_meta
        seen.append(name)
        return Wrapped(linear)

    ours = load_model(folder, quantize=hook)
    assert len(seen) == 2 * 7 and "model.layers.1.mlp.down_proj" in seen
    assert isinstance(ours.model.layers[0].self_attn.q_proj, Wrapped)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=TOL, rtol=TOL)


def test_dtype_and_mismatch_errors(tmp_path_factory, tmp_path):
    folder, _ = make_hf(tmp_path_factory, "llama2")
    assert load_model(folder, dtype="bfloat16").model.norm.weight.dtype == torch.bfloat16
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").symlink_to(folder / "model.safetensors")
    with pytest.raises(FormatError, match="missing .* model.layers.2"):
        load_model(tmp_path)
    cfg["model_type"] = "no_such_arch"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="model_type 'no_such_arch' is not supported"):
        load_model(tmp_path)
    # a type transformers knows goes to the transformers backend, which refuses weights that do not fit it
    cfg["model_type"] = "gpt_neox"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match=r"checkpoint does not match config.json \(gpt_neox, through transformers\)"):
        load_model(tmp_path)


def test_prequantized_folder_loads_directly(tmp_path_factory, tmp_path):
    import shutil

    from safetensors.torch import save_file
    from tunex.quant import NF4Linear

    folder, _ = make_hf(tmp_path_factory, "qwen2")
    packed = load_model(folder, quantize=lambda name, linear: NF4Linear.from_linear(linear))
    state = {k: v.contiguous() for k, v in packed.state_dict().items()}
    assert any(k.endswith(".weight.quant_state.bitsandbytes__nf4") for k in state)
    save_file(state, tmp_path / "model.safetensors")
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    again = load_model(tmp_path)
    assert isinstance(again.model.layers[1].self_attn.k_proj, NF4Linear)
    assert again.model.layers[1].self_attn.k_proj.bias is not None
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    with torch.no_grad():
        assert torch.equal(again(ids), packed(ids))


def test_tunex_quantize_output_loads_directly(tmp_path_factory, tmp_path):
    from click.testing import CliRunner
    from tunex.cli import cli
    from tunex.quant import NF4Linear

    folder, _ = make_hf(tmp_path_factory, "llama2")
    result = CliRunner().invoke(cli, ["quantize", str(folder), str(tmp_path / "q")])
    assert result.exit_code == 0, result.output
    loaded = load_model(tmp_path / "q")
    assert isinstance(loaded.model.layers[0].mlp.up_proj, NF4Linear)
    packed = load_model(folder, quantize=lambda name, linear: NF4Linear.from_linear(linear))
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    with torch.no_grad():
        assert torch.equal(loaded(ids), packed(ids))
