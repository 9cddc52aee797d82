"""Choosing between a kernel's Triton path and its torch path.

Every public kernel takes ``backend="auto" | "triton" | "torch"``. ``auto`` picks Triton for CUDA
tensors when triton is importable and torch otherwise, so CPU training never touches triton.
The environment variable ``TUNEX_KERNELS`` (``auto``/``triton``/``torch``) overrides ``auto``
process-wide: ``torch`` is the escape hatch when a Triton build misbehaves on some GPU, and
``triton`` together with ``TRITON_INTERPRET=1`` runs the Triton kernels on CPU tensors through
triton's interpreter, which is how the tests check them without a GPU.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from tunex.kernels import registry

BACKENDS = registry.BACKENDS


triton_available = registry.triton_available
interpreting = registry.interpreting


def use_triton(tensor: torch.Tensor, backend: str = "auto") -> bool:
    """Whether a kernel call on ``tensor`` runs its Triton path (the registry's triton condition).

    Raises:
        ValueError: ``backend`` is not one of BACKENDS, or Triton was asked for where it cannot run.
    """
    return registry.triton_wanted(registry.Facts(tensor.device.type, tensor.dtype, backend=backend))


def next_power_of_two(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on ``x`` runs in: autocast's when it is on for x's device, else x's own.

    Functions that cast explicitly use this and then switch autocast off inside, so a float32
    activation under bf16 autocast gets one consistent dtype instead of mixed ones.
    """
    if x.is_floating_point() and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def no_autocast(x: torch.Tensor):
    """A block with autocast off for ``x``'s device (nothing to switch off when it is off already)."""
    device = x.device.type
    if not torch.is_autocast_enabled(device):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device, enabled=False)


def frozen_product_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype of the frozen-weight products under CPU autocast (``train.dtype = "bfloat16"`` on
    the CPU) for a float32 activation ``x``; None when that mode is off.

    On the CPU tunex's own layers (LoRA/QLoRA bases, the loss head) run only their products with a
    frozen weight in autocast's dtype (bf16: twice the float32 rate with avx512_bf16 or AMX) and
    keep the activations, the adapters and everything element-wise in float32, where the native
    kernels are; on CUDA autocast applies as usual.
    """
    if x.device.type == "cpu" and x.dtype == torch.float32 and torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
        return None if dtype == torch.float32 else dtype
    return None


def matmul_nt_in(
    x: torch.Tensor,
    w: torch.Tensor,
    dtype: torch.dtype | None,
    *,
    bias: torch.Tensor | None = None,
    add: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``matmul_nt`` with the product computed in ``dtype`` (``w`` already in it; None: x's dtype)
    and rounded to it, the result (and ``bias``, ``add``) in x's dtype."""
    if dtype is None or dtype == x.dtype:
        return matmul_nt(x, w, bias=bias, add=add, out=out)
    y = matmul_nt(x.to(dtype), w)
    y = y.to(x.dtype) if out is None else out.copy_(y)
    if bias is not None:
        y.add_(bias)
    return y if add is None else y.add_(add)


def warps_for(block: int) -> int:
    """Warps for a program that reduces ``block`` elements: enough threads to keep each thread's
    share of a row at a few registers' worth (a wider row with 4 warps would spill)."""
    if block >= 32768:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """View ``x`` as a 2-D (rows, last dim) tensor whose last dim is contiguous."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


# inside a chosen kernel (grad None: grad mode does not decide), past the Triton row: the CPU paths
_CPU_F32 = registry.Facts("cpu", torch.float32, backend="torch")


def native_f32(op: str, kernel, *tensors: torch.Tensor) -> bool:
    """Whether ``op``'s tunex native CPU kernel ``kernel`` (None when the built extension lacks
    it) runs on these tensors: all float32 on the CPU and the registry choosing the native row
    (which, with TUNEX_REQUIRE_NATIVE=1, raises when the export is missing)."""
    return (
        all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
        and registry.choose(op, _CPU_F32) == "native"
        and kernel is not None
    )


_TO_DLPACK = getattr(torch._C, "_to_dlpack", None)
_TO_DLPACK_VERSIONED = getattr(torch._C, "_to_dlpack_versioned", None)


class _CpuExport:
    """A detached real CPU tensor as ``numpy.from_dlpack`` takes it, exported by torch's C exporter
    directly: ``Tensor.__dlpack__`` checks streams and devices in Python first, which costs more
    than the export itself, and the native kernels take a few hundred views per training step."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        if max_version is None or max_version[0] < 1:
            return _TO_DLPACK(self.tensor)
        return _TO_DLPACK_VERSIONED(self.tensor)

    def __dlpack_device__(self) -> tuple[int, int]:
        return (1, 0)  # DLPack's kDLCPU, device 0


def host_array(t: torch.Tensor):
    """A numpy view of a CPU tensor's data for tunex's native kernels, leaving its storage resizable.

    ``Tensor.numpy()`` marks the storage non-resizable for good, and FSDP2 frees unsharded
    parameters by resizing their storage to zero; DLPack shares the memory without that mark.
    Pass tensors this view has to write into contiguous (``.view(-1)`` of a contiguous tensor).
    """
    import numpy as np

    if _TO_DLPACK_VERSIONED is not None and t.device.type == "cpu" and not t.dtype.is_complex:
        return np.from_dlpack(_CpuExport(t.detach() if t.requires_grad else t))
    return np.from_dlpack(t.detach())  # torch's own checks and errors


def host_span(t: torch.Tensor):
    """:func:`host_array` of the storage a tensor with non-negative strides covers, flat, from its
    first element: with ``t.stride()`` it is what the native kernels that take strided tensors read."""
    n = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return host_array(t.as_strided((n,), (1,)))


def host_flat(t: torch.Tensor):
    """:func:`host_array` of a contiguous tensor as one flat array (what the native kernels take)."""
    return host_array(t.view(-1))


_ONEDNN_LINEAR = registry.ONEDNN_LINEAR


def matmul_facts(x: torch.Tensor, w: torch.Tensor, grad: bool) -> registry.Facts:
    """The registry's facts for ``x @ w.T`` (op matmul_f32); ``grad``: autograd on. Inside
    ``registry.varying_shapes`` they say the product's shape changes from step to step."""
    cpu_f32 = all(t.device.type == "cpu" and t.dtype == torch.float32 for t in (x, w))
    shape_ok = x.dim() == 2 and w.dim() == 2 and x.shape[1] == w.shape[1]
    return registry.Facts(
        "cpu" if cpu_f32 else x.device.type,
        torch.float32 if cpu_f32 else x.dtype,
        grad=grad,
        macs=x.shape[0] * x.shape[1] * w.shape[0] if shape_ok else 0,
        shape_ok=shape_ok,
        shape_varies=registry.shapes_vary(),
    )


def onednn_fits(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the registry runs ``x @ w.T`` outside autograd through oneDNN: both float32 2-D CPU
    tensors that fit, of at least registry.ONEDNN_MIN_MACS multiply-adds, oneDNN present and not
    switched off (``TUNEX_ONEDNN``)."""
    return registry.choose("matmul_f32", matmul_facts(x, w, grad=False)) == "onednn"


def matmul_nt(
    x: torch.Tensor,
    w: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    add: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ w.T (+ bias) (+ add)`` for 2-D tensors, outside autograd. Inside
    ``registry.varying_shapes`` (a shape that changes from step to step) it stays off oneDNN (see
    the registry's matmul_f32 row). ``out``: a contiguous (rows, out features) tensor the result is written into (not with ``add``).

    float32 CPU tensors (any strides) go through oneDNN when the registry's matmul_f32 row chooses it, else torch; only for
    use inside autograd Functions and no-grad code (the oneDNN op has no derivative). ``add`` is
    the caller's to give up: the torch path accumulates into it and returns it.
    """
    if (
        registry.choose("matmul_f32", matmul_facts(x, w, torch.is_grad_enabled())) == "onednn"
        and (bias is None or bias.dtype == torch.float32)
        and (add is None or (add.dtype == torch.float32 and add.shape == (x.shape[0], w.shape[0])))
    ):
        try:
            if add is None:
                y = _ONEDNN_LINEAR(x, w, bias, "none", [], "")
                return y if out is None else out.copy_(y)
            return _ONEDNN_LINEAR.binary(x, add.contiguous(), w, bias, "add")
        except RuntimeError as e:  # a oneDNN build that cannot run here: torch's matmul from now on
            registry.onednn_failed()
            warnings.warn(
                f"tunex: oneDNN matmul failed ({e}); using torch.mm from now on "
                "(set TUNEX_ONEDNN=0 to skip the attempt)",
                RuntimeWarning,
                stacklevel=2,
            )
    if add is None and out is not None:
        return torch.mm(x, w.t(), out=out) if bias is None else torch.addmm(bias, x, w.t(), out=out)
    if add is None:
        return torch.nn.functional.linear(x, w, bias)
    add.addmm_(x, w.t())
    return add if bias is None else add.add_(bias)
