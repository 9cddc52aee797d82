"""Error-compensated rounding (GPTQ, Frantar et al. 2022) into GGUF's block types, for calibrated
exports: what ``hf_to_gguf(..., calibration=FILE)`` runs by default.

Rounding each weight to its nearest level leaves errors that add up in the product. GPTQ instead
rounds a row's weights one input column at a time and moves the not yet rounded weights of the same
row to cancel, as far as the calibration inputs allow, the error just made: with H = sum of x x^T
over the calibration tokens (x: the product's input), the update that keeps ||(W - Q) X|| least
comes from the Cholesky factor of H's inverse. The blocks keep llama.cpp's layouts: before rounding
the columns of one block (32 values for Q8_0 / Q5_0 / Q5_1, a 256-value super-block for the K
types) the block's parameters (d, dmin, the sub-block scales and mins) are chosen by llama.cpp's
importance-weighted search on the block's weights as the earlier columns' errors left them; the
columns are then rounded to that fixed grid, and the levels are written into those blocks, so any
GGUF reader dequantizes them (tunex._native.ggml_grid / ggml_set_levels).

The model is quantized layer by layer: each layer's inputs come from the layers before it with
their weights already rounded (so a layer corrects for what earlier layers lost), its products'
H are collected over all calibration windows, its 2-D weights are rounded, and its outputs feed the
next layer. The embedding (a lookup), the output head and the MoE experts are packed with the
importance-weighted search alone."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from tunex.gguf_imatrix import CALIBRATION_CTX, CALIBRATION_TOKENS, _Collector, calibration_model

# H's diagonal is raised by this share of its mean before inversion (GPTQ's dampening): it keeps the
# factorization stable where inputs are nearly collinear and bounds how far an error moves weights
DAMP = 0.01


def gptq_blocks(
    w: np.ndarray, kind: str, hessian: np.ndarray, importance=None, name: str = "tensor", damp: float = DAMP
) -> tuple[np.ndarray, np.ndarray]:
    """Float32 rows ``w`` (out x in) packed as GGUF block type ``kind`` by GPTQ rounding against
    ``hessian`` (in x in: the sum of x x^T of the product's inputs). ``importance`` (one value per
    column; default H's diagonal) weighs each block's parameter search. Returns (the bytes, shaped as
    :func:`tunex.gguf_io.quantize_blocks` returns them; the float32 values they hold, bit for bit
    what llama.cpp reads). Columns no calibration input reached (H's diagonal 0) are rounded
    without moving others. A NaN / inf, a Hessian of the wrong shape or not finite: ValueError
    naming ``name``."""
    import torch

    from tunex import _native
    from tunex.gguf_io import BLOCK_ELEMS, _block_bytes, quantize_blocks

    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.ndim != 2 or kind not in BLOCK_ELEMS:
        raise ValueError(f"{name}: expected rows of weights and a type of {', '.join(BLOCK_ELEMS)}; got {kind!r}")
    rows, cols = w.shape
    n = BLOCK_ELEMS[kind]
    if cols % n:
        raise ValueError(f"{name}: rows of {cols} values are not whole {kind} blocks of {n}")
    bad = np.flatnonzero(~np.isfinite(w))
    if bad.size:
        raise ValueError(f"{name} holds {w.flat[bad[0]]} at flat index {bad[0]}; GGUF quantization needs finite weights")
    h = np.array(hessian, dtype=np.float64)
    if h.shape != (cols, cols):
        raise ValueError(f"{name}: the Hessian is {h.shape}, expected ({cols}, {cols}) for rows of {cols}")
    if not np.isfinite(h).all():
        raise ValueError(f"{name}: the Hessian holds NaN or inf; recollect it (the calibration run diverged)")
    diag = np.diag(h).copy()
    if importance is None:
        importance = np.maximum(diag, 0.0)
    importance = np.ascontiguousarray(importance, dtype=np.float32).reshape(-1)
    dead = ~(diag > 0)
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    h[dead, dead] = 1.0
    u = _inverse_factor(torch.from_numpy(h), damp, name).float()
    lo, hi = _native.ggml_level_range(kind)
    block_bytes = _block_bytes(kind)
    packed = np.empty((rows, cols // n * block_bytes), dtype=np.uint8)
    values = np.empty((rows, cols), dtype=np.float32)
    levels = np.empty((rows, n), dtype=np.int8)
    wt = torch.from_numpy(w.copy())
    a, b = np.empty((rows, n), np.float32), np.empty((rows, n), np.float32)
    with torch.no_grad():
        for g in range(0, cols, n):
            end = g + n
            block = quantize_blocks(wt[:, g:end].numpy(), kind, name, importance[g:end])
            _native.ggml_grid(block.reshape(-1), n, kind, name, a.reshape(-1), b.reshape(-1))
            at, bt = torch.from_numpy(a), torch.from_numpy(b)
            err = torch.empty((rows, n), dtype=torch.float32)
            for j in range(n):
                c = g + j
                col, scale, offset = wt[:, c], at[:, j], bt[:, j]
                k = torch.where(scale != 0, torch.round((col + offset) / scale), 0.0).clamp_(lo, hi)
                q = scale * k - offset
                levels[:, j] = k.numpy()
                values[:, c] = q.numpy()
                e = (col - q) / u[c, c]
                err[:, j] = e
                if j + 1 < n:
                    wt[:, c + 1 : end] -= e[:, None] * u[c, c + 1 : end][None, :]
            if end < cols:
                wt[:, end:] -= err @ u[g:end, end:]
            _native.ggml_set_levels(levels.reshape(-1), n, kind, name, block.reshape(-1))
            packed[:, g // n * block_bytes : end // n * block_bytes] = block
    return packed, values


def _inverse_factor(h, damp: float, name: str):
    """The upper Cholesky factor of (H + damp * mean(diag H) * I)^-1 in float64; the dampening grows
    tenfold (up to five times) while the factorization fails."""
    import torch

    mean = float(torch.diagonal(h).mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    for _ in range(5):
        lower, info = torch.linalg.cholesky_ex(h + damp * mean * eye)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper
        damp *= 10
    raise ValueError(f"{name}: the Hessian is not positive definite even dampened by {damp / 10:g} of its mean diagonal")


class _Stop(Exception):
    """Raised by :class:`_Inputs` once it holds a window's layer inputs: the rest of the model is not needed."""


class _Inputs:
    """A runtime that keeps the first layer's inputs (x, cos, sin, mask) and stops the forward pass."""

    def __init__(self):
        from tunex.runtime.compose import Plain

        self._plain = Plain()
        self.kept = None

    def __getattr__(self, name):
        return getattr(self._plain, name)

    def run_layers(self, model, x, cos, sin, mask, cache):
        self.kept = [x, cos, sin, mask]
        raise _Stop


class _HessianCollector(_Collector):
    """:class:`tunex.gguf_imatrix._Collector` that also adds up x x^T of each named product's input
    (one float64 sum shared by the products of one input: q / k / v, gate / up). Each window's
    product runs in float32 (a window's few hundred rows), the sum over windows in float64."""

    def __init__(self, names: dict[int, str]):
        super().__init__(names)
        self.hessians: dict[str, np.ndarray] = {}

    def project(self, modules, x, rebuild=None, kept=None):
        named = [self.names[id(m)] for m in modules if id(m) in self.names]
        if named:
            flat = x.detach().reshape(-1, x.shape[-1]).float()
            gram = (flat.T @ flat).double().numpy()
            if named[0] not in self.hessians:
                shared = np.zeros_like(gram)
                for name in named:
                    self.hessians[name] = shared
            self.hessians[named[0]] += gram
        return super().project(modules, x, rebuild, kept)


def gptq_model(
    model_dir: str | Path,
    text_file: str | Path,
    kinds: dict[str, str],
    weights: Callable[[str], np.ndarray | None],
    to_module: Callable[[str, np.ndarray], np.ndarray],
    tokens: int = CALIBRATION_TOKENS,
    ctx: int = CALIBRATION_CTX,
    damp: float = DAMP,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """GPTQ of a model's layers over the first ``tokens`` tokens of ``text_file`` (windows of
    ``ctx``). ``kinds``: {GGUF name: block type} of the tensors to pack; ``weights(name)``: that
    tensor's float32 values as GGUF stores them (None: not exported as one tensor, left to the
    caller); ``to_module(name, values)``: GGUF values back in the model module's layout. Returns
    ({GGUF name: packed bytes}, {GGUF name: mean square of each input column} of the other named
    products: the head and what ``weights`` left out)."""
    import torch

    model, ids, names = calibration_model(model_dir, text_file, tokens)
    decoder = model.model
    inputs = _Inputs()
    windows = []
    saved, decoder.runtime = decoder.runtime, inputs
    try:
        with torch.no_grad():
            for start in range(0, len(ids), ctx):
                try:
                    model(torch.tensor([ids[start : start + ctx]]))
                except _Stop:
                    windows.append(inputs.kept)
    finally:
        decoder.runtime = saved
    packed: dict[str, np.ndarray] = {}
    importance: dict[str, np.ndarray] = {}
    plain = inputs._plain
    with torch.no_grad():
        for layer in decoder.layers:
            collector = _HessianCollector(names)
            for x, cos, sin, mask in windows:
                layer(x, cos, sin, mask, None, rt=collector)
            modules = {names[id(m)]: m for m in layer.modules() if id(m) in names}
            for gname, module in modules.items():
                if gname not in collector.hessians:
                    continue
                mean_square = collector.sums[gname] / collector.rows[gname]
                w = weights(gname) if gname in kinds else None
                if w is None:
                    importance[gname] = mean_square.astype(np.float32)
                    continue
                packed[gname], values = gptq_blocks(w, kinds[gname], collector.hessians[gname], mean_square, gname, damp)
                back = to_module(gname, values)
                if tuple(back.shape) == tuple(module.weight.shape):
                    module.weight.copy_(torch.from_numpy(back))
            del collector
            for window in windows:
                window[0] = layer(*window, None, rt=plain)
        head = names.get(id(model.lm_head))
        if head is not None:
            sums, count = 0.0, 0
            for x, *_ in windows:
                flat = decoder.norm(x, plain).reshape(-1, x.shape[-1]).double()
                sums = sums + torch.einsum("ij,ij->j", flat, flat).numpy()
                count += flat.shape[0]
            importance[head] = (sums / count).astype(np.float32)
    return packed, importance
