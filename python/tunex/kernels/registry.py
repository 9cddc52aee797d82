"""Which implementation of each op runs: one table, one function that chooses.

Each op lists its implementations in priority order; each implementation has a condition (a pure
predicate over the call's :class:`Facts`: device, dtype, grad mode, autocast, the requested
backend, shape facts, settings switches, whether a native export exists, whether triton is
importable) and a sentence saying when it applies. :func:`choose` returns the first whose condition
holds; :func:`explain` says, for every implementation, whether it was chosen and, if not, why.

The op modules (rmsnorm.py, attention.py, ...) implement; they ask :func:`choose` which path to
take. Switches are read through :mod:`tunex.settings` at call time, so ``monkeypatch.setenv`` or
``settings.override`` changes the next call. With ``TUNEX_REQUIRE_NATIVE=1`` an implementation
that applies except that the built extension lacks its native export is an error (naming the
export) instead of a silent fall back to the next implementation.

Conditions are pure, so ``tunex doctor`` can evaluate them for facts of a machine it is not on
(the CUDA rows on a CPU box).

Inside :func:`pinned` (a generate call's decode loop) each distinct question is answered once and
the answer remembered until the block ends: a decoded token asks the same few hundred questions
as the one before it, and switches are then read once per generate call instead of every time.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import threading
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass

import torch

from tunex import settings
from tunex.errors import TunexError

BACKENDS = ("auto", "triton", "torch")


class Facts:
    """What the choice of an implementation depends on, for one call.

    ``grad``: True when autograd records the call, False when it does not (no-grad code, decoding),
    None when the question comes from inside a kernel that has already been chosen, where grad
    mode does not decide (its forward and its backward rebuild must take the same path). Rows
    that apply only without autograd test ``grad is False``.

    ``head_dim``, ``rows``, ``cols``, ``macs`` and ``shape_ok`` are the shape facts an op's
    conditions look at (None: unknown, which a condition treats as met, except ``rows == 1`` for
    the one-row decode paths; ``tunex doctor`` passes representative values). ``causal``: causal
    attention of the queries over as many keys (None: unknown). ``arena``: an activation arena is
    active (tunex.runtime.arena). ``docs``: how many packed documents the rows hold, each attending
    inside itself (tunex.kernels.attention.Documents; 0 or False: none). ``window``: the causal
    sliding window those documents are seen through, where one is longer than it (None: none).
    ``softcap``: attention logits soft-capped as ``cap * tanh(scores / cap)`` (Gemma 2; None: none).
    ``shape_varies``: the call's shape changes from step to step (an expert's share of a batch).
    ``backend`` is the kernel's ``backend=`` argument.
    """

    __slots__ = (
        "device",
        "dtype",
        "grad",
        "autocast",
        "backend",
        "head_dim",
        "rows",
        "cols",
        "macs",
        "shape_ok",
        "causal",
        "arena",
        "docs",
        "window",
        "softcap",
        "shape_varies",
    )

    def __init__(
        self,
        device: str,
        dtype: torch.dtype,
        *,
        grad: bool | None = None,
        autocast: bool = False,
        backend: str = "auto",
        head_dim: int | None = None,
        rows: int | None = None,
        cols: int | None = None,
        macs: int | None = None,
        shape_ok: bool = True,
        causal: bool | None = None,
        arena: bool = False,
        docs: int = 0,
        window: int | None = None,
        softcap: float | None = None,
        shape_varies: bool = False,
    ):
        self.device, self.dtype, self.grad, self.autocast, self.backend = device, dtype, grad, autocast, backend
        self.head_dim, self.rows, self.cols, self.macs, self.shape_ok = head_dim, rows, cols, macs, shape_ok
        self.causal, self.arena, self.docs, self.window = causal, arena, docs, window
        self.softcap = softcap
        self.shape_varies = shape_varies

    @classmethod
    def of(cls, t: torch.Tensor, backend: str = "auto", **shape) -> Facts:
        """The facts of a call on tensor ``t`` now (grad mode unless ``grad=`` is given, autocast
        for its device) and the given shape facts."""
        device = t.device.type
        shape.setdefault("grad", torch.is_grad_enabled())
        return cls(device, t.dtype, autocast=torch.is_autocast_enabled(device), backend=backend, **shape)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__)
        return f"Facts({fields})"

    def key(self) -> tuple:
        """Every fact, as a hashable tuple (equal tuples: the same choice)."""
        return (
            self.device,
            self.dtype,
            self.grad,
            self.autocast,
            self.backend,
            self.head_dim,
            self.rows,
            self.cols,
            self.macs,
            self.shape_ok,
            self.causal,
            self.arena,
            self.docs,
            self.window,
            self.softcap,
            self.shape_varies,
        )


@dataclass(frozen=True)
class Impl:
    """One implementation of an op: its name, when it applies (a sentence and a predicate) and
    the native export it needs (None: none)."""

    name: str
    when: str
    condition: Callable[[Facts], bool]
    native: str | None = None


@functools.cache
def triton_available() -> bool:
    """True when the ``triton`` package can be imported (checked once, without importing it)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when triton's CPU interpreter is switched on (``TRITON_INTERPRET=1``, triton's own variable)."""
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _native_module():
    try:
        from tunex import _native
    except ImportError:
        return None
    return _native


def has_native(export: str) -> bool:
    """Whether the built extension has the native export ``export``."""
    mod = _native_module()
    return mod is not None and hasattr(mod, export)


def native(export: str):
    """The native export ``export``, or None when the built extension lacks it."""
    mod = _native_module()
    return None if mod is None else getattr(mod, export, None)


def triton_wanted(f: Facts) -> bool:
    """Whether a kernel call with these facts runs its Triton path.

    ``backend="auto"`` follows ``TUNEX_KERNELS``: auto means Triton for CUDA tensors when triton is
    importable. Asking for Triton where it cannot run is an error, not a silent fallback.

    Raises:
        ValueError: the backend is not one of BACKENDS, or Triton was asked for where it cannot run.
    """
    backend = f.backend
    if backend not in BACKENDS:
        raise ValueError(f"kernel backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "auto":
        try:
            backend = settings.get("TUNEX_KERNELS")
        except TunexError as e:
            raise ValueError(str(e)) from None
        if backend == "auto":
            return f.device == "cuda" and triton_available()
    if backend == "torch":
        return False
    if not triton_available():
        raise ValueError(
            "the Triton kernel backend was requested but triton is not installed; install triton or use backend='torch'"
        )
    if f.device != "cuda" and not interpreting():
        raise ValueError(
            "the Triton kernel backend needs CUDA tensors, or TRITON_INTERPRET=1 "
            "(set before the first kernel call) to run triton's interpreter on CPU"
        )
    return True


# packed documents per batch from which FlexAttention's one call beats SDPA launched on each document
# on CUDA (bench/bench_flex_docs.py: fewer, longer documents favour SDPA's flash kernel per document)
FLEX_MIN_DOCUMENTS = 32


@functools.cache
def _flex_available() -> bool:
    from tunex.kernels.attention import flex_available

    return flex_available()


def _cpu_f32(f: Facts) -> bool:
    return f.device == "cpu" and f.dtype == torch.float32


def _ok(value, test) -> bool:
    return value is None or test(value)


# oneDNN's matmul as torch ships it; None where torch was built without oneDNN.
ONEDNN_LINEAR = (
    getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    if torch.backends.mkldnn.is_available()
    else None
)
# Products below this many multiply-adds stay on torch.mm: the call through torch.ops costs more
# than oneDNN's faster kernel saves on a small product.
ONEDNN_MIN_MACS = 1 << 21
MAX_TRITON_COLS = 65536  # widest row the Triton RMSNorm keeps in one program
_onednn_broken = False  # set when a oneDNN build failed at run time on this machine


def onednn_failed() -> None:
    """Record that oneDNN's matmul failed here: torch.mm from now on in this process."""
    global _onednn_broken
    _onednn_broken = True


def _native_cpu(name: str, export: str, extra: str = "", cond: Callable[[Facts], bool] | None = None) -> Impl:
    when = f"float32 CPU tensors{extra} (needs the native export {export})"
    return Impl(name, when, (lambda f: _cpu_f32(f) and cond(f)) if cond else _cpu_f32, export)


_TRITON = Impl("triton", "CUDA tensors with triton importable (TUNEX_KERNELS / backend= may force it)", triton_wanted)


def _torch(what: str = "torch") -> Impl:
    return Impl(what, "always", lambda f: True)


def _no_grad(f: Facts) -> bool:
    return f.grad is False


def _one_row(f: Facts) -> bool:
    return f.grad is False and f.rows == 1 and f.shape_ok


def _plain(what: str) -> Impl:
    return Impl("plain", f"without autograd: {what}", _no_grad)


OPS: dict[str, tuple[Impl, ...]] = {
    "rmsnorm": (
        _native_cpu(
            "native-row",
            "rms_norm_f32",
            ", one row without autograd (decoding), TUNEX_GEMV=1",
            lambda f: _one_row(f) and settings.on("TUNEX_GEMV"),
        ),
        _plain("torch's F.rms_norm (the lean backward of the kernels below buys nothing there)"),
        Impl(
            "triton",
            f"as triton, rows of at most {MAX_TRITON_COLS} elements",
            lambda f: triton_wanted(f) and _ok(f.cols, lambda c: c <= MAX_TRITON_COLS),
        ),
        _native_cpu("native", "rms_norm_forward_f32"),
        _torch(),
    ),
    "rope": (
        _plain("rotate-half in torch ops (fewer dispatches per decoded token than the autograd kernel)"),
        _TRITON,
        _native_cpu("native", "rope_f32"),
        _torch(),
    ),
    "attention": (
        Impl(
            "native",
            "float32 CPU training (grad on), causal over as many keys (packed documents too: attention "
            "inside each, costing the sum of their squared lengths; a sliding window: their lengths times "
            "the window; soft-capped logits too), head dim a multiple of 16, whole query-head groups, "
            "TUNEX_NATIVE_ATTENTION=1 (needs attention_forward_f32)",
            lambda f: (
                _cpu_f32(f)
                and bool(f.grad)
                and f.causal is not False
                and f.shape_ok
                and _ok(f.head_dim, lambda d: d % 16 == 0)
                and settings.on("TUNEX_NATIVE_ATTENTION")
            ),
            "attention_forward_f32",
        ),
        Impl(
            "flash-kept",
            "float32 CPU training (grad on), causal over as many keys, one document per row, inside the "
            "activation arena, no soft-capping: torch's CPU flash attention op with its output and log-sum-exp "
            "kept there",
            lambda f: (
                _cpu_f32(f)
                and bool(f.grad)
                and f.causal is not False
                and not f.docs
                and f.softcap is None
                and f.arena
                and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
            ),
        ),
        Impl(
            "flex-docs",
            f"CUDA, packed batches of at least {FLEX_MIN_DOCUMENTS} documents or documents longer than a sliding "
            "window, a power-of-two head dim of 16 or more, triton, no soft-capping: one compiled FlexAttention "
            "call with a block mask of the documents and the window (no per-document launches, no banded mask "
            "per document)",
            lambda f: (
                f.device == "cuda"
                and f.softcap is None
                and (f.docs >= FLEX_MIN_DOCUMENTS or (bool(f.docs) and f.window is not None))
                and _ok(f.head_dim, lambda d: d >= 16 and d & (d - 1) == 0)
                and triton_available()
                and _flex_available()
            ),
        ),
        Impl(
            "flex-softcap",
            "CUDA, soft-capped logits (Gemma 2), causal over as many keys (packed documents and a sliding "
            "window too), a power-of-two head dim of 16 or more, triton: one compiled FlexAttention call whose "
            "score_mod caps the logits and whose block mask holds the causal band, the documents and the window "
            "(no (T, T) mask, no score matrix)",
            lambda f: (
                f.device == "cuda"
                and f.softcap is not None
                and f.causal is not False
                and _ok(f.head_dim, lambda d: d >= 16 and d & (d - 1) == 0)
                and triton_available()
                and _flex_available()
            ),
        ),
        Impl(
            "sdpa-docs",
            "CUDA, packed documents, no soft-capping: torch's SDPA on each document (its flash kernel, no "
            "(T, T) mask; a document longer than a sliding window with its own banded mask)",
            lambda f: f.device == "cuda" and f.docs and f.softcap is None,
        ),
        Impl(
            "softcap-eager",
            "soft-capped logits (Gemma 2) where neither the native kernel nor FlexAttention applies (decoding "
            "with a KV cache included): torch ops over the whole score matrix, packed documents and windows as "
            "a dense mask",
            lambda f: f.softcap is not None,
        ),
        Impl(
            "sdpa",
            "always (torch's scaled_dot_product_attention; packed documents as a dense block-diagonal mask)",
            lambda f: True,
        ),
    ),
    "decode_attention": (
        Impl(
            "native",
            "float32 CPU without autograd, one new token per sequence over its own KV cache (one sequence or "
            "several decoded together), no mask, head dim a multiple of 16, whole query-head groups, "
            "TUNEX_NATIVE_ATTENTION=1: one call per layer stores the new keys and values and attends, every "
            "sequence by the same code alone or batched (needs attention_decode_f32)",
            lambda f: (
                _cpu_f32(f)
                and f.grad is False
                and f.shape_ok
                and _ok(f.head_dim, lambda d: d % 16 == 0)
                and settings.on("TUNEX_NATIVE_ATTENTION")
            ),
            "attention_decode_f32",
        ),
        Impl(
            "attention",
            "always: the cache stores the new keys and values, then the attention op's choice runs (sequences "
            "decoded together: one call per sequence)",
            lambda f: True,
        ),
    ),
    "swiglu": (
        _plain("silu(gate) * up in torch ops"),
        _TRITON,
        _native_cpu("native", "swiglu_forward_f32"),
        _torch(),
    ),
    "lora_linear": (
        _native_cpu(
            "gemv",
            "gemv_f32",
            ", one row without autograd, an unmerged adapter over a dense base in eval mode (chat "
            "--adapter): the base through the Rust GEMV and the adapter in two small products, TUNEX_GEMV=1",
            lambda f: _one_row(f) and settings.on("TUNEX_GEMV"),
        ),
        Impl("triton", "as triton, with dropout > 0 (the fused dropout)", lambda f: triton_wanted(f) and f.shape_ok),
        _native_cpu(
            "fused-native",
            "lora_down_f32",
            ", dropout none or native, TUNEX_FUSED_LORA=1",
            lambda f: settings.on("TUNEX_FUSED_LORA"),
        ),
        _torch("torch"),
    ),
    "cross_entropy": (_TRITON, _native_cpu("native", "cross_entropy_f32"), _torch("torch-chunked")),
    "dropout": (_TRITON, _native_cpu("native", "dropout_f32"), _torch("torch-bernoulli")),
    "decode_linear": (
        _native_cpu(
            "gemv",
            "gemv_f32",
            ", one row of input without autograd, contiguous weight, TUNEX_GEMV=1",
            lambda f: _one_row(f) and settings.on("TUNEX_GEMV"),
        ),
        Impl(
            "onednn",
            "float32 CPU outside autocast whose shape recurs, as matmul_f32's oneDNN row (forward and input gradient)",
            lambda f: _cpu_f32(f) and not f.autocast and not f.shape_varies and onednn_applies(f),
        ),
        _torch("F.linear"),
    ),
    "nf4_dequant": (
        _TRITON,
        Impl(
            "native",
            "CPU weights, any float output dtype (needs dequantize_4bit)",
            lambda f: f.device == "cpu",
            "dequantize_4bit",
        ),
        _torch(),
    ),
    "adamw_8bit": (
        Impl(
            "triton",
            "as triton, fewer than 2^32 elements per parameter",
            lambda f: triton_wanted(f) and _ok(f.rows, lambda n: n < 2**32),
        ),
        Impl(
            "native",
            "float32 CPU parameters, backend not torch (needs adamw_8bit_step_f32)",
            lambda f: _cpu_f32(f) and f.backend != "torch",
            "adamw_8bit_step_f32",
        ),
        Impl(
            "native-bf16",
            "bfloat16 CPU parameters, backend not torch (needs adamw_8bit_step_bf16)",
            lambda f: f.device == "cpu" and f.dtype == torch.bfloat16 and f.backend != "torch",
            "adamw_8bit_step_bf16",
        ),
        _torch(),
    ),
    "moe_experts": (
        Impl(
            "grouped",
            "with autograd, every expert projection a frozen linear, a LoRA adapter (no DoRA) over one or a "
            "frozen 4-bit layer, no bias: routing, SwiGLU experts and the weighted sum as one autograd node "
            "(tunex.kernels.moe: rows sorted by expert once, inverse-permutation gathers both ways)",
            lambda f: bool(f.grad),
        ),
        Impl("loop", "always: each expert through its own layers (models/moe.py grouped_experts)", lambda f: True),
    ),
    "matmul_f32": (
        Impl(
            "onednn",
            f"float32 2-D CPU products of at least {ONEDNN_MIN_MACS} multiply-adds outside autograd whose shape "
            "recurs (oneDNN builds and caches a kernel per shape: an expert's share of a batch, new each step, "
            "costs a build and grows the cache), torch built with oneDNN, TUNEX_ONEDNN=1",
            lambda f: _cpu_f32(f) and not f.grad and not f.shape_varies and onednn_applies(f),
        ),
        _torch("torch.mm"),
    ),
}


def onednn_applies(f: Facts) -> bool:
    """oneDNN's matmul is present, has not failed here, is switched on, and the product is big enough."""
    return f.shape_ok and onednn_allows(f.macs)


def onednn_allows(macs: int | None) -> bool:
    """:func:`onednn_applies` for a product of ``macs`` multiply-adds (the per-call form, no Facts)."""
    return (
        ONEDNN_LINEAR is not None
        and not _onednn_broken
        and (macs is None or macs >= ONEDNN_MIN_MACS)
        and settings.on("TUNEX_ONEDNN")
    )


def _missing(impl: Impl) -> bool:
    return impl.native is not None and not has_native(impl.native)


_memo = threading.local()  # .answers: the pinned block's remembered choices (absent or None: none)


@contextlib.contextmanager
def pinned() -> Iterator[None]:
    """Within the block, each distinct choice is made once and remembered (per thread; a nested
    block shares the outer one's answers). Switches and the built extension are read at the first
    call of each kind, so a switch changed inside the block takes effect at the next block."""
    if getattr(_memo, "answers", None) is not None:
        yield
        return
    _memo.answers = {}
    try:
        yield
    finally:
        _memo.answers = None


_shapes = threading.local()  # .vary: inside varying_shapes()


@contextlib.contextmanager
def thread_flag(state: threading.local, name: str) -> Iterator[None]:
    """``state.<name>`` is True on this thread within the block, and what it was after it."""
    before = getattr(state, name, False)
    setattr(state, name, True)
    try:
        yield
    finally:
        setattr(state, name, before)


@contextlib.contextmanager
def varying_shapes() -> Iterator[None]:
    """Within the block, the products' row counts change from call to call (a mixture of experts'
    per-expert rows, outside the grouped node: chat, serve, evaluation): the facts of the
    products made inside say ``shape_varies`` (:func:`shapes_vary`), which keeps them off oneDNN."""
    with thread_flag(_shapes, "vary"):
        yield


def shapes_vary() -> bool:
    """Whether this thread is inside :func:`varying_shapes`."""
    return getattr(_shapes, "vary", False)


def remembered(key: Hashable, decide: Callable[[], object]):
    """``decide()``, remembered under ``key`` inside a :func:`pinned` block (every call outside
    one). For callers whose facts cost more to gather than their own cheap key (the decode path's
    projections: one key per input shape and set of layers); ``decide`` asks :func:`choose`."""
    answers = getattr(_memo, "answers", None)
    if answers is None:
        return decide()
    try:
        return answers[key]
    except KeyError:
        answer = answers[key] = decide()
        return answer


def choose(op: str, facts: Facts) -> str:
    """The name of the implementation of ``op`` that runs for ``facts``: the first whose
    condition holds and whose native export (if any) is built (remembered inside :func:`pinned`).

    Raises:
        TunexError: TUNEX_REQUIRE_NATIVE=1 and the chosen implementation's native export is missing.
        ValueError: a backend was forced where it cannot run (see :func:`triton_wanted`).
    """
    answers = getattr(_memo, "answers", None)
    if answers is None:
        return _choose(op, facts)
    key = (op, *facts.key())
    try:
        return answers[key]
    except KeyError:
        answer = answers[key] = _choose(op, facts)
        return answer


def _choose(op: str, facts: Facts) -> str:
    for impl in OPS[op]:
        if impl.condition(facts):
            if impl.native is not None and not has_native(impl.native):
                if settings.on("TUNEX_REQUIRE_NATIVE"):
                    raise TunexError(
                        f"{op}: the {impl.name} implementation applies but the built tunex._native has no "
                        f"{impl.native}; rebuild the extension (maturin develop --release) or unset TUNEX_REQUIRE_NATIVE"
                    )
                continue
            return impl.name
    raise AssertionError(f"{op}: no implementation applies to {facts!r}")  # the last one always applies


def explain(op: str, facts: Facts) -> list[tuple[str, str]]:
    """(implementation, verdict) for each implementation of ``op`` in priority order: "chosen",
    "not reached" (after the chosen one), or why it was not chosen."""
    out, chosen = [], None
    for impl in OPS[op]:
        if chosen is not None:
            out.append((impl.name, "not reached"))
            continue
        try:
            holds = impl.condition(facts)
        except ValueError as e:
            out.append((impl.name, f"error: {e}"))
            continue
        if not holds:
            out.append((impl.name, f"condition not met: {impl.when}"))
        elif _missing(impl):
            out.append((impl.name, f"native export {impl.native} missing from the built extension"))
        else:
            chosen = impl.name
            out.append((impl.name, "chosen"))
    return out
