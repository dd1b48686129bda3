//! The walk floor of a re-sync: the least any tool that looks at every entry must spend.
//!
//! A re-sync that finds nothing (or little) to do still has to learn, on each side, what is
//! there: at least one `lstat` per entry of the source and of the destination. [`floor`] does
//! only that, both trees at once on two threads (as the client and the server walk theirs at
//! once), and times it: a re-sync's time over this floor is what the tool spends beyond looking.
//!
//! The walk is as cheap as a walk gets: each directory is opened relative to its parent
//! (`openat`), read with `getdents64`, and each entry is `fstatat`ed relative to it with
//! `AT_SYMLINK_NOFOLLOW`, so the kernel never resolves a path longer than one name. Symlinks
//! are not followed, and nothing is read or hashed.

use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use rustix::fs::{AtFlags, CWD, Dir, FileType, Mode, OFlags, openat, statat};

/// One timed walk of both trees.
#[derive(Clone, Copy, Debug)]
pub struct Walked {
    /// Wall time until both walks have ended.
    pub wall_s: f64,
    /// Entries below each root (the roots themselves not counted).
    pub src_entries: u64,
    pub dst_entries: u64,
}

/// Walks `src` and `dst` at once, one thread each, one `lstat` per entry; timed from before the
/// threads start until both have ended.
pub fn floor(src: &Path, dst: &Path) -> Result<Walked> {
    let t = Instant::now();
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| walk(src));
        let b = s.spawn(|| walk(dst));
        (a.join(), b.join())
    });
    let wall_s = t.elapsed().as_secs_f64();
    let a = a.map_err(|_| anyhow::anyhow!("the walk of {} panicked", src.display()))??;
    let b = b.map_err(|_| anyhow::anyhow!("the walk of {} panicked", dst.display()))??;
    Ok(Walked {
        wall_s,
        src_entries: a,
        dst_entries: b,
    })
}

/// The number of entries below `root`, each `lstat`ed once relative to its directory.
pub fn walk(root: &Path) -> Result<u64> {
    let fd = openat(CWD, root, dir_flags(), Mode::empty())
        .with_context(|| format!("open {}", root.display()))?;
    walk_dir(fd).with_context(|| format!("walk {}", root.display()))
}

fn dir_flags() -> OFlags {
    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC
}

fn walk_dir(fd: OwnedFd) -> rustix::io::Result<u64> {
    let mut dir = Dir::new(fd)?;
    let mut n = 0;
    while let Some(entry) = dir.read() {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_bytes() == b"." || name.to_bytes() == b".." {
            continue;
        }
        n += 1;
        let st = statat(dir.fd()?, name, AtFlags::SYMLINK_NOFOLLOW)?;
        if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
            // NOFOLLOW: the entry was a directory when stat'ed; a symlink swapped in since
            // fails rather than leading the walk elsewhere.
            let sub = openat(
                dir.fd()?,
                name,
                dir_flags() | OFlags::NOFOLLOW,
                Mode::empty(),
            )?;
            n += walk_dir(sub)?;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_every_entry_once_without_following_links() {
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        std::fs::create_dir_all(a.join("d/e")).unwrap();
        std::fs::write(a.join("f"), b"x").unwrap();
        std::fs::write(a.join("d/e/g"), b"y").unwrap();
        // A link to a directory is one entry, not followed.
        std::os::unix::fs::symlink(&a, a.join("d/loop")).unwrap();
        std::fs::create_dir(&b).unwrap();
        let w = floor(&a, &b).unwrap();
        assert_eq!((w.src_entries, w.dst_entries), (5, 0));
        assert!(w.wall_s >= 0.0);
        assert!(walk(&t.path().join("missing")).is_err());
    }
}
