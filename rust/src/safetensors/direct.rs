//! Sequential file output that bypasses the page cache where the filesystem allows it (O_DIRECT).
//!
//! A buffered write() copies every byte into the page cache in the kernel; for a multi-GB
//! checkpoint that copy was the largest single cost of a merge (~40% of its CPU time), and on a
//! machine whose memory is full of cache each new page also waits for reclaim. O_DIRECT hands the
//! disk our own (4 KiB-aligned) buffer instead: no kernel copy, no cache pressure, and the bytes
//! are already on the device when the file is fsynced. Direct writes block until the device has
//! the data, so they run on a thread of their own while the caller fills the next buffer (two
//! buffers in flight). Filesystems without O_DIRECT (tmpfs, some overlays) refuse it with EINVAL;
//! the file then continues as an ordinary buffered write. The unaligned tail of the file is
//! written after O_DIRECT is switched off.
//!
//! O_DIRECT is not always the faster path: on some filesystems (network mounts, some overlays and
//! FUSE ones) it is allowed but each direct write is slower than a buffered write plus its fsync.
//! Before a large write, [`choose`] probes the target folder's filesystem once per process: one
//! block written each way, timed with its sync. Direct I/O is kept only where it is not slower,
//! and the writer's summary says which way the bytes went and why.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Write};
use std::path::Path;
use std::sync::{mpsc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Instant;

/// Alignment of buffer addresses, lengths and file offsets for O_DIRECT (covers 512 B and 4 KiB
/// logical blocks).
const ALIGN: usize = 4096;
/// Bytes gathered before each write: large enough that the per-write latency amortizes.
const CHUNK: usize = 16 << 20;

/// Bytes the probe writes each way.
const PROBE: usize = 4 << 20;
/// Direct writes are kept unless they take this much longer than buffered ones (noise margin).
const SLOWER: f64 = 1.25;

/// How a writer's files are written, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DirectChoice {
    /// O_DIRECT where the filesystem takes it (the default; small writes never probe).
    Direct,
    /// Buffered writes; the reason, for the writer's final message.
    Buffered(String),
}

impl DirectChoice {
    pub fn describe(&self) -> String {
        match self {
            DirectChoice::Direct => "direct I/O".to_string(),
            DirectChoice::Buffered(why) => format!("buffered writes ({why})"),
        }
    }
}

fn timed_write(path: &Path, block: &Block, direct: bool) -> io::Result<f64> {
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).open(path)?;
    if direct && !set_direct(&file, true) {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let start = Instant::now();
    file.write_all(block.bytes(PROBE))?;
    file.sync_data()?;
    Ok(start.elapsed().as_secs_f64())
}

fn probe(dir: &Path) -> DirectChoice {
    let block = Block::new();
    let name = |tag: &str| crate::partial::partial_path(&dir.join("direct-io-probe"), tag);
    let (Ok(a), Ok(b)) = (name("probe"), name("probe")) else {
        return DirectChoice::Direct;
    };
    let direct = timed_write(&a, &block, true);
    let buffered = timed_write(&b, &block, false);
    let _ = std::fs::remove_file(&a);
    let _ = std::fs::remove_file(&b);
    verdict(direct, buffered)
}

/// The probe's timings (seconds for one block, sync included) -> the choice.
fn verdict(direct: io::Result<f64>, buffered: io::Result<f64>) -> DirectChoice {
    match (direct, buffered) {
        (Err(_), _) => DirectChoice::Buffered("the filesystem refuses O_DIRECT".to_string()),
        (Ok(d), Ok(b)) if d > SLOWER * b => DirectChoice::Buffered(format!(
            "O_DIRECT was slower here: {:.0} ms against {:.0} ms buffered for a 4 MiB probe",
            d * 1e3,
            b * 1e3
        )),
        _ => DirectChoice::Direct,
    }
}

/// How to write an output into `dir`: `TUNEX_DIRECT_IO=0` says buffered; otherwise, for a
/// `large` output, the probe's verdict for `dir`'s filesystem, measured once per process and
/// filesystem (a small one never probes).
pub fn choose(dir: &Path, large: bool) -> DirectChoice {
    if !crate::settings::direct_io() {
        return DirectChoice::Buffered("TUNEX_DIRECT_IO=0".to_string());
    }
    if !large {
        return DirectChoice::Direct;
    }
    static SEEN: OnceLock<Mutex<HashMap<u64, DirectChoice>>> = OnceLock::new();
    use std::os::unix::fs::MetadataExt;
    let Ok(dev) = std::fs::metadata(dir).map(|m| m.dev()) else { return DirectChoice::Direct };
    let seen = SEEN.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(c) = seen.lock().ok().and_then(|m| m.get(&dev).cloned()) {
        return c;
    }
    let choice = probe(dir);
    if let Ok(mut m) = seen.lock() {
        m.insert(dev, choice.clone());
    }
    choice
}

/// A CHUNK-sized window at an aligned address inside its own allocation.
struct Block {
    buf: Vec<u8>,
    start: usize,
}

impl Block {
    fn new() -> Block {
        let buf = vec![0u8; CHUNK + ALIGN];
        let start = buf.as_ptr().align_offset(ALIGN);
        Block { buf, start }
    }

    fn bytes(&self, len: usize) -> &[u8] {
        &self.buf[self.start..self.start + len]
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.start + CHUNK]
    }
}

/// The thread doing the blocking direct writes, and the blocks it hands back.
struct Io {
    tx: mpsc::SyncSender<(Block, usize)>,
    // a Mutex only to make the writer Sync (Python owns writers); one thread uses it
    back: Mutex<mpsc::Receiver<Block>>,
    handle: JoinHandle<io::Result<File>>,
}

pub struct DirectFile {
    block: Block,
    filled: usize,
    /// Direct mode: the file lives on the I/O thread. Buffered mode: it is here.
    io: Option<Io>,
    file: Option<File>,
}

/// A write after the file already failed (its error was reported then).
fn failed_before() -> io::Error {
    io::Error::other("an earlier write to this file failed")
}

/// Write `bytes` at the current offset; if O_DIRECT is refused after all (an odd block size, a
/// filesystem that accepts the flag but not the I/O), nothing landed: go on buffered.
fn write_block(file: &mut File, bytes: &[u8], direct: &mut bool) -> io::Result<()> {
    match file.write_all(bytes) {
        Err(e) if *direct && e.raw_os_error() == Some(libc::EINVAL) => {
            *direct = false;
            set_direct(file, false);
            file.write_all(bytes)
        }
        other => other,
    }
}

impl DirectFile {
    /// Wrap a freshly created, empty file opened for writing; turn O_DIRECT on if allowed.
    /// `TUNEX_DIRECT_IO=0` keeps ordinary buffered writes.
    pub fn new(file: File) -> DirectFile {
        Self::with_choice(file, true)
    }

    /// [`DirectFile::new`], buffered when `direct` is false (a probe found O_DIRECT slower).
    pub fn with_choice(file: File, direct: bool) -> DirectFile {
        if !(direct && crate::settings::direct_io() && set_direct(&file, true)) {
            return DirectFile { block: Block::new(), filled: 0, io: None, file: Some(file) };
        }
        let (tx, rx) = mpsc::sync_channel::<(Block, usize)>(1);
        let (back_tx, back) = mpsc::channel::<Block>();
        let handle = std::thread::spawn(move || {
            let mut file = file;
            let mut direct = true;
            for (block, len) in rx {
                write_block(&mut file, block.bytes(len), &mut direct)?;
                let _ = back_tx.send(block);
            }
            Ok(file)
        });
        DirectFile { block: Block::new(), filled: 0, io: Some(Io { tx, back: Mutex::new(back), handle }), file: None }
    }

    /// Whether writes bypass the page cache (for tests and reports).
    pub fn is_direct(&self) -> bool {
        self.io.is_some()
    }

    /// The underlying file in buffered mode (for a second descriptor to sync in the background).
    pub fn buffered_file(&self) -> Option<&File> {
        self.file.as_ref()
    }

    /// Stop the I/O thread and take the file back (or the thread's error).
    fn join(&mut self) -> io::Result<File> {
        let io = self.io.take().ok_or_else(failed_before)?;
        drop(io.tx);
        io.handle.join().unwrap_or_else(|_| Err(io::Error::other("the direct-I/O thread panicked")))
    }

    /// Hand `len` gathered bytes to the file.
    fn write_out(&mut self, len: usize) -> io::Result<()> {
        if let Some(file) = self.file.as_mut() {
            let mut direct = false;
            return write_block(file, self.block.bytes(len), &mut direct);
        }
        let io = self.io.as_ref().ok_or_else(failed_before)?;
        let reused = io.back.lock().ok().and_then(|rx| rx.try_recv().ok());
        let next = reused.unwrap_or_else(Block::new);
        let full = std::mem::replace(&mut self.block, next);
        if io.tx.send((full, len)).is_err() {
            // the thread stopped on an error: report it
            return Err(self.join().err().unwrap_or_else(|| io::Error::other("the direct-I/O thread stopped")));
        }
        Ok(())
    }

    /// Write what is gathered and give the file back (still open, O_DIRECT off).
    pub fn finish(mut self) -> io::Result<File> {
        let aligned = if self.io.is_some() { self.filled / ALIGN * ALIGN } else { 0 };
        let tail = self.block.bytes(self.filled)[aligned..].to_vec();
        if aligned > 0 {
            self.write_out(aligned)?;
        }
        let mut file = match self.file.take() {
            Some(f) => f,
            None => {
                let f = self.join()?;
                set_direct(&f, false);
                f
            }
        };
        file.write_all(&tail)?;
        Ok(file)
    }
}

impl Write for DirectFile {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let n = bytes.len().min(CHUNK - self.filled);
        self.block.bytes_mut()[self.filled..self.filled + n].copy_from_slice(&bytes[..n]);
        self.filled += n;
        if self.filled == CHUNK {
            self.write_out(CHUNK)?;
            self.filled = 0;
        }
        Ok(n)
    }

    /// Buffered mode: hand over what is gathered. Direct mode: whole chunks only (O_DIRECT needs
    /// whole blocks), so this is a no-op there.
    fn flush(&mut self) -> io::Result<()> {
        if self.file.is_some() && self.filled > 0 {
            self.write_out(self.filled)?;
            self.filled = 0;
        }
        Ok(())
    }
}

#[cfg(target_os = "linux")]
fn set_direct(file: &File, on: bool) -> bool {
    use std::os::unix::io::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own, with integer flag arguments only.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 {
            return false;
        }
        let new = if on { flags | libc::O_DIRECT } else { flags & !libc::O_DIRECT };
        libc::fcntl(fd, libc::F_SETFL, new) == 0
    }
}

#[cfg(not(target_os = "linux"))]
fn set_direct(_file: &File, _on: bool) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_keeps_direct_io_unless_it_is_refused_or_slower() {
        assert_eq!(verdict(Ok(0.010), Ok(0.009)), DirectChoice::Direct, "within the noise margin");
        assert_eq!(verdict(Ok(0.010), Err(io::Error::other("x"))), DirectChoice::Direct);
        let slow = verdict(Ok(0.030), Ok(0.010));
        assert!(matches!(&slow, DirectChoice::Buffered(why) if why.contains("30 ms against 10 ms")), "{slow:?}");
        let refused = verdict(Err(io::Error::from_raw_os_error(libc::EINVAL)), Ok(0.01));
        assert_eq!(refused.describe(), "buffered writes (the filesystem refuses O_DIRECT)");
    }

    #[test]
    fn choosing_leaves_no_probe_file_behind() {
        let root = tempfile::tempdir().unwrap();
        let _ = choose(root.path(), true);
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0);
    }

    fn roundtrip(sizes: &[usize], env_off: bool) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.bin");
        let mut want = Vec::new();
        let file = File::create(&path).unwrap();
        let mut f = if env_off {
            DirectFile { block: Block::new(), filled: 0, io: None, file: Some(file) }
        } else {
            DirectFile::new(file)
        };
        for (i, &n) in sizes.iter().enumerate() {
            let chunk: Vec<u8> = (0..n).map(|j| (i * 31 + j * 7) as u8).collect();
            f.write_all(&chunk).unwrap();
            want.extend_from_slice(&chunk);
        }
        f.flush().unwrap();
        drop(f.finish().unwrap());
        assert_eq!(std::fs::read(&path).unwrap(), want);
    }

    #[test]
    fn every_byte_lands_in_order_whatever_the_write_sizes() {
        for env_off in [false, true] {
            roundtrip(&[], env_off);
            roundtrip(&[1], env_off);
            roundtrip(&[ALIGN], env_off);
            roundtrip(&[8, 4095, 1, CHUNK - 4104, 3], env_off); // crosses one chunk exactly
            roundtrip(&[CHUNK + 17, 2 * CHUNK, 5], env_off);
        }
    }

    #[test]
    fn a_failing_disk_write_is_reported_not_lost() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ro.bin");
        std::fs::write(&path, b"").unwrap();
        // a read-only descriptor: every write fails (EBADF), on the I/O thread or inline
        let mut f = DirectFile::new(File::open(&path).unwrap());
        let chunk = vec![7u8; CHUNK];
        let failures = (0..4).filter(|_| f.write_all(&chunk).is_err()).count();
        // once failed, it stays failed (no panic on a write after the error)
        assert!(failures >= 2 || f.finish().is_err());
    }
}
