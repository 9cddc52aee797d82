"""PEFT's module-name rules live once, in Rust (``tunex._native.peft_pattern_keys`` /
``peft_targets``), and agree with PEFT itself (the oracle) on a table of rank/alpha pattern keys and
target_modules, regex keys and dotted-suffix matches included."""

from __future__ import annotations

import pytest
from tunex import _native
from tunex.peft.targets import matches, select

peft_other = pytest.importorskip("peft.utils.other")
tuners_utils = pytest.importorskip("peft.tuners.tuners_utils")
LoraConfig = pytest.importorskip("peft").LoraConfig

MODULES = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.k_proj",
    "model.layers.1.self_attn.q_proj",
    "model.layers.10.self_attn.q_proj",
    "model.layers.1.self_attn.xq_proj",
    "model.layers.1.mlp.down_proj",
    "model.layers.11.mlp.down_proj",
    "model.layers.0.mlp.gate_proj",
    "q_proj",
    "lm_head",
    "vision_model.encoder.layers.3.self_attn.out_proj",
]

PATTERN_KEYS = [
    ["q_proj"],
    ["proj"],
    ["self_attn.q_proj"],
    [r"layers\.0\.self_attn\.q_proj"],
    ["layers.1.mlp.down_proj"],  # unescaped dots: a regex all the same
    [r"model\.layers\.\d+\.mlp\..*_proj"],
    ["(q|k)_proj"],
    [r"layers\.1\..*", "q_proj"],  # the first matching key wins
    ["q_proj", r"layers\.1\..*"],
    [".*0.*"],
    ["^model.layers.0.self_attn.k_proj"],
    ["down_proj", "gate_proj", "lm_head"],
    ["encoder.layers.3.self_attn.out_proj", "out_proj"],
]


@pytest.mark.parametrize("keys", PATTERN_KEYS, ids=lambda k: "|".join(k))
def test_pattern_keys_match_peft(keys):
    got = _native.peft_pattern_keys(keys, MODULES)
    for module, index in zip(MODULES, got):
        picked = peft_other.get_pattern_key(keys, module)
        expected = keys.index(picked) if picked in keys else None
        assert index == expected, (keys, module)


TARGETS = [
    ["q_proj", "v_proj"],
    ["self_attn.q_proj"],
    ["q_proj"],
    ["proj"],
    ["lm_head"],
    ["model.layers.0.mlp.gate_proj"],
    ["mlp.down_proj", "k_proj"],
    r".*\.(q|k)_proj",
    r"model\.layers\.1\..*",
    "q_proj",  # a string is a full-match regex: only the bare name
    ".*proj",
    r".*layers\.1[0-9]?\..*",
    "lm_head|.*gate_proj",
]


@pytest.mark.parametrize("target", TARGETS, ids=str)
def test_target_modules_match_peft(target):
    config = LoraConfig(target_modules=target)
    expected = [bool(tuners_utils.check_target_module_exists(config, m)) for m in MODULES]
    assert select(MODULES, target) == expected
    assert [matches(m, target) for m in MODULES] == expected


def test_bad_regexes_are_one_line_errors_naming_them():
    with pytest.raises(ValueError, match=r"q_proj\(\[") as e:
        select(MODULES, "q_proj([")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"pattern key") as e:
        _native.peft_pattern_keys(["(", "q_proj"], MODULES)
    assert "\n" not in str(e.value)
