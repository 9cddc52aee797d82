"""Every ``TUNEX_*`` switch, in one place: its name, default, allowed values and effect.

Python code reads a switch only through :func:`get` / :func:`on`, at call time (so a test or an A/B
run can change it with ``monkeypatch.setenv`` or :func:`override` without reloading modules); the
Rust switches are read by ``rust/src/settings.rs`` and listed here so that ``tunex doctor`` and
docs/SETTINGS.md cover them too. A value outside a switch's choices is an error naming the switch,
the value and what it accepts.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

from tunex.errors import SettingError

ON_OFF = ("1", "0")


@dataclass(frozen=True)
class Switch:
    """One environment switch. ``choices`` None: free text (a path, a number)."""

    name: str
    default: str
    choices: tuple[str, ...] | None
    effect: str
    read_by: str  # "python", "rust", "tests", "scripts", "bench"


SWITCHES: dict[str, Switch] = {
    s.name: s
    for s in (
        Switch(
            "TUNEX_DEBUG", "0", ON_OFF, "1: a failing command prints the Python traceback instead of one line", "python"
        ),
        Switch(
            "TUNEX_KERNELS",
            "auto",
            ("auto", "triton", "torch"),
            "which GPU kernel backend `auto` means: triton for CUDA tensors (auto), always triton (with "
            "TRITON_INTERPRET=1 also on CPU tensors), or always the torch path",
            "python",
        ),
        Switch(
            "TUNEX_ONEDNN", "1", ON_OFF, "0: float32 CPU products use torch.mm instead of oneDNN's matmul", "python"
        ),
        Switch(
            "TUNEX_NATIVE_ATTENTION",
            "1",
            ON_OFF,
            "0: float32 CPU training attention uses torch's SDPA instead of tunex's Rust kernel, and decoding "
            "stores each token's keys and values and runs the attention op per sequence instead of one Rust "
            "call per layer",
            "python",
        ),
        Switch(
            "TUNEX_FUSED_LORA",
            "1",
            ON_OFF,
            "0: float32 CPU LoRA layers use separate products instead of the fused Rust kernels",
            "python",
        ),
        Switch(
            "TUNEX_GEMV",
            "1",
            ON_OFF,
            "0: decoding one token on the CPU uses torch instead of the Rust GEMV and one-row RMSNorm",
            "python",
        ),
        Switch(
            "TUNEX_ARENA",
            "1",
            ON_OFF,
            "0: CPU training keeps its saved activations on the heap instead of the step's activation arena",
            "python",
        ),
        Switch(
            "TUNEX_MALLOC_TUNE",
            "1",
            ON_OFF,
            "0: leave glibc malloc's trim and mmap thresholds alone during CPU training",
            "python",
        ),
        Switch(
            "TUNEX_REQUIRE_NATIVE",
            "0",
            ON_OFF,
            "1: a native kernel missing from the built extension is an error (and its tests fail) instead of a "
            "fallback to torch (and a skip)",
            "python",
        ),
        Switch(
            "TUNEX_CACHE", "", None, "tunex's cache folder (empty: $XDG_CACHE_HOME/tunex or ~/.cache/tunex)", "python"
        ),
        Switch(
            "TUNEX_DIST_TIMEOUT",
            "600",
            None,
            "seconds a distributed collective waits for a peer before the run fails",
            "python",
        ),
        Switch(
            "TUNEX_SIMD",
            "auto",
            ("auto", "avx2", "portable"),
            "highest SIMD tier the Rust kernels use: the CPU's best (auto), AVX2 at most, or portable code",
            "rust",
        ),
        Switch(
            "TUNEX_DIRECT_IO", "1", ON_OFF, "0: the Rust shard writer uses buffered writes instead of O_DIRECT", "rust"
        ),
        Switch(
            "TUNEX_OMP_KERNELS",
            "1",
            ON_OFF,
            "0: the Rust CPU kernels run their parts in turn instead of on torch's OpenMP threads",
            "rust",
        ),
        Switch(
            "TUNEX_NUM_THREADS",
            "",
            None,
            "threads of the Rust decode pool (empty: the cores this process may use)",
            "rust",
        ),
        Switch(
            "TUNEX_REQUIRE_ORACLES",
            "0",
            ON_OFF,
            "1 (scripts/test.sh): a missing test oracle fails the test run instead of skipping tests",
            "tests",
        ),
        Switch(
            "TUNEX_SETUP_MIN_FREE_GB",
            "8",
            None,
            "free disk scripts/setup.sh wants before making a fresh .venv (0: try anyway)",
            "scripts",
        ),
        Switch("TUNEX_BENCH_SHAPE", "4x256", None, "batch x tokens of bench/bench_train.py's steps", "bench"),
    )
}


def _switch(name: str) -> Switch:
    try:
        return SWITCHES[name]
    except KeyError:
        raise KeyError(f"{name} is not a tunex switch (see tunex.settings.SWITCHES)") from None


def get(name: str) -> str:
    """The switch's value now: the environment's (stripped, lower-cased where it has choices) or
    its default.

    Raises:
        SettingError: the value is not one of the switch's choices.
    """
    switch = _switch(name)
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return switch.default
    value = raw.strip()
    if switch.choices is not None:
        value = value.lower()
        if value not in switch.choices:
            raise SettingError(
                f"{name}={raw!r} is not one of {', '.join(switch.choices)}; unset it or pick one of those"
            )
    return value


def on(name: str) -> bool:
    """Whether an on/off switch is on."""
    return get(name) == "1"


def in_force() -> dict[str, str]:
    """The switches set in the environment, name -> raw value (unknown ``TUNEX_*`` names too, so
    a misspelt switch shows up in ``tunex doctor``)."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("TUNEX_")}


def unknown_in_force() -> list[str]:
    """``TUNEX_*`` variables set in the environment that are no tunex switch (likely misspelt)."""
    return [k for k in in_force() if k not in SWITCHES]


@contextlib.contextmanager
def override(**values: str | None) -> Iterator[None]:
    """Set (a str) or unset (None) switches for the block, then restore them: for tests and A/B runs."""
    for name in values:
        _switch(name)
    before = {name: os.environ.get(name) for name in values}
    try:
        for name, value in values.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def markdown_table() -> str:
    """The switches as the Markdown table docs/SETTINGS.md holds (a test keeps the two equal)."""
    rows = ["| Switch | Default | Values | Read by | Effect |", "|---|---|---|---|---|"]
    for s in SWITCHES.values():
        values = " / ".join(f"`{c}`" for c in s.choices) if s.choices else "free text"
        default = f"`{s.default}`" if s.default else "(empty)"
        rows.append(f"| `{s.name}` | {default} | {values} | {s.read_by} | {s.effect.replace('|', '/')} |")
    return "\n".join(rows) + "\n"
