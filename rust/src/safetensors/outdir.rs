//! Atomic output folders: everything is written into a hidden temporary folder next to (or inside)
//! the target and only moved into place once every file is complete and fsynced. A failed or killed
//! write leaves no target that looks complete; a failed one also removes its temporary folder, and
//! a killed one's is removed by the next writer into the same folder (`crate::partial`).

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};
use crate::partial;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// The whole folder appears at once (merge): the target must not exist unless overwriting.
    NewFolder { overwrite: bool },
    /// Weight files land in an existing or new folder that may hold other files (save_sharded,
    /// next to a config.json written by the caller); each file appears by rename.
    IntoFolder,
}

pub struct OutputDir {
    target: PathBuf,
    work: PathBuf,
    mode: Mode,
    files: Vec<String>,
    committed: bool,
    durable: bool,
}

fn sync_dir(dir: &Path) -> Result<()> {
    partial::sync_dir(dir);
    Ok(())
}

fn name_of(path: &Path) -> Result<String> {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| Error::arg(format!("{} has no final component to write to", path.display())))
}

impl OutputDir {
    /// Prepare to create `target` as a whole new folder. Refuses an existing target unless
    /// `overwrite`; the old one is replaced only at commit. Partials of dead writers beside the
    /// target are removed first.
    pub fn new_folder(target: &Path, overwrite: bool) -> Result<OutputDir> {
        if target.exists() && !overwrite {
            return Err(Error::io(
                target,
                std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "the output folder already exists; choose another path or pass --overwrite (overwrite=True)",
                ),
            ));
        }
        name_of(target)?;
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        fs::create_dir_all(&parent).at(&parent)?;
        partial::sweep(&parent);
        let work = partial::partial_path(target, "partial")?;
        Self::fresh(target, work, Mode::NewFolder { overwrite })
    }

    /// Prepare to add weight files to `target` (created if missing), sweeping dead partials in it.
    pub fn into_folder(target: &Path) -> Result<OutputDir> {
        fs::create_dir_all(target).at(target)?;
        partial::sweep(target);
        let work = partial::partial_path(&target.join("weights"), "partial")?;
        Self::fresh(target, work, Mode::IntoFolder)
    }

    fn fresh(target: &Path, work: PathBuf, mode: Mode) -> Result<OutputDir> {
        fs::create_dir(&work).at(&work)?;
        Ok(OutputDir { target: target.to_path_buf(), work, mode, files: Vec::new(), committed: false, durable: true })
    }

    /// Whether files are fsynced before they are moved into place (default true). Without it the
    /// rename still makes the output appear whole to other processes and after a crash of this
    /// one, but a power loss may leave truncated files behind the rename.
    pub fn set_durable(&mut self, durable: bool) {
        self.durable = durable;
    }

    pub fn durable(&self) -> bool {
        self.durable
    }

    /// The temporary folder files are written in (on the target's filesystem).
    pub fn work(&self) -> &Path {
        &self.work
    }

    /// The final location.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Create `name` inside the temporary folder; it is moved into place at commit, in creation
    /// order (so an index written last also appears last).
    pub fn create(&mut self, name: &str) -> Result<(PathBuf, File)> {
        let path = self.work.join(name);
        let file = File::create(&path).at(&path)?;
        self.files.push(name.to_string());
        Ok((path, file))
    }

    /// Copy a non-weight file (config.json, tokenizer files) into the output under its own name.
    pub fn copy_in(&mut self, src: &Path) -> Result<()> {
        let name = name_of(src)?;
        self.copy_as(src, &name)
    }

    /// Copy the bytes of `src` into the output as `name`. Not its permission bits (`fs::copy` would
    /// keep them): the copy gets the usual 0666 less the umask like every file written here, so a
    /// private 0600 source (a download made through a temp file) does not make the output private.
    pub fn copy_as(&mut self, src: &Path, name: &str) -> Result<()> {
        let (dst, mut file) = self.create(name)?;
        let mut from = File::open(src).at(src)?;
        std::io::copy(&mut from, &mut file).at(src)?;
        drop(file);
        self.sync_file(&dst)
    }

    /// fsync a file written into the temporary folder (a no-op when not durable).
    pub fn sync_file(&self, path: &Path) -> Result<()> {
        if self.durable {
            File::open(path).and_then(|f| f.sync_all()).at(path)?;
        }
        Ok(())
    }

    /// Move everything into place. `stale_prefix` (IntoFolder only): previous weight files with this
    /// prefix (`model.safetensors`, `model-000NN-of-000MM.safetensors`, the index) that the new
    /// set does not overwrite are deleted, so a folder never mixes two checkpoints.
    pub fn commit(mut self, stale_prefix: &str) -> Result<()> {
        if self.durable {
            sync_dir(&self.work)?;
        }
        match self.mode {
            Mode::NewFolder { overwrite } => {
                partial::publish(&self.work, &self.target, overwrite)?;
                self.committed = true;
            }
            Mode::IntoFolder => {
                // The old index goes first (then the old shards), so a kill between the renames
                // below leaves shards without an index (an error to load), never a mix of two
                // checkpoints that loads.
                let index = self.target.join(format!("{stale_prefix}.safetensors.index.json"));
                match fs::remove_file(&index) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(Error::io(&index, e)),
                    _ => {}
                }
                sync_dir(&self.target)?;
                self.remove_stale(stale_prefix)?;
                for name in &self.files {
                    let (from, to) = (self.work.join(name), self.target.join(name));
                    fs::rename(&from, &to).at(&to)?;
                }
                self.committed = true;
                fs::remove_dir(&self.work).at(&self.work)?;
                sync_dir(&self.target)?;
            }
        }
        Ok(())
    }

    fn remove_stale(&self, prefix: &str) -> Result<()> {
        let is_weight = |n: &str| {
            n == format!("{prefix}.safetensors")
                || n == format!("{prefix}.safetensors.index.json")
                || (n.starts_with(&format!("{prefix}-")) && n.ends_with(".safetensors") && n.contains("-of-"))
        };
        for entry in fs::read_dir(&self.target).at(&self.target)? {
            let entry = entry.at(&self.target)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if is_weight(&name) && !self.files.contains(&name) {
                fs::remove_file(entry.path()).at(entry.path())?;
            }
        }
        Ok(())
    }
}

impl Drop for OutputDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.work);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_folder_appears_only_at_commit_and_failures_clean_up() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("out");
        {
            let mut out = OutputDir::new_folder(&target, false).unwrap();
            out.create("a.txt").unwrap();
            assert!(!target.exists());
            // Dropped without commit: as after an error.
        }
        assert_eq!(fs::read_dir(root.path()).unwrap().count(), 0, "temporary folder left behind");
        let mut out = OutputDir::new_folder(&target, false).unwrap();
        out.create("a.txt").unwrap();
        out.commit("model").unwrap();
        assert!(target.join("a.txt").is_file());
        let e = OutputDir::new_folder(&target, false).err().unwrap();
        assert!(matches!(&e, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::AlreadyExists));
        assert!(e.to_string().contains("--overwrite"));
        let mut out = OutputDir::new_folder(&target, true).unwrap();
        out.create("b.txt").unwrap();
        out.commit("model").unwrap();
        assert!(target.join("b.txt").is_file() && !target.join("a.txt").exists());
        assert_eq!(fs::read_dir(root.path()).unwrap().count(), 1);
    }

    #[test]
    fn into_folder_replaces_stale_shards_and_keeps_other_files() {
        let root = tempfile::tempdir().unwrap();
        for n in [
            "config.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "model.safetensors.index.json",
        ] {
            fs::write(root.path().join(n), b"old").unwrap();
        }
        let mut out = OutputDir::into_folder(root.path()).unwrap();
        out.create("model.safetensors").unwrap();
        out.commit("model").unwrap();
        let mut names: Vec<String> =
            fs::read_dir(root.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        assert_eq!(names, vec!["config.json", "model.safetensors"]);
    }
}
