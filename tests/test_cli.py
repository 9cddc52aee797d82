"""The CLI through click's CliRunner and through a real `tunex` subprocess."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tunex
from click.testing import CliRunner
from tunex import builtin_configs
from tunex.cli import cli


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def test_version_command_and_flag(runner):
    for args in (["version"], ["--version"], ["-V"]):
        result = runner.invoke(cli, args)
        assert result.exit_code == 0
        assert result.output.strip() == f"tunex {tunex.__version__}"


def test_version_matches_cargo_toml():
    cargo = (Path(__file__).resolve().parents[1] / "Cargo.toml").read_text()
    assert f'version = "{tunex.__version__}"' in cargo


def test_help_lists_commands(runner):
    for args in (["help"], ["--help"], ["-h"]):
        result = runner.invoke(cli, args)
        assert result.exit_code == 0
        for command in ("list-cfg", "copy-cfg", "version", "help"):
            assert command in result.output


def test_help_for_one_command(runner):
    result = runner.invoke(cli, ["help", "copy-cfg"])
    assert result.exit_code == 0
    assert "SAVE_PATH" in result.output and "--force" in result.output


def test_help_for_unknown_command_is_usage_error(runner):
    result = runner.invoke(cli, ["help", "trian"])
    assert result.exit_code == 2
    assert "no such command 'trian'" in result.output


def test_list_cfg_all(runner):
    result = runner.invoke(cli, ["list-cfg"])
    assert result.exit_code == 0
    assert result.output.split() == builtin_configs.names()
    assert "smollm2_135m_instruct_lora_chatterbot" in result.output


def test_list_cfg_pattern_is_case_insensitive_substring(runner):
    result = runner.invoke(cli, ["list-cfg", "-p", "QLoRA"])
    assert result.exit_code == 0
    names = result.output.split()
    assert names and all("qlora" in n for n in names)
    assert "internlm2_chat_7b_qlora_alpaca_e3" in names
    assert "qwen2_7b_instruct_lora_alpaca_e3" not in names


def test_list_cfg_typo_gives_closest_names(runner):
    result = runner.invoke(cli, ["list-cfg", "--pattern", "smolm2_qlroa"])
    assert result.exit_code == 0
    assert "closest names" in result.output
    assert "smollm2_135m_instruct_qlora_chatterbot" in result.output


def test_list_cfg_no_match_is_one_error_line(tmp_path):
    out = subprocess.run([*_tunex_exe(), "list-cfg", "-p", "nomatch"], capture_output=True, text=True)
    assert out.returncode == 1
    assert out.stdout == ""
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("error: no built-in config name contains 'nomatch'")
    assert f"all {len(builtin_configs.names())}" in lines[0]


def test_copy_cfg_into_directory(runner, tmp_path):
    result = runner.invoke(cli, ["copy-cfg", "smollm2_135m_instruct_lora_chatterbot", str(tmp_path)])
    assert result.exit_code == 0, result.output
    copied = tmp_path / "smollm2_135m_instruct_lora_chatterbot_copy.toml"
    assert copied.read_text() == builtin_configs.path_of("smollm2_135m_instruct_lora_chatterbot").read_text()
    tunex.load_config(copied)


def test_copy_cfg_to_file_with_toml_suffix(runner, tmp_path):
    target = tmp_path / "sub" / "mine.toml"
    result = runner.invoke(cli, ["copy-cfg", "llama3_8b_instruct_qlora_alpaca_e3.toml", str(target)])
    assert result.exit_code == 0, result.output
    assert target.is_file()


def test_copy_cfg_refuses_to_overwrite_without_force(runner, tmp_path):
    target = tmp_path / "mine.toml"
    target.write_text("keep me")
    result = runner.invoke(cli, ["copy-cfg", "llama2_7b_qlora_alpaca_e3", str(target)])
    assert result.exit_code == 1
    assert "already exists" in result.output and "--force" in result.output
    assert target.read_text() == "keep me"
    result = runner.invoke(cli, ["copy-cfg", "llama2_7b_qlora_alpaca_e3", str(target), "--force"])
    assert result.exit_code == 0
    assert "[model]" in target.read_text()


def test_copy_cfg_unknown_name_names_closest(runner, tmp_path):
    result = runner.invoke(cli, ["copy-cfg", "smolm2_lora", str(tmp_path)])
    assert result.exit_code == 1
    assert "no built-in config named 'smolm2_lora'" in result.output
    assert "smollm2_135m_instruct_lora_chatterbot" in result.output


def test_usage_error_exit_code(runner):
    assert runner.invoke(cli, ["copy-cfg"]).exit_code == 2
    assert runner.invoke(cli, ["no-such-command"]).exit_code == 2


def _tunex_exe() -> list[str]:
    exe = shutil.which("tunex", path=os.path.dirname(sys.executable)) or shutil.which("tunex")
    return [exe] if exe else [sys.executable, "-m", "tunex"]


def test_real_subprocess_roundtrip(tmp_path):
    out = subprocess.run([*_tunex_exe(), "list-cfg", "-p", "qlora"], capture_output=True, text=True, check=True)
    assert "smollm2_135m_instruct_qlora_chatterbot" in out.stdout
    out = subprocess.run(
        [*_tunex_exe(), "copy-cfg", "smollm2_135m_instruct_qlora_chatterbot", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "smollm2_135m_instruct_qlora_chatterbot_copy.toml").is_file()


def test_real_subprocess_error_is_one_line_without_traceback(tmp_path):
    (tmp_path / "x_copy.toml").write_text("")
    env = {k: v for k, v in os.environ.items() if k != "TUNEX_DEBUG"}
    out = subprocess.run(
        [*_tunex_exe(), "copy-cfg", "nonexistent_cfg", str(tmp_path)], capture_output=True, text=True, env=env
    )
    assert out.returncode == 1
    assert out.stderr.startswith("error: no built-in config named 'nonexistent_cfg'")
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_debug_env_shows_traceback(tmp_path):
    env = dict(os.environ, TUNEX_DEBUG="1")
    out = subprocess.run(
        [*_tunex_exe(), "copy-cfg", "nonexistent_cfg", str(tmp_path)], capture_output=True, text=True, env=env
    )
    assert out.returncode == 1
    assert "Traceback" in out.stderr
