"""Every file tunex writes gets the usual permissions, 0666 less the umask (0644 under umask 022),
folders 0777 less the umask: crash-safe partials and copied side files included, even when a source
file is private (0600, as a download made through a temp file is)."""

from __future__ import annotations

import contextlib
import json
import os
import stat
from pathlib import Path

import pytest
import torch
import tunex
from test_merge_cli import make_pair
from tunex.io.atomic import atomic_folder, write_bytes, write_text
from tunex.peft.export import write_adapter
from tunex.train import checkpoint


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def modes(root: Path) -> dict[str, int]:
    """Permission bits of ``root`` and everything under it, by path relative to ``root``."""
    found = {".": stat.S_IMODE(root.stat().st_mode)}
    for path in root.rglob("*"):
        found[str(path.relative_to(root))] = stat.S_IMODE(path.stat().st_mode)
    return found


def expect(root: Path, mask: int) -> None:
    got = modes(root)
    want = {name: (0o777 if (root / name).is_dir() else 0o666) & ~mask for name in got}
    assert got == want


@pytest.mark.parametrize("mask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_merge_output_has_usual_permissions_even_from_private_sources(tmp_path, mask):
    base, adapter = make_pair(tmp_path)
    for f in [*base.iterdir(), *adapter.iterdir()]:
        f.chmod(0o600)
    with umask(mask):
        tunex.merge(base, adapter, tmp_path / "out" / "merged", device="cpu", fsync=False)
    expect(tmp_path / "out", mask)


@pytest.mark.parametrize("mask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_writers_give_usual_permissions(tmp_path, mask):
    with umask(mask):
        write_text(tmp_path / "a" / "config.toml", "x = 1\n")
        write_bytes(tmp_path / "a" / "b.bin", b"\0")
        with atomic_folder(tmp_path / "a" / "folder") as tmp:
            (tmp / "inside.json").write_text("{}")
        tunex.save_sharded({"w": torch.zeros(4, 4)}, tmp_path / "a" / "shards", max_shard_size=40)
        (tmp_path / "a" / "cfg.json").write_text(json.dumps({"model_type": "llama"}))
        (tmp_path / "a" / "cfg.json").chmod(0o600)
        writer = tunex._native.ShardWriter(
            str(tmp_path / "a" / "with_side"), [("w", "F32", [2])], 1 << 30, [], "model", "into", False, False
        )
        writer.write("w", torch.zeros(2).view(torch.uint8).numpy())
        writer.finish([(str(tmp_path / "a" / "cfg.json"), "config.json")])
        (tmp_path / "a" / "cfg.json").chmod(0o666 & ~mask)
        write_adapter(tmp_path / "a" / "adapter", {"base_model.model.q.lora_A.weight": torch.zeros(2, 2)}, {"r": 2})
        checkpoint.save(tmp_path / "a" / "work", 3, {"model": {"w": torch.zeros(2)}}, keep=2)
    expect(tmp_path / "a", mask)
