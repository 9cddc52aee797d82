"""``tunex train CFG --nproc-per-node N``: re-execute the same command under torchrun.

The launcher settings come from the command line or, as with XTuner, from the environment:

    NPROC_PER_NODE  processes on this node (one per GPU)        --nproc-per-node
    NNODES          nodes in the job (default 1)                 --nnodes
    NODE_RANK       this node's index, 0 .. NNODES-1 (default 0)
    ADDR            node 0's address (default 127.0.0.1)
    PORT            a free TCP port on node 0 (default 29500; on one node a free port is picked)

A process torchrun started (it has LOCAL_RANK set) never relaunches, so ``torchrun -m tunex train
CFG`` works the same, and one process on one node is the plain run without a launcher.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from tunex.errors import TunexError

DEFAULT_ADDR = "127.0.0.1"
DEFAULT_PORT = 29500


@dataclass(frozen=True)
class LaunchPlan:
    nproc_per_node: int
    nnodes: int = 1
    node_rank: int = 0
    addr: str = DEFAULT_ADDR
    port: int | None = None

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


def under_torchrun(environ: dict[str, str] | None = None) -> bool:
    """True inside a worker that torchrun started."""
    env = os.environ if environ is None else environ
    return "LOCAL_RANK" in env or "TORCHELASTIC_RUN_ID" in env


def _positive(name: str, raw: str | int | None, default: int, lo: int = 1) -> int:
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except (TypeError, ValueError):
        value = lo - 1
    if value < lo:
        raise TunexError(f"{name}={raw!r}: expected an integer >= {lo}")
    return value


def plan_launch(
    nproc_per_node: int | None = None, nnodes: int | None = None, environ: dict[str, str] | None = None
) -> LaunchPlan | None:
    """The torchrun job to start, or None to train in this process.

    Command-line values win over the environment variables; None when already under torchrun or
    when the job is one process on one node.

    Raises:
        TunexError: a value that is not a positive integer, or NODE_RANK outside 0..NNODES-1.
    """
    env = os.environ if environ is None else environ
    if under_torchrun(env):
        return None
    nproc = _positive(
        "--nproc-per-node" if nproc_per_node is not None else "NPROC_PER_NODE",
        nproc_per_node if nproc_per_node is not None else env.get("NPROC_PER_NODE"),
        1,
    )
    nodes = _positive(
        "--nnodes" if nnodes is not None else "NNODES", nnodes if nnodes is not None else env.get("NNODES"), 1
    )
    node_rank = _positive("NODE_RANK", env.get("NODE_RANK"), 0, lo=0)
    if node_rank >= nodes:
        raise TunexError(f"NODE_RANK={node_rank}: expected 0 .. {nodes - 1} for NNODES={nodes}")
    port = _positive("PORT", env.get("PORT"), 0) or None
    if port is not None and port > 65535:
        raise TunexError(f"PORT={port}: expected a TCP port from 1 to 65535")
    if nproc == 1 and nodes == 1:
        return None
    return LaunchPlan(nproc, nodes, node_rank, env.get("ADDR") or DEFAULT_ADDR, port)


def torchrun_argv(plan: LaunchPlan, tunex_args: list[str], python: str | None = None) -> list[str]:
    """``python -m torch.distributed.run <plan> -m tunex <tunex_args>``."""
    argv = [python or sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(plan.nproc_per_node)]
    if plan.nnodes == 1 and plan.port is None:
        argv.append("--standalone")  # a free local port: several one-node jobs may share a machine
    else:
        argv += [
            "--nnodes",
            str(plan.nnodes),
            "--node-rank",
            str(plan.node_rank),
            "--master-addr",
            plan.addr,
            "--master-port",
            str(plan.port or DEFAULT_PORT),
        ]
    return argv + ["-m", "tunex", *tunex_args]


def relaunch(plan: LaunchPlan, tunex_args: list[str]) -> None:
    """Replace this process by torchrun running ``tunex <tunex_args>`` in every worker; torchrun's
    exit status becomes the command's (non-zero when any rank failed)."""
    argv = torchrun_argv(plan, tunex_args)
    sys.stdout.flush()
    sys.stderr.flush()
    if os.name == "posix":
        os.execv(argv[0], argv)
    import subprocess

    sys.exit(subprocess.call(argv))
