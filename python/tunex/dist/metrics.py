"""One step's numbers for the whole job: every rank trains on its own micro-batches, the log shows
the global step (mean token loss over all ranks' micro-batches, and all ranks' tokens, from which
the loop's tokens/s is the job's throughput: ranks run in lockstep, so rank 0's step time is the job's)."""

from __future__ import annotations

import torch

from tunex.dist.env import DistEnv


def step_targets(env: DistEnv, labels: list[torch.Tensor], device: torch.device) -> float:
    """Target tokens of the whole global batch (all ranks' micro-batches of one step), at least 1:
    what every micro-batch's summed token loss is divided by.

    ``labels``: this rank's micro-batches' labels, given at input positions (the loss shifts them,
    so a row's first label never counts). One all-reduce of a scalar under a process group.
    """
    from tunex.train.loss import target_tokens

    count = sum(target_tokens(y) for y in labels)
    if env.enabled:
        import torch.distributed as dist

        total = torch.tensor(float(count), dtype=torch.float64, device=device)
        dist.all_reduce(total)
        count = int(total)
    return float(max(count, 1))


def reduce_step(env: DistEnv, loss_sum: torch.Tensor, tokens: int) -> tuple[float, int]:
    """(mean token loss of the global batch, tokens of all ranks), the same on every rank.

    ``loss_sum``: this rank's micro-batch losses added up, each its summed token loss over the global
    batch's target tokens (see step_targets), so the sum over ranks is the global batch's mean token
    loss. One all-reduce of a 2-vector; a lone process only converts.
    """
    if not env.enabled:
        return float(loss_sum), tokens
    import torch.distributed as dist

    dev = loss_sum.device
    sums = torch.stack(
        [loss_sum.detach().double().reshape(()), torch.tensor(float(tokens), dtype=torch.float64, device=dev)]
    )
    dist.all_reduce(sums)
    return float(sums[0]), int(sums[1])
