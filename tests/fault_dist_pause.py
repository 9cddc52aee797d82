"""``tunex train`` under torchrun with a pause inside a sharded checkpoint's save, for the kill tests
(test_faults.py). Run as a torchrun script: ``fault_dist_pause.py MARKERS WHERE STEP RANKS -- ARGS``.

WHERE says where the chosen RANKS (comma-separated) stop while saving ``iter_STEP.shards``:
``shard`` (right after the rank wrote its own shard file into the partial folder; the manifest may
be missing) or ``publish`` (rank 0 only: every file is in the partial, just before the one rename).
A stopped rank writes ``MARKERS/rank_R.pid`` and sleeps, so the test can SIGKILL it exactly there.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def _pause(markers: Path) -> None:
    rank = os.environ.get("RANK", "0")
    tmp = markers / f".rank_{rank}.pid"
    tmp.write_text(str(os.getpid()))
    tmp.rename(markers / f"rank_{rank}.pid")
    time.sleep(600)  # the test kills this process meanwhile


def main() -> None:
    markers, where, step, ranks = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
    assert sys.argv[5] == "--"
    args = sys.argv[6:]
    chosen = os.environ.get("RANK", "0") in ranks.split(",")
    target = f"iter_{step}.shards"

    from tunex.io import atomic, sharded

    if where == "shard":
        real_write = sharded.save_sharded

        def write(state, out, *a, **k):
            result = real_write(state, out, *a, **k)
            if chosen and f".{target}.tunex-partial" in Path(out).name:
                _pause(markers)
            return result

        sharded.save_sharded = write
    elif where == "publish":
        real_publish = atomic.publish

        def publish(partial, final, *a, **k):
            if chosen and Path(final).name == target:
                _pause(markers)
            return real_publish(partial, final, *a, **k)

        atomic.publish = publish
    else:
        raise SystemExit(f"unknown pause point {where!r}")

    from tunex.cli import cli

    cli.main(["train", *args], prog_name="tunex")


if __name__ == "__main__":
    main()
