"""AdamW (float32 or 8-bit moments) and the learning-rate schedule: linear warmup, then cosine, linear or constant (XTuner's
default is 3% warmup then cosine to zero)."""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable

import torch

from tunex.config import OPTIMIZERS


def build_optimizer(
    params: Iterable[torch.nn.Parameter],
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    bf16_adapters: bool = False,
    kind: str = "adamw",
    seed: int | None = None,
) -> torch.optim.Optimizer:
    """The optimizer ``train.optimizer`` names over ``params``.

    ``kind="adamw"``: AdamW, using torch's fused kernel where it takes them (plain tensors all on
    CUDA or all on the CPU; on the CPU too it is the faster step) and the multi-tensor (foreach)
    path elsewhere (sharded parameters): both are mathematically the plain AdamW step, only faster.
    On the CPU it is :class:`EagerAdamW` (the same step, without importing ``torch._dynamo``).
    ``bf16_adapters``: bf16 parameters, stepped by ``BF16AdamW`` (float32 moments, stochastic
    rounding of the weight). ``"adamw_8bit"`` / ``"paged_adamw_8bit"``: ``AdamW8bit`` (8-bit
    blockwise moments; paged: kept in host memory), for float32 and bf16 parameters alike;
    ``seed`` seeds the bf16 rounding of both (None: ``torch.initial_seed()``).
    """
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: method.kind selects nothing to train")
    if kind not in OPTIMIZERS:
        raise ValueError(f"train.optimizer: expected one of {', '.join(map(repr, OPTIMIZERS))}, got {kind!r}")
    if kind != "adamw":
        from tunex.train import adamw_8bit

        if not all(type(p.data) is torch.Tensor for p in params):
            raise ValueError(
                f"train.optimizer: {kind!r} steps plain tensors, not FSDP2 shards (a full fine-tune under "
                "torchrun); use 'adamw' there"
            )
        return adamw_8bit.AdamW8bit(
            params,
            lr=lr,
            betas=tuple(betas),
            weight_decay=weight_decay,
            paged=kind == "paged_adamw_8bit",
            min_8bit_size=adamw_8bit.MIN_8BIT_SIZE,
            seed=seed,
        )
    if bf16_adapters:  # train.adapter_dtype = "bfloat16": float32 moments, stochastic rounding
        from tunex.train.bf16_adamw import BF16AdamW

        return BF16AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, seed=seed)
    plain = all(type(p.data) is torch.Tensor for p in params)  # not DTensor shards (FSDP2)
    one_device = all(p.is_cuda for p in params) or all(p.device.type == "cpu" for p in params)
    if plain and one_device:
        adamw = EagerAdamW if params[0].device.type == "cpu" else torch.optim.AdamW
        try:
            return adamw(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, fused=True)
        except RuntimeError:  # a dtype or device this torch's fused kernel does not take
            pass
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, foreach=True)


class EagerAdamW(torch.optim.AdamW):
    """torch's AdamW whose methods run without torch's wrappers for ``torch.compile`` (what the CPU
    training path builds).

    torch wraps ``step``, ``zero_grad``, ``add_param_group``, ``state_dict`` and
    ``load_state_dict`` in functions whose first call imports ``torch._dynamo``, and with it triton
    and sympy: about 150 MB resident for the rest of the process, in a training process that
    compiles nothing. Outside a compiled region those wrappers only forward the call (``step``'s
    also turns autograd off, as here), so the update is torch's own, bit for bit; step hooks and
    the profiler's step record still apply.
    """

    add_param_group = inspect.unwrap(torch.optim.Optimizer.add_param_group)
    zero_grad = inspect.unwrap(torch.optim.Optimizer.zero_grad)
    state_dict = inspect.unwrap(torch.optim.Optimizer.state_dict)
    load_state_dict = inspect.unwrap(torch.optim.Optimizer.load_state_dict)

    @torch.no_grad()
    def step(self, closure=None):
        return _ADAMW_STEP(self, closure)


_ADAMW_STEP = inspect.unwrap(torch.optim.AdamW.step)


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based) of ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    span = max(total - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    if kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float, kind: str
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR following ``lr_factor``; its state_dict is plain numbers (checkpoint-safe)."""
    warmup = int(round(total_steps * warmup_ratio))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _Schedule(total_steps, warmup, kind))


class _Schedule:
    """Picklable-free callable: LambdaLR stores only its step count, the schedule is rebuilt from
    the config on resume."""

    def __init__(self, total: int, warmup: int, kind: str) -> None:
        self.total, self.warmup, self.kind = total, warmup, kind

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.total, self.warmup, self.kind)
