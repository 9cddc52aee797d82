//! Bindings for the optimizer steps (`crate::adamw8bit`): numpy views of a parameter, its gradient
//! and its quantized moments, stepped in place with the GIL released.

use numpy::{PyReadonlyArray1, PyReadwriteArray1};
use pyo3::prelude::*;

use crate::adamw8bit::{self, Hyper, Maps, State};

/// (beta1, beta2, 1 - beta1, 1 - beta2, eps, step_size, inv_sqrt_bc2, decay), as
/// `adamw8bit::Hyper` documents them.
type Scalars = (f32, f32, f32, f32, f32, f32, f32, f32);
type Codes<'py> = PyReadwriteArray1<'py, u8>;
type Absmax<'py> = PyReadwriteArray1<'py, f32>;
type Table<'py> = PyReadonlyArray1<'py, f32>;

fn hyper(s: Scalars) -> Hyper {
    let (beta1, beta2, one_minus_beta1, one_minus_beta2, eps, step_size, inv_sqrt_bc2, decay) = s;
    Hyper { beta1, beta2, one_minus_beta1, one_minus_beta2, eps, step_size, inv_sqrt_bc2, decay }
}

/// The quantized moments and code tables as slices, or a ValueError naming the array that is not
/// contiguous.
struct Views<'a> {
    state: State<'a>,
    signed: &'a [f32],
    unsigned: &'a [f32],
}

fn views<'a>(
    codes: &'a mut (Codes<'_>, Codes<'_>),
    absmax: &'a mut (Absmax<'_>, Absmax<'_>),
    maps: &'a (Table<'_>, Table<'_>),
) -> PyResult<Views<'a>> {
    let codes1 = super::contiguous_mut("codes1", "uint8 array", codes.0.as_slice_mut())?;
    let codes2 = super::contiguous_mut("codes2", "uint8 array", codes.1.as_slice_mut())?;
    let absmax1 = super::contiguous_mut("absmax1", "float32 array", absmax.0.as_slice_mut())?;
    let absmax2 = super::contiguous_mut("absmax2", "float32 array", absmax.1.as_slice_mut())?;
    let signed = super::contiguous("map_signed", "float32 array", maps.0.as_slice())?;
    let unsigned = super::contiguous("map_unsigned", "float32 array", maps.1.as_slice())?;
    Ok(Views { state: State { codes1, codes2, absmax1, absmax2 }, signed, unsigned })
}

/// One 8-bit blockwise AdamW step of a float32 parameter, in place: `codes` (m, v) one byte per
/// element, `absmax` (m, v) one float32 per 256 elements, `maps` the (signed, unsigned) code tables.
#[pyfunction]
fn adamw_8bit_step_f32(
    py: Python<'_>,
    mut param: PyReadwriteArray1<'_, f32>,
    grad: PyReadonlyArray1<'_, f32>,
    mut codes: (Codes<'_>, Codes<'_>),
    mut absmax: (Absmax<'_>, Absmax<'_>),
    maps: (Table<'_>, Table<'_>),
    scalars: Scalars,
) -> PyResult<()> {
    let p = super::contiguous_mut("param", "float32 array", param.as_slice_mut())?;
    let g = super::contiguous("grad", "float32 array", grad.as_slice())?;
    let v = views(&mut codes, &mut absmax, &maps)?;
    let maps = Maps { signed: v.signed, unsigned: v.unsigned };
    py.detach(|| adamw8bit::step_f32(p, g, v.state, &maps, &hyper(scalars)))?;
    Ok(())
}

/// [`adamw_8bit_step_f32`] for a bf16 parameter and gradient passed as int16 views of their bits;
/// the new weight is rounded to bf16 stochastically with the draws of `seed`.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn adamw_8bit_step_bf16(
    py: Python<'_>,
    mut param: PyReadwriteArray1<'_, i16>,
    grad: PyReadonlyArray1<'_, i16>,
    mut codes: (Codes<'_>, Codes<'_>),
    mut absmax: (Absmax<'_>, Absmax<'_>),
    maps: (Table<'_>, Table<'_>),
    scalars: Scalars,
    seed: u64,
) -> PyResult<()> {
    let p = super::contiguous_mut("param", "int16 array (bf16 bits)", param.as_slice_mut())?;
    let g = super::contiguous("grad", "int16 array (bf16 bits)", grad.as_slice())?;
    let (p, g): (&mut [u16], &[u16]) = (bytemuck::cast_slice_mut(p), bytemuck::cast_slice(g));
    let v = views(&mut codes, &mut absmax, &maps)?;
    let maps = Maps { signed: v.signed, unsigned: v.unsigned };
    py.detach(|| adamw8bit::step_bf16(p, g, v.state, &maps, &hyper(scalars), seed))?;
    Ok(())
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(adamw_8bit_step_f32, m)?)?;
    m.add_function(wrap_pyfunction!(adamw_8bit_step_bf16, m)?)?;
    Ok(())
}
