"""One step's numbers for the whole job: every rank trains on its own micro-batches, the log shows
the global step (mean loss over all ranks' micro-batches, and all ranks' tokens, from which the
loop's tokens/s is the job's throughput: ranks run in lockstep, so rank 0's step time is the job's)."""
from __future__ import annotations

import torch

from tunex.dist.env import DistEnv


def reduce_step(env: DistEnv, loss_sum: torch.Tensor, micro_batches: int, tokens: int) -> tuple[float, int]:
    """(mean micro-batch loss over all ranks, tokens of all ranks), the same on every rank.

    One all-reduce of a 3-vector; a lone process only converts. The mean equals a lone run's over
    the same micro-batches, since every rank runs the same number of them.
    """
    if not env.enabled:
        return float(loss_sum) / micro_batches, tokens
    import torch.distributed as dist

    dev = loss_sum.device
    sums = torch.stack([loss_sum.detach().double().reshape(()),
                        torch.tensor(float(micro_batches), dtype=torch.float64, device=dev),
                        torch.tensor(float(tokens), dtype=torch.float64, device=dev)])
    dist.all_reduce(sums)
    return float(sums[0] / sums[1]), int(sums[2])
