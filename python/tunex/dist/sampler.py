"""Which micro-batches each rank trains on.

The data order depends on the global batch only (``batch_size x grad_accum x world_size``), never
on how it is split. All ranks build the same stream of sequences: each epoch is ``make_loader``'s
order of global batches for the run's seed and epoch (shuffled; grouped by length for unpacked
data), and epochs follow one another. Optimizer step k takes the stream's k-th run of ``global
batch`` sequences and cuts it into ``grad_accum x world_size`` micro-batches of ``batch_size``:
micro-batch i goes to rank ``i % world_size`` as its accumulation step ``i // world_size``. So with
one seed and global batch 4, the splits 4x1x1, 2x2x1, 2x1x2 and 1x2x2 train on the same sequences
at every step.

The position in the stream is counted in sequences, so a run resumes at a global step whatever the
world size or split it is resumed with. Only a rank's own micro-batches are read and collated.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np


def global_batch(batch_size: int, grad_accum: int, world_size: int) -> int:
    """Sequences per optimizer step: per-device batch x accumulation x world size."""
    return batch_size * grad_accum * world_size


def steps_per_epoch(micro_batches_per_epoch: int, grad_accum: int, world_size: int) -> int:
    per_step = grad_accum * world_size
    return -(-micro_batches_per_epoch // per_step)


def sequence_stream(dataset: Any, global_size: int, seed: int, start: int = 0) -> Iterator[int]:
    """Item indices of the run's sequence stream from position ``start`` on, epoch after epoch."""
    from tunex.data import make_loader

    n = len(dataset)
    if n == 0:
        raise ValueError("the dataset is empty")
    epoch, offset = divmod(start, n)
    while True:
        loader = make_loader(dataset, global_size, seed=seed, epoch=epoch, shuffle=True)
        yield from (int(i) for i in np.concatenate(loader.batches)[offset:])
        epoch, offset = epoch + 1, 0


def rank_micro_batches(
    dataset: Any, batch_size: int, seed: int, consumed: int, rank: int = 0, world_size: int = 1, grad_accum: int = 1
) -> Iterator[dict[str, Any]]:
    """This rank's micro-batches from sequence ``consumed`` of the stream on, without end.

    Args:
        dataset: a :class:`tunex.data.TokenDataset` (or anything ``make_loader`` batches).
        batch_size: sequences per micro-batch (per device).
        seed: the run's seed; each epoch is reshuffled with (seed, epoch).
        consumed: sequences already trained on (by all ranks together): steps x global batch.
        rank, world_size: this process's place in the job.
        grad_accum: micro-batches per rank per optimizer step.
    """
    from tunex.data import collate

    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    size = global_batch(batch_size, grad_accum, world_size)
    stream = sequence_stream(dataset, size, seed, consumed)
    pad_id = getattr(dataset, "pad_id", 0)
    while True:
        step = [next(stream) for _ in range(size)]
        for micro in range(grad_accum):
            first = (micro * world_size + rank) * batch_size
            yield collate([dataset[i] for i in step[first : first + batch_size]], pad_id=pad_id)
