"""How a model runs, apart from what it computes: the pieces a model is composed with.

A model file (tunex/models/decoder.py) holds the math and calls a few hooks on a :class:`Runtime`
it is given: ``norm``, ``rope``, ``project`` (the linear layers sharing an input, with an optional
backward rebuild of that input), ``swiglu``, ``add`` (the residual), ``attention``, ``rebuild``
and ``run_layers`` (the layer stack, with checkpointing). :class:`Plain` does just the math with
torch ops. :class:`Standard`, every model's default, composes the rest (both in compose.py):

    arena.py    the activation arena of CPU training (kept tensors in one reused block)
    rebuild.py  lean backward rebuilds: adapted projections recompute their inputs in backward
    offload.py  activation checkpointing with the checkpoints in (pinned) CPU memory
    decode.py   the decode path: the registry's no-autograd implementations (one-row native
                RMSNorm, plain RoPE and SwiGLU); projections reach the GEMV via ``project``
    malloc.py   glibc malloc settings for CPU training (applied by tunex.dist.wrap)

Which implementation runs for an op (Triton, native, torch, or the decode path's) is the kernel
registry's choice (tunex.kernels.registry), not the runtime's: each hook asks it.
"""

from __future__ import annotations

_default = None


def default():
    """The runtime a model uses unless it is given another (a :class:`compose.Standard`)."""
    global _default
    if _default is None:
        from tunex.runtime.compose import Standard

        _default = Standard()
    return _default
