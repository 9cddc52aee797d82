"""Errors crossing the Rust boundary: missing files -> FileNotFoundError with filename, corrupt
files -> FormatError naming the file and the problem, bad arguments -> ValueError."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file
from tunex import _native
from tunex.errors import DataError, FormatError, TunexError
from tunex.io import SafetensorsFile


def raw_file(path, header: dict | bytes, data: bytes = b"") -> str:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return str(path)


def test_missing_file_is_file_not_found_with_filename(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError) as e:
        SafetensorsFile(missing)
    assert e.value.filename == str(missing)


@pytest.mark.parametrize(
    "header, data, problem",
    [
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, "truncated"),
        (b"not json at all", b"", "does not start with"),
        (b'{"a": 1', b"", "header JSON"),
        (
            {
                "a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
                "b": {"dtype": "U8", "shape": [2], "data_offsets": [1, 3]},
            },
            b"\0" * 3,
            "overlaps",
        ),
        ({"a": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 0]}}, b"", "overflows"),
        ({"a": {"dtype": "X9", "shape": [1], "data_offsets": [0, 1]}}, b"\0", "unsupported dtype"),
    ],
)
def test_corrupt_files_are_format_errors(tmp_path, header, data, problem):
    path = raw_file(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(FormatError) as e:
        SafetensorsFile(path)
    assert problem in str(e.value) and path in str(e.value)
    assert isinstance(e.value, TunexError) and isinstance(e.value, ValueError)


def test_truncated_real_file_and_huge_header_length(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file({"w": torch.randn(16, 16)}, str(good))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(FormatError, match="truncated"):
        SafetensorsFile(cut)
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    with pytest.raises(FormatError, match="limit"):
        SafetensorsFile(huge)
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"abc")
    with pytest.raises(FormatError, match="shorter"):
        SafetensorsFile(tiny)


def test_bad_arguments_are_value_errors(tmp_path):
    with pytest.raises(ValueError, match="bad size"):
        _native.parse_size("2 parsecs")
    with pytest.raises(ValueError, match="unsupported safetensors dtype"):
        _native.ShardWriter(str(tmp_path / "o"), [("a", "F99", [1])], 10, [])
    with pytest.raises(ValueError, match="appears twice"):
        _native.ShardWriter(str(tmp_path / "o"), [("a", "F32", [1]), ("a", "F32", [1])], 10, [])
    with pytest.raises(ValueError, match="mode"):
        _native.ShardWriter(str(tmp_path / "o"), [], 10, [], "model", "sideways")
    w = _native.ShardWriter(str(tmp_path / "o"), [("a", "F32", [2])], 10, [])
    with pytest.raises(ValueError, match='expected tensor "a" next'):
        w.write("b", torch.zeros(8, dtype=torch.uint8).numpy())
    with pytest.raises(DataError, match="more bytes"):
        w.write("a", torch.zeros(9, dtype=torch.uint8).numpy())
    w.abort()
    with pytest.raises(ValueError, match="finished"):
        w.finish()


def test_existing_output_folder_is_file_exists_error(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError) as e:
        _native.ShardWriter(str(tmp_path / "out"), [], 10, [], "model", "new")
    assert e.value.filename == str(tmp_path / "out") and "overwrite" in str(e.value)
