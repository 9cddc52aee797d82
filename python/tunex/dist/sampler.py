"""Which micro-batches each rank trains on.

All ranks build the same micro-batch order (``tunex.data.make_loader`` with the run's seed, epoch
after epoch), so the data order is one global stream of micro-batches of ``batch_size`` sequences.
An optimizer step consumes ``grad_accum x world_size`` consecutive micro-batches of that stream;
rank r takes every world_size-th of them, starting at offset r. A one-process run with
``grad_accum x world_size`` accumulation steps therefore sees exactly the same micro-batches per
step, which is why its loss curve equals the distributed one.

The position in the stream is counted in global micro-batches, so a run resumes at a global step
whatever the world size it is resumed on. Only a rank's own micro-batches are read and collated.
"""
from __future__ import annotations

from typing import Any, Iterator


def global_batch(batch_size: int, grad_accum: int, world_size: int) -> int:
    """Sequences per optimizer step: per-device batch x accumulation x world size."""
    return batch_size * grad_accum * world_size


def steps_per_epoch(micro_batches_per_epoch: int, grad_accum: int, world_size: int) -> int:
    per_step = grad_accum * world_size
    return -(-micro_batches_per_epoch // per_step)


def rank_micro_batches(dataset: Any, batch_size: int, seed: int, consumed: int, per_epoch: int,
                       rank: int = 0, world_size: int = 1) -> Iterator[dict[str, Any]]:
    """This rank's micro-batches from global micro-batch ``consumed`` on, without end.

    Args:
        dataset: a :class:`tunex.data.TokenDataset` (or anything ``make_loader`` batches).
        batch_size: sequences per micro-batch (per device).
        seed: the run's seed; each epoch is reshuffled with (seed, epoch).
        consumed: global micro-batches already trained on (by all ranks together).
        per_epoch: micro-batches in one epoch.
        rank, world_size: this process's slice: global micro-batches consumed+rank,
            consumed+rank+world_size, ...
    """
    from tunex.data import make_loader

    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    epoch, start = divmod(consumed, per_epoch)
    position = consumed
    while True:
        loader = make_loader(dataset, batch_size, seed=seed, epoch=epoch, shuffle=True)
        for indices in loader.batches[start:]:
            if (position - consumed) % world_size == rank:
                yield loader.collate([dataset[int(i)] for i in indices])
            position += 1
        epoch, start = epoch + 1, 0
