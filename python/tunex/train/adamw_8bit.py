"""8-bit blockwise AdamW (``train.optimizer = "adamw_8bit"`` or ``"paged_adamw_8bit"``).

The scheme of bitsandbytes' blockwise 8-bit Adam (Dettmers et al., "8-bit Optimizers via Block-wise
Quantization"), implemented by tunex: each moment is stored as one byte per element, an index into
a 256-entry *dynamic* code table (signed for m, unsigned for v), scaled by one float32 absmax per
block of 256 elements. A step dequantizes the moments, updates them and the weight in float32,
and requantizes each moment to its nearest code under its block's new absmax. State per parameter:
2 bytes + 8 bytes per 256 elements, against 8 bytes for float32 moments.

Where the step runs: CUDA tensors take the Triton kernel (tunex/kernels/adamw_8bit_triton.py),
float32 and bf16 CPU tensors the Rust step (rust/src/adamw8bit.rs); the torch path below computes
the same float32 operations in the same order (``backend="torch"``, or where neither applies).

As in bitsandbytes: tensors under ``min_8bit_size`` elements (4096) keep float32 moments; a
non-finite gradient element gets zero moments and leaves its weight unchanged; a moment code of m
never has the other sign than m. Weight decay comes before the Adam update (torch's AdamW order).
bf16 weights are rounded stochastically (as in BF16AdamW) with a counter-based draw of (seed,
element index), the seed derived from (the run's seed, step, parameter index), so a resumed run
steps exactly as the uninterrupted one.

``paged=True`` (``paged_adamw_8bit``): the 8-bit state lives in host memory (pinned when the
parameters are on CUDA) and each parameter's state is copied to one reused device buffer for its
step and back, so the GPU holds the state of one parameter at a time. On the CPU it is adamw_8bit.
"""

from __future__ import annotations

import math

import torch

from tunex.errors import TunexError
from tunex.kernels import registry
from tunex.train.bf16_adamw import float_moment_step, stochastic_round_bf16

BLOCK = 256  # elements per absmax block, as in bitsandbytes' blockwise optimizers
MIN_8BIT_SIZE = 4096  # smaller tensors keep float32 moments (bitsandbytes' min_8bit_size)
_MASK32 = 0xFFFFFFFF


def dynamic_map(signed: bool) -> torch.Tensor:
    """The 256-entry dynamic quantization table, sorted ascending, float32.

    Seven decades 10^-6 .. 10^0; decade ``k`` holds the midpoints of ``2^k`` (signed: each with
    both signs) or ``2^(k+1)`` (unsigned) equal steps of [0.1, 1] scaled by ``10^(k-6)``, plus the
    entries 0 and 1: fine steps near zero, coarse ones near the absmax.
    """
    values = [0.0, 1.0]
    for k in range(7):
        steps = 2**k if signed else 2 ** (k + 1)
        edges = torch.linspace(0.1, 1, steps + 1, dtype=torch.float32)
        mids = ((edges[:-1] + edges[1:]) / 2.0) * 10.0 ** (k - 6)
        values += mids.tolist()
        if signed:
            values += (-mids).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """rust/src/dropout.rs::mix on uint32 values held in int64."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def stream_key(seed: int, high: int = 0) -> int:
    """rust/src/dropout.rs::key: the 32-bit key of elements whose index has the high half ``high``."""

    def mix(x: int) -> int:
        return int(_mix(torch.tensor([x & _MASK32], dtype=torch.int64))[0])

    return mix(mix((seed >> 32) & _MASK32 ^ (high * 0x9E3779B9) & _MASK32) ^ seed & _MASK32)


def draws(seed: int, n: int, device: torch.device) -> torch.Tensor:
    """The 32-bit draws (int64) of elements 0..n-1 under ``seed`` (rust/src/dropout.rs::draw)."""
    index = torch.arange(n, dtype=torch.int64, device=device)
    out = torch.empty_like(index)
    for high in range((n - 1 >> 32) + 1 if n else 0):
        part = slice(high << 32, (high + 1) << 32)
        out[part] = _mix((index[part] & _MASK32) ^ stream_key(seed, high))
    return out


def _round_bf16(w: torch.Tensor, seed: int) -> torch.Tensor:
    """float32 ``w`` (flat) to bf16, rounded with the draws of ``seed`` (the Rust and Triton rule)."""
    bits = w.view(torch.int32).to(torch.int64) & _MASK32
    noise = draws(seed, w.numel(), w.device) >> 16
    rounded = torch.where(torch.isfinite(w), (bits + noise) & 0xFFFF0000, bits & 0xFFFF0000)
    return (rounded - ((rounded >> 31) << 32)).to(torch.int32).view(torch.float32).to(torch.bfloat16)


def _nearest(table: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    lo = (torch.searchsorted(table, x, right=True) - 1).clamp_(0, table.numel() - 2)
    below, above = table[lo], table[lo + 1]
    return torch.where(x - below <= above - x, lo, lo + 1)


def _step_torch(p, g, codes, absmax, maps, scalars, seed: int) -> None:
    """The step in torch float32 ops, in the order of the Rust and Triton steps."""
    f32 = torch.float32
    beta1, beta2, keep1, keep2, eps, step_size, inv_sqrt_bc2, decay = (
        torch.tensor(s, dtype=f32, device=p.device) for s in scalars
    )
    n = p.numel()
    gf = g.reshape(-1).to(f32)
    ok = torch.isfinite(gf)
    gz = torch.where(ok, gf, 0.0)
    a1 = absmax[0].repeat_interleave(BLOCK)[:n]
    a2 = absmax[1].repeat_interleave(BLOCK)[:n]
    m = torch.where(ok, maps[0][codes[0].reshape(-1).long()] * a1 * beta1 + keep1 * gz, 0.0)
    v = torch.where(ok, maps[1][codes[1].reshape(-1).long()] * a2 * beta2 + keep2 * gz * gz, 0.0)
    flat = p.view(-1)
    w = flat.to(f32) * decay
    root = v.double().sqrt().to(f32)  # correctly rounded, as sqrt_rn and Rust's sqrt (torch's float32 sqrt is not)
    w = w - step_size * (m / (root * inv_sqrt_bc2 + eps))
    new = _round_bf16(w, seed) if p.dtype == torch.bfloat16 else w.to(p.dtype)
    flat.copy_(torch.where(ok, new, flat))

    pad = (-n) % BLOCK
    max1 = torch.nn.functional.pad(m.abs(), (0, pad)).view(-1, BLOCK).amax(1)
    max2 = torch.nn.functional.pad(v, (0, pad)).view(-1, BLOCK).amax(1)
    absmax[0].copy_(max1)
    absmax[1].copy_(max2)
    e1, e2 = max1.repeat_interleave(BLOCK)[:n], max2.repeat_interleave(BLOCK)[:n]
    x1 = torch.where(e1 > 0, m / e1.clamp_min(1e-38), 0.0)
    x2 = torch.where(e2 > 0, v / e2.clamp_min(1e-38), 0.0)
    q1 = _nearest(maps[0], x1)
    neg = torch.signbit(m)
    flip = torch.signbit(maps[0][q1]) != neg
    q1 = torch.where(flip, torch.where(neg, (q1 - 1).clamp_min(0), (q1 + 1).clamp_max(255)), q1)
    codes[0].view(-1).copy_(q1)
    codes[1].view(-1).copy_(_nearest(maps[1], x2))


def _step_native(p, g, codes, absmax, maps, scalars, seed: int) -> None:
    from tunex.kernels._dispatch import host_flat

    c = (host_flat(codes[0]), host_flat(codes[1]))
    a = (host_flat(absmax[0]), host_flat(absmax[1]))
    t = (host_flat(maps[0]), host_flat(maps[1]))
    if p.dtype == torch.float32:
        registry.native("adamw_8bit_step_f32")(host_flat(p), host_flat(g), c, a, t, scalars)
    else:
        bits = (host_flat(p.view(torch.int16)), host_flat(g.view(torch.int16)))
        registry.native("adamw_8bit_step_bf16")(*bits, c, a, t, scalars, seed)


def blockwise_step(
    p: torch.Tensor,
    g: torch.Tensor,
    codes: tuple[torch.Tensor, torch.Tensor],
    absmax: tuple[torch.Tensor, torch.Tensor],
    maps: tuple[torch.Tensor, torch.Tensor],
    scalars: tuple[float, ...],
    seed: int,
    backend: str = "auto",
) -> str:
    """One 8-bit AdamW step of contiguous ``p`` (float32 or bf16) with gradient ``g`` (same dtype),
    in place on ``p``, ``codes`` (m, v: uint8, p's size) and ``absmax`` (m, v: float32, one per 256
    elements). ``scalars``: :func:`step_scalars`. Returns the path taken: "triton", "native" or "torch".

    Raises:
        TunexError: the Rust step is missing from the built extension and TUNEX_REQUIRE_NATIVE=1.
    """
    impl = registry.choose("adamw_8bit", registry.Facts(p.device.type, p.dtype, backend=backend, rows=p.numel()))
    if impl == "triton":
        from tunex.kernels import adamw_8bit_triton

        adamw_8bit_triton.step(p, g, codes, absmax, maps, scalars, stream_key(seed))
    elif impl in ("native", "native-bf16"):
        _step_native(p, g, codes, absmax, maps, scalars, seed)
    else:
        _step_torch(p, g, codes, absmax, maps, scalars, seed)
    return "native" if impl == "native-bf16" else impl


def step_scalars(lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, t: int) -> tuple:
    """The scalars of step ``t`` (1-based), computed once in float64, in the order every step
    implementation takes them: (beta1, beta2, 1 - beta1, 1 - beta2, eps, lr / (1 - beta1^t),
    1 / sqrt(1 - beta2^t), 1 - lr * weight_decay)."""
    bc1, bc2 = 1 - beta1**t, 1 - beta2**t
    return (beta1, beta2, 1 - beta1, 1 - beta2, eps, lr / bc1, 1 / math.sqrt(bc2), 1 - lr * weight_decay)


class AdamW8bit(torch.optim.Optimizer):
    """Decoupled-weight-decay Adam with 8-bit blockwise moments (see the module docstring).

    ``seed`` (default ``torch.initial_seed()``) seeds the bf16 rounding draws; the trainer passes
    ``train.seed``, so data-parallel ranks (seeded apart for dropout) round their replicas alike.
    State per parameter: ``step`` (float32 scalar tensor) and either ``state1``/``state2`` (uint8
    codes of m and v, the parameter's shape) with ``absmax1``/``absmax2`` (float32, one per 256
    elements), or, under ``min_8bit_size`` elements, float32 ``exp_avg``/``exp_avg_sq``. The state
    dict round-trips through a checkpoint; loading keeps the codes uint8, the absmax float32 and,
    when ``paged``, the 8-bit state in host memory.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        paged: bool = False,
        min_8bit_size: int = MIN_8BIT_SIZE,
        backend: str = "auto",
        seed: int | None = None,
    ):
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        self.paged, self.min_8bit_size, self.backend, self.seed = paged, min_8bit_size, backend, seed
        self._maps: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._scratch: dict[torch.device, dict[str, torch.Tensor]] = {}
        self.last_paths: set[str] = set()  # the paths the last step took (tests read it)

    def _maps_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._maps:
            self._maps[device] = (dynamic_map(True).to(device), dynamic_map(False).to(device))
        return self._maps[device]

    def _host(self, p: torch.Tensor) -> bool:
        """Whether p's 8-bit state is kept in host memory away from p (paged, p on an accelerator)."""
        return self.paged and p.device.type != "cpu"

    def _new_state(self, p: torch.Tensor) -> dict:
        state = {"step": torch.zeros((), dtype=torch.float32)}
        if p.numel() < self.min_8bit_size:
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
            return state
        device = torch.device("cpu") if self._host(p) else p.device
        pin = self._host(p) and p.is_cuda
        blocks = -(-p.numel() // BLOCK)
        for i in (1, 2):
            state[f"state{i}"] = torch.zeros(p.shape, dtype=torch.uint8, device=device, pin_memory=pin)
            state[f"absmax{i}"] = torch.zeros(blocks, dtype=torch.float32, device=device, pin_memory=pin)
        return state

    def _seed(self, step: int, index: int) -> int:
        base = torch.initial_seed() if self.seed is None else self.seed
        return (base * 1_000_003 + step * 65_537 + index) % (1 << 63)

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's loader casts floating state to the parameter's dtype and device; the absmax and
        float32 moments stay float32, and a paged optimizer keeps its 8-bit state in host memory."""
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        for saved_group, group in zip(state_dict["param_groups"], self.param_groups):
            for key, p in zip(saved_group["params"], group["params"]):
                if key not in saved:
                    continue
                state = self.state[p]
                host = self._host(p) and "state1" in saved[key]
                device = torch.device("cpu") if host else p.device
                for name in ("state1", "state2", "absmax1", "absmax2", "exp_avg", "exp_avg_sq"):
                    if name in saved[key]:
                        dtype = torch.uint8 if name.startswith("state") else torch.float32
                        value = saved[key][name].to(device=device, dtype=dtype)
                        state[name] = value.pin_memory() if host and p.is_cuda else value.contiguous()

    def _device_copy(self, p: torch.Tensor, state: dict) -> tuple[tuple, tuple]:
        """The 8-bit state of ``p`` in one reused device buffer (paged), else the state itself."""
        names = ("state1", "state2", "absmax1", "absmax2")
        if not self._host(p):
            return (state["state1"], state["state2"]), (state["absmax1"], state["absmax2"])
        scratch = self._scratch.setdefault(p.device, {})
        views = []
        for name in names:
            src = state[name]
            buf = scratch.get(name)
            if buf is None or buf.numel() < src.numel():
                buf = scratch[name] = torch.empty(src.numel(), dtype=src.dtype, device=p.device)
            view = buf[: src.numel()].view(src.shape)
            view.copy_(src, non_blocking=True)
            views.append(view)
        return (views[0], views[1]), (views[2], views[3])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.last_paths = set()
        index = -1
        paged_cuda = False
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise TunexError("adamw_8bit: sparse gradients are not supported")
                state = self.state[p]
                if not state:
                    state.update(self._new_state(p))
                state["step"] += 1
                t = int(state["step"])
                seed = self._seed(t, index)
                if "exp_avg" in state:
                    self._float_step(p, state, (lr, beta1, beta2, eps, wd), t, seed)
                    self.last_paths.add("float32 moments")
                    continue
                scalars = step_scalars(lr, beta1, beta2, eps, wd, t)
                codes, absmax = self._device_copy(p, state)
                w = p.data if p.data.is_contiguous() else p.data.contiguous()
                g = p.grad.to(p.dtype).contiguous()
                path = blockwise_step(w, g, codes, absmax, self._maps_on(p.device), scalars, seed, self.backend)
                self.last_paths.add(path)
                if w is not p.data:
                    p.data.copy_(w)
                if self._host(p):  # back to host memory; the next parameter reuses the buffer
                    for name, src in zip(("state1", "state2", "absmax1", "absmax2"), (*codes, *absmax)):
                        state[name].copy_(src, non_blocking=True)
                    paged_cuda = paged_cuda or p.is_cuda
        if paged_cuda:  # the host copies must be complete before anyone reads the state
            torch.cuda.current_stream().synchronize()
        return loss

    @staticmethod
    def _float_step(p: torch.Tensor, state: dict, hyper: tuple, t: int, seed: int) -> None:
        """A small tensor's step with float32 moments (bitsandbytes' 32-bit path for tensors under
        min_8bit_size); bf16 weights rounded stochastically."""
        w = float_moment_step(p, state["exp_avg"], state["exp_avg_sq"], *hyper, t)
        if p.dtype == torch.bfloat16:
            generator = torch.Generator(device=p.device).manual_seed(seed)
            p.copy_(stochastic_round_bf16(w, generator))
        else:
            p.copy_(w)
