"""Fuzzing the GGUF import (untrusted files): truncated or corrupted GGUF bytes either convert or
raise FormatError naming the file; never another exception, a crash or a hang. Bounded (hypothesis,
a fixed number of examples); the cases that once escaped are kept as explicit examples."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_train_helpers import make_tiny_model
from tunex.errors import FormatError
from tunex.gguf_io import gguf_to_hf, hf_to_gguf

pytestmark = pytest.mark.faults


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory) -> bytes:
    root = tmp_path_factory.mktemp("gguf-fuzz")
    model = make_tiny_model(root / "m", tied=False)
    return hf_to_gguf(model, root / "m.gguf", "f16").read_bytes()


def convert(data: bytes, where: Path) -> None:
    src, out = where / "in.gguf", where / "out"
    src.write_bytes(data)
    try:
        gguf_to_hf(src, out)
    except FormatError as e:
        assert str(src) in str(e) and "\n" not in str(e).strip(), str(e)
    finally:
        shutil.rmtree(out, ignore_errors=True)
        leftovers = [p.name for p in where.iterdir() if p.name != "in.gguf"]
        assert leftovers == [], leftovers


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.floats(0, 1))
@example(cut=0.0)
@example(cut=0.001)
@example(cut=0.5)
def test_a_truncated_gguf_is_a_format_error(gguf_bytes, tmp_path, cut):
    convert(gguf_bytes[: int(len(gguf_bytes) * cut)], tmp_path)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), min_size=1, max_size=6))
@example(edits=[(8, 255), (15, 127)])  # a tensor count of ~2**63
@example(edits=[(16, 255), (23, 127)])  # a metadata count of ~2**63
@example(edits=[(4, 9)])  # an unknown version
def test_corrupted_gguf_headers_convert_or_are_a_format_error(gguf_bytes, tmp_path, edits):
    data = bytearray(gguf_bytes)
    for at, value in edits:
        data[at % len(data)] = value
    convert(bytes(data), tmp_path)


# Run in a child limited to 1 GiB of address space and 60 s: before tunex.gguf_checked, a damaged
# array count made gguf's reader loop past the end of the file until the OOM killer came (9.7 GB).
BOUNDED_CHILD = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
from tunex.errors import FormatError
from tunex.estimate import shape_from_gguf
from tunex.gguf_io import gguf_to_hf
said = {}
for name in sys.argv[1:]:
    for what, read in (("convert", lambda: gguf_to_hf(name, name + ".out")), ("estimate", lambda: shape_from_gguf(name))):
        try:
            read()
            said[f"{what} {name}"] = "read"
        except FormatError as e:
            said[f"{what} {name}"] = str(e)
print(json.dumps(said))
"""


def _array_counts(path: Path) -> list[tuple[str, int, int]]:
    """(key, byte offset of the element count, bytes left after it) of each metadata array."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    found = []
    for field in reader.fields.values():
        if field.types and field.types[0] == gguf.GGUFValueType.ARRAY:
            at = field.offset + int(field.parts[0].nbytes + field.parts[1].nbytes) + 4 + 4  # value type, item type
            found.append((field.name, at, len(reader.data) - (at + 8)))
    return found


def test_a_damaged_metadata_array_count_is_a_format_error_not_an_allocation(gguf_bytes, tmp_path):
    """Each metadata array's count set to 2**63-1, to ~2**56 and to one item more than the rest of
    the file holds: converting it (`tunex convert gguf_to_hf`) and estimating from it (`tunex
    estimate`) are a FormatError naming the file and the damaged count, within 1 GiB and 60 s."""
    src = tmp_path / "ok.gguf"
    src.write_bytes(gguf_bytes)
    arrays = _array_counts(src)
    assert {"tokenizer.ggml.tokens", "tokenizer.ggml.token_type"} <= {key for key, _, _ in arrays}, arrays
    files = []
    for key, at, left in arrays:
        for count in (2**63 - 1, 2**56 + 300, left // 4 + 1 if key.endswith("token_type") else left // 8 + 1):
            data = bytearray(gguf_bytes)
            data[at : at + 8] = count.to_bytes(8, "little")
            files.append(tmp_path / f"{key}-{count}.gguf")
            files[-1].write_bytes(bytes(data))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "python"), *sys.path])}
    done = subprocess.run(
        [sys.executable, "-c", BOUNDED_CHILD, *map(str, files)], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr[-2000:]
    said = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(said) == 2 * len(files), said
    for key, message in said.items():
        name = key.split(" ", 1)[1]
        assert message.startswith(f"{name}: not a readable GGUF file"), (key, message)
        assert "damaged count" in message and "\n" not in message, (key, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ok.gguf", *(p.name for p in files)])
