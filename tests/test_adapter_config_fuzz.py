"""Fuzzing adapter_config.json (bounded hypothesis runs): a merge with any adapter config either
works or raises a named error (FormatError / DataError / ValueError naming the problem), never a
crash, and never leaves a partial output."""

from __future__ import annotations

import json
import shutil

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_merge_cli import make_pair
from tunex.errors import TunexError
from tunex.merge import merge

pytestmark = pytest.mark.faults
FIELDS = [
    "r",
    "lora_alpha",
    "peft_type",
    "target_modules",
    "use_dora",
    "use_rslora",
    "rank_pattern",
    "alpha_pattern",
    "fan_in_fan_out",
    "modules_to_save",
    "lora_bias",
    "layers_to_transform",
]
JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6,
)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("adapter-fuzz"))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    changes=st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=3), raw=st.one_of(st.none(), st.text(max_size=30))
)
@example(changes={"r": 2**64}, raw=None)
@example(changes={"r": -1, "lora_alpha": float("nan")}, raw=None)
@example(changes={}, raw="[1, 2")
def test_any_adapter_config_merges_or_is_a_named_error(pair, tmp_path, changes, raw):
    base, adapter = pair
    shutil.rmtree(tmp_path / "out", ignore_errors=True)  # tmp_path is shared by the examples
    config = adapter / "adapter_config.json"
    original = config.read_text()
    config.write_text(raw if raw is not None else json.dumps({**json.loads(original), **changes}))
    try:
        merge(base, adapter, tmp_path / "out", device="cpu", fsync=False)
    except (TunexError, ValueError) as e:
        assert str(e).strip() and "\n" not in str(e).strip(), str(e)
    finally:
        config.write_text(original)
    assert [p.name for p in tmp_path.iterdir()] in ([], ["out"])
