"""Fuzzing the GGUF import (untrusted files): truncated or corrupted GGUF bytes either convert or
raise FormatError naming the file; never another exception, a crash or a hang. Bounded (hypothesis,
a fixed number of examples); the cases that once escaped are kept as explicit examples."""

from __future__ import annotations

import shutil
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
