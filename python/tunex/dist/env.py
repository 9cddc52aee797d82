"""Where this process stands in a torch.distributed job, and joining it.

torchrun (or ``tunex train --nproc-per-node N``, which re-executes itself under torchrun) puts
RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT in each worker's environment. A process
without them, or with WORLD_SIZE=1, trains alone: no process group is created, so a one-process
torchrun run is the plain single-device run.

The backend follows the device: NCCL when the worker has a CUDA device, gloo on the CPU. Every
collective waits at most ``TUNEX_DIST_TIMEOUT`` seconds (default 600), so a rank that dies or hangs
brings the others down with an error instead of a silent, endless wait.
"""

from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tunex.errors import TunexError

DEFAULT_TIMEOUT_S = 600
TIMEOUT_VAR = "TUNEX_DIST_TIMEOUT"
# The variables torchrun sets for every worker; LOCAL_RANK alone marks a worker it started.
TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE")


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job.

    Attributes:
        rank: global rank, 0 .. world_size-1.
        local_rank: rank on this node; picks the CUDA device.
        world_size: processes in the job.
        backend: "nccl", "gloo", or None when training alone.
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        """True when there are peers to talk to (a process group exists)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes metrics, plots, eval answers and replicated files."""
        return self.rank == 0


def _int_var(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise TunexError(
            f"environment variable {name}={raw!r}: expected an integer "
            "(torchrun sets it; unset it to train in one process)"
        ) from None


def read_env() -> DistEnv:
    """(rank, local_rank, world_size) from torchrun's variables; a lone process is rank 0 of 1."""
    world = _int_var("WORLD_SIZE", 1)
    rank = _int_var("RANK", 0)
    local = _int_var("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise TunexError(
            f"environment: RANK={rank} WORLD_SIZE={world} is not a valid rank; "
            "expected 0 <= RANK < WORLD_SIZE (launch with torchrun, or unset both)"
        )
    return DistEnv(rank=rank, local_rank=local, world_size=world)


def timeout() -> datetime.timedelta:
    """How long a collective may wait for a peer: ``TUNEX_DIST_TIMEOUT`` seconds (default 600)."""
    from tunex import settings

    raw = settings.get(TIMEOUT_VAR)
    try:
        seconds = int(raw)
    except ValueError:
        raise TunexError(f"environment variable {TIMEOUT_VAR}={raw!r}: expected an integer number of seconds") from None
    if seconds < 1:
        raise TunexError(f"environment variable {TIMEOUT_VAR}={seconds}: expected seconds >= 1")
    return datetime.timedelta(seconds=seconds)


def pick_backend(use_cuda: bool | None = None) -> str:
    """NCCL for CUDA workers, gloo for CPU workers."""
    if use_cuda is None:
        use_cuda = torch.cuda.is_available()
    return "nccl" if use_cuda and dist.is_nccl_available() else "gloo"


def init_distributed(use_cuda: bool | None = None) -> DistEnv:
    """Join the job described by the environment (idempotent); a lone process joins nothing.

    The CUDA device is set from LOCAL_RANK before NCCL starts, so each worker owns one GPU.

    Raises:
        TunexError: bad torchrun variables, or torch built without distributed support.
    """
    env = read_env()
    if not env.enabled:
        return env
    if not dist.is_available():
        raise TunexError(
            f"WORLD_SIZE={env.world_size} but this torch build has no torch.distributed; "
            "install a torch with distributed support or launch one process"
        )
    backend = pick_backend(use_cuda)
    if dist.is_initialized():
        return DistEnv(env.rank, env.local_rank, env.world_size, dist.get_backend())
    kwargs = {}
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
        kwargs["device_id"] = torch.device("cuda", env.local_rank)
    dist.init_process_group(backend, timeout=timeout(), **kwargs)
    return DistEnv(env.rank, env.local_rank, env.world_size, backend)


def shutdown() -> None:
    """Leave the process group (after the last collective)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def broadcast_object(env: DistEnv, value: object) -> object:
    """Rank 0's ``value`` on every rank (for decisions rank 0 alone makes, e.g. a path)."""
    if not env.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(env: DistEnv, value: object) -> list[object]:
    """Every rank's ``value``, in rank order, on every rank."""
    if not env.enabled:
        return [value]
    out: list[object] = [None] * env.world_size
    dist.all_gather_object(out, value)
    return out


def rank_seed(seed: int, rank: int) -> int:
    """A per-rank seed for dropout masks: rank 0 keeps ``seed`` (so its masks are the lone run's)."""
    return seed + 1_000_003 * rank


def seed_all(seed: int) -> None:
    """Python's and torch's generators (CPU and every CUDA device)."""
    random.seed(seed)
    torch.manual_seed(seed)
