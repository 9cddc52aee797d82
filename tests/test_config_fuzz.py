"""Fuzzing config input (bounded hypothesis runs): any TOML text and any ``KEY=VALUE`` override
either loads or raises ConfigError naming the file; nothing else escapes."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from tunex.config import load_config
from tunex.errors import ConfigError

pytestmark = pytest.mark.faults
BASE = "smollm2_135m_instruct_lora_chatterbot"
KEYS = ["train.lr", "train.batch_size", "method.r", "model.path", "data.max_length", "save.save_steps", "x", ""]
VALUES = st.one_of(
    st.sampled_from(["1", "-1", "0", "1e309", "nan", "inf", "true", "[1, 2]", "{a = 1}", '"s"', "'", "[", ""]),
    st.text(max_size=12),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.one_of(st.sampled_from(KEYS), st.text(max_size=10)), value=VALUES, sep=st.sampled_from(["=", "", "=="]))
@example(key="train.lr", value="1e309", sep="=")
@example(key="method", value="1", sep="=")
def test_overrides_load_or_are_a_config_error(key, value, sep):
    try:
        load_config(BASE, [f"{key}{sep}{value}"])
    except ConfigError as e:
        assert e.problems and all(isinstance(p, str) and p for p in e.problems)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200), raw=st.binary(max_size=40))
@example(text="[train]\nlr = 'x'\n[train]\n", raw=b"")
@example(text="", raw=b"\xff\xfe")
def test_any_config_file_loads_or_is_a_config_error(tmp_path, text, raw):
    path = tmp_path / "c.toml"
    path.write_bytes(text.encode("utf-8", "surrogatepass") + raw)
    try:
        load_config(path)
    except ConfigError as e:
        assert str(path) in str(e)
