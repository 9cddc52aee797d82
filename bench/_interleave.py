"""Contenders taking turns, each in its own process: what the training benchmarks share.

Each contender is a worker process (the benchmark script run again with the worker's arguments):
it builds its step, runs one warm-up step (allocator, page cache, optimizer state), prints one JSON
line (what it wants to report, such as its real tokens per step) and then runs one timed step per
``step`` line on its stdin, printing the seconds; at ``end`` it prints its peak RSS and exits. The
parent starts the workers one at a time, so that no build overlaps another's steps, then sends
``step`` to each in turn, round by round, while the others wait on their pipe: only one process
computes at a time and all see the same machine load, which on the shared machines drifts by
several x within minutes. Separate processes keep what one contender sets for its process (tunex
tunes glibc's malloc, for one) from reaching the other, and give each its own peak RSS.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM). Not getrusage's ru_maxrss: Linux carries that
    across fork and exec, so a worker started by a parent holding 1 GB would report at least 1 GB."""
    return _status_mb("VmHWM:")


def rss_mb() -> float:
    """This process's resident set now (VmRSS)."""
    return _status_mb("VmRSS:")


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    return float("nan")


def serve_steps(step: Callable[[], object], ready: dict | None = None) -> None:
    """The worker's side: warm up, print ``ready`` as a JSON line, then time one ``step()`` per
    "step" line on stdin (the seconds go to stdout); at any other line, print the peak RSS."""
    step()  # warm-up step
    print(json.dumps(ready or {}), flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        started = time.perf_counter()
        step()
        print(time.perf_counter() - started, flush=True)
    print(json.dumps({"peak_rss_mb": peak_rss_mb()}), flush=True)


def take_turns(
    contenders: dict[str, list[str]], rounds: int, env: dict[str, dict[str, str]] | None = None
) -> dict[str, dict]:
    """The parent's side: run each contender's worker (``contenders``: name -> the arguments after
    the python executable, ``env``: name -> variables added to its environment) and step them in
    turn for ``rounds`` rounds.

    Returns:
        name -> the worker's ready JSON with ``times`` (seconds per round) and ``peak_rss_mb``
        added, or ``{"error": the last line of its stderr}`` for a worker that failed.
    """
    procs, results = {}, {}
    try:
        for name, args in contenders.items():  # one at a time, so that no build overlaps another's steps
            errors = tempfile.TemporaryFile("w+")  # a pipe could fill up with warnings and stall the worker
            proc = subprocess.Popen(
                [sys.executable, *args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=errors,
                text=True,
                env={**os.environ, **(env or {}).get(name, {})},
            )
            proc.errors = errors
            line = proc.stdout.readline()
            if not line.startswith("{"):
                results[name] = {"error": last_error(proc)}
                continue
            results[name] = {**json.loads(line), "times": []}
            procs[name] = proc
        for _ in range(rounds):
            for name, proc in list(procs.items()):
                proc.stdin.write("step\n")
                proc.stdin.flush()
                line = proc.stdout.readline()
                if not line:
                    results[name] = {"error": last_error(proc)}
                    del procs[name]
                    continue
                results[name]["times"].append(float(line))
        for name, proc in procs.items():
            proc.stdin.write("end\n")
            proc.stdin.flush()
            results[name].update(json.loads(proc.stdout.readline()))
            proc.wait()
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    return results


def last_error(proc: subprocess.Popen) -> str:
    """Stop a failed worker; the signal that killed it (the kernel's OOM killer sends SIGKILL), else
    the last line of its stderr (at most 120 characters)."""
    try:
        code = proc.wait(timeout=5)  # it closed its stdout: exiting, or killed
    except subprocess.TimeoutExpired:
        code = None
    if code is not None and code < 0:
        name = signal.Signals(-code).name
        return f"killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
    proc.kill()
    proc.wait()
    proc.errors.seek(0)
    return (proc.errors.read().strip().splitlines() or ["failed"])[-1][:120]


def spread(values: list[float], digits: int = 0, unit: str = "") -> str:
    """``median (min-max)`` of ``values``."""
    return f"{statistics.median(values):.{digits}f}{unit} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def speed_row(label: str, ours: dict, theirs: dict) -> str:
    """A table row of two contenders' results (``tokens`` real tokens per step and ``times``):
    tokens/s median (range) of each, the per-round speed ratio median (range), peak RSS of each and
    their ratio."""

    def speed(d: dict) -> str:
        if not d.get("times"):
            return f"n/a ({d.get('error', '?')})"
        return spread([d["tokens"] / t for t in d["times"]])

    def rss(d: dict) -> str:
        return f"{d['peak_rss_mb']:.0f}" if "peak_rss_mb" in d else f"n/a ({d.get('error', '?')})"

    both = ours.get("times") and theirs.get("times")
    # per round: (our real tokens / our time) / (their real tokens / their time)
    ratio = (
        spread([(ours["tokens"] / o) / (theirs["tokens"] / t) for o, t in zip(ours["times"], theirs["times"])], 2, "x")
        if both
        else "n/a"
    )
    mem = (
        f"{ours['peak_rss_mb'] / theirs['peak_rss_mb']:.2f}"
        if "peak_rss_mb" in ours and "peak_rss_mb" in theirs
        else "n/a"
    )
    return f"| {label} | {speed(ours)} | {speed(theirs)} | {ratio} | {rss(ours)} | {rss(theirs)} | {mem} |"
