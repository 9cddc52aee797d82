"""Lean backward rebuilds: adapted projections rebuild their inputs in backward instead of saving them.

A LoRA (or NF4) projection whose input is a cheap function of tensors other nodes keep anyway (the
normed residual, attention's output, the SwiGLU product) takes a :class:`Again` and then saves
nothing of its input: backward calls it, which recomputes the input once with the same kernel as
the forward (so the same bits) and drops it after its last use.
"""

from __future__ import annotations

import torch

from tunex.kernels.gemv import linear_many


class Again:
    """An input rebuilt in backward for ``uses`` adapted projections: built once, dropped after the last."""

    def __init__(self, build, uses: int):
        self.build, self.uses, self.value = build, uses, None

    def __call__(self) -> torch.Tensor:
        value = self.value if self.value is not None else self.build()
        self.uses -= 1
        self.value = value if self.uses > 0 else None
        return value


def no_grad_call(fn, *tensors, **kwargs):
    """``fn`` of the detached tensors, outside autograd."""
    with torch.no_grad():
        return fn(*(t.detach() for t in tensors), **kwargs)


def again(fn, *tensors, uses: int, **kwargs) -> Again:
    """A rebuild of ``fn(*tensors, **kwargs)`` for ``uses`` projections."""
    return Again(lambda: no_grad_call(fn, *tensors, **kwargs), uses)


def project(modules, x, rebuild: Again | None, kept: tuple[bool, ...] | None = None):
    """``[m(x) for m in modules]``; adapted layers get ``rebuild`` and then do not save x, and make
    the outputs marked ``kept`` (kept for backward by the next node) in the activation arena."""
    if rebuild is not None and all(getattr(m, "recomputes_input", False) for m in modules):
        return [m(x, x_recompute=rebuild, kept=k) for m, k in zip(modules, kept or (False,) * len(modules))]
    return linear_many(x, modules)
