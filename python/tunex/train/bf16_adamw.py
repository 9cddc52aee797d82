"""AdamW for bfloat16 parameters (``train.adapter_dtype = "bfloat16"``).

The weights and their gradients stay in bf16; the two moments are kept in float32, the step is
computed in float32 from the bf16 weight, and the result is rounded back to bf16 stochastically
(round up with probability equal to the discarded fraction). Round-to-nearest would drop every
update smaller than half a bf16 ulp (about 0.4% of the weight), which with lr 2e-4 is most of them;
stochastic rounding keeps the expected weight equal to the float32 step's, without a float32 master
copy. Memory per parameter: 2 (weight) + 2 (gradient) + 8 (moments) bytes, against 4 + 4 + 8.
"""

from __future__ import annotations

import torch


def stochastic_round_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """float32 ``x`` to bf16, rounding up or down at random with the probability that makes the
    expectation equal ``x`` (bf16 is float32's top 16 bits: add 16 random low bits, then truncate)."""
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=x.device, generator=generator)
    rounded = (bits + noise) & -65536  # clear the low 16 bits
    finite = torch.isfinite(x)
    out = torch.where(finite, rounded, bits).view(torch.float32)
    return out.to(torch.bfloat16)


def float_moment_step(
    p: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    wd: float,
    t: float,
    grad: torch.Tensor | None = None,
) -> torch.Tensor:
    """AdamW step ``t`` (1-based) of ``p`` with float32 moments ``m``, ``v`` (updated in place):
    the new weight in float32, for the caller to write back (rounded to p's dtype its own way)."""
    g = (p.grad if grad is None else grad).float()
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (v / (1 - beta2**t)).sqrt_().add_(eps)
    w = p.float()
    if wd:
        w.mul_(1 - lr * wd)
    return w.addcdiv_(m, denom, value=-lr / (1 - beta1**t))


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's shard on this rank (its storage), a plain tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


class BF16AdamW(torch.optim.Optimizer):
    """Decoupled-weight-decay Adam (the torch AdamW step) over bf16 parameters with float32 moments
    and stochastic rounding of the updated weight. State per parameter: ``step`` (float32 scalar
    tensor), ``exp_avg`` and ``exp_avg_sq`` (float32), so ``state_dict`` round-trips through a
    checkpoint like torch's AdamW. The rounding noise of parameter ``i`` at step ``t`` is drawn from a
    generator seeded with (``seed``, ``t``, ``i``), so a run resumed from a checkpoint (with the same
    seed) rounds exactly as the uninterrupted one, and data-parallel replicas, which step the same
    averaged gradients, round alike and stay identical. ``seed`` None: ``torch.initial_seed()``
    (which differs per process unless every process seeds torch alike)."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        seed: int | None = None,
    ):
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        self._generators: dict[torch.device, torch.Generator] = {}
        self._seed = seed

    def _generator(self, device: torch.device, step: int, index: int) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device)
        g = self._generators[device]
        seed = torch.initial_seed() if self._seed is None else self._seed
        g.manual_seed((seed * 1_000_003 + step * 65_537 + index) % (1 << 63))
        return g

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's loader casts floating state to the parameter's dtype; the moments stay float32."""
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        for saved_group, group in zip(state_dict["param_groups"], self.param_groups):
            for key, p in zip(saved_group["params"], group["params"]):
                for name in ("exp_avg", "exp_avg_sq"):
                    if key in saved and name in saved[key]:
                        self.state[p][name] = saved[key][name].to(device=p.device, dtype=torch.float32)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = -1
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
                state["step"] += 1
                t = float(state["step"])
                # FSDP2 (train.fsdp): each rank steps its own rows; the moments stay DTensors like p,
                # so a checkpoint gathers them, and the rounding noise is drawn per rank's rows
                w_p, g, m, v = (_local(x) for x in (p, p.grad, state["exp_avg"], state["exp_avg_sq"]))
                w = float_moment_step(w_p, m, v, lr, beta1, beta2, eps, wd, t, grad=g)
                if p.dtype == torch.bfloat16:
                    w_p.copy_(stochastic_round_bf16(w, self._generator(w_p.device, int(t), index)))
                else:
                    w_p.copy_(w)
        return loss
