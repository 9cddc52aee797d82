"""A corrupt safetensors file is refused the same way everywhere: every Python read goes through
tunex's Rust reader, so ``tunex chat``, ``tunex train`` and ``tunex convert merge`` all exit 1 with
one identical ``FormatError`` line naming the file and the tensor; malformed headers never surface
as KeyError / TypeError or a crash."""

from __future__ import annotations

import gc
import json
import struct
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from test_train_helpers import make_data, make_tiny_model, write_config
from tunex.cli import cli
from tunex.errors import FormatError
from tunex.models import load_model, read_safetensors

pytest.importorskip("transformers")

FIRST, SECOND = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"


def split(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def join(path: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    text += b" " * (-(8 + len(text)) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


@pytest.fixture(scope="module")
def overlapping(tmp_path_factory) -> Path:
    """A transformers-made model folder whose second q_proj shares the first one's bytes."""
    folder = make_tiny_model(tmp_path_factory.mktemp("overlap") / "model")
    weights = folder / "model.safetensors"
    header, data = split(weights)
    a, b = header[FIRST]["data_offsets"], header[SECOND]["data_offsets"]
    assert a[1] - a[0] == b[1] - b[0] and a[0] < b[0]
    header[SECOND]["data_offsets"] = list(a)
    join(weights, header, data)
    return folder


def refusal(args: list[str]) -> str:
    result = CliRunner().invoke(cli, args)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1, result.output
    # one error line, the last; before it only the start-up lines `tunex train` prints (what it reads, loads)
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.output
    assert not any("Traceback" in line for line in lines), result.output
    return errors[0]


def test_chat_train_and_merge_refuse_overlapping_offsets_with_one_message(overlapping, tmp_path):
    weights = overlapping / "model.safetensors"
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_file(
        {
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 32),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(32, 4),
        },
        str(adapter / "adapter_model.safetensors"),
    )
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    cfg = write_config(
        tmp_path / "c.toml", overlapping, make_data(tmp_path / "d", "pretrain"), "lora", "pretrain", tmp_path / "w"
    )

    chat = refusal(["chat", str(overlapping), "--prompt", "hi"])
    train = refusal(["train", str(cfg)])
    merge = refusal(["convert", "merge", str(overlapping), str(adapter), str(tmp_path / "out"), "--device", "cpu"])
    assert chat == train == merge
    assert chat.startswith("error: ") and str(weights) in chat and "overlaps" in chat
    assert f'"{SECOND}"' in chat or f'"{FIRST}"' in chat
    with pytest.raises(FormatError) as e:
        load_model(overlapping)
    assert f"error: {e.value}" == chat


def _tensors(tmp_path: Path) -> Path:
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}, str(path))
    return path


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-3])


def _begin_after_end(path: Path) -> None:
    header, data = split(path)
    b, e = header["a"]["data_offsets"]
    header["a"]["data_offsets"] = [e, b]
    join(path, header, data)


def _duplicate_key(path: Path) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    text = raw[8 : 8 + n].rstrip()
    entry = json.dumps({"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]})
    text = text[:-1] + f',"a":{entry}}}'.encode()
    text += b" " * (-(8 + len(text)) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


def _header_past_eof(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw[8:])


def _shape_mismatch(path: Path) -> None:
    header, data = split(path)
    header["b"]["shape"] = [5]
    join(path, header, data)


def _not_json(path: Path) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    path.write_bytes(raw[:8] + b"{" + b"x" * (n - 1) + raw[8 + n :])


@pytest.mark.parametrize(
    ("corrupt", "words", "tensor"),
    [
        (_truncate, "truncated", "b"),
        (_begin_after_end, "data_offsets", "a"),
        (_duplicate_key, "duplicate", "a"),
        (_header_past_eof, "runs past the end", None),
        (_shape_mismatch, "needs", "b"),
        (_not_json, "JSON", None),
    ],
)
def test_corrupt_files_are_format_errors_naming_file_and_tensor(tmp_path, corrupt, words, tensor):
    path = _tensors(tmp_path)
    corrupt(path)
    with pytest.raises(FormatError) as e:
        read_safetensors(path)
    text = str(e.value)
    assert str(path) in text and words in text, text
    if tensor is not None:
        assert f'"{tensor}"' in text, text
    assert "\n" not in text


def test_views_share_the_map_and_writes_stay_private(tmp_path):
    path = _tensors(tmp_path)
    before = path.read_bytes()
    state = read_safetensors(path)
    assert torch.equal(state["a"], torch.arange(6.0).reshape(2, 3))
    assert state["b"].dtype == torch.bfloat16 and torch.equal(state["b"], torch.ones(4, dtype=torch.bfloat16))
    # zero-copy: both tensors view one mapping, b right after a's 24 bytes
    assert state["b"].data_ptr() - state["a"].data_ptr() == 24
    state["a"].add_(1)  # an in-place op on a loaded weight changes a private page, not the file
    assert path.read_bytes() == before
    kept = state["a"]
    del state
    gc.collect()  # the view alone keeps the map alive
    assert torch.equal(kept, torch.arange(6.0).reshape(2, 3) + 1)
    again = read_safetensors(path)
    assert torch.equal(again["a"], torch.arange(6.0).reshape(2, 3))
