"""The distributed pieces that need no second process: launch planning, environment reading,
rank slices of the batch stream, checkpoint listing with sharded folders."""

from __future__ import annotations

import datetime
import json

import pytest
import torch
from tunex.dist.env import DistEnv, pick_backend, rank_seed, read_env, timeout
from tunex.dist.launch import LaunchPlan, plan_launch, torchrun_argv
from tunex.dist.sampler import global_batch, rank_micro_batches, steps_per_epoch
from tunex.errors import TunexError
from tunex.train import checkpoint


class Items:
    """A 10-item dataset whose item k is the one token k (so a batch shows its item indices)."""

    lengths = None
    packed = True
    pad_id = 0

    def __len__(self) -> int:
        return 10

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        t = torch.tensor([k])
        return {"input_ids": t, "labels": t, "position_ids": torch.zeros(1, dtype=torch.long)}


def take(stream, n: int) -> list[list[int]]:
    return [next(stream)["input_ids"][:, 0].tolist() for _ in range(n)]


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_split_the_lone_stream_into_equal_global_steps(world):
    ds, accum = Items(), 2
    # a lone run with accumulation world x accum has the same global batch: the same stream
    lone = take(rank_micro_batches(ds, 2, seed=3, consumed=0, grad_accum=world * accum), 4 * world * accum)
    per_rank = [
        take(rank_micro_batches(ds, 2, seed=3, consumed=0, rank=r, world_size=world, grad_accum=accum), 4 * accum)
        for r in range(world)
    ]
    for step in range(4):
        global_step = lone[step * world * accum : (step + 1) * world * accum]
        mine = [mb for r in range(world) for mb in per_rank[r][step * accum : (step + 1) * accum]]
        assert sorted(map(tuple, mine)) == sorted(map(tuple, global_step))
    # epochs are reshuffled, and every rank sees the same order
    assert lone[:5] != lone[5:10] and sorted(i for mb in lone[:5] for i in mb) == list(range(10))


def step_sequences(batch_size: int, accum: int, world: int, steps: int, seed: int = 3, consumed: int = 0):
    """The set of sequences each optimizer step trains on, over all ranks."""
    streams = [
        rank_micro_batches(Items(), batch_size, seed, consumed, rank=r, world_size=world, grad_accum=accum)
        for r in range(world)
    ]
    per_rank = [take(s, steps * accum) for s in streams]
    return [
        sorted(i for r in range(world) for mb in per_rank[r][k * accum : (k + 1) * accum] for i in mb)
        for k in range(steps)
    ]


def test_the_data_order_depends_on_the_global_batch_only():
    """batch_size x grad_accum x world_size = 4 split four ways: the same sequences at every step,
    across epoch boundaries (10 items, 4 per step) and after a resume with another split."""
    want = step_sequences(4, 1, 1, steps=7)
    for split in [(2, 2, 1), (2, 1, 2), (1, 2, 2), (1, 4, 1)]:
        assert step_sequences(*split, steps=7) == want, split
    assert all(len(s) == 4 for s in want) and want[0] != want[1]
    # resumed after 3 steps (12 sequences) with another split: the steps continue unchanged
    assert step_sequences(1, 2, 2, steps=4, consumed=12) == want[3:]
    assert step_sequences(8, 1, 1, steps=2) != [want[0] + want[1], want[2] + want[3]], "a new global batch"


def test_resume_by_sequence_on_another_world_size():
    ds = Items()
    lone = take(rank_micro_batches(ds, 2, seed=0, consumed=0, grad_accum=2), 12)
    # 2 ranks resuming after 12 sequences (3 steps of a lone run with batch 2 and accumulation 2)
    r0 = take(rank_micro_batches(ds, 2, seed=0, consumed=12, rank=0, world_size=2), 3)
    r1 = take(rank_micro_batches(ds, 2, seed=0, consumed=12, rank=1, world_size=2), 3)
    assert r0 == lone[6::2] and r1 == lone[7::2]
    with pytest.raises(ValueError, match="outside world size"):
        next(rank_micro_batches(ds, 2, seed=0, consumed=0, rank=2, world_size=2))


def test_global_batch_and_steps():
    assert global_batch(1, 16, 8) == 128
    assert steps_per_epoch(10, 2, 2) == 3 and steps_per_epoch(8, 2, 2) == 2


def test_read_env(monkeypatch):
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert read_env() == DistEnv(0, 0, 1) and not read_env().enabled and read_env().is_main
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    env = read_env()
    assert (env.rank, env.local_rank, env.world_size, env.enabled, env.is_main) == (3, 1, 4, True, False)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(TunexError, match="RANK=4 WORLD_SIZE=4"):
        read_env()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(TunexError, match="RANK='x'"):
        read_env()


def test_timeout_and_backend(monkeypatch):
    monkeypatch.delenv("TUNEX_DIST_TIMEOUT", raising=False)
    assert timeout() == datetime.timedelta(seconds=600)
    monkeypatch.setenv("TUNEX_DIST_TIMEOUT", "30")
    assert timeout() == datetime.timedelta(seconds=30)
    monkeypatch.setenv("TUNEX_DIST_TIMEOUT", "0")
    with pytest.raises(TunexError, match="TUNEX_DIST_TIMEOUT"):
        timeout()
    assert pick_backend(use_cuda=False) == "gloo"
    assert rank_seed(7, 0) == 7 and len({rank_seed(7, r) for r in range(8)}) == 8


def test_launch_plan_from_flags_and_xtuner_variables():
    assert plan_launch(None, None, {}) is None  # one process: no launcher
    assert plan_launch(1, 1, {}) is None
    assert plan_launch(4, None, {"LOCAL_RANK": "0", "NPROC_PER_NODE": "4"}) is None  # already a worker
    assert plan_launch(None, None, {"NPROC_PER_NODE": "8"}) == LaunchPlan(8)
    assert plan_launch(2, None, {"NPROC_PER_NODE": "8"}) == LaunchPlan(2)  # the flag wins
    env = {"NPROC_PER_NODE": "8", "NNODES": "2", "NODE_RANK": "1", "ADDR": "10.0.0.1", "PORT": "29600"}
    plan = plan_launch(None, None, env)
    assert plan == LaunchPlan(8, 2, 1, "10.0.0.1", 29600) and plan.world_size == 16
    for bad, message in [
        ({"NPROC_PER_NODE": "0"}, "NPROC_PER_NODE='0'"),
        ({"NPROC_PER_NODE": "two"}, "NPROC_PER_NODE='two'"),
        ({"NNODES": "2", "NODE_RANK": "2"}, "NODE_RANK=2"),
        ({"NNODES": "2", "PORT": "70000"}, "PORT=70000"),
    ]:
        with pytest.raises(TunexError, match=message):
            plan_launch(None, None, bad)


def test_torchrun_command_line():
    one_node = torchrun_argv(LaunchPlan(2), ["train", "c.toml", "-o", "train.lr=1"], python="py")
    assert one_node == [
        "py",
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--standalone",
        "-m",
        "tunex",
        "train",
        "c.toml",
        "-o",
        "train.lr=1",
    ]
    nodes = torchrun_argv(LaunchPlan(8, 2, 1, "10.0.0.1", None), ["train", "c.toml"], python="py")
    assert nodes[3:] == [
        "--nproc-per-node",
        "8",
        "--nnodes",
        "2",
        "--node-rank",
        "1",
        "--master-addr",
        "10.0.0.1",
        "--master-port",
        "29500",
        "-m",
        "tunex",
        "train",
        "c.toml",
    ]


def test_checkpoint_listing_includes_sharded_folders(tmp_path):
    checkpoint.save(tmp_path, 2, {"x": torch.zeros(1)}, keep=0)
    (tmp_path / "iter_4.shards").mkdir()
    (tmp_path / "iter_4.shards" / "manifest.json").write_text("{}")
    (tmp_path / "iter_6.shards").write_text("a file, not a checkpoint folder")
    assert [s for s, _ in checkpoint.checkpoints(tmp_path)] == [2, 4]
    assert checkpoint.resolve_resume("auto", tmp_path).name == "iter_4.shards"
    checkpoint.prune(tmp_path, 1)
    assert [p.name for _, p in checkpoint.checkpoints(tmp_path)] == ["iter_4.shards"]


def test_unfinished_sharded_checkpoint_is_named(tmp_path):
    from tunex.errors import FormatError

    folder = tmp_path / "iter_4.shards"
    folder.mkdir()
    with pytest.raises(FormatError, match="iter_4.shards: a checkpoint folder without manifest.json"):
        checkpoint.load(folder)


def _tiny_run(seed: int, steps: int = 1):
    torch.manual_seed(seed)
    lm = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3, bias=False))
    optimizer = torch.optim.AdamW(lm.parameters(), lr=1e-2, betas=(0.8, 0.9))
    for _ in range(steps):
        lm(torch.randn(4, 6)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return lm, optimizer


def test_sharded_checkpoint_holds_no_pickle_and_restores_exactly(tmp_path):
    """The .shards format (here written by one process): JSON + safetensors only, read back as the
    same weights, optimizer state, scheduler state and RNG, into a fresh model."""
    from tunex.dist import ckpt

    lm, optimizer = _tiny_run(0)
    meta = {"scheduler": {"base_lrs": [0.01], "last_epoch": 1}, "data": {"micro_batches": 8}, "method": "full"}
    torch.manual_seed(5)
    expected_draw = torch.rand(3)
    torch.manual_seed(5)
    path = ckpt.save_sharded(tmp_path, 1, lm, optimizer, meta, keep=0, env=DistEnv())
    assert path.name == "iter_1.shards"
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "rank_0.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["iter_1.shards"], "no partial left"
    json.loads((path / "manifest.json").read_text())  # plain JSON
    loaded = checkpoint.load(path)
    assert loaded["step"] == 1 and loaded["data"] == {"micro_batches": 8} and loaded["world_size"] == 1
    for k, v in lm.state_dict().items():
        assert torch.equal(loaded["model"][k], v)
    fresh, fresh_opt = _tiny_run(1, steps=0)  # as a resumed run builds them
    ckpt.restore(path, None, fresh, fresh_opt, "full")
    for a, b in zip(fresh.parameters(), lm.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(fresh_opt.state.values(), optimizer.state.values()):
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert list(fresh_opt.param_groups[0]["betas"]) == [0.8, 0.9]
    torch.manual_seed(0)
    ckpt.restore_rng(ckpt.read_meta(path), DistEnv(), seed=0, step=1)
    assert torch.equal(torch.rand(3), expected_draw)


def test_torch_distributed_checkpoint_folders_are_refused_naming_the_pickle(tmp_path):
    from tunex.errors import FormatError

    folder = tmp_path / "iter_4.dcp"
    folder.mkdir()
    (folder / ".metadata").write_bytes(b"\x80\x04 a pickle")
    (folder / "meta.pt").write_bytes(b"")
    from tunex.dist.ckpt import read_meta

    for read in (checkpoint.load, read_meta):
        with pytest.raises(FormatError, match=r"iter_4.dcp: a torch.distributed.checkpoint folder; .*pickle"):
            read(folder)


def test_damaged_sharded_checkpoints_are_named_errors(tmp_path):
    from tunex.dist import ckpt
    from tunex.errors import FormatError

    lm, optimizer = _tiny_run(0)
    path = ckpt.save_sharded(tmp_path, 1, lm, optimizer, {"method": "full"}, keep=0, env=DistEnv())
    manifest = json.loads((path / "manifest.json").read_text())
    cases = {
        "not readable JSON": "{",
        "not a tunex sharded checkpoint": json.dumps({**manifest, "format": "x"}),
        "checkpoint version 9": json.dumps({**manifest, "version": 9}),
        "rank_1.safetensors is missing": json.dumps({**manifest, "world_size": 2}),
        "world_size 0 is not a positive integer": json.dumps({**manifest, "world_size": 0}),
    }
    for expected, text in cases.items():
        (path / "manifest.json").write_text(text)
        with pytest.raises(FormatError, match=expected):
            checkpoint.load(path)
    key = next(k for k, v in manifest["tensors"].items() if v["shape"])
    bad = {**manifest, "tensors": {**manifest["tensors"], key: {"shape": [1, 2, 3], "rows": None}}}
    (path / "manifest.json").write_text(json.dumps(bad))
    with pytest.raises(FormatError, match=f"tensor {key!r} has shape"):
        checkpoint.load(path)
