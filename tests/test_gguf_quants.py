"""GGUF block packing in Rust (Q8_0, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K) against independent oracles:
gguf-py's reference quantizers (Q8_0, Q5_0, Q5_1: bit-exact ports of ggml's) and dequantizers (all
six), and llama.cpp's own ggml library (its reference quantizer and dequantizer, through
llama-cpp-python's shared libraries) where that is installed."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from _ggml_oracle import ggml_dequantize, ggml_quantize, load_ggml, qtype, weights
from tunex.gguf_io import BLOCK_ELEMS, quantize_blocks, tensor_type

KINDS = ["q8_0", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k"]
GGUF_QUANTIZES = ["q8_0", "q5_0", "q5_1"]  # the types gguf-py can quantize (it dequantizes all six)


@pytest.mark.parametrize("kind", GGUF_QUANTIZES)
def test_bytes_equal_gguf_reference_quantizer(kind):
    w = weights(16, 512)
    ours = quantize_blocks(w, kind, "w")
    theirs = gguf.quants.quantize(w, qtype(kind))
    assert ours.shape == theirs.shape
    assert np.array_equal(ours, theirs)


@pytest.mark.parametrize("kind", KINDS)
def test_gguf_dequantizer_reads_our_blocks_back_within_a_step(kind):
    w = weights(16, 512)
    back = gguf.quants.dequantize(quantize_blocks(w, kind, "w"), qtype(kind))
    assert back.shape == w.shape
    err = np.abs(back - w).reshape(-1, BLOCK_ELEMS[kind])
    # per block the error stays within the block's quantization step (range / levels); Q5_0
    # clamps the value opposite the largest to +15: one full step there
    levels = {"q8_0": 127, "q5_0": 16, "q5_1": 31, "q4_k": 15, "q5_k": 31, "q6_k": 31}[kind]
    span = np.abs(w).reshape(err.shape).max(axis=1, keepdims=True) * 2
    assert (err <= span / levels * 1.01 + 1e-7).all()
    # and the all-zero block comes back as zeros
    assert (back[0, :256] == 0).all()


def test_k_quants_are_rounding_noise_against_f32():
    w = weights(64, 1024, seed=1)[8:]
    rel = {
        k: np.linalg.norm(gguf.quants.dequantize(quantize_blocks(w, k), qtype(k)) - w) / np.linalg.norm(w)
        for k in ("q4_k", "q5_k", "q6_k", "q8_0")
    }
    assert rel["q8_0"] < rel["q6_k"] < rel["q5_k"] < rel["q4_k"] < 0.1, rel


@pytest.mark.parametrize(
    "shape,kind,needle",
    [
        ((4, 320), "q4_k", "rows of 320 values cannot be stored as Q4_K (blocks of 256 values)"),
        ((4, 48), "q8_0", "rows of 48 values cannot be stored as Q8_0"),
        ((4, 256), "q3_k", "q3_k"),
    ],
)
def test_bad_shapes_and_types_are_one_line_errors_naming_the_tensor(shape, kind, needle):
    with pytest.raises(ValueError) as e:
        quantize_blocks(np.zeros(shape, np.float32), kind, "blk.3.attn_q.weight")
    msg = str(e.value)
    assert needle in msg and "blk.3.attn_q.weight" in msg and "\n" not in msg


def test_non_finite_weights_are_refused_naming_tensor_and_index():
    from tunex.errors import DataError

    w = np.zeros((2, 256), np.float32)
    w[1, 3] = np.inf
    with pytest.raises(DataError, match=r"tensor 'output.weight' holds inf at flat index 259"):
        quantize_blocks(w, "q6_k", "output.weight")


def test_tensor_types_follow_llama_quantize():
    # SmolLM2-135M's shapes: hidden 576 (not whole 256-blocks), intermediate 1536, 30 layers, tied
    n = 30

    def t(name, shape, outtype="q4_k_m"):
        return tensor_type(name, shape, outtype, n, tied=True)

    assert t("token_embd.weight", (49152, 576)) == "q8_0"  # tied output: Q6_K, not whole blocks -> Q8_0
    assert t("blk.5.attn_q.weight", (576, 576)) == "q5_0"  # Q4_K's fallback
    # more bits for layers < 30 // 8, >= 7 * 30 // 8 and where (i - 3) % 3 == 2
    assert [t(f"blk.{i}.ffn_down.weight", (576, 1536)) == "q6_k" for i in (2, 3, 4, 5, 25, 26)] == [
        True, False, False, True, False, True,
    ]  # fmt: skip
    assert t("blk.0.attn_v.weight", (192, 576)) == "q8_0"  # first eighth -> Q6_K -> fallback Q8_0
    assert t("blk.5.attn_norm.weight", (576,)) == "f32"
    assert t("blk.5.ffn_up.weight", (1536, 576), "q5_k_m") == "q5_1"
    assert t("blk.5.ffn_down.weight", (576, 1536), "q6_k") == "q6_k"
    assert tensor_type("output.weight", (96, 512), "q4_k_m", 2, tied=False) == "q6_k"
    assert tensor_type("token_embd.weight", (96, 512), "q4_k_m", 2, tied=False) == "q4_k"
    assert tensor_type("blk.1.attn_qkv.weight", (96, 512), "q4_k_m", 2, tied=False) == "q5_k"
    assert tensor_type("blk.1.attn_q.weight", (96, 40), "q4_k_m", 2, tied=False) == "f16"


def test_moe_tensor_types_follow_llama_quantize():
    """llama-quantize's MoE rules: the routers stay f32 (also in f16 files, as llama.cpp's converter
    writes them), the experts' and shared expert's ffn_down follow ffn_down's layer mix, and 8
    experts (Mixtral) put attn_k / attn_v in Q8_0 and, in Q4_K_M, attn_output in Q5_K."""

    def t(name, shape, outtype="q4_k_m", experts=8):
        return tensor_type(name, shape, outtype, 32, tied=False, experts=experts)

    for outtype in ("f16", "bf16", "q8_0", "q4_k_m"):
        assert t("blk.3.ffn_gate_inp.weight", (8, 4096), outtype) == "f32"
        assert t("blk.3.ffn_gate_inp_shexp.weight", (1, 4096), outtype, experts=60) == "f32"
    assert t("blk.3.ffn_gate_exps.weight", (8, 14336, 4096), "f16") == "f16"
    assert [t(f"blk.{i}.ffn_down_exps.weight", (8, 4096, 14336)) for i in (3, 4, 6)] == ["q6_k", "q4_k", "q6_k"]
    assert t("blk.4.ffn_down_shexp.weight", (2048, 5632), experts=60) == "q4_k"
    assert t("blk.6.ffn_down_shexp.weight", (2048, 5632), experts=60) == "q6_k"
    assert t("blk.4.ffn_up_exps.weight", (8, 14336, 4096)) == "q4_k"
    for outtype in ("q8_0", "q6_k", "q5_k_m", "q4_k_m"):
        assert t("blk.4.attn_k.weight", (1024, 4096), outtype) == "q8_0"
        assert t("blk.4.attn_v.weight", (1024, 4096), outtype) == "q8_0"
    assert t("blk.4.attn_output.weight", (4096, 4096)) == "q5_k"
    assert t("blk.4.attn_output.weight", (4096, 4096), "q5_k_m") == "q5_k"
    assert t("blk.4.attn_output.weight", (4096, 4096), experts=60) == "q4_k"
    assert t("blk.4.attn_v.weight", (1024, 4096), experts=60) == "q4_k"
    assert t("blk.4.attn_k.weight", (1024, 4096), experts=60) == "q4_k"


# ---- llama.cpp's own ggml, where llama-cpp-python is installed ---------------------------------


@pytest.fixture(scope="module")
def ggml():
    return load_ggml()


@pytest.mark.parametrize("kind", KINDS)
def test_bytes_equal_llama_cpp_reference_quantizer(ggml, kind):
    w = weights(32, 1024, seed=2)
    w[9] *= 50.0  # rows of larger magnitude too
    ours = quantize_blocks(w, kind, "w")
    assert np.array_equal(ours, ggml_quantize(ggml, w, kind))


@pytest.mark.parametrize("kind", KINDS)
def test_llama_cpp_dequantizes_our_blocks_as_gguf_does(ggml, kind):
    w = weights(8, 512, seed=3)
    q = quantize_blocks(w, kind, "w")
    theirs = ggml_dequantize(ggml, q, kind, w.size).reshape(w.shape)
    assert np.array_equal(theirs, gguf.quants.dequantize(q, qtype(kind)))


@pytest.mark.parametrize("outtype", ["bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m"])
def test_export_writes_llama_quantize_types_and_stays_close(tmp_path, outtype):
    import torch
    import transformers
    from tunex.gguf_io import gguf_to_hf, hf_to_gguf
    from tunex.models import load_model

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path / "hf")
    path = hf_to_gguf(tmp_path / "hf", tmp_path / "m.gguf", outtype)
    reader = gguf.GGUFReader(str(path))
    types = {t.name: t.tensor_type.name.lower() for t in reader.tensors}
    for name, kind in types.items():
        shape = tuple(int(d) for d in reversed(reader.tensors[[t.name for t in reader.tensors].index(name)].shape))
        assert kind == tensor_type(name, shape, outtype, 8, tied=False), name
    if outtype == "q4_k_m":  # the mix: more bits for attn_v / ffn_down of layers 0, 3, 6, 7 (of 8)
        assert [types[f"blk.{i}.ffn_down.weight"] for i in range(8)] == ["q6_k", "q4_k", "q4_k", "q6_k"] + [
            "q4_k", "q4_k", "q6_k", "q6_k",
        ]  # fmt: skip
        assert types["output.weight"] == "q6_k" and types["blk.3.attn_q.weight"] == "q4_k"
    ids = torch.tensor([[5, 9, 13, 2, 77, 31, 8, 40]])
    with torch.no_grad():
        ours = load_model(gguf_to_hf(path, tmp_path / "back"))(ids)
        want = hf(ids).logits
    # relative error of the logits on a random 8-layer model (its gaussian weights are the hardest
    # case for block quantization; the measured errors are about two thirds of these bounds)
    bound = {"bf16": 0.01, "q8_0": 0.025, "q6_k": 0.08, "q5_k_m": 0.12, "q4_k_m": 0.25}[outtype]
    assert float((ours - want).norm() / want.norm()) < bound
