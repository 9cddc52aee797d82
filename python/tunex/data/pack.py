"""Packing samples into max_length sequences, position ids, and batch orders.

A packed sequence is several whole samples back to back. Each sample keeps its own position ids
(0, 1, ... restarting at every sample), which is how the model knows where samples begin: it
attends only within a run of increasing positions, so no token sees another sample. Samples are
never split across sequences.

Packing is first-fit over a small window of open sequences: each sample (in the given, usually
shuffled, order) goes into the first open sequence with room, and the oldest open sequence is
closed when the window is full. This fills sequences nearly as well as sorting by length would
(short samples fill the gaps long ones leave) while keeping the shuffled order's mixing.
"""

from __future__ import annotations

import numpy as np

OPEN_BINS = 32


def pack(
    lengths: np.ndarray, max_length: int, order: np.ndarray | None = None, open_bins: int = OPEN_BINS
) -> tuple[np.ndarray, np.ndarray]:
    """Group samples into sequences of at most ``max_length`` tokens.

    Args:
        lengths: (S,) tokens per sample; each must be <= max_length.
        max_length: capacity of one sequence.
        order: (S,) the order samples are offered in; default 0..S-1.
        open_bins: how many sequences stay open for later samples to fill.

    Returns:
        (members, starts): sequence k holds samples ``members[starts[k]:starts[k+1]]``.
    """
    n = len(lengths)
    order = np.arange(n, dtype=np.int64) if order is None else np.asarray(order, dtype=np.int64)
    if n and int(lengths.max()) > max_length:
        raise ValueError(f"a sample has {int(lengths.max())} tokens, more than max_length={max_length}")
    members = np.empty(n, dtype=np.int64)
    counts: list[int] = []  # samples per closed sequence
    filled = 0
    room: list[int] = []
    bins: list[list[int]] = []
    block = 1 << 16  # samples converted to Python ints at a time: memory stays flat
    for at in range(0, n, block):
        ids = order[at : at + block]
        for sample, size in zip(ids.tolist(), lengths[ids].tolist()):
            for j, r in enumerate(room):
                if r >= size:
                    room[j] = r - size
                    bins[j].append(sample)
                    break
            else:
                if len(bins) == open_bins:
                    closed = bins.pop(0)
                    room.pop(0)
                    members[filled : filled + len(closed)] = closed
                    filled += len(closed)
                    counts.append(len(closed))
                bins.append([sample])
                room.append(max_length - size)
    for closed in bins:
        members[filled : filled + len(closed)] = closed
        filled += len(closed)
        counts.append(len(closed))
    starts = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=starts[1:])
    return members, starts


def position_ids(lengths: np.ndarray) -> np.ndarray:
    """0..len-1 for each sample, concatenated: (sum(lengths),) int64."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    starts = np.cumsum(lengths) - lengths
    return np.arange(total, dtype=np.int64) - np.repeat(starts, lengths)


def cu_seqlens(position_ids: np.ndarray) -> np.ndarray:
    """Cumulative sample boundaries [0, l0, l0+l1, ..., T] of a 1-D position id row."""
    pos = np.asarray(position_ids)
    begins = np.flatnonzero(pos == 0)
    if len(begins) == 0 or begins[0] != 0:
        begins = np.concatenate(([0], begins))
    return np.concatenate((begins, [len(pos)])).astype(np.int64)


def batch_order(
    n_items: int,
    batch_size: int,
    rng: np.random.Generator | None,
    lengths: np.ndarray | None = None,
    group_by_length: bool = False,
    drop_last: bool = False,
    megabatch: int = 50,
) -> list[np.ndarray]:
    """Item indices for each batch of one epoch.

    With ``group_by_length``, items are shuffled, cut into megabatches of ``megabatch`` batches,
    and sorted by length inside each megabatch, so a batch holds items of similar length (little
    padding) while the epoch order stays random; the batches are then shuffled. Without ``rng``
    the order is 0..n-1.
    """
    idx = rng.permutation(n_items) if rng is not None else np.arange(n_items)
    if group_by_length and lengths is not None and n_items:
        span = batch_size * megabatch
        groups = [idx[i : i + span] for i in range(0, n_items, span)]
        idx = np.concatenate([g[np.argsort(-lengths[g], kind="stable")] for g in groups])
    batches = [idx[i : i + batch_size] for i in range(0, n_items, batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    if group_by_length and rng is not None and len(batches) > 1:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches
