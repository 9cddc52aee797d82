//! Bindings for `crate::safetensors`: a streaming shard writer fed with numpy byte views of torch
//! tensors (no copy on the way in), and an mmap reader that hands out numpy arrays.

use numpy::{PyArray1, PyReadonlyArray1};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::error::Error;
use crate::safetensors::reader::PrivateMap;
use crate::safetensors::{Dtype, Header, OutputDir, SafeFile, ShardedWriter, TensorInfo, TensorSpec, WriteSummary};

pub(crate) fn dtype_of(name: &str) -> PyResult<Dtype> {
    Dtype::from_name(name).ok_or_else(|| {
        PyValueError::new_err(format!("unsupported safetensors dtype {name:?}; expected F32, F16, BF16, I64, ..."))
    })
}

pub(crate) fn summary_dict<'py>(py: Python<'py>, s: &WriteSummary) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("files", s.files.clone())?;
    d.set_item("tensors", s.tensors)?;
    d.set_item("data_bytes", s.data_bytes)?;
    d.set_item("file_bytes", s.file_bytes)?;
    d.set_item("io", s.io.clone())?;
    Ok(d)
}

/// Streams tensors, in the order given at construction, into HF-style shards under `out_dir`.
/// mode "into": files land in `out_dir` (created if needed) next to what is there, replacing an
/// older checkpoint's shards; mode "new": `out_dir` appears as a whole at `finish`, and must not
/// exist unless `overwrite`.
#[pyclass(module = "tunex._native")]
pub struct ShardWriter {
    inner: Option<ShardedWriter>,
    prefix: String,
}

#[pymethods]
impl ShardWriter {
    #[new]
    #[pyo3(signature = (out_dir, tensors, max_shard_size, metadata, prefix="model", mode="into", overwrite=false, fsync=true))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        out_dir: std::path::PathBuf,
        tensors: Vec<(String, String, Vec<u64>)>,
        max_shard_size: u64,
        metadata: Vec<(String, String)>,
        prefix: &str,
        mode: &str,
        overwrite: bool,
        fsync: bool,
    ) -> PyResult<ShardWriter> {
        if prefix.is_empty() || prefix.contains(['/', '\\']) {
            return Err(PyValueError::new_err(format!(
                "bad file prefix {prefix:?}: expected a plain name such as \"model\""
            )));
        }
        let specs = tensors
            .into_iter()
            .map(|(name, dtype, shape)| Ok(TensorSpec { name, dtype: dtype_of(&dtype)?, shape }))
            .collect::<PyResult<Vec<_>>>()?;
        let mut dir = match mode {
            "into" => OutputDir::into_folder(&out_dir)?,
            "new" => OutputDir::new_folder(&out_dir, overwrite)?,
            _ => return Err(PyValueError::new_err(format!("mode must be \"into\" or \"new\", not {mode:?}"))),
        };
        dir.set_durable(fsync);
        let inner = ShardedWriter::new(dir, specs, max_shard_size, metadata, prefix)?;
        Ok(ShardWriter { inner: Some(inner), prefix: prefix.to_string() })
    }

    /// Write the whole of tensor `name` from a contiguous uint8 array (its raw bytes).
    fn write(&mut self, py: Python<'_>, name: &str, data: PyReadonlyArray1<'_, u8>) -> PyResult<()> {
        let bytes = data
            .as_slice()
            .map_err(|_| PyValueError::new_err(format!("tensor {name:?}: the byte view must be contiguous")))?;
        let w = self.inner.as_mut().ok_or_else(|| PyValueError::new_err("the writer is already finished"))?;
        py.detach(|| w.write_tensor(name, bytes))?;
        Ok(())
    }

    /// Close the last shard, write the index, copy `extra_files` ((source, name) pairs) and move
    /// everything into place. Returns files, tensors, data_bytes, file_bytes.
    #[pyo3(signature = (extra_files=Vec::new()))]
    fn finish<'py>(
        &mut self,
        py: Python<'py>,
        extra_files: Vec<(std::path::PathBuf, String)>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let w = self.inner.take().ok_or_else(|| PyValueError::new_err("the writer is already finished"))?;
        let prefix = self.prefix.clone();
        let summary = py.detach(move || -> Result<WriteSummary, Error> {
            let (mut dir, summary) = w.finish()?;
            for (src, name) in &extra_files {
                dir.copy_as(src, name)?;
            }
            dir.commit(&prefix)?;
            Ok(summary)
        })?;
        summary_dict(py, &summary)
    }

    /// Drop everything written so far (the temporary folder is removed).
    fn abort(&mut self) {
        self.inner = None;
    }
}

/// An open safetensors file (memory-mapped).
#[pyclass(module = "tunex._native", frozen)]
pub struct SafeReader {
    file: SafeFile,
}

fn info_tuple(t: &TensorInfo) -> (String, &'static str, Vec<u64>) {
    (t.name.clone(), t.dtype.name(), t.shape.clone())
}

#[pymethods]
impl SafeReader {
    #[new]
    fn new(path: std::path::PathBuf) -> PyResult<SafeReader> {
        Ok(SafeReader { file: SafeFile::open(path)? })
    }

    /// (name, dtype, shape) of every tensor, in on-disk order.
    fn tensors(&self) -> Vec<(String, &'static str, Vec<u64>)> {
        self.file.tensors().iter().map(info_tuple).collect()
    }

    fn metadata(&self) -> Vec<(String, String)> {
        self.file.header().metadata.clone()
    }

    /// The raw bytes of tensor `name` as a new uint8 array (one copy out of the mapping).
    fn read<'py>(&self, py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyArray1<u8>>> {
        let info = self.file.require(name)?;
        let array = PyArray1::from_slice(py, self.file.bytes(info));
        self.file.release(info);
        Ok(array)
    }
}

/// A safetensors file mapped copy-on-write, its header checked as `SafeReader` checks it (offsets
/// in range, begin <= end, no overlaps or holes, no duplicate keys, dtype/shape/length agreement).
/// `data()` is the whole file as a writable uint8 numpy array over the mapping: no copy, and every
/// array (and torch tensor) made from it keeps the mapping alive. Writes land in private pages.
#[pyclass(module = "tunex._native", frozen, weakref)]
pub struct SafeMap {
    path: std::path::PathBuf,
    header: Header,
    /// Start and length of the mapping, taken from `&mut` before the map was stored.
    addr: usize,
    len: usize,
    _map: memmap2::MmapMut,
}

#[pymethods]
impl SafeMap {
    #[new]
    fn new(path: std::path::PathBuf) -> PyResult<SafeMap> {
        let PrivateMap { path, header, mut map } = PrivateMap::open(path)?;
        let (addr, len) = (map.as_mut_ptr() as usize, map.len());
        Ok(SafeMap { path, header, addr, len, _map: map })
    }

    /// (name, dtype, shape, begin, end) of every tensor in data-offset order; begin/end are
    /// absolute file offsets (checked: inside the file, back to back).
    fn tensors(&self) -> Vec<(String, &'static str, Vec<u64>, u64, u64)> {
        let base = self.header.data_start;
        self.header
            .tensors
            .iter()
            .map(|t| (t.name.clone(), t.dtype.name(), t.shape.clone(), base + t.begin, base + t.end))
            .collect()
    }

    fn metadata(&self) -> Vec<(String, String)> {
        self.header.metadata.clone()
    }

    /// (address, length) of the mapping, for page-release bookkeeping.
    fn address(&self) -> (usize, usize) {
        (self.addr, self.len)
    }

    fn path(&self) -> std::path::PathBuf {
        self.path.clone()
    }

    /// The whole file as a writable uint8 array viewing the mapping (no copy).
    fn data<'py>(slf: Bound<'py, Self>) -> Bound<'py, PyArray1<u8>> {
        let me = slf.get();
        // SAFETY: addr/len describe the live private mapping owned by `me`; it is never remapped
        // or unmapped while `me` lives, and the array below holds `slf` as its base object, so the
        // mapping outlives every array and tensor made from it. Rust holds no reference into the
        // mapping after `new`, so writes from Python alias nothing on this side.
        unsafe {
            let view = numpy::ndarray::ArrayView1::from_shape_ptr(me.len, me.addr as *const u8);
            PyArray1::borrow_from_array(&view, slf.clone().into_any())
        }
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<ShardWriter>()?;
    m.add_class::<SafeReader>()?;
    m.add_class::<SafeMap>()?;
    Ok(())
}
