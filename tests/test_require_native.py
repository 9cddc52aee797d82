"""The tests' guard for native kernels (conftest.require_native / has_native): a kernel the built
extension lacks skips its tests on a developer's older build, and fails them under
TUNEX_REQUIRE_NATIVE=1 (scripts/test.sh)."""

from __future__ import annotations

import sys

import pytest
import tunex
from conftest import has_native, require_native
from tunex import _native


def test_a_present_kernel_gives_the_module(monkeypatch):
    for value in ("0", "1"):
        monkeypatch.setenv("TUNEX_REQUIRE_NATIVE", value)
        assert require_native("rope_f32", "cross_entropy_f32") is _native
        assert has_native("rope_f32")


def test_a_missing_kernel_skips_without_the_switch(monkeypatch):
    monkeypatch.delattr(_native, "rope_f32")
    monkeypatch.delenv("TUNEX_REQUIRE_NATIVE", raising=False)
    assert has_native("cross_entropy_f32") and not has_native("rope_f32", "cross_entropy_f32")
    with pytest.raises(pytest.skip.Exception, match="the native extension lacks rope_f32"):
        require_native("cross_entropy_f32", "rope_f32")


def test_a_missing_kernel_fails_under_the_switch(monkeypatch):
    monkeypatch.delattr(_native, "rope_f32")
    monkeypatch.setenv("TUNEX_REQUIRE_NATIVE", "1")
    with pytest.raises(pytest.fail.Exception, match="the native extension lacks rope_f32; rebuild it"):
        require_native("cross_entropy_f32", "rope_f32")
    with pytest.raises(pytest.fail.Exception, match="lacks rope_f32"):
        has_native("rope_f32")


def test_an_extension_that_does_not_import_fails_under_the_switch(monkeypatch):
    monkeypatch.delattr(tunex, "_native")
    monkeypatch.setitem(sys.modules, "tunex._native", None)  # import now raises ImportError
    monkeypatch.setenv("TUNEX_REQUIRE_NATIVE", "0")
    with pytest.raises(pytest.skip.Exception):
        require_native("rope_f32")
    monkeypatch.setenv("TUNEX_REQUIRE_NATIVE", "1")
    with pytest.raises(pytest.fail.Exception, match=r"tunex._native does not import"):
        require_native("rope_f32")
