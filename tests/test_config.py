"""Config validation: every class of error names its key, and every shipped config validates."""

from __future__ import annotations

import pytest
import tunex
from tunex import builtin_configs
from tunex.config import validate

MINIMAL = '[model]\npath = "m"\n[data]\npath = "d.jsonl"\n'


def write(tmp_path, text: str):
    p = tmp_path / "cfg.toml"
    p.write_bytes(text.encode() if isinstance(text, str) else text)
    return p


def problems_of(tmp_path, text: str, overrides=()) -> list[str]:
    with pytest.raises(tunex.ConfigError) as info:
        tunex.load_config(write(tmp_path, text), overrides)
    assert str(tmp_path / "cfg.toml") in str(info.value)
    return info.value.problems


@pytest.mark.parametrize("name", builtin_configs.names())
def test_every_shipped_config_validates(name):
    cfg = tunex.load_config(name)
    assert cfg.model.path and cfg.data.path
    assert cfg.name == name


def test_defaults_follow_xtuner_qlora_recipe(tmp_path):
    cfg = tunex.load_config(write(tmp_path, MINIMAL))
    m, t, d = cfg.method, cfg.train, cfg.data
    assert (m.kind, m.r, m.alpha, m.dropout) == ("qlora", 64, 16.0, 0.1)
    assert (t.lr, t.betas, t.weight_decay, t.max_norm, t.warmup_ratio, t.scheduler) == (
        2e-4,
        [0.9, 0.999],
        0.0,
        1.0,
        0.03,
        "cosine",
    )
    assert (t.batch_size, t.grad_accum, d.max_length, d.pack_to_max_length) == (1, 16, 2048, True)


def test_unknown_key_suggests_the_closest(tmp_path):
    problems = problems_of(tmp_path, MINIMAL + "[train]\nlearning_rat = 1e-4\nbatch_sise = 2\n")
    assert any(p.startswith("train.batch_sise: unknown key; did you mean 'batch_size'?") for p in problems)
    assert any(p.startswith("train.learning_rat: unknown key") and "valid keys" in p for p in problems)


def test_unknown_section_suggests_the_closest(tmp_path):
    problems = problems_of(tmp_path, MINIMAL + "[trian]\nlr = 1.0\n")
    assert problems == [
        "trian: unknown section; did you mean 'train'? (valid sections: model, data, method, train, eval, save, log, vision, preference)"
    ]


def test_wrong_type_names_key_and_expectation(tmp_path):
    problems = problems_of(tmp_path, MINIMAL + '[train]\nlr = "fast"\ngradient_checkpointing = 1\n')
    assert "train.lr: expected a number > 0, got 'fast'" in problems
    assert "train.gradient_checkpointing: expected true or false, got 1" in problems


def test_out_of_range(tmp_path):
    problems = problems_of(tmp_path, MINIMAL + "[method]\ndropout = 1.5\nr = 0\n[train]\nwarmup_ratio = -0.1\n")
    assert "method.dropout: expected a number >= 0 and < 1, got 1.5" in problems
    assert "method.r: expected an integer >= 1 and <= 4096, got 0" in problems
    assert "train.warmup_ratio: expected a number >= 0 and < 1, got -0.1" in problems


def test_choice_lists_valid_values(tmp_path):
    problems = problems_of(tmp_path, MINIMAL + '[method]\nkind = "qlroa"\n')
    assert problems == ["method.kind: expected one of 'full', 'lora', 'qlora', got 'qlroa'"]


def test_blocksize_must_be_power_of_two(tmp_path):
    problems = problems_of(tmp_path, MINIMAL + "[method]\nblocksize = 100\n")
    assert problems == ["method.blocksize: expected a power of two from 32 to 4096, got 100"]


def test_betas_shape(tmp_path):
    problems = problems_of(tmp_path, MINIMAL + "[train]\nbetas = [0.9]\n")
    assert problems[0].startswith("train.betas: expected two numbers in [0, 1)")


def test_bad_regex_target_modules(tmp_path):
    problems = problems_of(tmp_path, MINIMAL + '[method]\ntarget_modules = "q_proj(["\n')
    assert problems[0].startswith("method.target_modules: expected 'all-linear', a list or a valid regex")


def test_missing_required_section_and_key(tmp_path):
    problems = problems_of(tmp_path, '[model]\ndtype = "float32"\n')
    assert "model.path: required key is missing (HF model folder, GGUF file, or a downloaded hub snapshot)" in problems
    assert "data: required section [data] is missing" in problems


def test_section_must_be_a_table(tmp_path):
    problems = problems_of(tmp_path, "train = 3\n" + MINIMAL)
    assert problems == ["train: expected a table [train], got int"]


def test_all_problems_reported_at_once(tmp_path):
    problems = problems_of(tmp_path, "[model]\n[data]\npath = 3\n[method]\nr = -1\n[save]\nsave_stepz = 1\n")
    keys = [p.split(":")[0] for p in problems]
    assert keys == ["data.path", "model.path", "method.r", "save.save_stepz"] or sorted(keys) == sorted(
        ["data.path", "model.path", "method.r", "save.save_stepz"]
    )
    assert len(problems) == 4


def test_toml_syntax_error_names_line(tmp_path):
    problems = problems_of(tmp_path, MINIMAL + "[train]\nlr = = 3\n")
    assert problems[0].startswith("not valid TOML:") and "line 6" in problems[0]


def test_not_utf8(tmp_path):
    problems = problems_of(tmp_path, MINIMAL.encode() + b'[eval]\nsystem = "\xff"\n')
    assert problems[0].startswith("not UTF-8 text")


def test_overrides_apply_and_validate(tmp_path):
    cfg = tunex.load_config(
        write(tmp_path, MINIMAL),
        ["train.lr=1e-4", "method.kind=lora", "eval.prompts=['hi', 'there']", "save.work_dir=out/x"],
    )
    assert cfg.train.lr == 1e-4 and cfg.method.kind == "lora"
    assert cfg.eval.prompts == ["hi", "there"] and cfg.save.work_dir == "out/x"
    problems = problems_of(tmp_path, MINIMAL, ["train.lr=-3", "trainn.seed=1"])
    assert "train.lr: expected a number > 0, got -3" in problems
    assert any(p.startswith("trainn: unknown section; did you mean 'train'?") for p in problems)


def test_malformed_override(tmp_path):
    with pytest.raises(tunex.ConfigError) as info:
        tunex.load_config(write(tmp_path, MINIMAL), ["train.lr"])
    assert "expected KEY.PATH=VALUE" in str(info.value)


def test_missing_file_or_name():
    with pytest.raises(FileNotFoundError) as info:
        tunex.load_config("does/not/exist.toml")
    assert "does/not/exist.toml" in str(info.value)
    with pytest.raises(FileNotFoundError) as info:
        tunex.load_config("smollm2_lora_chaterbot")
    assert "closest" in str(info.value)


def test_to_toml_round_trips(tmp_path):
    cfg = tunex.load_config("smollm2_135m_instruct_qlora_chatterbot")
    again = tunex.load_config(write(tmp_path, cfg.to_toml()))
    assert again.to_dict() == cfg.to_dict()


def test_validate_dict_directly():
    cfg = validate({"model": {"path": "m"}, "data": {"path": ["a", "b"], "format": "sharegpt"}})
    assert cfg.data.path == ["a", "b"]
    with pytest.raises(tunex.ConfigError) as info:
        validate({"model": {"path": "m"}, "data": {"path": "d", "format": "alpacca"}})
    assert "data.format: expected one of 'alpaca'" in str(info.value)


def test_config_error_is_a_value_error_and_tunex_error():
    assert issubclass(tunex.ConfigError, ValueError) and issubclass(tunex.ConfigError, tunex.TunexError)


def test_docs_config_reference_is_current():
    from pathlib import Path

    from tunex.config import describe

    doc = Path(__file__).resolve().parents[1] / "docs" / "CONFIG.md"
    assert doc.read_text().strip() == describe().strip(), "regenerate: python -m tunex.config > docs/CONFIG.md"


def test_optimizer_and_offload_checkpoint_keys():
    from tunex.errors import ConfigError

    base = {"model": {"path": "x"}, "data": {"path": "-"}}
    cfg = validate({**base, "train": {"optimizer": "paged_adamw_8bit", "offload_checkpoints": True}})
    assert (cfg.train.optimizer, cfg.train.offload_checkpoints) == ("paged_adamw_8bit", True)
    assert validate(base).train.offload_checkpoints is False
    with pytest.raises(ConfigError, match=r"train.offload_checkpoints: expected true or false, got 'yes'"):
        validate({**base, "train": {"offload_checkpoints": "yes"}})
    with pytest.raises(
        ConfigError, match="train.offload_checkpoints: expected false when train.gradient_checkpointing"
    ):
        validate({**base, "train": {"offload_checkpoints": True, "gradient_checkpointing": False}})
    with pytest.raises(
        ConfigError, match=r"train.optimizer: expected one of 'adamw', 'adamw_8bit', 'paged_adamw_8bit', got 'lion'"
    ):
        validate({**base, "train": {"optimizer": "lion"}})


def test_fsdp_key_and_what_it_refuses():
    from tunex.errors import ConfigError

    base = {"model": {"path": "x"}, "data": {"path": "-"}}
    assert validate(base).train.fsdp is False
    assert validate({**base, "train": {"fsdp": True}}).train.fsdp is True
    assert validate({**base, "method": {"kind": "full"}, "train": {"fsdp": True}}).train.fsdp  # always sharded
    for train, match in (
        ({"optimizer": "adamw_8bit"}, r"train.optimizer: 'adamw_8bit' steps plain tensors, not the FSDP2 shards"),
        ({"sequence_parallel": 2}, r"train.sequence_parallel: expected 1 with train.fsdp = true"),
    ):
        with pytest.raises(ConfigError, match=match):
            validate({**base, "train": {"fsdp": True, **train}})
    with pytest.raises(ConfigError, match=r"train.fsdp: expected false for \[vision\] runs"):
        validate(
            {**base, "vision": {"path": "tower"}, "data": {"path": "-", "format": "llava"}, "train": {"fsdp": True}}
        )
