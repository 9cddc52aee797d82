"""Fuzzing training records (bounded hypothesis runs): for every data format, any JSON record maps
to a sample or raises RecordError saying which field is wrong (the loader adds the file and line);
nothing else escapes the format mappers."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from tunex.data import formats as F

pytestmark = pytest.mark.faults
KEYS = [
    "instruction",
    "input",
    "output",
    "messages",
    "conversations",
    "role",
    "content",
    "from",
    "value",
    "text",
    "system",
    "loss",
    "conversation",
    "human",
    "assistant",
]
JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=6)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=4)), inner, max_size=4),
    ),
    max_leaves=10,
)


@settings(max_examples=150, deadline=None)
@given(fmt=st.sampled_from(sorted(F.FORMATS)), record=JSON)
@example(fmt="openai", record={"messages": [{"role": "user"}]})
@example(fmt="sharegpt", record={"conversations": [{"from": 1, "value": None}]})
@example(fmt="alpaca", record=[])
def test_any_record_maps_or_is_a_data_error(fmt, record):
    try:
        F.mapper(fmt)(record)
    except F.RecordError as e:
        assert str(e).strip() and "\n" not in str(e).strip(), str(e)
