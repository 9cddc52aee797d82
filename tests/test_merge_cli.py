"""``tunex convert merge`` end to end, and every user error it must explain (missing files,
unmatched adapter modules, shape mismatches, existing output, failures mid-write)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import tunex
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from tunex.cli import cli
from tunex.errors import DataError, FormatError

HIDDEN = 24


def make_pair(root: Path, adapter: dict | None = None, config: dict | None = None) -> tuple[Path, Path]:
    torch.manual_seed(0)
    base = root / "base"
    base.mkdir(parents=True)
    state = {
        f"model.layers.{i}.self_attn.{p}.weight": torch.randn(HIDDEN, HIDDEN).to(torch.bfloat16)
        for i in range(3)
        for p in ("q_proj", "v_proj")
    }
    state["model.embed_tokens.weight"] = torch.randn(50, HIDDEN).to(torch.bfloat16)
    save_file(state, str(base / "model.safetensors"), metadata={"format": "pt"})
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "bfloat16"}))
    (base / "tokenizer_config.json").write_text("{}")
    ad = root / "adapter"
    ad.mkdir()
    if adapter is None:
        adapter = {}
        for i in range(3):
            m = f"model.layers.{i}.self_attn.q_proj"
            adapter[f"{m}.lora_A.weight"] = torch.randn(4, HIDDEN)
            adapter[f"{m}.lora_B.weight"] = torch.randn(HIDDEN, 4)
    save_file({f"base_model.model.{k}": v for k, v in adapter.items()}, str(ad / "adapter_model.safetensors"))
    (ad / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, **(config or {})})
    )
    return base, ad


def invoke(*args: str):
    return CliRunner().invoke(cli, ["convert", "merge", *args, "--device", "cpu", "-q"])


def leftovers(root: Path) -> list[str]:
    return [p.name for p in root.iterdir() if "tunex-partial" in p.name]


def test_cli_merges_shards_and_copies_side_files(tmp_path):
    base, ad = make_pair(tmp_path)
    out = tmp_path / "merged"
    r = invoke(str(base), str(ad), str(out), "--max-shard-size", "3KB", "--no-fsync")
    assert r.exit_code == 0, r.output
    assert "merged the adapter into 3 of 7 tensors and copied 4 unchanged" in r.output
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert (out / "config.json").is_file() and (out / "tokenizer_config.json").is_file()
    # an existing output is refused, then replaced with --overwrite
    r = invoke(str(base), str(ad), str(out))
    assert r.exit_code == 1 and "already exists" in r.output and "--overwrite" in r.output
    r = invoke(str(base), str(ad), str(out), "--overwrite", "--dtype", "fp32")
    assert r.exit_code == 0, r.output
    assert load_file(str(out / "model.safetensors"))["model.embed_tokens.weight"].dtype == torch.float32
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    assert leftovers(tmp_path) == []


def test_missing_inputs_name_the_path(tmp_path):
    base, ad = make_pair(tmp_path)
    r = invoke(str(tmp_path / "nobase"), str(ad), str(tmp_path / "o"))
    assert r.exit_code == 1 and "base model folder not found" in r.output and "nobase" in r.output
    (ad / "adapter_config.json").unlink()
    r = invoke(str(base), str(ad), str(tmp_path / "o"))
    assert r.exit_code == 1 and "adapter_config.json" in r.output
    with pytest.raises(FileNotFoundError) as e:
        tunex.merge(tmp_path / "nobase", ad, tmp_path / "o")
    assert e.value.filename == str(tmp_path / "nobase")
    (base / "model.safetensors").unlink()
    (ad / "adapter_config.json").write_text(json.dumps({"r": 4}))
    r = invoke(str(base), str(ad), str(tmp_path / "o"))
    assert r.exit_code == 1 and "holds no model weights" in r.output and "config.json" in r.output


def test_unmatched_modules_are_all_listed(tmp_path):
    adapter = {}
    for m in ("model.layers.7.self_attn.q_proj", "model.layers.8.self_attn.q_proj", "model.layers.0.self_attn.q_proj"):
        adapter[f"{m}.lora_A.weight"], adapter[f"{m}.lora_B.weight"] = torch.randn(4, HIDDEN), torch.randn(HIDDEN, 4)
    base, ad = make_pair(tmp_path, adapter)
    with pytest.raises(DataError) as e:
        tunex.merge(base, ad, tmp_path / "o", device="cpu")
    msg = str(e.value)
    assert "2 adapter entries match no tensor" in msg
    assert "model.layers.7.self_attn.q_proj" in msg and "model.layers.8.self_attn.q_proj" in msg
    assert not (tmp_path / "o").exists() and leftovers(tmp_path) == []


def test_shape_mismatch_names_both_shapes(tmp_path):
    m = "model.layers.0.self_attn.q_proj"
    base, ad = make_pair(
        tmp_path, {f"{m}.lora_A.weight": torch.randn(4, HIDDEN + 1), f"{m}.lora_B.weight": torch.randn(HIDDEN, 4)}
    )
    r = invoke(str(base), str(ad), str(tmp_path / "o"))
    assert r.exit_code == 1
    assert "(24, 25)" in r.output and "(24, 24)" in r.output and m in r.output
    # rank disagreeing with adapter_config.json
    base2, ad2 = make_pair(tmp_path / "r", config={"r": 8})
    with pytest.raises(DataError, match="rank 4 but adapter_config.json gives r=8"):
        tunex.merge(base2, ad2, tmp_path / "o2", device="cpu")


def test_bad_options_are_usage_errors(tmp_path):
    base, ad = make_pair(tmp_path)
    r = invoke(str(base), str(ad), str(tmp_path / "o"), "--max-shard-size", "2 parsecs")
    assert r.exit_code == 1 and "bad size" in r.output
    r = CliRunner().invoke(cli, ["convert", "merge", str(base), str(ad), str(tmp_path / "o"), "--dtype", "int8"])
    assert r.exit_code == 2
    r = invoke(str(base), str(ad), str(tmp_path / "o"), "--no-safe-serialization")
    assert r.exit_code == 2 and "safetensors only" in r.output
    with pytest.raises(ValueError, match="device"):
        tunex.merge(base, ad, tmp_path / "o", device="tpu")
    with pytest.raises(ValueError, match="dtype"):
        tunex.merge(base, ad, tmp_path / "o", dtype=torch.int8)


def test_failure_mid_write_leaves_nothing_behind(tmp_path):
    adapter = {}
    for i in range(3):
        m = f"model.layers.{i}.self_attn.q_proj"
        adapter[f"{m}.lora_A.weight"] = torch.randn(4, HIDDEN)
        adapter[f"{m}.lora_B.weight"] = torch.randn(HIDDEN, 4)
    adapter["model.layers.2.self_attn.q_proj.lora_B.weight"][0, 0] = float("nan")
    base, ad = make_pair(tmp_path, adapter)
    with pytest.raises(DataError, match="non-finite"):
        tunex.merge(base, ad, tmp_path / "o", device="cpu", max_shard_size="1KB")
    assert not (tmp_path / "o").exists() and leftovers(tmp_path) == []

    # an exception from the progress callback (Ctrl-C, a closed UI) stops the merge the same way
    base, ad = make_pair(tmp_path / "p")

    def stop(name, done, total, bytes_done, bytes_total):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tunex.merge(base, ad, tmp_path / "p" / "o", device="cpu", progress=stop)
    assert not (tmp_path / "p" / "o").exists() and leftovers(tmp_path / "p") == []


def test_corrupt_base_is_a_format_error_naming_the_file(tmp_path):
    base, ad = make_pair(tmp_path)
    data = (base / "model.safetensors").read_bytes()
    (base / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError) as e:
        tunex.merge(base, ad, tmp_path / "o", device="cpu")
    assert "model.safetensors" in str(e.value) and "truncated" in str(e.value)


def test_the_final_line_says_when_shards_were_written_buffered(tmp_path, monkeypatch):
    base, ad = make_pair(tmp_path)
    assert "buffered" not in invoke(str(base), str(ad), str(tmp_path / "a")).output
    monkeypatch.setenv("TUNEX_DIRECT_IO", "0")
    r = invoke(str(base), str(ad), str(tmp_path / "b"))
    assert r.exit_code == 0 and r.output.strip().endswith("; buffered writes (TUNEX_DIRECT_IO=0)"), r.output


def test_summary_says_in_words_what_the_merge_did():
    from tunex.commands.merge import describe
    from tunex.merge import MergeReport

    report = MergeReport("out", "cpu", tensors=272, merged=208, replaced=2, bytes_written=2_500_000, seconds=1.25)
    text = describe(report, Path("out"))
    assert text.startswith("merged the adapter into 208 of 272 tensors and copied 62 unchanged; ")
    assert "2 replaced by the adapter's saved modules" in text
    assert "0 files, 2.5 MB -> out" in text
    one = MergeReport("o", "cpu", tensors=3, merged=3, replaced=0, bytes_written=10, seconds=0.1, files=["a"])
    assert (
        describe(one, Path("o"))
        == "merged the adapter into 3 of 3 tensors and copied 0 unchanged on cpu in 0.1s: 1 file, 10 B -> o"
    )
