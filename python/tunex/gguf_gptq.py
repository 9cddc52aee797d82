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
GGUF reader dequantizes them (tunex._native.ggml_grid / ggml_set_levels; the column loop is
tunex._native.ggml_gptq_run). The search weighs each value's own error, not the output error
GPTQ's updates then leave, so the block is also rounded on that grid with d scaled (SCALES), and
each row keeps the grid that leaves the least output error (the block's share of GPTQ's loss).
On SmolLM2's q4_k_m (mostly Q5_0) llama.cpp's perplexity over f16's, averaged over four 2048-token
texts the calibration did not see (the test's dialogue and three passages of Python's documentation),
was +2.4% (three runs whose float32 order differed: +2.22, 2.24, 2.71; the dialogue alone +1.2 to
1.7%) with the dampening at 0.5 of H's mean diagonal, +2.7% (2.72 to 2.77) at 0.1 and +3.0% at 0.01,
GPTQ's usual share; single runs at 0.3, 1 and 2 gave +2.55 and 3.08, +3.04, +3.11.

The model is quantized layer by layer: each layer's inputs come from the layers before it with
their weights already rounded (so a layer corrects for what earlier layers lost), its products are
rounded in the order it runs them, each one's H collected over all calibration windows with the
products before it already rounded, and its outputs feed the next layer. The embedding (a lookup),
the output head and the MoE experts are packed with the importance-weighted search alone."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from tunex.gguf_imatrix import CALIBRATION_CTX, CALIBRATION_TOKENS, calibration_model

# H's diagonal is raised by this share of its mean before inversion (GPTQ's dampening): it keeps the
# factorization stable where inputs are nearly collinear and bounds how far an error moves weights.
# 0.5 rather than the usual 0.01: the updates fit the calibration text less closely and carry over to
# other text better (see the module's docs; a few thousand calibration tokens are typical here)
DAMP = 0.5
# columns rounded between two matrix products of GPTQ's update (a divisor of every block size)
LAZY = 32
# each block's d is tried at these multiples of the search's, every try rounded by GPTQ, and each
# row keeps the one that leaves the least output error (the search's own d is the first try)
SCALES = (1.0, 0.9, 0.95, 1.05, 1.1)


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
    factor = inverse_factor(hessian, damp, name)
    if importance is None:
        importance = np.maximum(np.diagonal(hessian), 0.0)
    return _round(w, kind, factor, importance, name)


def inverse_factor(hessian: np.ndarray, damp: float = DAMP, name: str = "tensor"):
    """GPTQ's factor of ``hessian`` (a float32 torch tensor): the upper Cholesky factor of
    (H + damp * mean(diag H) * I)^-1, computed in float64. A column whose diagonal is 0 (no input
    reached it) is cut loose (its row and column zeroed, diagonal 1) so its error moves nothing; the
    dampening grows tenfold (up to five times) while the factorization fails. A Hessian not square
    or not finite: ValueError naming ``name``."""
    import torch

    h = np.array(hessian, dtype=np.float64)
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"{name}: the Hessian is {h.shape}, expected a square matrix (one row per input column)")
    if not np.isfinite(h).all():
        raise ValueError(f"{name}: the Hessian holds NaN or inf; recollect it (the calibration run diverged)")
    dead = ~(np.diagonal(h) > 0)
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    h[dead, dead] = 1.0
    h = torch.from_numpy(h)
    mean = float(torch.diagonal(h).mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    for _ in range(5):
        lower, info = torch.linalg.cholesky_ex(h + damp * mean * eye)
        if int(info) == 0:
            # H^-1 = L^-T L^-1 (a triangular solve and a product: faster here than cholesky_inverse)
            inv_lower = torch.linalg.solve_triangular(lower, eye, upper=False)
            upper, info = torch.linalg.cholesky_ex(inv_lower.T @ inv_lower, upper=True)
            if int(info) == 0:
                return upper.float()
        damp *= 10
    raise ValueError(
        f"{name}: the Hessian is not positive definite even dampened by {damp / 10:g} of its mean diagonal"
    )


def _round(w: np.ndarray, kind: str, u, importance, name: str) -> tuple[np.ndarray, np.ndarray]:
    """:func:`gptq_blocks` with the :func:`inverse_factor` ``u`` of its Hessian."""
    import torch

    from tunex import _native
    from tunex.gguf_io import BLOCK_ELEMS, _block_bytes, quantize_blocks

    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2 or kind not in BLOCK_ELEMS:
        raise ValueError(f"{name}: expected rows of weights and a type of {', '.join(BLOCK_ELEMS)}; got {kind!r}")
    rows, cols = w.shape
    n = BLOCK_ELEMS[kind]
    if cols % n:
        raise ValueError(f"{name}: rows of {cols} values are not whole {kind} blocks of {n}")
    if tuple(u.shape) != (cols, cols):
        raise ValueError(f"{name}: the Hessian is {tuple(u.shape)}, expected ({cols}, {cols}) for rows of {cols}")
    bad = np.flatnonzero(~np.isfinite(w))
    if bad.size:
        raise ValueError(
            f"{name} holds {w.flat[bad[0]]} at flat index {bad[0]}; GGUF quantization needs finite weights"
        )
    importance = np.ascontiguousarray(importance, dtype=np.float32).reshape(-1)
    size = _block_bytes(kind)
    packed = np.empty((rows, cols // n * size), dtype=np.uint8)
    # column-major copies: the loop reads and updates one input column (all rows) at a time
    wt = torch.from_numpy(np.ascontiguousarray(w.T))
    values = np.empty((cols, rows), dtype=np.float32)
    every = np.arange(rows)
    with torch.no_grad():
        for g in range(0, cols, n):
            end = g + n
            ub = u[g:end, g:end].contiguous()
            # the block parameters: llama.cpp's weighted search on the weights as earlier errors left
            # them, and that grid's d scaled (every try rounded by GPTQ; each row keeps its best)
            block = quantize_blocks(wt[g:end].T.numpy(), kind, name, importance[g:end])
            blocks = np.repeat(block[None], len(SCALES), axis=0)  # (tries, rows, size)
            for t, s in enumerate(SCALES):  # d times s, in float16 (an overflowing d kept)
                _native.ggml_scale_d(blocks[t].reshape(-1), n, kind, name, s)
            k, q, err, loss = _tries(wt[g:end], blocks, ub, kind, name)
            best = np.argmin(loss, axis=0)
            pick = best * rows + every
            block = blocks[best, every]
            levels = np.ascontiguousarray(k[:, pick].T)
            values[g:end] = q[:, pick]
            _native.ggml_set_levels(levels.reshape(-1), n, kind, name, block.reshape(-1))
            packed[:, g // n * size : end // n * size] = block
            if end < cols:
                wt[end:].addmm_(u[g:end, end:].T, err[:, pick], alpha=-1.0)
    return packed, np.ascontiguousarray(values.T)


def _tries(w, blocks: np.ndarray, ub, kind: str, name: str):
    """GPTQ of one block's columns ``w`` (n x rows, torch, left as it is) on each grid of ``blocks``
    (tries x rows x bytes, one block per row), ``ub`` the factor restricted to the block. Returns
    (levels, values: n x tries * rows, each try's rows side by side; the scaled errors (torch, the
    same shape); each try's and row's share of ||(W - Q) X||^2: its sum of squared scaled errors)."""
    import torch

    from tunex import _native

    tries, rows = blocks.shape[:2]
    n = w.shape[0]
    a = np.empty((tries, rows, n), np.float32)
    b = np.empty((tries, rows, n), np.float32)
    for t in range(tries):
        _native.ggml_grid(blocks[t].reshape(-1), n, kind, name, a[t].reshape(-1), b[t].reshape(-1))
    at = np.ascontiguousarray(a.transpose(2, 0, 1).reshape(n, tries * rows))
    bt = np.ascontiguousarray(b.transpose(2, 0, 1).reshape(n, tries * rows))
    wb = w.repeat(1, tries)
    q = np.empty((n, tries * rows), np.float32)
    k = np.empty((n, tries * rows), np.int8)
    err = torch.empty((n, tries * rows), dtype=torch.float32)
    # GPTQ's lazy batches: a column's error moves the rest of its run of LAZY columns at once
    # (tunex._native.ggml_gptq_run), the block's columns after the run take the run's errors in one
    # product (the columns after the block take the block's, in the caller)
    for j in range(0, n, LAZY):
        stop = j + LAZY
        _native.ggml_gptq_run(
            wb[j:stop].numpy().reshape(-1),
            tries * rows,
            at[j:stop].reshape(-1),
            bt[j:stop].reshape(-1),
            ub[j:stop, j:stop].contiguous().numpy().reshape(-1),
            kind,
            name,
            k[j:stop].reshape(-1),
            q[j:stop].reshape(-1),
            err[j:stop].numpy().reshape(-1),
        )
        if stop < n:
            wb[stop:].addmm_(ub[j:stop, stop:].T, err[j:stop], alpha=-1.0)
    e = err.numpy()
    loss = np.einsum("ij,ij->j", e, e, dtype=np.float64).reshape(tries, rows)
    return k, q, err, loss


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


class _HessianCollector:
    """A runtime for one pass of one layer: the first named product not yet ``done`` that the layer
    runs becomes the target (with the products that share its input: q / k / v, gate / up); its
    input's x x^T is added up (a window's product in float32, the sum over windows in float64) and
    the pass stops there (_Stop): the layer's later products wait for this one to be rounded.

    The products before the target are done (their weights rounded, their inputs from products
    also done): their outputs are the same in every later pass of the layer, so the first pass that
    computes them keeps them in ``outputs`` (by window and the call's place in the pass) and the
    later passes reuse them."""

    def __init__(self, plain, names: dict[int, str], done: set[str], outputs: dict):
        self._plain = plain
        self.names = names
        self.done = done
        self.outputs = outputs
        self.window = 0
        self.calls = 0
        self.target: tuple[str, ...] | None = None
        self.hessian = None
        self.rows = 0

    def __getattr__(self, name):
        return getattr(self._plain, name)

    def project(self, modules, x, rebuild=None, kept=None):
        todo = tuple(self.names[id(m)] for m in modules if id(m) in self.names and self.names[id(m)] not in self.done)
        if not todo:
            key, ids = (self.window, self.calls), tuple(id(m) for m in modules)
            self.calls += 1
            seen = self.outputs.get(key)
            if seen is None or seen[0] != ids:
                seen = self.outputs[key] = (ids, [m(x) for m in modules])
            return seen[1]
        if self.target is None:
            self.target = todo
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        gram = (flat.T @ flat).double().numpy()
        self.hessian = gram if self.hessian is None else self.hessian + gram
        self.rows += flat.shape[0]
        raise _Stop


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
    products: the head and what ``weights`` left out).

    Within a layer the products are rounded in the order the layer runs them, each one's inputs
    computed with the products before it already rounded (one partial pass of the layer per
    input: q / k / v, the attention output, gate / up, down), then one full pass gives the next
    layer's inputs."""
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
            modules = {names[id(m)]: m for m in layer.modules() if id(m) in names}
            done: set[str] = set()
            outputs: dict = {}
            while True:
                collector = _HessianCollector(plain, names, done, outputs)
                ends = []
                for i, (x, cos, sin, mask) in enumerate(windows):
                    collector.window, collector.calls = i, 0
                    try:
                        ends.append(layer(x, cos, sin, mask, None, rt=collector))
                    except _Stop:
                        pass
                if collector.target is None:  # every product done: this pass gave the layer's outputs
                    break
                mean_square = np.diag(collector.hessian) / collector.rows
                factor = None
                for gname in collector.target:
                    done.add(gname)
                    w = weights(gname) if gname in kinds else None
                    if w is None:
                        importance[gname] = mean_square.astype(np.float32)
                        continue
                    if factor is None:  # one per input: q / k / v share it
                        factor = inverse_factor(collector.hessian, damp, gname)
                    packed[gname], values = _round(w, kinds[gname], factor, mean_square, gname)
                    back = to_module(gname, values)
                    module = modules.get(gname)
                    if module is not None and tuple(back.shape) == tuple(module.weight.shape):
                        module.weight.copy_(torch.from_numpy(back))
            for window, end in zip(windows, ends, strict=True):
                window[0] = end
        head = names.get(id(model.lm_head))
        if head is not None:
            sums, count = 0.0, 0
            for x, *_ in windows:
                flat = decoder.norm(x, plain).reshape(-1, x.shape[-1]).double()
                sums = sums + torch.einsum("ij,ij->j", flat, flat).numpy()
                count += flat.shape[0]
            importance[head] = (sums / count).astype(np.float32)
    return packed, importance
