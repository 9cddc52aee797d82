//! A memory-mapped safetensors file: parsed header plus borrowed views of each tensor's bytes.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::{Mmap, MmapMut, MmapOptions};

use super::header::{parse_header, Header, TensorInfo};
use crate::error::{Error, IoContext, Result};

/// An open safetensors file. Tensor bytes are read through the mapping, so opening costs only the
/// header; the pages a caller touches can be handed back with [`SafeFile::release`].
pub struct SafeFile {
    path: PathBuf,
    map: Mmap,
    header: Header,
    by_name: HashMap<String, usize>,
}

impl SafeFile {
    pub fn open(path: impl AsRef<Path>) -> Result<SafeFile> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).at(&path)?;
        let len = file.metadata().at(&path)?.len();
        if len < 8 {
            return Err(short_file(&path));
        }
        // SAFETY: the mapping is read-only and SHARED (MAP_SHARED): it shows the file's current
        // bytes, so another process writing or truncating the file while we read it would change
        // what we see or fault, as with every mmap-based reader (safetensors, numpy.memmap). tunex
        // never writes to its inputs, and every range handed out was checked against the length
        // mapped here.
        let map = unsafe { Mmap::map(&file) }.at(&path)?;
        let header = parse_header(&path, &map)?;
        let by_name = header.tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        Ok(SafeFile { path, map, header, by_name })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Tensors in data-offset order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.header.tensors
    }

    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.header.tensors[i])
    }

    /// Look a tensor up, or fail naming the file.
    pub fn require(&self, name: &str) -> Result<&TensorInfo> {
        self.get(name).ok_or_else(|| Error::format(&self.path, format!("has no tensor named {name:?}")))
    }

    /// The bytes of `info`, which must come from this file's header.
    pub fn bytes(&self, info: &TensorInfo) -> &[u8] {
        let start = (self.header.data_start + info.begin) as usize;
        let end = (self.header.data_start + info.end) as usize;
        &self.map[start..end]
    }

    /// Ask the kernel to start reading `info`'s pages now (asynchronous readahead), so a streaming
    /// pass finds them in memory instead of stalling on the disk when it gets there.
    pub fn prefetch(&self, info: &TensorInfo) {
        let start = (self.header.data_start + info.begin) as usize;
        if info.nbytes() > 0 {
            let _ = self.map.advise_range(memmap2::Advice::WillNeed, start, info.nbytes() as usize);
        }
    }

    /// Drop this process's resident pages of `info` (they stay in the page cache). A streaming pass
    /// over a model calls this after each tensor so its resident set stays at one tensor, not the
    /// whole checkpoint.
    pub fn release(&self, info: &TensorInfo) {
        let start = (self.header.data_start + info.begin) as usize;
        let len = info.nbytes() as usize;
        if len == 0 {
            return;
        }
        #[cfg(unix)]
        // SAFETY: the mapping is shared and read-only (see `open`) and nothing in this process writes
        // it, so its pages are clean page-cache pages: MADV_DONTNEED only drops this process's
        // mappings of them, and a later read of the range faults the same bytes back in from the
        // page cache (or the file). References into the range stay valid: their contents do not
        // change (a shared mapping of a file that another process writes changes with or without
        // this call).
        unsafe {
            let _ = self.map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, len);
        }
    }
}

fn short_file(path: &Path) -> Error {
    // Zero-length files cannot be mapped; let the parser report the short file.
    match std::fs::read(path).at(path) {
        Err(e) => e,
        Ok(head) => match parse_header(path, &head) {
            Err(e) => e,
            Ok(_) => Error::format(path, "is shorter than a safetensors header"),
        },
    }
}

/// A safetensors file mapped copy-on-write (MAP_PRIVATE, readable and writable) with its header
/// checked exactly as [`SafeFile::open`] checks it. Python's loader hands out tensors that view
/// this mapping: a write to such a tensor (an in-place op on a loaded weight) changes a private
/// copy of the page, never the file.
pub struct PrivateMap {
    pub path: PathBuf,
    pub header: Header,
    pub map: MmapMut,
}

impl PrivateMap {
    pub fn open(path: impl AsRef<Path>) -> Result<PrivateMap> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).at(&path)?;
        let len = file.metadata().at(&path)?.len();
        if len < 8 {
            return Err(short_file(&path));
        }
        // SAFETY: a private (copy-on-write) mapping: writes through it go to this process's own
        // copies of the pages and never reach the file. Pages not yet written still show the
        // file's bytes, so another process truncating the file would fault a later read, as with
        // every mmap-based reader; tunex never writes to its inputs.
        let map = unsafe { MmapOptions::new().map_copy(&file) }.at(&path)?;
        let header = parse_header(&path, &map)?;
        Ok(PrivateMap { path, header, map })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::safetensors::dtype::Dtype;
    use crate::safetensors::header::build_header;

    #[test]
    fn reads_back_bytes_and_reports_missing_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.safetensors");
        let (mut bytes, _) = build_header(&[("w", Dtype::U8, &[3]), ("v", Dtype::U8, &[2])], &[]);
        bytes.extend_from_slice(&[1, 2, 3, 4, 5]);
        std::fs::write(&p, &bytes).unwrap();
        let f = SafeFile::open(&p).unwrap();
        assert_eq!(f.bytes(f.require("v").unwrap()), &[4, 5]);
        f.release(f.get("w").unwrap());
        assert_eq!(f.bytes(f.get("w").unwrap()), &[1, 2, 3]);
        assert!(f.require("nope").unwrap_err().to_string().contains("\"nope\""));

        std::fs::write(dir.path().join("empty"), b"").unwrap();
        let e = SafeFile::open(dir.path().join("empty")).err().unwrap().to_string();
        assert!(e.contains("shorter"), "{e}");
        let e = SafeFile::open(dir.path().join("missing")).err().unwrap();
        assert!(matches!(e, Error::Io { .. }));

        let mut m = PrivateMap::open(&p).unwrap();
        assert_eq!(m.header.tensors.len(), 2);
        let start = m.header.data_start as usize;
        m.map[start] = 9; // a private copy: the file keeps its byte
        assert_eq!(std::fs::read(&p).unwrap()[start], 1);
        let e = PrivateMap::open(dir.path().join("empty")).err().unwrap().to_string();
        assert!(e.contains("shorter"), "{e}");
    }
}
