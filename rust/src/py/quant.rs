//! Bindings for `crate::quant`: numpy arrays in (torch tensors viewed through `.numpy()`, so no
//! copy), caller-allocated numpy arrays out, the GIL released while the cores work.

use numpy::{PyReadonlyArray1, PyReadwriteArray1};
use pyo3::prelude::*;

use crate::quant::{self, FloatDtype, QuantType};

fn contiguous<'a, T>(what: &str, data: Result<&'a [T], numpy::AsSliceError>) -> PyResult<&'a [T]> {
    super::contiguous(what, "array", data)
}

fn contiguous_mut<'a, T>(what: &str, data: Result<&'a mut [T], numpy::AsSliceError>) -> PyResult<&'a mut [T]> {
    super::contiguous_mut(what, "array", data)
}

/// Quantize the raw bytes of a float tensor to 4 bits into `packed` and `absmax`.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn quantize_4bit(
    py: Python<'_>,
    src: PyReadonlyArray1<'_, u8>,
    dtype: &str,
    quant_type: &str,
    blocksize: usize,
    name: &str,
    mut packed: PyReadwriteArray1<'_, u8>,
    mut absmax: PyReadwriteArray1<'_, f32>,
) -> PyResult<()> {
    let dtype = FloatDtype::parse(dtype)?;
    let quant_type = QuantType::parse(quant_type)?;
    let src = contiguous("src", src.as_slice())?;
    let packed = contiguous_mut("packed", packed.as_slice_mut())?;
    let absmax = contiguous_mut("absmax", absmax.as_slice_mut())?;
    py.detach(|| quant::quantize_4bit(src, dtype, quant_type, blocksize, name, packed, absmax))?;
    Ok(())
}

/// Dequantize `n` 4-bit codes into `out`, the raw bytes of an `n`-element `dtype` tensor.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn dequantize_4bit(
    py: Python<'_>,
    packed: PyReadonlyArray1<'_, u8>,
    absmax: PyReadonlyArray1<'_, f32>,
    quant_type: &str,
    blocksize: usize,
    n: usize,
    dtype: &str,
    mut out: PyReadwriteArray1<'_, u8>,
) -> PyResult<()> {
    let dtype = FloatDtype::parse(dtype)?;
    let quant_type = QuantType::parse(quant_type)?;
    let packed = contiguous("packed", packed.as_slice())?;
    let absmax = contiguous("absmax", absmax.as_slice())?;
    let out = contiguous_mut("out", out.as_slice_mut())?;
    py.detach(|| quant::dequantize_4bit(packed, absmax, quant_type, blocksize, n, dtype, out))?;
    Ok(())
}

/// 8-bit blockwise quantization of `src - offset` with a 256-entry codebook (double quant).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn quantize_blockwise_8bit(
    py: Python<'_>,
    src: PyReadonlyArray1<'_, f32>,
    offset: f32,
    code: PyReadonlyArray1<'_, f32>,
    blocksize: usize,
    mut out: PyReadwriteArray1<'_, u8>,
    mut absmax: PyReadwriteArray1<'_, f32>,
) -> PyResult<()> {
    let src = contiguous("src", src.as_slice())?;
    let code = contiguous("code", code.as_slice())?;
    let out = contiguous_mut("out", out.as_slice_mut())?;
    let absmax = contiguous_mut("absmax", absmax.as_slice_mut())?;
    py.detach(|| quant::quantize_blockwise_8bit(src, offset, code, blocksize, out, absmax))?;
    Ok(())
}

/// `out = code[q] * absmax[block] + offset` (restores a double-quantized absmax).
#[pyfunction]
fn dequantize_blockwise_8bit(
    py: Python<'_>,
    q: PyReadonlyArray1<'_, u8>,
    absmax: PyReadonlyArray1<'_, f32>,
    code: PyReadonlyArray1<'_, f32>,
    blocksize: usize,
    offset: f32,
    mut out: PyReadwriteArray1<'_, f32>,
) -> PyResult<()> {
    let q = contiguous("q", q.as_slice())?;
    let absmax = contiguous("absmax", absmax.as_slice())?;
    let code = contiguous("code", code.as_slice())?;
    let out = contiguous_mut("out", out.as_slice_mut())?;
    py.detach(|| quant::dequantize_blockwise_8bit(q, absmax, code, blocksize, offset, out))?;
    Ok(())
}

/// Quantize `src` (f32 rows of `row_len`) as the GGUF block type `ggml_type` into `out`.
#[pyfunction]
fn quantize_ggml(
    py: Python<'_>,
    src: PyReadonlyArray1<'_, f32>,
    row_len: usize,
    ggml_type: &str,
    name: &str,
    mut out: PyReadwriteArray1<'_, u8>,
) -> PyResult<()> {
    let ty = quant::GgmlType::parse(ggml_type)?;
    let src = contiguous("src", src.as_slice())?;
    let out = contiguous_mut("out", out.as_slice_mut())?;
    py.detach(|| quant::quantize_ggml(src, row_len, ty, name, out))?;
    Ok(())
}

/// Quantize `src` as `quantize_ggml` does, with `importance` (one value per column of the rows)
/// weighting each value's error: llama.cpp's search when it quantizes with an importance matrix.
#[pyfunction]
fn quantize_ggml_weighted(
    py: Python<'_>,
    src: PyReadonlyArray1<'_, f32>,
    row_len: usize,
    ggml_type: &str,
    name: &str,
    importance: PyReadonlyArray1<'_, f32>,
    mut out: PyReadwriteArray1<'_, u8>,
) -> PyResult<()> {
    let ty = quant::GgmlType::parse(ggml_type)?;
    let src = contiguous("src", src.as_slice())?;
    let importance = contiguous("importance", importance.as_slice())?;
    let out = contiguous_mut("out", out.as_slice_mut())?;
    py.detach(|| quant::quantize_ggml_weighted(src, row_len, ty, name, importance, out))?;
    Ok(())
}

/// Each value's grid of the `ggml_type` blocks in `packed` (rows of `row_len` values): the value
/// reads back as `a * k - b` for its level `k` (the type's level range: `quant::ggml_levels::level_range`).
#[pyfunction]
fn ggml_grid(
    py: Python<'_>,
    packed: PyReadonlyArray1<'_, u8>,
    row_len: usize,
    ggml_type: &str,
    name: &str,
    mut a: PyReadwriteArray1<'_, f32>,
    mut b: PyReadwriteArray1<'_, f32>,
) -> PyResult<()> {
    let ty = quant::GgmlType::parse(ggml_type)?;
    let packed = contiguous("packed", packed.as_slice())?;
    let a = contiguous_mut("a", a.as_slice_mut())?;
    let b = contiguous_mut("b", b.as_slice_mut())?;
    py.detach(|| quant::ggml_grid(packed, row_len, ty, name, a, b))?;
    Ok(())
}

/// Writes `levels` (one per value) into the `ggml_type` blocks of `packed`, keeping their parameters.
#[pyfunction]
fn ggml_set_levels(
    py: Python<'_>,
    levels: PyReadonlyArray1<'_, i8>,
    row_len: usize,
    ggml_type: &str,
    name: &str,
    mut packed: PyReadwriteArray1<'_, u8>,
) -> PyResult<()> {
    let ty = quant::GgmlType::parse(ggml_type)?;
    let levels = contiguous("levels", levels.as_slice())?;
    let packed = contiguous_mut("packed", packed.as_slice_mut())?;
    py.detach(|| quant::ggml_set_levels(levels, row_len, ty, name, packed))?;
    Ok(())
}

/// Multiplies every block's f16 `d` in `packed` by `s` in place (a d that would overflow is kept).
#[pyfunction]
fn ggml_scale_d(
    py: Python<'_>,
    mut packed: PyReadwriteArray1<'_, u8>,
    row_len: usize,
    ggml_type: &str,
    name: &str,
    s: f32,
) -> PyResult<()> {
    let ty = quant::GgmlType::parse(ggml_type)?;
    let packed = contiguous_mut("packed", packed.as_slice_mut())?;
    py.detach(|| quant::ggml_scale_d(packed, row_len, ty, name, s))?;
    Ok(())
}

/// GPTQ's column loop over one run of column-major weights `w` (columns of `rows`) on a fixed
/// grid: levels, values and scaled errors out, the run's later columns moved in place.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn ggml_gptq_run(
    py: Python<'_>,
    mut w: PyReadwriteArray1<'_, f32>,
    rows: usize,
    a: PyReadonlyArray1<'_, f32>,
    b: PyReadonlyArray1<'_, f32>,
    u: PyReadonlyArray1<'_, f32>,
    ggml_type: &str,
    name: &str,
    mut levels: PyReadwriteArray1<'_, i8>,
    mut values: PyReadwriteArray1<'_, f32>,
    mut err: PyReadwriteArray1<'_, f32>,
) -> PyResult<()> {
    let ty = quant::GgmlType::parse(ggml_type)?;
    let w = contiguous_mut("w", w.as_slice_mut())?;
    let a = contiguous("a", a.as_slice())?;
    let b = contiguous("b", b.as_slice())?;
    let u = contiguous("u", u.as_slice())?;
    let levels = contiguous_mut("levels", levels.as_slice_mut())?;
    let values = contiguous_mut("values", values.as_slice_mut())?;
    let err = contiguous_mut("err", err.as_slice_mut())?;
    py.detach(|| quant::ggml_gptq_run(w, rows, a, b, u, ty, name, levels, values, err))?;
    Ok(())
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(quantize_4bit, m)?)?;
    m.add_function(wrap_pyfunction!(dequantize_4bit, m)?)?;
    m.add_function(wrap_pyfunction!(quantize_blockwise_8bit, m)?)?;
    m.add_function(wrap_pyfunction!(dequantize_blockwise_8bit, m)?)?;
    m.add_function(wrap_pyfunction!(quantize_ggml, m)?)?;
    m.add_function(wrap_pyfunction!(quantize_ggml_weighted, m)?)?;
    m.add_function(wrap_pyfunction!(ggml_grid, m)?)?;
    m.add_function(wrap_pyfunction!(ggml_set_levels, m)?)?;
    m.add_function(wrap_pyfunction!(ggml_scale_d, m)?)?;
    m.add_function(wrap_pyfunction!(ggml_gptq_run, m)?)?;
    Ok(())
}
