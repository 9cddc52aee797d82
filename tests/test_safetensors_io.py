"""save_sharded and SafetensorsFile against safetensors' own Python loader and writer."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tunex import save_sharded
from tunex.io import SafetensorsFile, load_state_dict


def sample_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(13, 7, generator=g).to(torch.bfloat16),
        "layer.0.w": torch.randn(5, 3, generator=g).half(),
        "layer.0.b": torch.randn(3, generator=g),
        "layer.1.w": torch.randn(2, 2, 2, generator=g).double(),
        "ids": torch.arange(9, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "small_ints": torch.tensor([1, -2, 3], dtype=torch.int8),
        "transposed": torch.randn(4, 6, generator=g).t(),  # non-contiguous on purpose
    }


def test_single_file_round_trip_with_safetensors_loader(tmp_path):
    state = sample_state()
    summary = save_sharded(state, tmp_path, metadata={"note": "hi"})
    assert summary["files"] == ["model.safetensors"] and summary["tensors"] == len(state)
    loaded = load_file(str(tmp_path / "model.safetensors"))
    assert list(loaded) == list(state) or set(loaded) == set(state)
    for name, t in state.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t), name
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt", "note": "hi"}
    assert not list(tmp_path.glob(".tunex-partial-*"))


def test_sharding_index_and_boundaries(tmp_path):
    state = {f"t{i}": torch.full((100,), float(i)) for i in range(10)}  # 400 bytes each
    save_sharded(state, tmp_path, max_shard_size=1000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 4000
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-0000{i}-of-00005.safetensors" for i in range(1, 6)]
    # greedy in order: two 400-byte tensors per 1000-byte shard
    assert [index["weight_map"][f"t{i}"] for i in (0, 1, 2)] == [files[0], files[0], files[1]]
    assert list(index["weight_map"]) == sorted(index["weight_map"])
    merged = {}
    for f in files:
        merged.update(load_file(str(tmp_path / f)))
    assert all(torch.equal(merged[k], v) for k, v in state.items())
    # A tensor over the limit gets a shard of its own.
    big = {"a": torch.zeros(10), "huge": torch.zeros(1000), "b": torch.zeros(10)}
    save_sharded(big, tmp_path / "big", max_shard_size="1KB")
    wm = json.loads((tmp_path / "big" / "model.safetensors.index.json").read_text())["weight_map"]
    assert len({wm["a"], wm["huge"], wm["b"]}) == 3


def test_rewriting_a_folder_replaces_old_shards_and_keeps_other_files(tmp_path):
    state = {f"t{i}": torch.zeros(100) for i in range(4)}
    (tmp_path / "config.json").write_text("{}")
    save_sharded(state, tmp_path, max_shard_size=500)
    assert len(list(tmp_path.glob("model-*.safetensors"))) == 4
    save_sharded(state, tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["config.json", "model.safetensors"]
    assert set(load_state_dict(tmp_path)) == set(state)
    save_sharded({"x": torch.ones(2)}, tmp_path, prefix="adapter_model")
    assert (tmp_path / "adapter_model.safetensors").is_file() and (tmp_path / "model.safetensors").is_file()


def test_reader_matches_safetensors_writer(tmp_path):
    state = {k: v.contiguous() for k, v in sample_state().items()}
    save_file(state, str(tmp_path / "x.safetensors"), metadata={"format": "pt"})
    f = SafetensorsFile(tmp_path / "x.safetensors")
    assert set(f.keys()) == set(state) and len(f) == len(state) and "ids" in f
    assert f.metadata() == {"format": "pt"}
    for name, t in state.items():
        got = f.get(name)
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t), name
    with pytest.raises(KeyError, match="nope"):
        f.get("nope")


def test_bad_input_is_refused_before_writing(tmp_path):
    with pytest.raises(TypeError, match="not a torch.Tensor"):
        save_sharded({"a": [1, 2]}, tmp_path / "o")
    with pytest.raises(ValueError, match="bad size"):
        save_sharded({"a": torch.zeros(1)}, tmp_path / "o", max_shard_size="2XB")
    with pytest.raises(ValueError, match="complex64"):
        save_sharded({"a": torch.zeros(1, dtype=torch.complex64)}, tmp_path / "o")
    with pytest.raises(TypeError, match="metadata"):
        save_sharded({"a": torch.zeros(1)}, tmp_path / "o", metadata={"k": 1})
    assert not (tmp_path / "o").exists()


def test_large_writes_say_how_they_were_written_and_leave_no_probe(tmp_path, monkeypatch):
    """Outputs of 64 MiB and more probe once per filesystem whether O_DIRECT is slower than
    buffered writes there; the summary says which way the bytes went, the probe leaves nothing."""
    big = {f"t{i}": torch.zeros(1024, 4096) for i in range(4)}  # 64 MiB
    summary = save_sharded(big, tmp_path / "a")
    assert summary["io"] == "direct I/O" or summary["io"].startswith("buffered writes ("), summary["io"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["model.safetensors"]
    monkeypatch.setenv("TUNEX_DIRECT_IO", "0")
    assert save_sharded(big, tmp_path / "b")["io"] == "buffered writes (TUNEX_DIRECT_IO=0)"
    assert save_sharded({"x": torch.ones(2)}, tmp_path / "c")["io"] == "buffered writes (TUNEX_DIRECT_IO=0)"
    monkeypatch.delenv("TUNEX_DIRECT_IO")
    assert save_sharded({"x": torch.ones(2)}, tmp_path / "d")["io"] == "direct I/O", "small writes never probe"
