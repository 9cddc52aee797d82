"""A shape whose sizes overflow the native side's 64-bit arithmetic is refused with a one-line
ValueError naming the argument, before any kernel touches memory (rust/src/error.rs `product`,
rope.rs `Shape::span`): a wrapped size would otherwise pass the bounds checks in front of the
unsafe code."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import require_native

native = require_native("rope_f32", "attention_forward_f32", "cross_entropy_f32", allow_module_level=True)

HALF = 1 << 63  # x 2 wraps a 64-bit size to 0


def f32(n: int) -> np.ndarray:
    return np.ones(n, dtype=np.float32)


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_rope_strides_and_tables_that_overflow_are_value_errors():
    x, out, table = f32(12), np.zeros(12, dtype=np.float32), f32(4)
    dense, shape = (4, 4, 2), (3, 1, 2, 2)
    with pytest.raises(ValueError, match=r"^rope: x holds 12 values; .* reach past the largest usize$") as err:
        native.rope_f32(x, (HALF, 4, 2), out, dense, table, table, 0, shape, False)
    one_line(err)
    with pytest.raises(ValueError, match=r"^rope: out holds 12 values") as err:
        native.rope_f32(x, dense, out, (HALF, 4, 2), table, table, 0, shape, False)
    one_line(err)
    with pytest.raises(ValueError, match=r"^rope: table_batch \d+ .* past the largest usize$") as err:
        native.rope_f32(x, dense, out, dense, table, table, HALF, shape, False)
    one_line(err)
    assert not out.any()


def test_attention_shape_that_overflows_is_a_value_error():
    x, out, lse = f32(16), np.zeros(16, dtype=np.float32), np.zeros(1, dtype=np.float32)
    s = (16, 16, 16)
    with pytest.raises(ValueError, match=r"^attention: shape B x H x T \(padded\) x D = .* does not fit") as err:
        native.attention_forward_f32((x, s), (x, s), (x, s), (out, s), lse, (1 << 62, 2, 1, 1, 16), 0.25)
    one_line(err)
    with pytest.raises(ValueError, match=r"^attention: q holds 16 values; .* past the largest usize$"):
        native.attention_forward_f32((x, (16, 16, HALF)), (x, s), (x, s), (out, s), lse, (1, 1, 1, 3, 16), 0.25)
    assert not out.any()


def test_cross_entropy_vocab_that_overflows_is_a_value_error():
    empty = np.zeros(0, dtype=np.float32)
    labels, weight = np.array([0, 1], dtype=np.int64), f32(2)
    lse, picked = np.zeros(2, dtype=np.float32), np.zeros(2, dtype=np.float32)
    # 2 rows x 2^63 wraps to 0 logits, which the empty array would match
    with pytest.raises(ValueError, match=r"^cross-entropy: labels x vocab .* does not fit in a usize") as err:
        native.cross_entropy_f32(empty, HALF, labels, weight, True, lse, picked)
    one_line(err)
