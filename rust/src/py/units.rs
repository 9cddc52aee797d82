use pyo3::prelude::*;

/// Parse a size string such as "2GB", "500MiB" or "1048576" into bytes.
#[pyfunction]
fn parse_size(text: &str) -> PyResult<u64> {
    Ok(crate::units::parse_size(text)?)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(parse_size, m)?)
}
