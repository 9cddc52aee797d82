"""Sequence parallelism (``train.sequence_parallel = N``), DeepSpeed-Ulysses style.

The world is cut into groups of N consecutive ranks. Every rank of a group gets the group's
micro-batch whole (the data is split over the groups: data parallel over world / N), pads it to a
multiple of N tokens and runs the model on its own N-th of each sequence: embeddings, norms, MLPs,
the output head and the loss see T / N tokens. Around attention, one all-to-all turns the (B, H,
T/N, D) heads of the rank's slice into (B, H/N, T, D): H/N heads over the whole sequence, so each
rank attends with its heads exactly as one process would; a second all-to-all turns the output
back (with fewer key/value heads than ranks, each is repeated for the ranks whose query heads
read it). Packed documents are found in the whole sequence's position ids (the decoder computes them
before the layers are sliced), so attention stays inside each document wherever the cut falls.

Loss: each rank sums the losses of its tokens and divides by ``denom``, the target count of the
step's global batch (tunex.dist.metrics.step_targets, which counts each group's micro-batches once:
every rank of a group holds the same labels), so the shares of all ranks add up to the global
batch's token-mean loss. Backward runs on the share times the world size (the loop's
``grad_scale``): every rank's share flows back through the all-to-alls into the other ranks'
tokens, so the sum of the group's gradients is the gradient of the group's shares, and DDP's or
FSDP2's mean over all world ranks, times the world size, is the one-process gradient of the
global batch's token-mean loss.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from tunex.dist.env import DistEnv
from tunex.errors import TunexError
from tunex.runtime.compose import Standard

IGNORE_INDEX = -100


@dataclass(frozen=True)
class SequenceGroup:
    """This rank's place in a sequence-parallel job.

    Attributes:
        size: ranks per sequence (``train.sequence_parallel``).
        rank: this rank's index in its group: it holds the rank-th 1/size of each sequence.
        dp_rank, dp_size: the group's index among the data-parallel groups, and their count.
        group: the process group of this rank's sequence group.
    """

    size: int
    rank: int
    dp_rank: int
    dp_size: int
    group: Any = None


def plan(env: DistEnv, size: int, source: str = "config") -> SequenceGroup:
    """Form the sequence groups (ranks ``g*size .. g*size+size-1``); every rank must call this.

    Raises:
        TunexError: ``size`` does not divide the world size (naming the key and both numbers).
    """
    if env.world_size % size or env.world_size < size:
        raise TunexError(
            f"{source}: train.sequence_parallel = {size}: expected a divisor of the number of processes "
            f"({env.world_size}; processes = data-parallel x sequence-parallel); launch a multiple of {size} "
            "processes or lower the key"
        )
    mine = None
    for first in range(0, env.world_size, size):  # every rank creates every group, in one order
        group = dist.new_group(list(range(first, first + size)))
        if first <= env.rank < first + size:
            mine = group
    return SequenceGroup(size, env.rank % size, env.rank // size, env.world_size // size, mine)


def check_model(model_cfg: Any, size: int, source: str = "config") -> None:
    """Refuse a model the split cannot serve: the query heads must divide among the ``size`` ranks,
    the key/value heads too or divide ``size`` (then repeated), windowed attention (Mistral,
    Phi-3, Gemma) is not split, and neither is a transformers-backend model's attention.

    Raises:
        TunexError: naming ``train.sequence_parallel``, the model's numbers and the fix.
    """
    from tunex.models.config import ModelConfig

    if not isinstance(model_cfg, ModelConfig):
        raise TunexError(
            f"{source}: train.sequence_parallel = {size}: {model_cfg.family} runs through the transformers backend, "
            "whose attention sequence parallelism does not split (tunex's own decoder only); set "
            "train.sequence_parallel = 1"
        )
    heads, kv = model_cfg.num_heads, model_cfg.num_kv_heads
    if heads % size or (kv % size and size % kv):
        raise TunexError(
            f"{source}: train.sequence_parallel = {size}: expected a divisor of the model's {heads} attention "
            f"heads that its {kv} key/value heads divide or are divided by (each rank attends with heads / {size} "
            "query heads); pick another"
        )
    windowed = model_cfg.sliding_window is not None or model_cfg.layer_types is not None
    if windowed:
        raise TunexError(
            f"{source}: train.sequence_parallel = {size}: {model_cfg.family} attends in sliding windows, "
            "which sequence parallelism does not split; set train.sequence_parallel = 1"
        )


def _all_to_all(x: torch.Tensor, group, scatter: int, gather: int) -> torch.Tensor:
    """Rank i's chunk j of ``x`` along ``scatter`` goes to rank j; what arrives is concatenated
    along ``gather`` in rank order."""
    n = dist.get_world_size(group)
    send = torch.stack(x.chunk(n, dim=scatter)).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(recv.unbind(0), dim=gather)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group, scatter: int, gather: int) -> torch.Tensor:
        ctx.group, ctx.scatter, ctx.gather = group, scatter, gather
        return _all_to_all(x, group, scatter, gather)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_to_all(grad, ctx.group, ctx.gather, ctx.scatter), None, None, None


def heads_to_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """(B, heads, T/N, D) of this rank's slice -> (B, heads/N, T, D) of the whole sequence."""
    return _AllToAll.apply(x, group, 1, 2)


def sequence_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    """The inverse of :func:`heads_to_sequence`."""
    return _AllToAll.apply(x, group, 2, 1)


class _Sharded:
    """What a sliced layer stack passes where the mask goes: the whole sequence's documents
    (tunex.kernels.attention.Documents, or None for plain causal attention)."""

    __slots__ = ("docs",)

    def __init__(self, docs) -> None:
        self.docs = docs


class SequenceParallel(Standard):
    """The default runtime, with the layer stack run on this rank's slice of each sequence and
    attention over the whole sequence (see the module docstring). Slices only inside
    :meth:`sharding` (the training loss); generation and evaluation run unsplit."""

    def __init__(self, group: SequenceGroup) -> None:
        self.sp = group
        self._on = False

    @contextlib.contextmanager
    def sharding(self) -> Iterator[None]:
        self._on = True
        try:
            yield
        finally:
            self._on = False

    def run_layers(self, model, x, cos, sin, mask, cache):
        if not self._on or cache is not None:
            return super().run_layers(model, x, cos, sin, mask, cache)
        if isinstance(mask, torch.Tensor):  # windowed attention: check_model refuses such models
            raise TunexError("sequence parallelism got a dense attention mask; it splits unwindowed attention only")
        part = x.shape[1] // self.sp.size
        cut = slice(self.sp.rank * part, (self.sp.rank + 1) * part)
        x, cos, sin = (t[:, cut].contiguous() for t in (x, cos, sin))
        return super().run_layers(model, x, cos, sin, _Sharded(mask), cache)

    def attention(self, q, k, v, mask, causal, gqa, softcap=None):
        if not isinstance(mask, _Sharded):
            return super().attention(q, k, v, mask, causal, gqa, softcap)
        group = self.sp.group
        if k.shape[1] % self.sp.size:  # fewer key/value heads than ranks: each rank gets a copy of its group's
            k, v = (t.repeat_interleave(self.sp.size // t.shape[1], dim=1) for t in (k, v))
        q, k, v = (heads_to_sequence(t, group) for t in (q, k, v))
        y = super().attention(q, k, v, mask.docs, mask.docs is None, gqa, softcap)
        return sequence_to_heads(y, group)


def pad_to_multiple(
    input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor | None, size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The batch padded on the right to a multiple of ``size`` tokens: the padding is a document of
    its own (positions from 0, labels -100), so it changes no other token's loss or gradient."""
    b, t = input_ids.shape
    pad = -t % size
    if not pad:
        return input_ids, labels, position_ids
    if position_ids is None:
        position_ids = torch.arange(t, device=input_ids.device)[None].expand(b, -1)
    fill = torch.arange(pad, device=input_ids.device)[None].expand(b, -1)
    return (
        torch.cat((input_ids, torch.zeros_like(fill)), dim=1),
        torch.cat((labels, torch.full_like(fill, IGNORE_INDEX)), dim=1),
        torch.cat((position_ids, fill.to(position_ids.dtype)), dim=1),
    )


def local_targets(labels: torch.Tensor, group: SequenceGroup) -> tuple[torch.Tensor, int]:
    """(the targets of this rank's positions, the target count of the whole batch): position t
    predicts label t+1, so the slice is taken from the labels shifted left by one (the last
    position has none)."""
    shifted = torch.cat((labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)), dim=1)
    part = labels.shape[1] // group.size
    count = int((shifted != IGNORE_INDEX).sum())
    return shifted[:, group.rank * part : (group.rank + 1) * part], max(count, 1)


class SequenceLossModule(torch.nn.Module):
    """:class:`tunex.dist.wrap.LossModule` for sequence parallelism: ``forward(input_ids, labels,
    position_ids, denom=None)`` of the group's whole micro-batch -> this rank's share of the loss:
    its tokens' summed loss over ``denom`` (None: over the micro-batch's own target tokens, so the
    group's shares add up to its mean)."""

    def __init__(self, lm: torch.nn.Module, group: SequenceGroup) -> None:
        super().__init__()
        self.lm = lm
        self.sp = group
        decoder = getattr(lm, "model", None)
        if decoder is None or not hasattr(decoder, "runtime"):
            raise TunexError(f"train.sequence_parallel: {type(lm).__name__} is not a tunex decoder")
        self.runtime = SequenceParallel(group)
        decoder.runtime = self.runtime

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor | None,
        denom: float | None = None,
    ) -> torch.Tensor:
        from tunex.train.build import forward_hidden, output_head
        from tunex.train.loss import linear_cross_entropy

        input_ids, labels, position_ids = pad_to_multiple(input_ids, labels, position_ids, self.sp.size)
        with self.runtime.sharding():
            hidden = forward_hidden(self.lm, input_ids, position_ids)  # (B, T/N, C): this rank's slice
        weight, bias = output_head(self.lm)
        targets, count = local_targets(labels, self.sp)
        return linear_cross_entropy(hidden, weight, targets, bias, denom=float(count) if denom is None else denom)
