"""GGUF conversions hold one tensor at a time (issue: bounded memory whatever the model size).

Every array the converters make is tracked with a weak reference: with streaming, the previous
tensor is gone before the next one exists, however many tensors the model has. (Peak RSS on real
models is measured by bench/bench_gguf.py, figures in BENCHMARKS.md.)"""

from __future__ import annotations

import weakref

import pytest
from test_train_helpers import make_tiny_model

pytest.importorskip("gguf")


class Live:
    """How many tracked arrays are alive at once, at most."""

    def __init__(self) -> None:
        self.now = self.most = self.seen = 0

    def track(self, array):
        self.now += 1
        self.seen += 1
        self.most = max(self.most, self.now)
        weakref.finalize(array, self._gone)
        return array

    def _gone(self) -> None:
        self.now -= 1


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("stream") / "m", tied=False)


def test_hf_to_gguf_converts_and_writes_one_tensor_at_a_time(model, tmp_path, monkeypatch):
    import tunex.gguf_io as gio

    live, convert = Live(), gio._gguf_array
    monkeypatch.setattr(gio, "_gguf_array", lambda *a, **k: live.track(convert(*a, **k)))
    gio.hf_to_gguf(model, tmp_path / "m.gguf", "q8_0")
    assert live.seen >= 15, live.seen  # every weight of the 2-layer model went through it
    assert live.most == 1, f"{live.most} converted tensors were alive at once"


def test_gguf_to_hf_dequantizes_and_writes_one_tensor_at_a_time(model, tmp_path, monkeypatch):
    import tunex.gguf_io as gio
    import tunex.io.sharded as sharded

    gguf_path = gio.hf_to_gguf(model, tmp_path / "m.gguf", "q8_0")
    made, handed = Live(), Live()
    dequantize, stream = gio._dequantized, sharded.stream_sharded
    monkeypatch.setattr(gio, "_dequantized", lambda *a, **k: made.track(dequantize(*a, **k)))

    def passed_on(tensors):  # holding no reference of its own once the writer asks for the next
        for name, array in tensors:
            yield name, handed.track(array)
            del array

    def counted(out, specs, tensors):  # what the Rust shard writer is handed, one (name, array) at a time
        return stream(out, specs, passed_on(tensors))

    monkeypatch.setattr(sharded, "stream_sharded", counted)
    gio.gguf_to_hf(gguf_path, tmp_path / "hf")
    assert made.seen == handed.seen >= 15, (made.seen, handed.seen)
    assert made.most == handed.most == 1, (made.most, handed.most)
