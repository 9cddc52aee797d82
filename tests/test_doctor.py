"""`tunex doctor`: its op table is what actually runs, switches change both, bad values fail in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tunex import settings
from tunex.kernels import attention, registry, rmsnorm
from tunex.runtime.arena import kept_causal_attention

PYTHON_DIR = str(Path(__file__).resolve().parents[1] / "python")


def doctor(*args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TUNEX_")}
    clean["PYTHONPATH"] = PYTHON_DIR + os.pathsep + clean.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "tunex", "doctor", *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def doctor_json(**env: str) -> dict:
    result = doctor("--json", **env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _rmsnorm_runs_native(monkeypatch) -> bool:
    calls = []
    real = rmsnorm._native_forward
    if real is not None:
        monkeypatch.setattr(rmsnorm, "_native_forward", lambda *a: (calls.append(1), real(*a))[1])
    x = torch.randn(4, 32, requires_grad=True)
    rmsnorm.rms_norm(x, torch.ones(32, requires_grad=True), 1e-6).sum().backward()
    return bool(calls)


def _attention_runs_native(monkeypatch) -> bool:
    calls = []
    real = attention._native_forward
    if real is not None:
        monkeypatch.setattr(attention, "_native_forward", lambda *a: (calls.append(1), real(*a))[1])
    q, k, v = (torch.randn(1, 2, 8, 64, requires_grad=True) for _ in range(3))
    kept_causal_attention(q, k, v)
    return bool(calls)


def test_doctor_prints_a_table_and_exits_0():
    result = doctor()
    assert result.returncode == 0, result.stderr
    for op in registry.OPS:
        assert op in result.stdout
    for section in ("native extension:", "cpu:", "versions:", "disk:", "switches set:"):
        assert section in result.stdout


def test_the_op_table_names_what_runs(monkeypatch):
    rep = doctor_json()
    assert set(rep["ops"]) == set(registry.OPS)
    for op, cols in rep["ops"].items():
        names = {impl.name for impl in registry.OPS[op]}
        for column in ("cpu-fp32", "cpu-bf16", "cuda"):
            assert set(cols[column]) == {"train", "inference"}
            assert cols[column]["train"] in names and cols[column]["inference"] in names
    cpu = rep["ops"]
    assert (cpu["rmsnorm"]["cpu-fp32"]["train"] == "native") == _rmsnorm_runs_native(monkeypatch)
    assert (cpu["attention"]["cpu-fp32"]["train"] == "native") == _attention_runs_native(monkeypatch)
    assert rep["versions"]["torch"] == torch.__version__
    assert rep["native"]["available"] == (registry._native_module() is not None)
    assert rep["disk"]["work"]["free_bytes"] > 0 and rep["disk"]["cache"]["free_bytes"] > 0
    native = registry._native_module()
    if native is not None and hasattr(native, "build_info"):
        assert rep["native"]["version"] == native.__version__
        assert rep["native"]["simd_tier"] in rep["native"]["simd_compiled"]
        assert rep["native"]["simd_tier"] in ("portable", "avx2", "avx512")


@pytest.mark.skipif(attention._native_forward is None, reason="extension built without the attention kernel")
def test_a_switch_changes_doctor_and_the_real_call(monkeypatch):
    assert doctor_json()["ops"]["attention"]["cpu-fp32"]["train"] == "native"
    assert _attention_runs_native(monkeypatch)
    off = doctor_json(TUNEX_NATIVE_ATTENTION="0")
    # CPU training runs inside the activation arena: torch's flash op with its outputs kept there
    assert off["ops"]["attention"]["cpu-fp32"]["train"] == "flash-kept"
    assert off["switches"]["in_force"] == {"TUNEX_NATIVE_ATTENTION": "0"}
    monkeypatch.setenv("TUNEX_NATIVE_ATTENTION", "0")
    assert not _attention_runs_native(monkeypatch)


def test_unknown_switches_are_flagged():
    rep = doctor_json(TUNEX_ONEDN="0")
    assert rep["switches"]["unknown"] == ["TUNEX_ONEDN"]
    assert "not a tunex switch" in doctor(TUNEX_ONEDN="0").stdout


def test_a_bad_switch_value_is_a_one_line_error_naming_it():
    result = doctor(TUNEX_GEMV="yes")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "TUNEX_GEMV" in lines[0]


def test_explain_says_why_higher_rows_were_not_chosen():
    facts = registry.Facts("cpu", torch.float32, grad=False, head_dim=64)
    verdicts = dict(registry.explain("attention", facts))
    assert verdicts["sdpa"] == "chosen"
    assert verdicts["native"].startswith("condition not met")
    with settings.override(TUNEX_NATIVE_ATTENTION="0"):
        assert registry.choose("attention", registry.Facts("cpu", torch.float32, grad=True, head_dim=64)) == "sdpa"


def test_require_native_turns_a_missing_export_into_an_error(monkeypatch):
    monkeypatch.delenv("TUNEX_REQUIRE_NATIVE", raising=False)  # scripts/test.sh sets it for the whole run
    monkeypatch.setattr(registry, "has_native", lambda export: export != "rms_norm_forward_f32")
    facts = registry.Facts("cpu", torch.float32, backend="torch")
    assert registry.choose("rmsnorm", facts) == "torch"
    assert "missing" in dict(registry.explain("rmsnorm", facts))["native"]
    monkeypatch.setenv("TUNEX_REQUIRE_NATIVE", "1")
    with pytest.raises(Exception, match="rms_norm_forward_f32"):
        registry.choose("rmsnorm", facts)
