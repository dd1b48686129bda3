//! The synced directory as a write target: every change to it goes through [`Root`], which
//! refuses to act through a symlink and writes content only via verified temporary files.

use std::ffi::CString;
use std::fs::{self, File};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use crate::core::manifest::{Meta, RelPath, TEMP_PREFIX};

#[derive(Debug, thiserror::Error)]
pub enum RootError {
    #[error(
        "{path}: parent {ancestor} is a symlink or not a directory; refusing to write through it"
    )]
    UnsafeParent { path: RelPath, ancestor: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
}

impl RootError {
    fn io(path: impl ToString, source: io::Error) -> Self {
        RootError::Io {
            path: path.to_string(),
            source,
        }
    }
}

/// A directory that writes are confined to.
#[derive(Clone, Debug)]
pub struct Root {
    dir: PathBuf,
}

impl Root {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Root { dir: dir.into() }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The absolute path of `rel`, after checking that every ancestor of it below the root is a
    /// real directory. Checking with `lstat` component by component is what stops a server-side
    /// `link -> /elsewhere` from turning a write to `link/x` into a write to `/elsewhere/x`.
    pub fn resolve(&self, rel: &RelPath) -> Result<PathBuf, RootError> {
        let mut cur = self.dir.clone();
        let comps: Vec<&str> = rel.as_str().split('/').collect();
        for (i, c) in comps[..comps.len() - 1].iter().enumerate() {
            cur.push(c);
            match fs::symlink_metadata(&cur) {
                Ok(m) if m.file_type().is_dir() => {}
                Ok(_) => {
                    return Err(RootError::UnsafeParent {
                        path: rel.clone(),
                        ancestor: comps[..=i].join("/"),
                    });
                }
                Err(e) => return Err(RootError::io(rel, e)),
            }
        }
        cur.push(comps[comps.len() - 1]);
        Ok(cur)
    }

    /// A new, empty temporary file in the directory that will hold `rel`, so that the final
    /// rename stays within one file system and is atomic.
    pub fn temp_for(&self, rel: &RelPath) -> Result<TempFile, RootError> {
        let target = self.resolve(rel)?;
        let dir = target.parent().expect("resolved paths are below the root");
        in_dir(dir, || TempFile::new_in(dir)).map_err(|e| RootError::io(rel, e))
    }

    /// Moves a finished temporary file onto `rel`, replacing what was there (a file or a
    /// symlink; never following it).
    pub fn place(&self, tmp: TempFile, rel: &RelPath) -> Result<(), RootError> {
        let target = self.resolve(rel)?;
        let dir = target.parent().expect("resolved paths are below the root");
        in_dir(dir, || fs::rename(tmp.path(), &target)).map_err(|e| RootError::io(rel, e))?;
        tmp.forget();
        Ok(())
    }

    /// Removes a file, symlink or (empty) directory; a missing entry is not an error.
    /// Returns whether it was a directory.
    pub fn remove(&self, rel: &RelPath) -> Result<bool, RootError> {
        let p = self.resolve(rel)?;
        let dir = p.parent().expect("resolved paths are below the root");
        let res = match fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_dir() => in_dir(dir, || fs::remove_dir(&p)).map(|()| true),
            Ok(_) => in_dir(dir, || fs::remove_file(&p)).map(|()| false),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        };
        res.map_err(|e| RootError::io(rel, e))
    }

    pub fn mkdir(&self, rel: &RelPath) -> Result<(), RootError> {
        let p = self.resolve(rel)?;
        let dir = p.parent().expect("resolved paths are below the root");
        match in_dir(dir, || fs::create_dir(&p)) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && is_real_dir(&p) => Ok(()),
            r => r.map_err(|e| RootError::io(rel, e)),
        }
    }

    /// Creates or atomically replaces a symlink at `rel`.
    pub fn symlink(&self, rel: &RelPath, target: &str) -> Result<(), RootError> {
        let p = self.resolve(rel)?;
        let dir = p.parent().expect("resolved paths are below the root");
        let tmp = dir.join(temp_name());
        in_dir(dir, || symlink(target, &tmp)).map_err(|e| RootError::io(rel, e))?;
        fs::rename(&tmp, &p).map_err(|e| {
            let _ = fs::remove_file(&tmp);
            RootError::io(rel, e)
        })
    }

    /// Applies permission bits (not to symlinks, which have none) and the modification time
    /// (to symlinks too, without following them).
    pub fn set_meta(&self, rel: &RelPath, meta: &Meta) -> Result<(), RootError> {
        let p = self.resolve(rel)?;
        let m = fs::symlink_metadata(&p).map_err(|e| RootError::io(rel, e))?;
        if !m.file_type().is_symlink() {
            fs::set_permissions(&p, fs::Permissions::from_mode(meta.mode))
                .map_err(|e| RootError::io(rel, e))?;
        }
        set_mtime_nofollow(&p, meta.mtime_secs, meta.mtime_nanos).map_err(|e| RootError::io(rel, e))
    }

    /// Deletes temporary files left by a crash or a kill, anywhere in the tree.
    /// Returns how many were removed.
    pub fn remove_stale_temps(&self) -> io::Result<usize> {
        let mut removed = 0;
        let mut stack = vec![self.dir.clone()];
        while let Some(dir) = stack.pop() {
            let Ok(rd) = fs::read_dir(&dir) else { continue };
            for ent in rd.flatten() {
                let Ok(ft) = ent.file_type() else { continue };
                let is_temp = ent
                    .file_name()
                    .as_bytes()
                    .starts_with(TEMP_PREFIX.as_bytes());
                if is_temp {
                    if ft.is_dir() {
                        fs::remove_dir_all(ent.path())?;
                    } else {
                        fs::remove_file(ent.path())?;
                    }
                    removed += 1;
                } else if ft.is_dir() {
                    stack.push(ent.path());
                }
            }
        }
        Ok(removed)
    }

    /// Flushes the whole file system holding the root: one call makes every file written in a
    /// session durable, instead of one fsync per file.
    pub fn sync_filesystem(&self) -> io::Result<()> {
        let f = File::open(&self.dir)?;
        use std::os::fd::AsRawFd;
        // SAFETY: syncfs only reads the descriptor, which `f` keeps open for the call.
        if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Runs `op`, which changes the entries of directory `dir`. If that is refused because `dir`
/// is not writable by its owner (a read-only directory mirrored from the client, on a server
/// that is not root), makes it owner-writable and tries once more, as rsync does. The plan
/// puts the directory's own mode back at the end of the session.
pub fn in_dir<T>(dir: &Path, op: impl Fn() -> io::Result<T>) -> io::Result<T> {
    match op() {
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            let m = fs::symlink_metadata(dir)?;
            let mode = m.permissions().mode();
            if !m.is_dir() || mode & 0o300 == 0o300 {
                return Err(e);
            }
            fs::set_permissions(dir, fs::Permissions::from_mode(mode | 0o300))?;
            op()
        }
        r => r,
    }
}

fn is_real_dir(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_dir())
}

fn temp_name() -> String {
    format!("{TEMP_PREFIX}{:016x}", crate::process::random_u64())
}

/// Sets the modification time of `p` itself, even when `p` is a symlink.
pub fn set_mtime_nofollow(p: &Path, secs: i64, nanos: u32) -> io::Result<()> {
    let c = CString::new(p.as_os_str().as_bytes())?;
    let times = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: secs as libc::time_t,
            tv_nsec: nanos as _,
        },
    ];
    // SAFETY: `c` is a valid NUL-terminated path and `times` has the two entries utimensat reads.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A file being written under a reserved name; removed on drop unless persisted. Dropping it is
/// how an abandoned or failed transfer leaves nothing behind.
#[derive(Debug)]
pub struct TempFile {
    path: PathBuf,
    file: Option<File>,
}

impl TempFile {
    pub fn new_in(dir: &Path) -> io::Result<TempFile> {
        let path = dir.join(temp_name());
        // Private while it fills: the final mode is applied only once the content is verified,
        // and until then another local user must not be able to open a 0600 file's data.
        let file = File::options()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        Ok(TempFile {
            path,
            file: Some(file),
        })
    }

    pub fn file(&mut self) -> &mut File {
        self.file.as_mut().expect("open until persisted")
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Starts writeback of a written range without waiting for it, so that the flush at the
    /// end of the session finds less to do.
    pub fn start_writeback(&mut self, offset: u64, len: u64) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let fd = self.file().as_raw_fd();
        // SAFETY: sync_file_range only reads the descriptor, which `self` keeps open.
        let rc = unsafe {
            libc::sync_file_range(
                fd,
                offset as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Gives the finished file its final permission bits and mtime before it becomes visible.
    pub fn set_meta(&self, meta: &Meta) -> io::Result<()> {
        fs::set_permissions(&self.path, fs::Permissions::from_mode(meta.mode))?;
        set_mtime_nofollow(&self.path, meta.mtime_secs, meta.mtime_nanos)
    }

    /// Takes charge of an existing file under a reserved name (a staged move).
    pub fn adopt(path: PathBuf) -> TempFile {
        TempFile { path, file: None }
    }

    /// Renames the finished file to `target`; from then on it is no longer temporary.
    pub fn persist_to(mut self, target: &Path) -> io::Result<()> {
        drop(self.file.take());
        fs::rename(&self.path, target)?;
        self.forget();
        Ok(())
    }

    /// Marks the file as moved away by the caller: dropping it deletes nothing.
    fn forget(mut self) {
        self.path = PathBuf::new();
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    #[test]
    fn refuses_to_write_through_a_symlinked_ancestor() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        symlink(outside.path(), root.path().join("link")).unwrap();
        let r = Root::new(root.path());
        for res in [
            r.temp_for(&p("link/x")).map(|_| ()),
            r.mkdir(&p("link/d")),
            r.symlink(&p("link/s"), "/etc"),
            r.remove(&p("link/y")).map(|_| ()),
        ] {
            let err = res.unwrap_err().to_string();
            assert!(err.contains("parent link is a symlink"), "{err}");
        }
        assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0);
        // The link itself may be replaced, never followed.
        r.remove(&p("link")).unwrap();
        assert!(outside.path().exists());
    }

    #[test]
    fn temp_file_vanishes_unless_placed() {
        let root = tempfile::tempdir().unwrap();
        let r = Root::new(root.path());
        let t = r.temp_for(&p("a")).unwrap();
        let tp = t.path().to_owned();
        assert!(tp.exists());
        drop(t);
        assert!(!tp.exists());

        let mut t = r.temp_for(&p("a")).unwrap();
        use std::io::Write;
        t.file().write_all(b"x").unwrap();
        t.set_meta(&Meta {
            mode: 0o600,
            mtime_secs: 1_000_000_000,
            mtime_nanos: 5,
        })
        .unwrap();
        r.place(t, &p("a")).unwrap();
        let m = fs::metadata(root.path().join("a")).unwrap();
        assert_eq!(m.permissions().mode() & 0o7777, 0o600);
        use std::os::unix::fs::MetadataExt;
        assert_eq!((m.mtime(), m.mtime_nsec()), (1_000_000_000, 5));
        assert_eq!(fs::read_dir(root.path()).unwrap().count(), 1);

        let t = r.temp_for(&p("b")).unwrap();
        let mode = fs::metadata(t.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "a temp file is private while it fills");
    }

    #[test]
    fn stale_temps_are_swept() {
        let root = tempfile::tempdir().unwrap();
        fs::create_dir(root.path().join("d")).unwrap();
        fs::write(root.path().join("d/.server-sync-tmp.1"), "x").unwrap();
        fs::create_dir(root.path().join(".server-sync-tmp.stage")).unwrap();
        fs::write(root.path().join(".server-sync-tmp.stage/f"), "x").unwrap();
        fs::write(root.path().join("keep"), "x").unwrap();
        assert_eq!(Root::new(root.path()).remove_stale_temps().unwrap(), 2);
        assert!(root.path().join("keep").exists());
        assert_eq!(fs::read_dir(root.path().join("d")).unwrap().count(), 0);
    }
}
