"""Packing, position ids, the token cache, and deterministic resumable batches."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_data_helpers import chatml_tokenizer
from tunex.config import DataConfig
from tunex.data import build_dataset, collate, make_loader
from tunex.data.pack import batch_order, cu_seqlens, pack, position_ids


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 64), min_size=0, max_size=300), st.integers(64, 200), st.integers(0, 2**31))
def test_pack_places_every_sample_once_within_capacity(lengths, max_length, seed):
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.random.default_rng(seed).permutation(len(lengths))
    members, starts = pack(lengths, max_length, order)
    assert sorted(members.tolist()) == list(range(len(lengths)))
    sizes = [int(lengths[members[a:b]].sum()) for a, b in zip(starts[:-1], starts[1:])]
    assert all(0 < s <= max_length for s in sizes)
    assert sum(sizes) == int(lengths.sum())
    if len(lengths):  # first-fit over a window: no two open sequences could have been merged
        assert sum(sizes) / (len(sizes) * max_length) > 0.5 or len(sizes) == 1


def test_position_ids_restart_per_sample_and_cu_seqlens():
    pos = position_ids(np.array([3, 1, 2]))
    assert pos.tolist() == [0, 1, 2, 0, 0, 1]
    assert cu_seqlens(pos).tolist() == [0, 3, 4, 6]


def chat_file(tmp_path, n=200, seed=0):
    rng = np.random.default_rng(seed)
    f = tmp_path / "chat.jsonl"
    with open(f, "w") as out:
        for i in range(n):
            q = "q" * int(rng.integers(1, 30))
            reply = "a" * int(rng.integers(1, 40))
            turns = [{"role": "user", "content": f"{i}{q}"}, {"role": "assistant", "content": reply}]
            if i % 3 == 0:
                turns += [{"role": "user", "content": "more"}, {"role": "assistant", "content": f"r{i}"}]
            out.write(json.dumps({"messages": turns}) + "\n")
    return f


def config(path, **kw):
    kw = {"format": "openai", "template": "chatml", "max_length": 128, **kw}
    return DataConfig(path=str(path), **kw)


def test_packed_items_hold_whole_samples_with_their_own_positions(tmp_path):
    tok = chatml_tokenizer()
    f = chat_file(tmp_path)
    packed = build_dataset(config(f, max_length=512), tok, seed=3, cache_dir=tmp_path / "c")
    plain = build_dataset(config(f, max_length=512, pack_to_max_length=False), tok, seed=3, cache_dir=tmp_path / "c")
    assert packed.stats["samples"] == plain.stats["samples"] == len(plain) == 200
    assert packed.stats["tokens"] / (len(packed) * 512) > 0.9  # sequences are nearly full
    total = sum(len(packed[i]["input_ids"]) for i in range(len(packed)))
    assert total == sum(len(plain[i]["input_ids"]) for i in range(len(plain))) == packed.stats["tokens"]
    # each packed item splits at position-id resets into exactly the unpacked samples
    seen = {}
    for i in range(len(packed)):
        item = packed[i]
        assert len(item["input_ids"]) <= 512
        bounds = cu_seqlens(item["position_ids"].numpy())
        for a, b in zip(bounds[:-1], bounds[1:]):
            assert item["position_ids"][a:b].tolist() == list(range(b - a))
            seen[tuple(item["input_ids"][a:b].tolist())] = item["labels"][a:b].tolist()
    for j in range(len(plain)):
        sample = plain[j]
        assert seen[tuple(sample["input_ids"].tolist())] == sample["labels"].tolist()
        assert sample["position_ids"].tolist() == list(range(len(sample["input_ids"])))
    targets = sum(int((plain[j]["labels"] != -100).sum()) for j in range(len(plain)))
    assert targets == plain.stats["target_tokens"]


def test_packed_loss_equals_unpacked_loss(tmp_path):
    """The first label of every sample is ignored, so no position predicts across a sample border."""
    tok = chatml_tokenizer()
    f = chat_file(tmp_path, n=40)
    packed = build_dataset(config(f), tok, seed=0, cache_dir=tmp_path / "c")
    plain = build_dataset(config(f, pack_to_max_length=False), tok, seed=0, cache_dir=tmp_path / "c")
    vocab = tok.vocab_size
    table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0))

    def summed_loss(item):  # a "model" whose logits depend on the current token only
        logits = table[item["input_ids"]][:-1]
        return torch.nn.functional.cross_entropy(logits, item["labels"][1:], reduction="sum")

    a = sum(summed_loss(packed[i]) for i in range(len(packed)))
    b = sum(summed_loss(plain[i]) for i in range(len(plain)))
    torch.testing.assert_close(a, b)


def test_cache_is_reused_and_keyed_by_content_and_settings(tmp_path):
    tok = chatml_tokenizer()
    f = chat_file(tmp_path, n=30)
    cache = tmp_path / "c"
    first = build_dataset(config(f), tok, seed=0, cache_dir=cache)
    stores = lambda: [p for p in cache.iterdir() if p.name != "content" and not p.name.startswith(".")]  # noqa: E731
    assert len(stores()) == 1
    again = build_dataset(config(f), tok, seed=0, cache_dir=cache)
    assert again.store.folder == first.store.folder and isinstance(again.store.ids, np.memmap)
    build_dataset(config(f, max_length=64), tok, seed=0, cache_dir=cache)
    build_dataset(config(f, template="auto"), tok, seed=0, cache_dir=cache)
    with open(f, "a") as out:
        extra = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
        out.write(json.dumps({"messages": extra}) + "\n")
    grown = build_dataset(config(f), tok, seed=0, cache_dir=cache)
    assert grown.stats["records"] == 31
    assert len(stores()) == 4


def test_unchanged_files_are_not_read_again(tmp_path, monkeypatch):
    from tunex.data import sources

    tok = chatml_tokenizer()
    f = chat_file(tmp_path, n=20)
    first = build_dataset(config(f), tok, seed=0, cache_dir=tmp_path / "c")

    def no_reading(*args, **kwargs):
        raise AssertionError("the data files were read again")

    monkeypatch.setattr(sources, "scan", no_reading)
    again = build_dataset(config(f), tok, seed=0, cache_dir=tmp_path / "c")
    assert again.store.folder == first.store.folder


def test_worker_processes_build_the_same_store(tmp_path, monkeypatch):
    from tunex.data import sources

    monkeypatch.setattr(sources, "CHUNK_BYTES", 2000)  # several chunks from a small file
    tok = chatml_tokenizer()
    f = chat_file(tmp_path, n=300)
    one = build_dataset(config(f), tok, seed=0, cache_dir=tmp_path / "a")
    two = build_dataset(config(f, num_workers=2), tok, seed=0, cache_dir=tmp_path / "b")
    assert one.stats == two.stats
    assert np.array_equal(one.store.ids, two.store.ids) and np.array_equal(one.store.mask, two.store.mask)


def test_same_seed_same_batches_and_resume_lands_on_the_same_batch(tmp_path):
    tok = chatml_tokenizer()
    f = chat_file(tmp_path)
    ds = build_dataset(config(f), tok, seed=7, cache_dir=tmp_path / "c")
    same = build_dataset(config(f), tok, seed=7, cache_dir=tmp_path / "c")
    full = list(make_loader(ds, 3, seed=1, epoch=2))
    assert len(full) == -(-len(ds) // 3)
    again = list(make_loader(same, 3, seed=1, epoch=2))
    for a, b in zip(full, again):
        assert all(torch.equal(a[k], b[k]) for k in a)
    resumed = make_loader(ds, 3, seed=1, epoch=2, start_batch=5)
    assert len(resumed) == len(full) - 5
    first = next(iter(resumed))
    assert all(torch.equal(first[k], full[5][k]) for k in first)
    other_epoch = next(iter(make_loader(ds, 3, seed=1, epoch=3)))
    assert not torch.equal(other_epoch["input_ids"], full[0]["input_ids"]) or len(ds) < 4
    # a different seed packs differently
    reshuffled = build_dataset(config(f), tok, seed=8, cache_dir=tmp_path / "c")
    assert not np.array_equal(reshuffled.members, ds.members)


def test_collate_pads_with_own_positions_and_ignored_labels():
    items = [
        {
            "input_ids": torch.tensor([5, 6, 7]),
            "labels": torch.tensor([-100, 6, 7]),
            "position_ids": torch.tensor([0, 1, 0]),
        },
        {"input_ids": torch.tensor([9]), "labels": torch.tensor([-100]), "position_ids": torch.tensor([0])},
    ]
    out = collate(items, pad_id=2)
    assert out["input_ids"].tolist() == [[5, 6, 7], [9, 2, 2]]
    assert out["labels"].tolist() == [[-100, 6, 7], [-100, -100, -100]]
    assert out["position_ids"].tolist() == [[0, 1, 0], [0, 0, 1]]
    assert all(v.dtype == torch.long for v in out.values())


def test_length_grouped_batches_for_unpacked_data():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 1000, size=4000)
    grouped = batch_order(4000, 8, np.random.default_rng(1), lengths, group_by_length=True)
    plain = batch_order(4000, 8, np.random.default_rng(1), lengths, group_by_length=False)
    spread = lambda bs: np.mean([lengths[b].max() - lengths[b].min() for b in bs])  # noqa: E731
    assert spread(grouped) < spread(plain) / 5
    assert sorted(np.concatenate(grouped).tolist()) == list(range(4000))


def test_loader_rejects_bad_arguments(tmp_path):
    ds = build_dataset(config(chat_file(tmp_path, n=5)), chatml_tokenizer(), seed=0, cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        make_loader(ds, 0, seed=0)
    with pytest.raises(IndexError, match="out of range"):
        ds[len(ds)]


def test_concurrent_builders_tokenize_once(tmp_path, monkeypatch):
    """Several ranks sharing a cache: one tokenizes, the others wait and open its store."""
    import threading

    from tunex.data import store

    calls = []
    real_write = store._write

    def counting_write(*args, **kwargs):
        calls.append(1)
        return real_write(*args, **kwargs)

    monkeypatch.setattr(store, "_write", counting_write)
    tok = chatml_tokenizer()
    f = chat_file(tmp_path, n=300)
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(build_dataset(config(f), tok, seed=0, cache_dir=tmp_path / "c")))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and len({r.store.folder for r in results}) == 1
    assert len(calls) == 1
