"""A small memorisation task for optimizer tests: LoRA adapters on a frozen random 2-layer MLP fit
64 random key -> value pairs, so an optimizer that loses small updates recalls fewer of them."""

from __future__ import annotations

import torch
from tunex.train.optim import build_optimizer


def memorise(adapter_dtype: torch.dtype, **optimizer) -> tuple[float, torch.optim.Optimizer]:
    """Train the adapters (held in ``adapter_dtype``) for 150 steps with ``build_optimizer(...,
    **optimizer)``; returns the recall (fraction of keys whose argmax is their value) and the
    optimizer."""
    from tunex.peft.lora import LoRALinear

    torch.manual_seed(0)
    n, d, vocab = 64, 48, 64
    keys = torch.randn(n, d)
    values = torch.randperm(vocab)[:n]
    layers = torch.nn.ModuleList([LoRALinear(torch.nn.Linear(d, d), r=8, alpha=16) for _ in range(2)])
    head = LoRALinear(torch.nn.Linear(d, vocab), r=8, alpha=16)
    params = []
    for m in (*layers, head):
        for p in (m.lora_A.weight, m.lora_B.weight):
            p.data = p.data.to(adapter_dtype)
            params.append(p)
    opt = build_optimizer(params, 1e-2, (0.9, 0.999), 0.0, **optimizer)

    def forward():
        x = keys
        for m in layers:
            x = torch.relu(m(x)) + x
        return head(x)

    for _ in range(150):
        loss = torch.nn.functional.cross_entropy(forward(), values)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        return float((forward().argmax(-1) == values).float().mean()), opt
