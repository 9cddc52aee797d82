"""Fuzzing the files of a model folder (bounded hypothesis runs): any config.json is a ModelConfig
or a FormatError naming the file, and any tokenizer.json loads or raises a named error."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from tunex.errors import TunexError
from tunex.models.config import read_config

pytestmark = pytest.mark.faults
GOOD = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 100,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
}
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**66), 2**66),
    st.floats(),
    st.text(max_size=6),
    st.lists(st.integers(), max_size=2),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    changes=st.dictionaries(
        st.sampled_from(sorted(GOOD) + ["rope_scaling", "head_dim", "tie_word_embeddings"]), VALUES, max_size=3
    ),
    raw=st.one_of(st.none(), st.text(max_size=20)),
)
@example(changes={"num_attention_heads": 0}, raw=None)
@example(changes={"hidden_size": 2**64}, raw=None)
@example(changes={"model_type": None}, raw=None)
def test_any_config_json_is_a_model_config_or_a_named_error(tmp_path, changes, raw):
    (tmp_path / "config.json").write_text(raw if raw is not None else json.dumps({**GOOD, **changes}))
    try:
        read_config(tmp_path)
    except (TunexError, ValueError) as e:
        assert str(e).strip() and "\n" not in str(e).strip(), str(e)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    text=st.one_of(
        st.text(max_size=60), st.builds(json.dumps, st.dictionaries(st.text(max_size=8), VALUES, max_size=4))
    )
)
@example(text='{"model": {"type": "BPE", "vocab": {}, "merges": []}}')
def test_any_tokenizer_json_loads_or_is_a_named_error(tmp_path, text):
    from tunex.tokenizer import load_tokenizer

    (tmp_path / "tokenizer.json").write_text(text)
    try:
        load_tokenizer(tmp_path)
    except (TunexError, ValueError) as e:
        assert "tokenizer.json" in str(e), str(e)
