//! The streaming sharded writer: every shard's header is known from the plan, so tensors are
//! written once, in order, straight to their file, and no shard is ever held in memory.

use std::collections::HashSet;
use std::fs::File;
use std::io::Write;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::mpsc;
use std::thread::JoinHandle;

use super::direct::{choose, DirectChoice, DirectFile};
use super::dtype::Dtype;
use super::header::build_header;
use super::index::index_json;
use super::outdir::OutputDir;
use super::plan::{index_file_name, plan_shards, shard_file_names};
use crate::error::{Error, IoContext, Result};

/// Name, dtype and shape of one tensor to write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<u64>,
}

impl TensorSpec {
    pub fn nbytes(&self) -> Result<u64> {
        self.shape
            .iter()
            .try_fold(self.dtype.size() as u64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| Error::arg(format!("tensor {:?}: shape {:?} is too large", self.name, self.shape)))
    }
}

/// Bytes written between background flushes of a durable write.
const SYNC_EVERY: u64 = 256 << 20;

/// fsyncs files on a background thread, so the disk writes back while the writer keeps producing
/// and the final fsync at the end has little left to wait for.
struct Syncer {
    tx: Option<mpsc::Sender<(PathBuf, File)>>,
    handle: Option<JoinHandle<Result<()>>>,
}

impl Syncer {
    fn start() -> Syncer {
        let (tx, rx) = mpsc::channel::<(PathBuf, File)>();
        let handle = std::thread::spawn(move || {
            for (path, file) in rx {
                file.sync_data().at(&path)?;
            }
            Ok(())
        });
        Syncer { tx: Some(tx), handle: Some(handle) }
    }

    fn send(&self, path: &std::path::Path, file: File) -> Result<()> {
        match &self.tx {
            Some(tx) if tx.send((path.to_path_buf(), file)).is_ok() => Ok(()),
            // The thread stopped on an error; finish() reports it.
            _ => Ok(()),
        }
    }

    /// Wait until everything sent is on disk.
    fn finish(&mut self) -> Result<()> {
        self.tx = None;
        match self.handle.take() {
            Some(h) => h.join().unwrap_or_else(|_| Err(Error::data("the fsync thread panicked"))),
            None => Ok(()),
        }
    }
}

/// What a finished write produced.
#[derive(Clone, Debug, Default)]
pub struct WriteSummary {
    pub files: Vec<String>,
    pub tensors: usize,
    /// Bytes of tensor data (the index's total_size).
    pub data_bytes: u64,
    /// Bytes on disk across the weight files, headers included.
    pub file_bytes: u64,
    /// How the files were written ("direct I/O", or "buffered writes (why)").
    pub io: String,
}

pub struct ShardedWriter {
    out: OutputDir,
    specs: Vec<TensorSpec>,
    sizes: Vec<u64>,
    shards: Vec<Range<usize>>,
    names: Vec<String>,
    prefix: String,
    metadata: Vec<(String, String)>,
    next: usize,
    shard: usize,
    file: Option<(PathBuf, DirectFile)>,
    remaining: Option<u64>,
    summary: WriteSummary,
    /// Whether shard files try O_DIRECT (a probe may turn it off for large outputs).
    direct: bool,
    syncer: Option<Syncer>,
    unsynced: u64,
}

/// Outputs from this size on probe whether O_DIRECT is worth it on their filesystem.
const PROBE_FROM: u64 = 64 << 20;

impl ShardedWriter {
    /// Plan the shards of `specs` (written in this order) under `max_shard_size` bytes.
    pub fn new(
        out: OutputDir,
        specs: Vec<TensorSpec>,
        max_shard_size: u64,
        metadata: Vec<(String, String)>,
        prefix: &str,
    ) -> Result<ShardedWriter> {
        if max_shard_size == 0 {
            return Err(Error::arg("max_shard_size must be at least one byte"));
        }
        let mut seen = HashSet::new();
        for s in &specs {
            if !seen.insert(s.name.as_str()) {
                return Err(Error::arg(format!("tensor name {:?} appears twice", s.name)));
            }
            if s.name == "__metadata__" {
                return Err(Error::arg("\"__metadata__\" is reserved and cannot name a tensor"));
            }
        }
        let sizes = specs.iter().map(TensorSpec::nbytes).collect::<Result<Vec<_>>>()?;
        let shards = plan_shards(&sizes, max_shard_size);
        let names = shard_file_names(prefix, shards.len());
        // Only an output large enough to use O_DIRECT's chunks pays for the probe.
        let choice = choose(out.work(), sizes.iter().sum::<u64>() >= PROBE_FROM);
        Ok(ShardedWriter {
            out,
            specs,
            sizes,
            shards,
            names,
            prefix: prefix.to_string(),
            metadata,
            next: 0,
            shard: 0,
            file: None,
            remaining: None,
            summary: WriteSummary { io: choice.describe(), ..WriteSummary::default() },
            direct: choice == DirectChoice::Direct,
            syncer: None,
            unsynced: 0,
        })
    }

    /// The shard file name each tensor will land in (for progress and reports).
    pub fn shard_names(&self) -> &[String] {
        &self.names
    }

    /// The tensor expected next, if any.
    pub fn next_spec(&self) -> Option<&TensorSpec> {
        self.specs.get(self.next)
    }

    fn open_shard(&mut self) -> Result<()> {
        let range = self.shards[self.shard].clone();
        let entries: Vec<(&str, Dtype, &[u64])> =
            self.specs[range].iter().map(|s| (s.name.as_str(), s.dtype, s.shape.as_slice())).collect();
        let (header, _) = build_header(&entries, &self.metadata);
        let (path, file) = self.out.create(&self.names[self.shard])?;
        let mut w = DirectFile::with_choice(file, self.direct);
        w.write_all(&header).at(&path)?;
        self.summary.file_bytes += header.len() as u64;
        self.file = Some((path, w));
        Ok(())
    }

    fn close_shard(&mut self) -> Result<()> {
        if let Some((path, w)) = self.file.take() {
            let file = w.finish().at(&path)?;
            if self.out.durable() {
                self.syncer.get_or_insert_with(Syncer::start).send(&path, file)?;
            }
            self.unsynced = 0;
            self.summary.files.push(self.names[self.shard].clone());
        }
        self.shard += 1;
        Ok(())
    }

    /// Start the next tensor; `name` must be the one the plan expects.
    pub fn begin(&mut self, name: &str) -> Result<()> {
        if let Some(left) = self.remaining {
            let cur = &self.specs[self.next].name;
            return Err(Error::data(format!("tensor {cur:?} is still missing {left} bytes; cannot start {name:?}")));
        }
        let Some(spec) = self.specs.get(self.next) else {
            return Err(Error::arg(format!(
                "tensor {name:?} was not in the planned list (all {} written)",
                self.specs.len()
            )));
        };
        if spec.name != name {
            return Err(Error::arg(format!("expected tensor {:?} next, got {name:?}", spec.name)));
        }
        if self.file.is_none() {
            self.open_shard()?;
        }
        self.remaining = Some(self.sizes[self.next]);
        Ok(())
    }

    /// Append bytes of the current tensor.
    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let left = self.remaining.ok_or_else(|| Error::arg("write() before begin()"))?;
        if bytes.len() as u64 > left {
            let s = &self.specs[self.next];
            return Err(Error::data(format!(
                "tensor {:?}: got more bytes than {} {:?} holds ({})",
                s.name,
                s.dtype.name(),
                s.shape,
                self.sizes[self.next]
            )));
        }
        let (path, w) = self.file.as_mut().expect("begin() opened the shard");
        w.write_all(bytes).at(&*path)?;
        self.remaining = Some(left - bytes.len() as u64);
        self.unsynced += bytes.len() as u64;
        if self.unsynced >= SYNC_EVERY && self.out.durable() && !w.is_direct() {
            // Start writeback of what is written so far on a second descriptor of the same file
            // (direct writes are on the device already).
            w.flush().at(&*path)?;
            let clone = w.buffered_file().expect("buffered mode").try_clone().at(&*path)?;
            self.syncer.get_or_insert_with(Syncer::start).send(path, clone)?;
            self.unsynced = 0;
        }
        Ok(())
    }

    /// Finish the current tensor; fails if its bytes are incomplete.
    pub fn end(&mut self) -> Result<()> {
        match self.remaining {
            None => return Err(Error::arg("end() before begin()")),
            Some(0) => {}
            Some(left) => {
                let s = &self.specs[self.next];
                return Err(Error::data(format!(
                    "tensor {:?}: {left} of its {} bytes were never written",
                    s.name, self.sizes[self.next]
                )));
            }
        }
        self.remaining = None;
        self.summary.data_bytes += self.sizes[self.next];
        self.summary.file_bytes += self.sizes[self.next];
        self.summary.tensors += 1;
        self.next += 1;
        if self.next == self.shards[self.shard].end {
            self.close_shard()?;
        }
        Ok(())
    }

    pub fn write_tensor(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        self.begin(name)?;
        self.write(bytes)?;
        self.end()
    }

    /// Close the last shard and write the index (several shards only). The caller may still copy
    /// files into the returned folder before committing it.
    pub fn finish(mut self) -> Result<(OutputDir, WriteSummary)> {
        if self.next != self.specs.len() || self.remaining.is_some() {
            return Err(Error::data(format!(
                "only {} of {} planned tensors were written",
                self.next,
                self.specs.len()
            )));
        }
        // A plan with no tensors still produces one (empty) shard.
        while self.shard < self.shards.len() {
            self.open_shard()?;
            self.close_shard()?;
        }
        if self.names.len() > 1 {
            let weight_map: Vec<(String, String)> = self
                .shards
                .iter()
                .zip(&self.names)
                .flat_map(|(r, f)| self.specs[r.clone()].iter().map(move |s| (s.name.clone(), f.clone())))
                .collect();
            let name = index_file_name(&self.prefix);
            let (path, mut file) = self.out.create(&name)?;
            file.write_all(index_json(&weight_map, self.summary.data_bytes).as_bytes()).at(&path)?;
            drop(file);
            self.out.sync_file(&path)?;
        }
        if let Some(syncer) = self.syncer.as_mut() {
            syncer.finish()?;
        }
        Ok((self.out, self.summary))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::safetensors::reader::SafeFile;

    fn spec(name: &str, n: u64) -> TensorSpec {
        TensorSpec { name: name.into(), dtype: Dtype::F32, shape: vec![n] }
    }

    #[test]
    fn writes_shards_index_and_reads_back() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("out");
        let out = OutputDir::new_folder(&target, false).unwrap();
        let specs = vec![spec("a", 3), spec("b", 3), spec("c", 1)];
        let meta = vec![("format".to_string(), "pt".to_string())];
        let mut w = ShardedWriter::new(out, specs, 24, meta, "model").unwrap();
        for (name, n) in [("a", 3usize), ("b", 3), ("c", 1)] {
            let data: Vec<u8> = (0..n * 4).map(|i| i as u8).collect();
            w.begin(name).unwrap();
            w.write(&data[..2]).unwrap();
            w.write(&data[2..]).unwrap();
            w.end().unwrap();
        }
        let (out, summary) = w.finish().unwrap();
        out.commit("model").unwrap();
        assert_eq!(summary.files, vec!["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]);
        assert_eq!(summary.data_bytes, 28);
        let f = SafeFile::open(target.join("model-00002-of-00002.safetensors")).unwrap();
        assert_eq!(f.tensors().len(), 1);
        assert_eq!(f.bytes(f.require("c").unwrap()), &[0, 1, 2, 3]);
        assert_eq!(f.header().metadata[0].1, "pt");
        let idx = std::fs::read_to_string(target.join("model.safetensors.index.json")).unwrap();
        assert!(idx.contains("\"total_size\": 28") && idx.contains("\"a\": \"model-00001-of-00002.safetensors\""));
    }

    #[test]
    fn misuse_is_reported_not_panicked() {
        let root = tempfile::tempdir().unwrap();
        let out = OutputDir::new_folder(&root.path().join("o"), false).unwrap();
        assert!(ShardedWriter::new(out, vec![spec("a", 1), spec("a", 1)], 10, vec![], "model").is_err());
        let out = OutputDir::new_folder(&root.path().join("o"), false).unwrap();
        let mut w = ShardedWriter::new(out, vec![spec("a", 1), spec("b", 1)], 10, vec![], "model").unwrap();
        assert!(w.begin("b").unwrap_err().to_string().contains("expected tensor \"a\""));
        w.begin("a").unwrap();
        assert!(w.write(&[0; 5]).unwrap_err().to_string().contains("more bytes"));
        w.write(&[0; 3]).unwrap();
        assert!(w.end().unwrap_err().to_string().contains("never written"));
        w.write(&[0; 1]).unwrap();
        w.end().unwrap();
        assert!(w.finish().err().unwrap().to_string().contains("only 1 of 2"));
        // The failed writer's temporary folder is gone.
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0);
    }

    #[test]
    fn empty_state_dict_writes_one_empty_file() {
        let root = tempfile::tempdir().unwrap();
        let out = OutputDir::into_folder(root.path()).unwrap();
        let (out, s) = ShardedWriter::new(out, vec![], 10, vec![], "model").unwrap().finish().unwrap();
        out.commit("model").unwrap();
        assert_eq!(s.files, vec!["model.safetensors"]);
        assert!(SafeFile::open(root.path().join("model.safetensors")).unwrap().tensors().is_empty());
    }
}
