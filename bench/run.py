#!/usr/bin/env python3
"""Run benchmark scripts and record their tables in BENCHMARKS.md.

Usage: python bench/run.py [NAME ...]    (NAME = merge, quant, generate, data, train, gguf, kquant, serve, ...; none = all)

Each bench/bench_NAME.py runs tunex and its competitor side by side in one run and prints a markdown
table to stdout. This runner replaces the section ``## NAME`` of BENCHMARKS.md with that table, the
command that produced it, the date and the machine, and leaves the other sections as they were.
Timings are never pass/fail: these machines are noisy, so read the ratios. On a machine shared with
other jobs, run it as root under ``chrt -f 10`` (children inherit the policy): the benchmark then
has the cores to itself but for the kernel's real-time throttling, and its section says so.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
TABLE = BENCH.parent / "BENCHMARKS.md"
HEADER = """# Benchmarks

Made by `python bench/run.py [NAME ...]`, which runs `bench/bench_NAME.py` and writes its section
here. tunex and the competitor run in the same invocation on the same inputs; absolute times drift
on these shared machines, ratios hold.
"""


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    policy = ""
    if hasattr(os, "sched_getscheduler") and os.sched_getscheduler(0) == os.SCHED_FIFO:
        policy = (
            ", real-time FIFO scheduling (`chrt -f`: other jobs on the machine get the kernel's 5% real-time remainder)"
        )
    return f"{os.cpu_count()} cores, {cpu}{policy}"


def run_one(name: str, args: list[str]) -> str:
    script = BENCH / f"bench_{name}.py"
    if not script.is_file():
        known = sorted(p.stem[len("bench_") :] for p in BENCH.glob("bench_*.py"))
        raise SystemExit(f"error: no benchmark {name!r} (bench/bench_{name}.py); known: {', '.join(known)}")
    command = [sys.executable, str(script.relative_to(BENCH.parent)), *args]
    print(f"$ {' '.join(command)}", file=sys.stderr)
    result = subprocess.run(command, cwd=BENCH.parent, stdout=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise SystemExit(f"error: bench/bench_{name}.py exited with {result.returncode}")
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    shown = " ".join(["python", "bench/run.py", name, *args])
    return f"## {name}\n\nCommand: `{shown}` — {when}, {machine()}\n\n{result.stdout.strip()}\n"


def record(name: str, section: str) -> None:
    text = TABLE.read_text() if TABLE.exists() else HEADER
    pattern = re.compile(rf"^## {re.escape(name)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    TABLE.write_text(text.rstrip("\n") + "\n")


def main(argv: list[str]) -> None:
    if "-h" in argv or "--help" in argv:  # help, not a run: nothing is recorded
        names = [a for a in argv if not a.startswith("-")]
        if not names:
            print(__doc__)
        for name in names:
            subprocess.run([sys.executable, str(BENCH / f"bench_{name}.py"), "--help"], check=False)
        return
    names = [a for a in argv if not a.startswith("-")]
    extra = [a for a in argv if a.startswith("-")]
    if not names:
        names = sorted(p.stem[len("bench_") :] for p in BENCH.glob("bench_*.py"))
    for name in names:
        section = run_one(name, extra)
        print(section)
        record(name, section)


if __name__ == "__main__":
    main(sys.argv[1:])
