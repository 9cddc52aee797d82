//! Bindings for the compute kernels (`crate::infer` decode kernels, `crate::dropout`): numpy views
//! of torch tensors in and out, the GIL released for the long ones.

use numpy::{PyReadonlyArray1, PyReadwriteArray1};
use pyo3::prelude::*;

use crate::attention::{self, Dims, Input, Output, Span};
use crate::infer::{self, Gemv};
use crate::rope::{self, Shape, Strides};
use crate::{dropout, lora, rmsnorm, swiglu, xent};

fn slice<'a>(what: &str, s: Result<&'a [f32], numpy::AsSliceError>) -> PyResult<&'a [f32]> {
    super::contiguous(what, "float32 array", s)
}

fn slice_mut<'a>(what: &str, s: Result<&'a mut [f32], numpy::AsSliceError>) -> PyResult<&'a mut [f32]> {
    super::contiguous_mut(what, "float32 array", s)
}

type Product<'py> = (PyReadonlyArray1<'py, f32>, Option<PyReadonlyArray1<'py, f32>>, PyReadwriteArray1<'py, f32>);

/// The checked slices of each `(weight, bias, out)` product.
fn gemv_batch<'a>(products: &'a mut [Product<'_>]) -> PyResult<Vec<Gemv<'a>>> {
    let mut batch = Vec::with_capacity(products.len());
    for (w, b, out) in products.iter_mut() {
        let w = slice("weight", w.as_slice())?;
        let bias = match b {
            Some(b) => Some(slice("bias", b.as_slice())?),
            None => None,
        };
        let y = slice_mut("out", out.as_slice_mut())?;
        batch.push(Gemv { w, bias, y });
    }
    Ok(batch)
}

/// `out = weight @ x (+ bias)` for each `(weight, bias, out)` in `products`, all of the same `x`;
/// each weight is the flat row-major (len(out), len(x)) matrix.
#[pyfunction]
fn gemv_f32(py: Python<'_>, x: PyReadonlyArray1<'_, f32>, mut products: Vec<Product<'_>>) -> PyResult<()> {
    let x = slice("x", x.as_slice())?;
    let mut batch = gemv_batch(&mut products)?;
    py.detach(|| infer::gemv_f32(x, &mut batch))?;
    Ok(())
}

/// [`gemv_f32`] for `n` input rows at once: `x` holds the rows, each `out` the `n` rows of its
/// outputs; every output row is bit for bit what `gemv_f32` gives for its input row alone.
#[pyfunction]
fn gemv_rows_f32(
    py: Python<'_>,
    x: PyReadonlyArray1<'_, f32>,
    n: usize,
    mut products: Vec<Product<'_>>,
) -> PyResult<()> {
    let x = slice("x", x.as_slice())?;
    let mut batch = gemv_batch(&mut products)?;
    py.detach(|| infer::gemv_rows_f32(x, n, &mut batch))?;
    Ok(())
}

/// `out = x / sqrt(mean(x^2) + eps) * weight` over rows of `len(weight)` values.
#[pyfunction]
fn rms_norm_f32(
    x: PyReadonlyArray1<'_, f32>,
    weight: PyReadonlyArray1<'_, f32>,
    eps: f32,
    mut out: PyReadwriteArray1<'_, f32>,
) -> PyResult<()> {
    let y = slice_mut("out", out.as_slice_mut())?;
    Ok(infer::rms_norm_f32(slice("x", x.as_slice())?, slice("weight", weight.as_slice())?, eps, y)?)
}

/// Whether the training kernels split their work over the process's OpenMP team (tests, A/B).
#[pyfunction]
fn set_omp_kernels(on: bool) {
    crate::omp::ENABLED.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Training RMSNorm forward: `out = x * rstd * weight`, `rstd` (one per row) kept for backward.
#[pyfunction]
fn rms_norm_forward_f32(
    py: Python<'_>,
    x: PyReadonlyArray1<'_, f32>,
    weight: PyReadonlyArray1<'_, f32>,
    eps: f32,
    mut out: PyReadwriteArray1<'_, f32>,
    mut rstd: PyReadwriteArray1<'_, f32>,
) -> PyResult<()> {
    let (x, weight) = (slice("x", x.as_slice())?, slice("weight", weight.as_slice())?);
    let (out, rstd) = (slice_mut("out", out.as_slice_mut())?, slice_mut("rstd", rstd.as_slice_mut())?);
    py.detach(|| rmsnorm::forward_f32(x, weight, eps, out, rstd))?;
    Ok(())
}

/// Training RMSNorm backward: `dx`, and the weight's gradient added into `dw` when given.
#[pyfunction]
#[pyo3(signature = (dy, x, weight, rstd, dx, dw=None))]
fn rms_norm_backward_f32(
    py: Python<'_>,
    dy: PyReadonlyArray1<'_, f32>,
    x: PyReadonlyArray1<'_, f32>,
    weight: PyReadonlyArray1<'_, f32>,
    rstd: PyReadonlyArray1<'_, f32>,
    mut dx: PyReadwriteArray1<'_, f32>,
    mut dw: Option<PyReadwriteArray1<'_, f32>>,
) -> PyResult<()> {
    let (dy, x) = (slice("dy", dy.as_slice())?, slice("x", x.as_slice())?);
    let (weight, rstd) = (slice("weight", weight.as_slice())?, slice("rstd", rstd.as_slice())?);
    let dx = slice_mut("dx", dx.as_slice_mut())?;
    let dw = match dw.as_mut() {
        Some(d) => Some(slice_mut("dw", d.as_slice_mut())?),
        None => None,
    };
    py.detach(|| rmsnorm::backward_f32(dy, x, weight, rstd, dx, dw))?;
    Ok(())
}

/// `out = dropout(x)` with the counter-based mask of `seed` (drop probability `p`).
#[pyfunction]
fn dropout_f32(
    py: Python<'_>,
    x: PyReadonlyArray1<'_, f32>,
    mut out: PyReadwriteArray1<'_, f32>,
    seed: u64,
    p: f32,
) -> PyResult<()> {
    let x = slice("x", x.as_slice())?;
    let y = slice_mut("out", out.as_slice_mut())?;
    py.detach(|| dropout::dropout_f32(x, y, seed, p))?;
    Ok(())
}

/// `x = dropout(x)` in place, the mask of `seed`.
#[pyfunction]
fn dropout_inplace_f32(py: Python<'_>, mut x: PyReadwriteArray1<'_, f32>, seed: u64, p: f32) -> PyResult<()> {
    let x = slice_mut("x", x.as_slice_mut())?;
    py.detach(|| dropout::dropout_inplace_f32(x, seed, p))?;
    Ok(())
}

/// `y = silu(gate) * up`.
#[pyfunction]
fn swiglu_forward_f32(
    py: Python<'_>,
    gate: PyReadonlyArray1<'_, f32>,
    up: PyReadonlyArray1<'_, f32>,
    mut y: PyReadwriteArray1<'_, f32>,
) -> PyResult<()> {
    let (g, u) = (slice("gate", gate.as_slice())?, slice("up", up.as_slice())?);
    let y = slice_mut("y", y.as_slice_mut())?;
    py.detach(|| swiglu::forward(g, u, y))?;
    Ok(())
}

/// The gradients of `silu(gate) * up` for the upstream gradient `dy`, into `d_gate` and `d_up`.
#[pyfunction]
fn swiglu_backward_f32(
    py: Python<'_>,
    dy: PyReadonlyArray1<'_, f32>,
    gate: PyReadonlyArray1<'_, f32>,
    up: PyReadonlyArray1<'_, f32>,
    mut d_gate: PyReadwriteArray1<'_, f32>,
    mut d_up: PyReadwriteArray1<'_, f32>,
) -> PyResult<()> {
    let (d, g, u) = (slice("dy", dy.as_slice())?, slice("gate", gate.as_slice())?, slice("up", up.as_slice())?);
    let dg = slice_mut("d_gate", d_gate.as_slice_mut())?;
    let du = slice_mut("d_up", d_up.as_slice_mut())?;
    py.detach(|| swiglu::backward(d, g, u, dg, du))?;
    Ok(())
}

/// The backward of rows `w_r * silu(gate_r) * up_r` (one weight per row): `d_gate`, `d_up` for
/// the upstream gradient `w_r * dy_r` and `d_w_r = <dy_r, silu(gate_r) * up_r>`.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn swiglu_backward_weighted_f32(
    py: Python<'_>,
    dy: PyReadonlyArray1<'_, f32>,
    gate: PyReadonlyArray1<'_, f32>,
    up: PyReadonlyArray1<'_, f32>,
    w: PyReadonlyArray1<'_, f32>,
    mut d_gate: PyReadwriteArray1<'_, f32>,
    mut d_up: PyReadwriteArray1<'_, f32>,
    mut d_w: PyReadwriteArray1<'_, f32>,
) -> PyResult<()> {
    let (d, g, u) = (slice("dy", dy.as_slice())?, slice("gate", gate.as_slice())?, slice("up", up.as_slice())?);
    let w = slice("w", w.as_slice())?;
    let dg = slice_mut("d_gate", d_gate.as_slice_mut())?;
    let du = slice_mut("d_up", d_up.as_slice_mut())?;
    let dw = slice_mut("d_w", d_w.as_slice_mut())?;
    py.detach(|| swiglu::backward_weighted(d, g, u, w, dg, du, dw))?;
    Ok(())
}

/// Cross-entropy of a chunk of float32 logits (rows x vocab, flat), in place: `lse` and `picked`
/// per row; with `grad`, the logits become `(softmax - onehot(label)) * weight` per row (with
/// `grad_out`, that buffer does and the logits stay).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (logits, vocab, labels, weight, grad, lse, picked, grad_out=None))]
fn cross_entropy_f32(
    py: Python<'_>,
    mut logits: PyReadwriteArray1<'_, f32>,
    vocab: usize,
    labels: PyReadonlyArray1<'_, i64>,
    weight: PyReadonlyArray1<'_, f32>,
    grad: bool,
    mut lse: PyReadwriteArray1<'_, f32>,
    mut picked: PyReadwriteArray1<'_, f32>,
    grad_out: Option<PyReadwriteArray1<'_, f32>>,
) -> PyResult<()> {
    let labels = super::contiguous("labels", "int64 array", labels.as_slice())?;
    let weight = slice("weight", weight.as_slice())?;
    let (lse, picked) = (slice_mut("lse", lse.as_slice_mut())?, slice_mut("picked", picked.as_slice_mut())?);
    match grad_out {
        Some(mut out) if grad => {
            let logits = slice("logits", logits.as_slice())?;
            let out = slice_mut("grad_out", out.as_slice_mut())?;
            py.detach(|| xent::forward_backward_to(logits, vocab, labels, weight, out, lse, picked))?;
        }
        _ => {
            let logits = slice_mut("logits", logits.as_slice_mut())?;
            py.detach(|| xent::forward_backward(logits, vocab, labels, weight, grad, lse, picked))?;
        }
    }
    Ok(())
}

/// RoPE (or, with `backward`, its transpose) of the (B, H, T, D) tensor `x` into `out`; both are
/// flat spans with element strides (batch, head, pos) and a contiguous head dim; `cos`/`sin` are
/// (T, D) tables per batch row, `table_batch` values apart (0: shared).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn rope_f32(
    py: Python<'_>,
    x: PyReadonlyArray1<'_, f32>,
    x_strides: (usize, usize, usize),
    mut out: PyReadwriteArray1<'_, f32>,
    out_strides: (usize, usize, usize),
    cos: PyReadonlyArray1<'_, f32>,
    sin: PyReadonlyArray1<'_, f32>,
    table_batch: usize,
    shape: (usize, usize, usize, usize),
    backward: bool,
) -> PyResult<()> {
    let (x, c, s) = (slice("x", x.as_slice())?, slice("cos", cos.as_slice())?, slice("sin", sin.as_slice())?);
    let o = slice_mut("out", out.as_slice_mut())?;
    let (batch, heads, seq, dim) = shape;
    py.detach(|| {
        rope::rotate(
            x,
            strides(x_strides),
            o,
            strides(out_strides),
            c,
            s,
            table_batch,
            Shape { batch, heads, seq, dim },
            backward,
        )
    })?;
    Ok(())
}

/// LoRA's adapter side with its dropout (drop probability `p`, mask of `seed`) fused in:
/// `h = dropout(x) @ a^T` for x (rows, cols), a (r, cols), h (rows, r), all flat.
#[pyfunction]
fn lora_down_f32(
    py: Python<'_>,
    x: PyReadonlyArray1<'_, f32>,
    cols: usize,
    a: PyReadonlyArray1<'_, f32>,
    seed: u64,
    p: f32,
    mut h: PyReadwriteArray1<'_, f32>,
) -> PyResult<()> {
    let (x, a) = (slice("x", x.as_slice())?, slice("a", a.as_slice())?);
    let h = slice_mut("h", h.as_slice_mut())?;
    let mask = lora::Mask::new(seed, p)?;
    py.detach(|| lora::down(x, cols, a, mask, h))?;
    Ok(())
}

/// `d_a = dh^T @ dropout(x)` for dh (rows, r), x (rows, cols), d_a (r, cols).
#[pyfunction]
fn lora_grad_a_f32(
    py: Python<'_>,
    dh: PyReadonlyArray1<'_, f32>,
    x: PyReadonlyArray1<'_, f32>,
    cols: usize,
    seed: u64,
    p: f32,
    mut d_a: PyReadwriteArray1<'_, f32>,
) -> PyResult<()> {
    let (dh, x) = (slice("dh", dh.as_slice())?, slice("x", x.as_slice())?);
    let d_a = slice_mut("d_a", d_a.as_slice_mut())?;
    let mask = lora::Mask::new(seed, p)?;
    py.detach(|| lora::grad_a(dh, x, cols, mask, d_a))?;
    Ok(())
}

/// `dx += dropout(dh @ a)` in place for dx (rows, cols), dh (rows, r), a (r, cols).
#[pyfunction]
fn lora_add_up_f32(
    py: Python<'_>,
    mut dx: PyReadwriteArray1<'_, f32>,
    dh: PyReadonlyArray1<'_, f32>,
    a: PyReadonlyArray1<'_, f32>,
    cols: usize,
    seed: u64,
    p: f32,
) -> PyResult<()> {
    let (dh, a) = (slice("dh", dh.as_slice())?, slice("a", a.as_slice())?);
    let dx = slice_mut("dx", dx.as_slice_mut())?;
    let mask = lora::Mask::new(seed, p)?;
    py.detach(|| lora::add_up(dx, dh, a, cols, mask))?;
    Ok(())
}

type Strided<'py> = (PyReadonlyArray1<'py, f32>, (usize, usize, usize));
type StridedMut<'py> = (PyReadwriteArray1<'py, f32>, (usize, usize, usize));

fn strides((batch, head, pos): (usize, usize, usize)) -> Strides {
    Strides { batch, head, pos }
}

fn dims((batch, heads, kv_heads, seq, dim): (usize, usize, usize, usize, usize)) -> Dims {
    Dims { batch, heads, kv_heads, seq, dim }
}

fn input<'a>(what: &str, t: &'a Strided<'_>) -> PyResult<Input<'a>> {
    Ok(Input { data: slice(what, t.0.as_slice())?, strides: strides(t.1) })
}

fn output<'a>(what: &str, t: &'a mut StridedMut<'_>) -> PyResult<Output<'a>> {
    let s = strides(t.1);
    Ok(Output { data: slice_mut(what, t.0.as_slice_mut())?, strides: s })
}

fn spans(docs: Option<Vec<(usize, usize, usize)>>) -> Option<Vec<Span>> {
    docs.map(|d| d.into_iter().map(|(batch, start, len)| Span { batch, start, len }).collect())
}

/// Causal attention of q (B, H, T, D) over k, v (B, Hkv, T, D) into `out` (B, H, T, D), each a
/// flat span with the element strides of its (batch, head, pos) axes; `lse` (B, H, T) contiguous
/// gets the rows' log-sum-exp. `shape` is (B, H, Hkv, T, D). `docs`: (row, start, length) of the
/// documents packed in the rows, tiling them in order: each query then attends inside its own
/// document only, and `lse` holds H x length values per document in `docs` order. `window`: a
/// causal sliding window of that many keys (query i sees keys j with i - window < j <= i).
/// `softcap`: Gemma 2's cap c on the logits, `c tanh(scale q.k / c)`, before the masking.
#[pyfunction]
#[pyo3(signature = (q, k, v, out, lse, shape, scale, docs=None, window=None, softcap=None))]
#[allow(clippy::too_many_arguments)]
fn attention_forward_f32(
    py: Python<'_>,
    q: Strided<'_>,
    k: Strided<'_>,
    v: Strided<'_>,
    mut out: StridedMut<'_>,
    mut lse: PyReadwriteArray1<'_, f32>,
    shape: (usize, usize, usize, usize, usize),
    scale: f32,
    docs: Option<Vec<(usize, usize, usize)>>,
    window: Option<usize>,
    softcap: Option<f32>,
) -> PyResult<()> {
    let (q, k, v) = (input("q", &q)?, input("k", &k)?, input("v", &v)?);
    let out = output("out", &mut out)?;
    let lse = slice_mut("lse", lse.as_slice_mut())?;
    let docs = spans(docs);
    py.detach(|| match docs {
        Some(docs) => attention::forward_docs(q, k, v, out, lse, dims(shape), &docs, scale, window, softcap),
        None => attention::forward(q, k, v, out, lse, dims(shape), scale, window, softcap),
    })?;
    Ok(())
}

/// The gradients of `attention_forward_f32` into dq (B, H, T, D), dk and dv (B, Hkv, T, D);
/// `docs`, `window` and `softcap` as given to the forward.
#[pyfunction]
#[pyo3(signature = (dout, q, k, v, out, lse, dq, dk, dv, shape, scale, docs=None, window=None, softcap=None))]
#[allow(clippy::too_many_arguments)]
fn attention_backward_f32(
    py: Python<'_>,
    dout: Strided<'_>,
    q: Strided<'_>,
    k: Strided<'_>,
    v: Strided<'_>,
    out: Strided<'_>,
    lse: PyReadonlyArray1<'_, f32>,
    mut dq: StridedMut<'_>,
    mut dk: StridedMut<'_>,
    mut dv: StridedMut<'_>,
    shape: (usize, usize, usize, usize, usize),
    scale: f32,
    docs: Option<Vec<(usize, usize, usize)>>,
    window: Option<usize>,
    softcap: Option<f32>,
) -> PyResult<()> {
    let (dout, q, k) = (input("dout", &dout)?, input("q", &q)?, input("k", &k)?);
    let (v, out, lse) = (input("v", &v)?, input("out", &out)?, slice("lse", lse.as_slice())?);
    let (dq, dk, dv) = (output("dq", &mut dq)?, output("dk", &mut dk)?, output("dv", &mut dv)?);
    let (d, docs) = (dims(shape), spans(docs));
    py.detach(|| match docs {
        Some(docs) => attention::backward_docs(dout, q, k, v, out, lse, dq, dk, dv, d, &docs, scale, window, softcap),
        None => attention::backward(dout, q, k, v, out, lse, dq, dk, dv, d, scale, window, softcap),
    })?;
    Ok(())
}

type CacheArgs<'py> = (PyReadwriteArray1<'py, f32>, PyReadwriteArray1<'py, f32>, usize, usize, usize);

/// Decoding attention: `q` (N, H, D) and the new keys and values `k`, `v` (N, Hkv, D), contiguous,
/// for N sequences; `caches` holds each sequence's (keys, values, offset, capacity, past): its
/// cache's flat key and value storage, where this layer's (Hkv, capacity, D) block starts, and
/// how many positions it holds. The new keys and values go to position `past`; `out` (N, H, D)
/// gets each head's attention over positions `0..=past` (the `window` latest of them, with one).
/// `heads` is (H, Hkv, D).
#[pyfunction]
#[pyo3(signature = (q, k, v, caches, out, heads, scale, window=None))]
#[allow(clippy::too_many_arguments)]
fn attention_decode_f32(
    py: Python<'_>,
    q: PyReadonlyArray1<'_, f32>,
    k: PyReadonlyArray1<'_, f32>,
    v: PyReadonlyArray1<'_, f32>,
    mut caches: Vec<CacheArgs<'_>>,
    mut out: PyReadwriteArray1<'_, f32>,
    heads: (usize, usize, usize),
    scale: f32,
    window: Option<usize>,
) -> PyResult<()> {
    let (q, k, v) = (slice("q", q.as_slice())?, slice("k", k.as_slice())?, slice("v", v.as_slice())?);
    let out = slice_mut("out", out.as_slice_mut())?;
    let mut rows = Vec::with_capacity(caches.len());
    for (ck, cv, offset, capacity, past) in caches.iter_mut() {
        let (ck, cv) = (slice_mut("cache keys", ck.as_slice_mut())?, slice_mut("cache values", cv.as_slice_mut())?);
        rows.push(attention::Cache { k: ck, v: cv, offset: *offset, capacity: *capacity, past: *past });
    }
    let (heads, kv_heads, dim) = heads;
    let step = attention::Step { q, k, v };
    py.detach(|| attention::decode(step, &mut rows, out, attention::Heads { heads, kv_heads, dim }, scale, window))?;
    Ok(())
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(gemv_f32, m)?)?;
    m.add_function(wrap_pyfunction!(gemv_rows_f32, m)?)?;
    m.add_function(wrap_pyfunction!(rms_norm_f32, m)?)?;
    m.add_function(wrap_pyfunction!(rms_norm_forward_f32, m)?)?;
    m.add_function(wrap_pyfunction!(rms_norm_backward_f32, m)?)?;
    m.add_function(wrap_pyfunction!(set_omp_kernels, m)?)?;
    m.add_function(wrap_pyfunction!(dropout_f32, m)?)?;
    m.add_function(wrap_pyfunction!(swiglu_forward_f32, m)?)?;
    m.add_function(wrap_pyfunction!(swiglu_backward_f32, m)?)?;
    m.add_function(wrap_pyfunction!(swiglu_backward_weighted_f32, m)?)?;
    m.add_function(wrap_pyfunction!(dropout_inplace_f32, m)?)?;
    m.add_function(wrap_pyfunction!(cross_entropy_f32, m)?)?;
    m.add_function(wrap_pyfunction!(rope_f32, m)?)?;
    m.add_function(wrap_pyfunction!(attention_forward_f32, m)?)?;
    m.add_function(wrap_pyfunction!(attention_decode_f32, m)?)?;
    m.add_function(wrap_pyfunction!(attention_backward_f32, m)?)?;
    m.add_function(wrap_pyfunction!(lora_down_f32, m)?)?;
    m.add_function(wrap_pyfunction!(lora_grad_a_f32, m)?)?;
    m.add_function(wrap_pyfunction!(lora_add_up_f32, m)?)?;
    Ok(())
}
