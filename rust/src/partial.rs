//! Owner-stamped partial outputs: the one rule every tunex writer (Rust and Python) follows.
//!
//! A writer never writes under the name a reader looks for. It writes `.{name}.tunex-{tag}.{token}`
//! beside the output (a file or a whole folder), fsyncs it and renames it into place. The token names
//! the owner: a hash of the host name and pid namespace, the boot id
//! (`/proc/sys/kernel/random/boot_id`), the pid, the process start time (`/proc/PID/stat`, field 22)
//! and a per-call counter. Because the owner is part of the name it is recorded the instant the
//! partial exists; no crash can leave a partial without one.
//!
//! Every writer sweeps the folder it writes into before it starts ([`sweep`]): a partial is removed
//! only when its owner is provably dead: same host and boot, and the pid is gone, a zombie, or
//! reused by a process that started at another time; or same host and another boot. A partial of a
//! live process, or of another host (a shared filesystem), is never touched.

use std::ffi::CString;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use crate::error::{Error, IoContext, Result};

/// What a sweep may do with a partial, judged from its owner token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    /// The owner runs (or may run: its liveness cannot be disproved): leave it.
    Alive,
    /// The owner is provably dead: the partial is garbage.
    Dead,
    /// Written by another host or pid namespace: never touched from here.
    Foreign,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Owner {
    host: String,
    boot: String,
    pid: u32,
    start: u64,
}

const MARK: &str = ".tunex-";
static SEQ: AtomicU64 = AtomicU64::new(0);

fn fnv64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that many bytes.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return String::new();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// The host as seen by pids: two containers with one hostname but separate pid namespaces are two hosts.
fn host_key() -> String {
    let ns = fs::read_link("/proc/self/ns/pid").map(|p| p.display().to_string()).unwrap_or_default();
    format!("{:016x}", fnv64(format!("{}\0{ns}", hostname()).as_bytes()))
}

fn boot_id() -> String {
    let raw = fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let hex: String = raw.chars().filter(|c| c.is_ascii_hexdigit()).take(16).collect();
    if hex.is_empty() {
        "0".to_string()
    } else {
        hex.to_ascii_lowercase()
    }
}

/// (start time in clock ticks since boot, state letter) of `pid`, or None when it does not exist.
fn proc_stat(pid: u32) -> Option<(u64, char)> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // the command name (field 2) may hold spaces and parentheses: parse after its last ')'
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((start, state))
}

fn me() -> &'static Owner {
    static ME: OnceLock<Owner> = OnceLock::new();
    ME.get_or_init(|| {
        let pid = std::process::id();
        Owner { host: host_key(), boot: boot_id(), pid, start: proc_stat(pid).map_or(0, |s| s.0) }
    })
}

/// This process's owner token; unique per call, so threads of one process never share a partial.
pub fn token() -> String {
    let o = me();
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    format!("{}-{}-{}-{}-{seq}", o.host, o.boot, o.pid, o.start)
}

/// The partial path for `target` (`.{name}.tunex-{tag}.{token}` in the same folder).
pub fn partial_path(target: &Path, tag: &str) -> Result<PathBuf> {
    if tag.is_empty() || !tag.bytes().all(|b| b.is_ascii_lowercase()) {
        return Err(Error::arg(format!("partial tag {tag:?}: expected lowercase letters such as \"partial\"")));
    }
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| Error::arg(format!("{} has no final component to write to", target.display())))?;
    let parent = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok(parent.join(format!(".{name}{MARK}{tag}.{}", token())))
}

fn parse_owner(file_name: &str) -> Option<Owner> {
    if !file_name.starts_with('.') {
        return None;
    }
    let at = file_name.rfind(MARK)?;
    let (tag, token) = file_name[at + MARK.len()..].split_once('.')?;
    if tag.is_empty() || !tag.bytes().all(|b| b.is_ascii_lowercase()) {
        return None;
    }
    let parts: Vec<&str> = token.split('-').collect();
    let [host, boot, pid, start, seq] = parts[..] else { return None };
    let hex = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit());
    if host.len() != 16 || !hex(host) || !hex(boot) || seq.parse::<u64>().is_err() {
        return None;
    }
    Some(Owner { host: host.to_string(), boot: boot.to_string(), pid: pid.parse().ok()?, start: start.parse().ok()? })
}

/// The fate of the partial named `file_name` (None: not a tunex partial name).
pub fn fate(file_name: &str) -> Option<Fate> {
    let owner = parse_owner(file_name)?;
    let mine = me();
    if owner.host != mine.host {
        return Some(Fate::Foreign);
    }
    if owner.boot != "0" && mine.boot != "0" {
        if owner.boot != mine.boot {
            return Some(Fate::Dead);
        }
        return Some(match proc_stat(owner.pid) {
            None => Fate::Dead,
            Some((_, 'Z' | 'X')) => Fate::Dead,
            Some((start, _)) if owner.start != 0 && start != owner.start => Fate::Dead,
            Some(_) => Fate::Alive,
        });
    }
    // No boot id (not Linux): only a pid that no longer exists proves death.
    // SAFETY: kill with signal 0 sends nothing; it only checks that the pid exists.
    let gone = unsafe { libc::kill(owner.pid as libc::pid_t, 0) } != 0
        && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
    Some(if gone { Fate::Dead } else { Fate::Alive })
}

/// Remove every partial in `dir` whose owner is provably dead; returns what was removed. Never
/// fails: a partial that cannot be removed (a read-only folder, a concurrent sweeper) is skipped.
pub fn sweep(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else { return Vec::new() };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if fate(&name) != Some(Fate::Dead) {
            continue;
        }
        let path = entry.path();
        let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
        let gone = if is_dir { fs::remove_dir_all(&path) } else { fs::remove_file(&path) };
        if gone.is_ok() {
            removed.push(path);
        }
    }
    removed
}

/// fsync a folder so the renames inside it survive a power loss. Some filesystems refuse to open a
/// folder for it; there the rename is all we can do.
pub fn sync_dir(dir: &Path) {
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

fn rename2(from: &Path, to: &Path, flags: libc::c_uint) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).map_err(std::io::Error::other);
    let (a, b) = (c(from)?, c(to)?);
    // SAFETY: both are valid NUL-terminated paths relative to the current directory.
    let rc = unsafe { libc::renameat2(libc::AT_FDCWD, a.as_ptr(), libc::AT_FDCWD, b.as_ptr(), flags) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn unsupported(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP))
}

/// Move the finished partial folder (or file) `work` to `target` in one rename and fsync the parent.
///
/// A missing target: renamed with RENAME_NOREPLACE, so of two writers racing for one new output one
/// wins whole and the other gets AlreadyExists (its partial is left for the caller to remove). An
/// existing target: refused unless `overwrite`; then swapped in one step (RENAME_EXCHANGE) and the
/// old content, now under the partial's name, removed. Where the filesystem has neither flag the
/// old target is moved aside under a partial name first (a crash then leaves no target, never a
/// mixed one).
pub fn publish(work: &Path, target: &Path, overwrite: bool) -> Result<()> {
    let exists = fs::symlink_metadata(target).is_ok();
    let taken = || {
        Error::io(
            target,
            std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "the output already exists (another run may have just written it); choose another path or overwrite",
            ),
        )
    };
    if exists && !overwrite {
        return Err(taken());
    }
    let parent = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut old = None;
    if !exists {
        match rename2(work, target, libc::RENAME_NOREPLACE) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Err(taken()),
            Err(e) if unsupported(&e) => fs::rename(work, target).at(target)?,
            Err(e) => return Err(Error::io(target, e)),
        }
    } else {
        match rename2(work, target, libc::RENAME_EXCHANGE) {
            Ok(()) => old = Some(work.to_path_buf()),
            Err(e) if unsupported(&e) => {
                let aside = partial_path(target, "old")?;
                fs::rename(target, &aside).at(target)?;
                fs::rename(work, target).at(target)?;
                old = Some(aside);
            }
            Err(e) => return Err(Error::io(target, e)),
        }
    }
    sync_dir(&parent);
    if let Some(old) = old {
        let is_dir = fs::symlink_metadata(&old).map(|m| m.is_dir()).unwrap_or(false);
        let gone = if is_dir { fs::remove_dir_all(&old) } else { fs::remove_file(&old) };
        gone.at(&old)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_partials_are_alive_and_parse() {
        let p = partial_path(Path::new("/x/out"), "partial").unwrap();
        let name = p.file_name().unwrap().to_str().unwrap();
        assert!(name.starts_with(".out.tunex-partial."), "{name}");
        assert_eq!(fate(name), Some(Fate::Alive));
        assert_eq!(fate("out"), None);
        assert_eq!(fate(".out.tunex-partial-123"), None, "legacy names carry no owner and are left alone");
        assert!(partial_path(Path::new("/x/out"), "Bad-tag").is_err());
        assert_ne!(token(), token());
    }

    #[test]
    fn dead_reused_other_boot_and_foreign_owners() {
        let o = me();
        let name =
            |host: &str, boot: &str, pid: u32, start: u64| format!(".m.tunex-partial.{host}-{boot}-{pid}-{start}-0");
        // a pid above pid_max; our own pid with another start time (a reused pid); another boot
        assert_eq!(fate(&name(&o.host, &o.boot, u32::MAX - 1, o.start)), Some(Fate::Dead));
        assert_eq!(fate(&name(&o.host, &o.boot, o.pid, o.start + 12345)), Some(Fate::Dead));
        if o.boot != "0" {
            assert_eq!(fate(&name(&o.host, "abcdef", o.pid, o.start)), Some(Fate::Dead));
        }
        assert_eq!(fate(&name("0123456789abcdef", &o.boot, u32::MAX - 1, 1)), Some(Fate::Foreign));
    }

    #[test]
    fn sweep_removes_only_the_dead_and_publish_refuses_a_taken_target() {
        let root = tempfile::tempdir().unwrap();
        let o = me();
        let dead = root.path().join(format!(".m.tunex-partial.{}-{}-{}-{}-0", o.host, o.boot, u32::MAX - 1, o.start));
        let live = partial_path(&root.path().join("m"), "partial").unwrap();
        fs::create_dir(&dead).unwrap();
        fs::write(dead.join("f"), b"x").unwrap();
        fs::create_dir(&live).unwrap();
        assert_eq!(sweep(root.path()), vec![dead.clone()]);
        assert!(live.is_dir());
        let target = root.path().join("m");
        publish(&live, &target, false).unwrap();
        let again = partial_path(&target, "partial").unwrap();
        fs::create_dir(&again).unwrap();
        fs::write(again.join("new"), b"y").unwrap();
        let e = publish(&again, &target, false).unwrap_err();
        assert!(matches!(&e, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::AlreadyExists));
        publish(&again, &target, true).unwrap();
        assert!(target.join("new").is_file());
        assert_eq!(fs::read_dir(root.path()).unwrap().count(), 1, "the old folder is removed");
    }
}
