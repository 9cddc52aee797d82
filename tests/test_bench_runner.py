"""bench/run.py, the runner that records benchmark sections in BENCHMARKS.md: asking it for help
runs no benchmark and records nothing (it once ran every bench with ``--help`` and wrote their help
texts over the recorded tables)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _runner(monkeypatch, table: Path):
    spec = importlib.util.spec_from_file_location("bench_runner", ROOT / "bench" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "TABLE", table)
    return module


def test_help_records_nothing(monkeypatch, tmp_path, capsys):
    table = tmp_path / "BENCHMARKS.md"
    table.write_text("# Benchmarks\n\n## moe\n\nrecorded rows\n")
    runner = _runner(monkeypatch, table)
    calls = []
    monkeypatch.setattr(runner, "run_one", lambda name, args: calls.append(name) or f"## {name}\n\nhelp text\n")
    runner.main(["--help"])
    assert "Usage: python bench/run.py" in capsys.readouterr().out
    runner.main(["moe", "-h"])
    assert calls == [] and table.read_text() == "# Benchmarks\n\n## moe\n\nrecorded rows\n"


def test_a_run_replaces_only_its_own_section(monkeypatch, tmp_path):
    table = tmp_path / "BENCHMARKS.md"
    table.write_text("# Benchmarks\n\n## moe\n\nold rows\n\n## serve\n\nserve rows\n")
    runner = _runner(monkeypatch, table)
    monkeypatch.setattr(runner, "run_one", lambda name, args: f"## {name}\n\nnew rows {args}\n")
    runner.main(["moe", "--rounds=1"])
    assert table.read_text() == "# Benchmarks\n\n## moe\n\nnew rows ['--rounds=1']\n\n## serve\n\nserve rows\n"
