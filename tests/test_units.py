"""Size strings parsed in Rust; a bad one crosses the boundary as ValueError naming the input."""

from __future__ import annotations

import pytest
from tunex import _native
from tunex.units import parse_size


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2GB", 2 * 10**9),
        ("1.5GB", 1_500_000_000),
        ("500MB", 5 * 10**8),
        ("10KB", 10_000),
        ("1TB", 10**12),
        ("2GiB", 2 * 2**30),
        ("512MiB", 512 * 2**20),
        ("4KiB", 4096),
        ("123", 123),
        (" 3 GB ", 3 * 10**9),
        ("2gb", 2 * 10**9),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_int_passes_through():
    assert parse_size(4096) == 4096


@pytest.mark.parametrize("text", ["", "GB", "2XB", "-1GB", "0", "1.2.3GB", "2Gb", "two GB"])
def test_bad_size_is_value_error_naming_input(text):
    with pytest.raises(ValueError) as info:
        _native.parse_size(text)
    assert f"bad size {text!r}".replace("'", '"') in str(info.value)
    assert 'e.g. "2GB"' in str(info.value)


@pytest.mark.parametrize("bad", [0, -5, True])
def test_bad_int_size(bad):
    with pytest.raises(ValueError):
        parse_size(bad)
