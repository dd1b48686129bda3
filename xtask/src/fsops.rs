//! File-system actions of scenario steps (write, rename, chmod, mtime, symlink, …) and generated data.
//!
//! Everything here sets permission bits explicitly instead of trusting the umask, so that trees,
//! snapshots and the product's view of them are the same on every machine.

use std::fs::{self, File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;

use anyhow::{Context, Result, bail};

/// Mode given to files the harness creates when a step names none.
pub const DEFAULT_FILE_MODE: u32 = 0o644;
/// Mode given to directories the harness creates when a step names none.
pub const DEFAULT_DIR_MODE: u32 = 0o755;

/// splitmix64: a tiny, well-distributed generator, so generated data is reproducible from its seed
/// without a `rand` dependency.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// What a write or append puts into a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Content {
    Text(String),
    /// `size` bytes from splitmix64 seeded with `seed` (little-endian words).
    Generated {
        size: u64,
        seed: u64,
    },
}

impl Content {
    pub fn len(&self) -> u64 {
        match self {
            Content::Text(t) => t.len() as u64,
            Content::Generated { size, .. } => *size,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Streams the content into `out` in bounded chunks (64 MiB files never sit in memory).
    pub fn write_to(&self, out: &mut impl Write) -> Result<()> {
        match self {
            Content::Text(t) => out.write_all(t.as_bytes())?,
            Content::Generated { size, seed } => {
                let mut rng = SplitMix64::new(*seed);
                let mut left = *size;
                let mut buf = vec![0u8; 256 * 1024];
                while left > 0 {
                    let n = left.min(buf.len() as u64) as usize;
                    for chunk in buf[..n].chunks_mut(8) {
                        let word = rng.next_u64().to_le_bytes();
                        chunk.copy_from_slice(&word[..chunk.len()]);
                    }
                    out.write_all(&buf[..n])?;
                    left -= n as u64;
                }
            }
        }
        Ok(())
    }
}

/// Creates `dir` and its missing ancestors, each with `mode` (not subject to the umask).
pub fn mkdir_p(dir: &Path, mode: u32) -> Result<()> {
    if fs::symlink_metadata(dir).is_ok_and(|m| m.is_dir()) {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        mkdir_p(parent, DEFAULT_DIR_MODE)?;
    }
    fs::create_dir(dir).with_context(|| format!("mkdir {}", dir.display()))?;
    set_mode(dir, mode)
}

/// Sets the permission bits of `path`, which must not be a symlink (chmod would follow it).
pub fn set_mode(path: &Path, mode: u32) -> Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {:o} {}", mode, path.display()))
}

fn ensure_parent(path: &Path) -> Result<()> {
    match path.parent() {
        Some(parent) => mkdir_p(parent, DEFAULT_DIR_MODE),
        None => Ok(()),
    }
}

/// Replaces the file's content (creating it and its parents as needed). A new file gets `mode` or
/// 0644; an existing one keeps its bits unless `mode` is given.
pub fn write(path: &Path, content: &Content, mode: Option<u32>) -> Result<()> {
    ensure_parent(path)?;
    let existed = fs::symlink_metadata(path).is_ok();
    let mut f = File::create(path).with_context(|| format!("create {}", path.display()))?;
    content.write_to(&mut f)?;
    drop(f);
    match (mode, existed) {
        (Some(m), _) => set_mode(path, m),
        (None, false) => set_mode(path, DEFAULT_FILE_MODE),
        (None, true) => Ok(()),
    }
}

/// Appends to an existing file.
pub fn append(path: &Path, content: &Content) -> Result<()> {
    let mut f = OpenOptions::new()
        .append(true)
        .open(path)
        .with_context(|| format!("open {} for append", path.display()))?;
    content.write_to(&mut f)
}

/// Overwrites bytes in place at `offset` without truncating (the size grows only if it must).
pub fn modify(path: &Path, offset: u64, content: &Content) -> Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .open(path)
        .with_context(|| format!("open {} for writing", path.display()))?;
    f.seek(SeekFrom::Start(offset))?;
    content.write_to(&mut f)
}

/// Removes a file, symlink, special file or a whole directory tree.
pub fn delete(path: &Path) -> Result<()> {
    let meta = fs::symlink_metadata(path).with_context(|| format!("delete {}", path.display()))?;
    if meta.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    }
    .with_context(|| format!("delete {}", path.display()))
}

pub fn rename(from: &Path, to: &Path) -> Result<()> {
    ensure_parent(to)?;
    fs::rename(from, to).with_context(|| format!("rename {} to {}", from.display(), to.display()))
}

/// Copies a file's content and permission bits (like `cp`, the copy gets a fresh mtime).
pub fn copy(from: &Path, to: &Path) -> Result<()> {
    ensure_parent(to)?;
    fs::copy(from, to).with_context(|| format!("copy {} to {}", from.display(), to.display()))?;
    Ok(())
}

pub fn make_symlink(path: &Path, target: &str) -> Result<()> {
    ensure_parent(path)?;
    symlink(target, path).with_context(|| format!("symlink {} -> {target}", path.display()))
}

pub fn mkfifo(path: &Path) -> Result<()> {
    ensure_parent(path)?;
    let mode = rustix::fs::Mode::from_raw_mode(DEFAULT_FILE_MODE);
    rustix::fs::mkfifoat(rustix::fs::CWD, path, mode)
        .with_context(|| format!("mkfifo {}", path.display()))?;
    // The umask may have taken bits off.
    set_mode(path, DEFAULT_FILE_MODE)
}

/// Sets the modification time of `path` itself (a symlink is not followed); atime is left alone.
pub fn set_mtime(path: &Path, secs: i64, nanos: u32) -> Result<()> {
    use rustix::fs::{AtFlags, CWD, Timespec, Timestamps, UTIME_OMIT, utimensat};
    let times = Timestamps {
        last_access: Timespec {
            tv_sec: 0,
            tv_nsec: UTIME_OMIT,
        },
        last_modification: Timespec {
            tv_sec: secs,
            tv_nsec: nanos.into(),
        },
    };
    utimensat(CWD, path, &times, AtFlags::SYMLINK_NOFOLLOW)
        .with_context(|| format!("set mtime of {}", path.display()))
}

/// Copies the tree under `from` into the (empty or missing) directory `to`, keeping content, modes,
/// symlinks and mtimes (to the nanosecond), so that two client directories are truly identical.
pub fn clone_tree(from: &Path, to: &Path) -> Result<()> {
    mkdir_p(to, DEFAULT_DIR_MODE)?;
    if fs::read_dir(to)?.next().is_some() {
        bail!("clone target {} is not empty", to.display());
    }
    clone_dir_contents(from, to)
}

fn clone_dir_contents(from: &Path, to: &Path) -> Result<()> {
    let mut names: Vec<_> = fs::read_dir(from)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<std::io::Result<_>>()?;
    names.sort();
    for name in names {
        let (src, dst) = (from.join(&name), to.join(&name));
        let meta = fs::symlink_metadata(&src)?;
        let ft = meta.file_type();
        if ft.is_symlink() {
            symlink(fs::read_link(&src)?, &dst)?;
        } else if ft.is_dir() {
            fs::create_dir(&dst)?;
            clone_dir_contents(&src, &dst)?;
            set_mode(&dst, meta.permissions().mode() & 0o7777)?;
        } else if ft.is_file() {
            fs::copy(&src, &dst)?;
            set_mode(&dst, meta.permissions().mode() & 0o7777)?;
        } else {
            continue; // special files are not cloned: they are not part of any mirror
        }
        // Children first, then the directory: writing into a directory changes its mtime.
        use std::os::unix::fs::MetadataExt;
        set_mtime(&dst, meta.mtime(), meta.mtime_nsec() as u32)?;
    }
    Ok(())
}

/// Creates `count` files of `size` generated bytes under `dir`, 100 per subdirectory
/// (`dir/00/f0000.bin`, …), or all in `dir` itself when `flat` (`dir/f0000.bin`, …); file `i` is
/// seeded with `seed + i` so every file is distinct.
pub fn generate_files(dir: &Path, count: u64, size: u64, seed: u64, flat: bool) -> Result<()> {
    for i in 0..count {
        let name = format!("f{i:04}.bin");
        let path = if flat {
            dir.join(name)
        } else {
            dir.join(format!("{:02}", i / 100)).join(name)
        };
        let content = Content::Generated {
            size,
            seed: seed.wrapping_add(i),
        };
        write(&path, &content, None)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_is_stable() {
        // Reference values of splitmix64 for seed 0; generated files depend on them.
        let mut r = SplitMix64::new(0);
        assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn generates_into_subdirectories_or_flat() {
        let dir = tempfile::tempdir().unwrap();
        let (nested, flat) = (dir.path().join("n"), dir.path().join("f"));
        generate_files(&nested, 101, 3, 7, false).unwrap();
        generate_files(&flat, 101, 3, 7, true).unwrap();
        assert!(nested.join("00/f0099.bin").is_file() && nested.join("01/f0100.bin").is_file());
        assert!(flat.join("f0000.bin").is_file() && flat.join("f0100.bin").is_file());
        assert_eq!(fs::read_dir(&flat).unwrap().count(), 101);
        assert_eq!(
            fs::read(flat.join("f0100.bin")).unwrap(),
            fs::read(nested.join("01/f0100.bin")).unwrap()
        );
    }

    #[test]
    fn generated_content_has_exact_size() {
        for size in [0u64, 1, 7, 8, 9, 300_000] {
            let mut v = Vec::new();
            Content::Generated { size, seed: 3 }
                .write_to(&mut v)
                .unwrap();
            assert_eq!(v.len() as u64, size);
        }
    }
}
