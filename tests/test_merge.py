"""tunex.merge against a float64 torch reference on synthetic checkpoints (no transformers needed):
every LoRA variant, several dtypes and odd sizes; the torch (GPU) path against the Rust path."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import tunex
from safetensors.torch import load_file, save_file
from tunex.io import load_state_dict

OUT, IN, R = 37, 29, 5  # odd sizes on purpose


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32).long()


def assert_within_one_rounding(got: torch.Tensor, ref64: torch.Tensor) -> None:
    """got (bf16/f16/f32) equals the float64 reference rounded once, give or take one ulp."""
    assert got.shape == ref64.shape
    if got.dtype == torch.float32:
        torch.testing.assert_close(got.double(), ref64, rtol=2e-6, atol=1e-6)
        return
    want = ref64.to(got.dtype)
    assert (bits(got) - bits(want)).abs().max().item() <= 1


def write_base(folder: Path, dtype: torch.dtype, extra: dict | None = None) -> dict:
    torch.manual_seed(0)
    state = {
        "model.embed_tokens.weight": torch.randn(11, IN).to(dtype),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(OUT, IN).to(dtype),
        "model.layers.0.self_attn.q_proj.bias": torch.randn(OUT).to(dtype),
        "model.layers.0.mlp.down_proj.weight": torch.randn(OUT, IN).to(dtype),
        "model.layers.1.mlp.down_proj.weight": torch.randn(OUT, IN).to(dtype),
        "model.norm.weight": torch.ones(IN, dtype=dtype),
        "lm_head.weight": torch.randn(11, IN).to(dtype),
        "position_ids": torch.arange(7),
    }
    state.update(extra or {})
    folder.mkdir(parents=True)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": str(dtype)[6:]}))
    (folder / "tokenizer.json").write_text("{}")
    return state


def write_adapter(folder: Path, config: dict, tensors: dict) -> None:
    folder.mkdir(parents=True)
    cfg = {"peft_type": "LORA", "r": R, "lora_alpha": 8, **config}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(
        {f"base_model.model.{k}": v.contiguous() for k, v in tensors.items()}, str(folder / "adapter_model.safetensors")
    )


def lora_pair(out: int, inp: int, r: int = R, dtype=torch.float32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, inp, generator=g).to(dtype), torch.randn(out, r, generator=g).to(dtype)


MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


def standard_adapter(r_of=lambda m: R, dtype=torch.float32):
    tensors = {}
    for i, m in enumerate(MODULES):
        a, b = lora_pair(OUT, IN, r_of(m), dtype, seed=i)
        tensors[f"{m}.lora_A.weight"], tensors[f"{m}.lora_B.weight"] = a, b
    return tensors


def reference(base: dict, adapter: dict, scaling_of) -> dict:
    ref = {k: v.double() for k, v in base.items() if v.is_floating_point()}
    for m in MODULES:
        a, b = adapter[f"{m}.lora_A.weight"].double(), adapter[f"{m}.lora_B.weight"].double()
        ref[f"{m}.weight"] = ref[f"{m}.weight"] + scaling_of(m) * (b @ a)
    return ref


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("variant", ["plain", "rslora", "patterns"])
def test_lora_scalings_match_float64_reference(tmp_path, dtype, variant):
    base = write_base(tmp_path / "base", dtype)
    if variant == "plain":
        config, r_of, scaling_of = {}, (lambda m: R), (lambda m: 8 / R)
    elif variant == "rslora":
        config, r_of, scaling_of = {"use_rslora": True}, (lambda m: R), (lambda m: 8 / math.sqrt(R))
    else:
        config = {"rank_pattern": {"q_proj": 3}, "alpha_pattern": {r"layers\.1\.mlp\.down_proj": 2}}
        r_of = lambda m: 3 if m.endswith("q_proj") else R  # noqa: E731
        scaling_of = lambda m: (8 / 3) if m.endswith("q_proj") else (2 / R if ".1." in m else 8 / R)  # noqa: E731
    adapter = standard_adapter(r_of, dtype=torch.bfloat16)
    write_adapter(tmp_path / "adapter", config, adapter)
    report = tunex.merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", device="cpu")
    assert (report.tensors, report.merged) == (len(base), 3)
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    ref = reference(base, adapter, scaling_of)
    for name, tensor in base.items():
        assert got[name].dtype == tensor.dtype
        if name in ref:
            assert_within_one_rounding(got[name], ref[name])
        else:
            assert torch.equal(got[name], tensor)
    assert (tmp_path / "out" / "config.json").is_file() and (tmp_path / "out" / "tokenizer.json").is_file()


def test_fan_in_fan_out_dora_bias_embedding_and_modules_to_save(tmp_path):
    dtype = torch.bfloat16
    base = write_base(tmp_path / "base", dtype, {"conv.c_attn.weight": torch.randn(IN, OUT).to(dtype)})
    q = "model.layers.0.self_attn.q_proj"
    a, b = lora_pair(OUT, IN, seed=3)
    mag = torch.rand(OUT) + 0.5
    ea, eb = torch.randn(R, 11), torch.randn(IN, R)
    new_head = torch.randn(11, IN)
    bias = torch.randn(OUT)
    adapter = {
        f"{q}.lora_A.weight": a,
        f"{q}.lora_B.weight": b,
        f"{q}.lora_magnitude_vector": mag,
        f"{q}.lora_B.bias": bias,
        "lm_head.weight": new_head,
    }
    write_adapter(tmp_path / "adapter", {"use_dora": True, "modules_to_save": ["lm_head"]}, adapter)
    tunex.merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", device="cpu")
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    s = 8 / R
    w = base[f"{q}.weight"].double() + s * (b.double() @ a.double())
    w = w * (mag.double() / w.norm(dim=1)).unsqueeze(1)
    assert_within_one_rounding(got[f"{q}.weight"], w)
    assert_within_one_rounding(got[f"{q}.bias"], base[f"{q}.bias"].double() + s * bias.double())
    assert torch.equal(got["lm_head.weight"], new_head.to(dtype))
    assert torch.equal(got["conv.c_attn.weight"], base["conv.c_attn.weight"])

    # fan_in_fan_out (GPT-2 Conv1D): the stored weight is (in, out) and gets (B @ A)^T; embedding
    # LoRA stores A (r, num_embeddings), B (dim, r) and also lands transposed.
    write_adapter(
        tmp_path / "a2",
        {"fan_in_fan_out": True},
        {
            "conv.c_attn.lora_A.weight": a,
            "conv.c_attn.lora_B.weight": b,
            "model.embed_tokens.lora_embedding_A": ea,
            "model.embed_tokens.lora_embedding_B": eb,
        },
    )
    tunex.merge(tmp_path / "base", tmp_path / "a2", tmp_path / "out2", device="cpu")
    got = load_file(str(tmp_path / "out2" / "model.safetensors"))
    assert_within_one_rounding(
        got["conv.c_attn.weight"], base["conv.c_attn.weight"].double() + s * (b.double() @ a.double()).T
    )
    emb = base["model.embed_tokens.weight"].double() + s * (eb.double() @ ea.double()).T
    assert_within_one_rounding(got["model.embed_tokens.weight"], emb)


def test_dtype_override_shards_and_torch_path_agree(tmp_path):
    base = write_base(tmp_path / "base", torch.float32)
    adapter = standard_adapter()
    write_adapter(tmp_path / "adapter", {}, adapter)
    report = tunex.merge(
        tmp_path / "base", tmp_path / "adapter", tmp_path / "out", dtype="bf16", max_shard_size="4KB", device="cpu"
    )
    assert len(report.files) > 1
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(base)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    rust = load_state_dict(tmp_path / "out")
    assert rust["model.norm.weight"].dtype == torch.bfloat16 and rust["position_ids"].dtype == torch.int64

    # The torch path (what --device cuda runs) on the CPU: same plan, same writer, same numbers.
    from tunex import _native
    from tunex.merge_torch import merge_on_device

    plan = _native.merge_plan(
        str(tmp_path / "base"),
        str(tmp_path / "adapter" / "adapter_config.json"),
        str(tmp_path / "adapter" / "adapter_model.safetensors"),
        "bf16",
        False,
    )
    merge_on_device(
        plan, str(tmp_path / "adapter" / "adapter_model.safetensors"), tmp_path / "out_t", 4000, False, [], "cpu", None
    )
    torch_path = load_state_dict(tmp_path / "out_t")
    for name, t in rust.items():
        if t.is_floating_point():
            assert (bits(t) - bits(torch_path[name])).abs().max() <= 1, name
        else:
            assert torch.equal(t, torch_path[name])


def test_legacy_bin_base_and_adapter(tmp_path):
    base = write_base(tmp_path / "st", torch.float32)
    (tmp_path / "base").mkdir()
    torch.save(base, tmp_path / "base" / "pytorch_model.bin")
    adapter = standard_adapter()
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({"r": R, "lora_alpha": 8}))
    torch.save({f"base_model.model.{k}": v for k, v in adapter.items()}, tmp_path / "adapter" / "adapter_model.bin")
    tunex.merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", device="cpu")
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    ref = reference(base, adapter, lambda m: 8 / R)
    for name in MODULES:
        assert_within_one_rounding(got[f"{name}.weight"], ref[f"{name}.weight"])


def test_adapter_written_by_tunex_export_merges(tmp_path):
    from types import SimpleNamespace

    from tunex.peft.export import export_adapter

    base = write_base(tmp_path / "base", torch.bfloat16)
    adapter = standard_adapter()
    method = SimpleNamespace(target_modules="all-linear", alpha=8, dropout=0.0, r=R, use_dora=False, use_rslora=False)
    export_adapter(adapter, method, tmp_path / "adapter", base_model=str(tmp_path / "base"), dtype=torch.float16)
    tunex.merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", device="cpu")
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    f16 = {k: v.half() for k, v in adapter.items()}
    ref = reference(base, f16, lambda m: 8 / R)
    for name in MODULES:
        assert_within_one_rounding(got[f"{name}.weight"], ref[f"{name}.weight"])


def test_auto_device_merges_and_reports_where(tmp_path):
    base = write_base(tmp_path / "base", torch.bfloat16)
    adapter = standard_adapter()
    write_adapter(tmp_path / "adapter", {}, adapter)
    report = tunex.merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")
    assert report.device == ("cuda" if torch.cuda.is_available() else "cpu")
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    ref = reference(base, adapter, lambda m: 8 / R)
    for name in MODULES:
        assert_within_one_rounding(got[f"{name}.weight"], ref[f"{name}.weight"])
