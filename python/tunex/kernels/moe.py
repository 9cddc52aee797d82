"""Mixture-of-experts SwiGLU experts as one autograd node: dispatch, the experts and the combine.

``out[t] = sum_j weights[t, j] * expert_{chosen[t, j]}(x[t])`` with each expert
``down(silu(gate(x)) * up(x))``, for the N*k (row, slot) pairs of a top-k routing.

The pairs are sorted by expert once (a stable argsort of the expert ids: a permutation ``order``
of the N*k pairs, and its inverse ``inv``). Forward:

    xs = x[order // k]                    (S, H)  rows in expert order, one gather
    ys[run_e] = expert_e(xs[run_e])       (S, H)  one product per projection per expert with rows,
                                                  written into one buffer (no cat)
    out = sum_j w[:, j] * ys[inv].view(N, k, H)[:, j]     un-permuted by a gather, the k slots summed
                                                  (a batched (1, k) @ (k, H) product per row)

Backward (G = dout rows in expert order, one gather, unweighted):

    per expert: the down backward on G gives d_act (for G, the adapter's gradients for w * G);
    SwiGLU's weighted backward (one pass) rebuilds act = silu(g) * u, gives
    d_w[pair] = <d_act, act> (= <G, ys>: the down projection's adjoint moved over, so ys is not
    kept) and the gate/up gradients of w * d_act; the gate and up input gradients accumulate in
    the expert's rows of G (read by then)
    d_w = d_w_sorted[inv]                          the routing weights' gradient (to the router)
    dx = sum_j dxs[inv].view(N, k, H)[:, j]       the inverse permutation again: a gather per slot, no scatter-add

Each projection is a frozen base (a weight, or a callable dequantizing a 4-bit one) with an optional
LoRA adapter (``dy = x W^T + s (drop(x) A^T) B^T``, the backward as tunex.kernels.lora's), so the
adapters of every expert get their gradients from this node. Saved: the input x (only when a gate/up
adapter needs it: backward gathers each expert's rows from it again, half the size of the sorted
rows; not even that when the caller gives a rebuild of x, the decoder's lean norm), the gate and up
pre-activations of all experts in one (S, I) block each and the adapters' (rows, r) products;
SwiGLU's output is rebuilt in backward (for the routing weights' gradient and the down adapter). The
two (S, I) blocks are kept tensors (tunex.kernels.kept): in CPU training they lie in the runtime's
activation arena, one size every step, instead of per-expert pieces of new sizes each step in the
heap. The products' shapes follow each expert's share of the batch, new each step, so they run
torch's matmul (the node runs in ``registry.varying_shapes``), never oneDNN (which builds and caches
a kernel per shape: slower here, and a cache that grows by hundreds of MB); SwiGLU runs tunex's
native kernels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from tunex.kernels import registry
from tunex.kernels._dispatch import (
    compute_dtype,
    frozen_product_dtype,
    host_flat,
    matmul_nt_in,
    no_autocast,
    use_triton,
)
from tunex.kernels.kept import kept_empty
from tunex.kernels.lora import _dense, _Dropout, _native_add_up, _native_down, _native_grad_a
from tunex.kernels.swiglu import _forward_torch as _swiglu_forward
from tunex.kernels.swiglu import backward_weighted as _swiglu_backward_weighted


@dataclass(frozen=True)
class Projection:
    """One expert projection: ``base`` (the frozen (out, in) weight, or a callable returning it in
    the dtype it is given) and an optional adapter (``lora_a`` (r, in), ``lora_b`` (out, r),
    ``scaling``, ``dropout`` probability)."""

    base: torch.Tensor | Callable[[torch.dtype], torch.Tensor]
    lora_a: torch.Tensor | None = None
    lora_b: torch.Tensor | None = None
    scaling: float = 1.0
    dropout: float = 0.0


def projection_of(module: torch.nn.Module) -> Projection | None:
    """The :class:`Projection` of an expert's linear layer, or None where the grouped node does not
    run it: a plain ``nn.Linear`` with a frozen weight, a LoRA layer (tunex.peft.LoRALinear: its
    ``lora_A``/``lora_B``, no DoRA) over a frozen dense or 4-bit base, or a frozen 4-bit layer
    (``dequantize``); none of them with a bias."""
    if getattr(module, "bias", None) is not None:
        return None
    if type(module) is torch.nn.Linear:
        return None if module.weight.requires_grad else Projection(module.weight)
    lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
    if lora_a is not None and lora_b is not None:
        if getattr(module, "lora_magnitude_vector", None) is not None:
            return None  # DoRA keeps its own path
        base_layer = getattr(module, "base_layer", None)
        if base_layer is None:
            if module.weight.requires_grad:
                return None
            base = module.weight
        else:
            if getattr(base_layer, "bias", None) is not None or any(p.requires_grad for p in base_layer.parameters()):
                return None
            base = base_layer.dequantize
        drop = module.lora_dropout
        p = float(drop.p) if isinstance(drop, torch.nn.Dropout) and module.training else 0.0
        return Projection(base, lora_a.weight, lora_b.weight, float(module.scaling), p)
    if callable(getattr(module, "dequantize", None)) and not any(p.requires_grad for p in module.parameters()):
        return Projection(module.dequantize)
    return None


def expert_projections(experts: Sequence) -> list[tuple[Projection, Projection, Projection]] | None:
    """(gate, up, down) projections of every expert (``expert.projections()`` gives the layers in
    that order), or None when any layer is not one :func:`projection_of` takes."""
    out = []
    for expert in experts:
        projs = tuple(projection_of(m) for m in expert.projections())
        if any(p is None for p in projs):
            return None
        out.append(projs)
    return out


class _Run:
    """The dtypes and triton flag of one call, shared by its projections."""

    def __init__(self, x: torch.Tensor):
        self.dtype = compute_dtype(x)
        # CPU autocast: the frozen bases' products in bf16, all else in x's float32 (as lora_linear)
        self.base_dtype = frozen_product_dtype(x)
        if self.base_dtype is not None:
            self.dtype = x.dtype
        self.triton = use_triton(x)  # the adapters' dropout: Triton's seeded mask on CUDA
        # The node's products and adapters differ in their sizes only: the registry's questions
        # are asked once per call, sizes unknown (which a condition treats as met), not once per
        # product (a few hundred per call). Where matmul_f32 then says torch.mm for every product
        # (each expert's rows vary: see the module's docs), the products run it directly.
        device, grad = x.device.type, torch.is_grad_enabled()
        self.torch_mm = all(
            registry.choose("matmul_f32", registry.Facts(device, dtype, grad=grad, shape_varies=True)) != "onednn"
            for dtype in {self.dtype, self.base_dtype or self.dtype}
        )
        self.fused_row = (
            registry.choose("lora_linear", registry.Facts(device, self.dtype, grad=grad, backend="torch"))
            == "fused-native"
        )

    def weight(self, proj: Projection) -> torch.Tensor:
        return _dense(proj.base, self.base_dtype or self.dtype)

    def mm(self, x: torch.Tensor, w: torch.Tensor, *, out=None, add=None, base: bool = False) -> torch.Tensor:
        """``x @ w.T`` written into ``out`` or added to ``add``, as ``matmul_nt`` computes it (``base``:
        a frozen base's product, in ``base_dtype`` where that is set, as ``matmul_nt_in``)."""
        low = self.base_dtype if base else None
        if not self.torch_mm or (low is not None and low != x.dtype):
            return matmul_nt_in(x, w, low, out=out, add=add)
        if add is not None:
            return add.addmm_(x, w.t())
        if out is not None:
            return torch.mm(x, w.t(), out=out)
        return torch.nn.functional.linear(x, w)

    def forward(self, proj: Projection, x2: torch.Tensor, out: torch.Tensor | None = None):
        """(x2 @ W.T + s * drop(x2) @ A.T @ B.T, written into ``out`` when given, and the saved
        adapter state (h, dropout) or None)."""
        y = self.mm(x2, self.weight(proj), out=out, base=True)
        if proj.lora_a is None:
            return y, None
        drop = _Dropout(x2, proj.dropout, self.triton and proj.dropout > 0, self.fused_row)
        a = proj.lora_a.to(self.dtype)
        if drop.fused:  # h = dropout(x) @ A.T in one pass over x (tunex.kernels.lora's native kernels)
            a = a.contiguous()
            h = torch.empty((x2.shape[0], a.shape[0]), dtype=self.dtype, device=x2.device)
            _native_down(host_flat(x2), x2.shape[1], host_flat(a), drop.seed, drop.p, host_flat(h))
        else:
            h = self.mm(drop(x2), a)  # (n, r)
        y.addmm_(h, proj.lora_b.to(self.dtype).T, alpha=proj.scaling)
        return y, (h, drop)

    def backward(
        self, proj: Projection, g: torch.Tensor, saved, x2: Callable[[], torch.Tensor], add=None, out=None, rows_w=None
    ):
        """(dx = g @ W + drop'(dh @ A) (+ add), dA, dB) for the projection's output gradient g; dx
        written into ``out`` when given (not with ``add``). ``rows_w`` (n,): the output gradient is
        ``rows_w[:, None] * g``; the adapter's gradients are for that one, dx is for g (the caller
        weights it)."""
        d_a = d_b = d_lora = None
        if proj.lora_a is not None:
            h, drop = saved
            a, b, s = proj.lora_a.to(self.dtype), proj.lora_b.to(self.dtype), proj.scaling
            rows_w = None if rows_w is None else rows_w.unsqueeze(1)
            hw = h if rows_w is None else h * rows_w  # dB = s (w g)^T h = s g^T (w h)
            d_b = self.mm(hw.t(), g.t()).mul_(s).t().to(proj.lora_b.dtype)  # (out, r)
            dh = self.mm(g, b.t()).mul_(s)  # (n, r), for g
            dh_w = dh if rows_w is None else dh * rows_w  # for w g: dA's
            if drop.fused:  # dh.T @ dropout(x) in one pass over x, and dx += dropout(dh @ A) below
                d_a = torch.empty(a.shape, dtype=self.dtype, device=a.device)
                x = x2()
                _native_grad_a(host_flat(dh_w), host_flat(x), x.shape[1], drop.seed, drop.p, host_flat(d_a))
                dx = self.mm(g, self.weight(proj).t(), add=add, out=out, base=True)
                _native_add_up(host_flat(dx), host_flat(dh), host_flat(a.contiguous()), dx.shape[1], drop.seed, drop.p)
                return dx, d_a.to(proj.lora_a.dtype), d_b
            d_a = self.mm(dh_w.t(), drop(x2()).t()).to(proj.lora_a.dtype)  # (r, in)
            d_lora = drop(self.mm(dh, a.t()), inplace=True)
            add = d_lora if add is None else add.add_(d_lora)
            if out is not None:  # the product then adds to the adapter's part in place
                add = out.copy_(add)
        return self.mm(g, self.weight(proj).t(), add=add, out=None if add is not None else out, base=True), d_a, d_b


def _out_features(proj: Projection) -> int | None:
    """The projection's output width where known without dequantizing its base."""
    if isinstance(proj.base, torch.Tensor):
        return proj.base.shape[0]
    return None if proj.lora_b is None else proj.lora_b.shape[0]


def _sort_pairs(chosen: torch.Tensor, num_experts: int):
    """(order, inverse, rows in expert order, per-expert counts) of the (row, slot) pairs."""
    flat = chosen.reshape(-1)
    order = torch.argsort(flat, stable=True)
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel(), device=order.device)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    return order, inv, order // chosen.shape[1], counts


class _Saved:
    """The tensors one call keeps for backward, all through ``ctx.save_for_backward`` (so saved-tensor
    hooks, activation checkpointing and offload see every one), addressed by index."""

    def __init__(self):
        self.tensors: list[torch.Tensor | None] = []

    def put(self, t: torch.Tensor | None) -> int:
        self.tensors.append(t)
        return len(self.tensors) - 1

    def put_state(self, state):
        """An adapter's (h, dropout) as (index of h, index of the mask, dropout without its mask)."""
        if state is None:
            return None
        h, drop = state
        mask, drop.keep = drop.keep, None
        return self.put(h), self.put(mask), drop


def _state(tensors, saved):
    if saved is None:
        return None
    h, mask, drop = saved
    drop.keep = tensors[mask]
    return tensors[h], drop


class GroupedSwiGLUExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weights, chosen, projections, again, *adapters):
        run = _Run(x)
        with no_autocast(x), registry.varying_shapes():  # each expert's rows: a new count each step
            return GroupedSwiGLUExperts._forward(ctx, run, x, weights, chosen, projections, again)

    @staticmethod
    def _forward(ctx, run, x, weights, chosen, projections, again):
        n, hidden = x.shape
        k = chosen.shape[1]
        order, inv, rows, counts = _sort_pairs(chosen, len(projections))
        # (S, H) in expert order; each expert's outputs (unweighted) overwrite its rows once its gate
        # and up products have read them. Not kept: backward gathers the gate/up adapters' inputs
        # from x again and rebuilds the outputs' part in the routing weights' gradient from SwiGLU's.
        ys = xs = torch.index_select(x.to(run.dtype), 0, rows)
        gates = ups = None  # (S, I) each, every expert's gate and up pre-activations: kept for backward
        keep = _Saved()
        layout, start = [], 0
        for (gate, up, down), count in zip(projections, counts):
            if not count:
                layout.append(None)
                continue
            run_rows = slice(start, start + count)
            xe = xs[run_rows]
            if gates is None:  # one block each for all experts (the arena's when one is installed)
                inter = _out_features(gate) or run.weight(gate).shape[0]
                gates, ups = (kept_empty((xs.shape[0], inter), run.dtype, x.device) for _ in range(2))
            g, g_state = run.forward(gate, xe, gates[run_rows])  # (n_e, I)
            u, u_state = run.forward(up, xe, ups[run_rows])
            _, d_state = run.forward(down, _swiglu_forward(g, u), ys[run_rows])  # (n_e, H)
            states = tuple(keep.put_state(s) for s in (g_state, u_state, d_state))
            layout.append((start, count, *states))
            start += count
        # each row's k outputs weighted and summed: one batched (1, k) @ (k, H) product per row
        dtype = torch.promote_types(ys.dtype, weights.dtype)
        out = torch.bmm(weights.view(n, 1, k).to(dtype), ys.index_select(0, inv).view(n, k, hidden).to(dtype))
        out = out.view(n, hidden)  # (N, H)
        keep_x = any(p[0].lora_a is not None or p[1].lora_a is not None for p in projections)
        ctx.again = again if keep_x else None
        ctx.save_for_backward(
            x if keep_x and again is None else None, gates, ups, order, inv, rows, weights, *keep.tensors
        )
        ctx.run, ctx.projections, ctx.layout, ctx.k, ctx.x_dtype = run, projections, layout, k, x.dtype
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, dout):
        with no_autocast(dout), registry.varying_shapes():
            return GroupedSwiGLUExperts._backward(ctx, dout)

    @staticmethod
    def _backward(ctx, dout):
        x, gates, ups, order, inv, rows, weights, *tensors = ctx.saved_tensors
        if ctx.again is not None:  # the rows rebuilt (the same bits), held through the experts' loop
            x = ctx.again()
            x = x.reshape(-1, x.shape[-1])
        run, k = ctx.run, ctx.k
        need_x, need_w = ctx.needs_input_grad[:2]
        n, hidden = dout.shape
        # (S, H) in expert order, unweighted: each expert's down backward runs on it and its SwiGLU
        # backward applies the pairs' weights and gives their gradient, <dout[row], ys[pair]> as
        # <d act, act> (the down projection's adjoint moved over), with no outputs kept from forward
        grads = dout.to(run.dtype).index_select(0, rows)
        w_sorted = weights.reshape(-1)[order].to(run.dtype)
        d_ws = torch.empty_like(w_sorted)
        dxs = grads if need_x else None  # each expert's input gradient replaces its rows once read
        adapter_grads = []
        for (gate, up, down), entry in zip(ctx.projections, ctx.layout):
            if entry is None:  # no rows: its adapters get no gradient (as when the expert is not called)
                adapter_grads += [None, None] * sum(p.lora_a is not None for p in (gate, up, down))
                continue
            start, count, g_saved, u_saved, d_saved = entry
            run_rows = slice(start, start + count)
            g, u, w_e = gates[run_rows], ups[run_rows], w_sorted[run_rows]
            d_act, d_a_down, d_b_down = run.backward(
                down, grads[run_rows], _state(tensors, d_saved), lambda: _swiglu_forward(g, u), rows_w=w_e
            )
            d_g, d_u, d_ws[run_rows] = _swiglu_backward_weighted(d_act, g, u, w_e)
            del d_act

            gathered = []

            def xe():  # the gate and up adapters' input, gathered once when they ask
                if not gathered:
                    gathered.append(x.index_select(0, rows[run_rows]).to(run.dtype))
                return gathered[0]

            # the input gradient goes straight into its rows of dxs (read above by the down backward)
            into = None if dxs is None else dxs[run_rows]
            dx, d_a_gate, d_b_gate = run.backward(gate, d_g, _state(tensors, g_saved), xe, out=into)
            dx, d_a_up, d_b_up = run.backward(up, d_u, _state(tensors, u_saved), xe, add=dx)
            if into is not None and dx is not into:  # oneDNN's sum with an addend is a fresh tensor
                into.copy_(dx)
            for proj, da, db in ((gate, d_a_gate, d_b_gate), (up, d_a_up, d_b_up), (down, d_a_down, d_b_down)):
                if proj.lora_a is not None:
                    adapter_grads += [da, db]
        d_w = d_ws.index_select(0, inv).view(n, k).to(weights.dtype) if need_w else None
        d_x = None
        if dxs is not None:
            # each row's k slots gathered and added one slot at a time: no (N, k, H) copy to sum
            slots = inv.view(n, k)
            d_x = dxs.index_select(0, slots[:, 0])
            for j in range(1, k):
                d_x.add_(dxs.index_select(0, slots[:, j]))
            d_x = d_x.to(ctx.x_dtype)
        return (d_x, d_w, None, None, None, *adapter_grads)


def grouped_swiglu_experts(
    x: torch.Tensor,
    weights: torch.Tensor,
    chosen: torch.Tensor,
    projections: Sequence[tuple[Projection, Projection, Projection]],
    again=None,
) -> torch.Tensor:
    """``sum_j weights[:, j] * expert_{chosen[:, j]}(x)`` for SwiGLU experts, as one autograd node.

    Args:
        x: (N, H) rows.
        weights: (N, k) routing weights (gradient flows to them: the router's).
        chosen: (N, k) expert ids in ``[0, len(projections))``.
        projections: per expert its (gate, up, down) :class:`Projection` (see :func:`expert_projections`).
        again: a rebuild of x in backward (tunex.runtime.rebuild.Again: rows of any leading shape,
            the same values as x), which the node then calls instead of keeping x.

    Returns:
        (N, H) tensor in x's dtype. Gradients flow to x, weights and every adapter, never to a base.
    """
    if x.dim() != 2 or chosen.shape != weights.shape or chosen.shape[0] != x.shape[0]:
        raise ValueError(
            f"grouped_swiglu_experts: x {tuple(x.shape)} must be (N, H) and weights {tuple(weights.shape)}, "
            f"chosen {tuple(chosen.shape)} both (N, k)"
        )
    adapters = [t for trio in projections for p in trio if p.lora_a is not None for t in (p.lora_a, p.lora_b)]
    return GroupedSwiGLUExperts.apply(x, weights, chosen, tuple(projections), again, *adapters)
