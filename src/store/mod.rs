//! The store layer: the only code that touches the synced tree (walks, reads, writes, the hash
//! cache behind them). `tests/tidy.rs` checks that no other layer uses the file system.

pub mod apply;
pub mod cache;
pub mod db;
mod local;
pub mod read;
pub mod root;
pub mod scan;
pub mod state;
pub mod watch;

use std::fs::{File, Metadata};
use std::io;
use std::path::{Path, PathBuf};

use crate::core::manifest::{Manifest, Meta, RelPath};
use crate::core::plan::Plan;
use crate::core::stamp::Stamp;
use crate::events::EventSink;
use apply::Outcome;
use root::{Root, RootError};
use scan::Scan;

/// The synced tree as the rest of the program sees it: listed, read, written through staged
/// files that become visible only when committed, changed entry by entry, flushed. [`Root`] is
/// the local-disk implementation; the server and the transfers are written against this
/// trait, so a tree elsewhere (or a test double) fits in without touching them.
pub trait Store: Clone + Send + Sync + 'static {
    /// A file being written for an entry: not part of the tree until committed, gone if
    /// dropped uncommitted.
    type Staged: Staged + Send;
    /// What a thread that reads or stages file after file keeps from one to the next (for
    /// [`Root`], the directory it last reached: files of one directory come together).
    type Dirs: Default + Send;

    /// Lists the tree (its hash cache, if any, in `cache_file`).
    fn list(&self, cache_file: Option<PathBuf>, opts: scan::Options) -> io::Result<Scan>;
    /// Lists part of the tree again: the scopes' paths, their ancestors, and below deep ones.
    fn list_part(
        &self,
        scopes: &[scan::Scope],
        cache_file: Option<PathBuf>,
        opts: scan::Options,
    ) -> io::Result<Scan>;
    /// Opens the regular file `rel` for reading, never through a symlink; with its metadata.
    fn read(&self, rel: &RelPath, dirs: &mut Self::Dirs) -> io::Result<(File, Metadata)>;
    /// A new, empty, private file that will become `rel`.
    fn stage(&self, rel: &RelPath, dirs: &mut Self::Dirs) -> Result<Self::Staged, RootError>;
    /// Makes a staged file `rel`, atomically replacing what was there. Returns the stamp it
    /// has in place when the hash cache may trust it at once.
    fn commit(&self, staged: Self::Staged, rel: &RelPath) -> Result<Option<Stamp>, RootError>;
    /// The local phases of a plan: copies and moves (staged before anything is destroyed),
    /// deletes, new directories, symlinks. `scanned`: the tree as scanned, when a path that
    /// changed since must be left alone (two-way sync); `None` in a mirror.
    fn apply(&self, plan: &Plan, scanned: Option<&Manifest>, events: &dyn EventSink) -> Outcome;
    /// The last phase of a plan: metadata, directories deepest first, modes put back.
    fn finish(&self, plan: &Plan, out: &mut Outcome, events: &dyn EventSink);
    /// Gives the tree's top directory the client's mtime.
    fn set_root_mtime(&self, meta: &Meta) -> io::Result<()>;
    /// Makes everything written so far durable.
    fn flush(&self) -> io::Result<()>;
    /// Makes these files and directories (`None`: the top) durable: what a batch that
    /// changed a few entries needs, rather than everything.
    fn flush_paths(&self, files: &[RelPath], dirs: &[Option<RelPath>]) -> io::Result<()> {
        let _ = (files, dirs);
        self.flush()
    }
}

/// A file being written into a [`Store`].
pub trait Staged {
    fn write_all(&mut self, data: &[u8]) -> io::Result<()>;
    /// Leaves the next `len` bytes unwritten: a hole.
    fn skip(&mut self, len: u64) -> io::Result<()>;
    fn set_len(&mut self, len: u64) -> io::Result<()>;
    /// Starts writing a range back to disk without waiting, so the final flush waits less.
    fn start_writeback(&mut self, offset: u64, len: u64) -> io::Result<()>;
    /// The final permission bits and mtime, given before the file becomes visible.
    fn set_meta(&self, meta: &Meta) -> io::Result<()>;
}

/// Why a directory cannot be synced.
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error("{0} exists and is not a directory")]
    NotADirectory(PathBuf),
    #[error("cannot read {path}: {source}")]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create directory {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot clean stale temporary files in {path}: {source}")]
    Clean {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Checks that `dir` is a directory that can be listed (the client's side).
pub fn check_dir(dir: &Path) -> Result<(), DirError> {
    match std::fs::metadata(dir) {
        Ok(m) if !m.is_dir() => Err(DirError::NotADirectory(dir.into())),
        Ok(_) => std::fs::read_dir(dir)
            .map(drop)
            .map_err(|source| DirError::Unreadable {
                path: dir.into(),
                source,
            }),
        Err(source) => Err(DirError::Unreadable {
            path: dir.into(),
            source,
        }),
    }
}

/// The server's side: creates `dir` if needed and removes temporary files left by an earlier
/// crash. Returns the root and how many were removed.
pub fn prepare(dir: &Path) -> Result<(Root, usize), DirError> {
    match std::fs::metadata(dir) {
        Ok(m) if !m.is_dir() => return Err(DirError::NotADirectory(dir.into())),
        Ok(_) => {}
        Err(_) => std::fs::create_dir_all(dir).map_err(|source| DirError::Create {
            path: dir.into(),
            source,
        })?,
    }
    let root = Root::new(dir);
    let n = root
        .remove_stale_temps()
        .map_err(|source| DirError::Clean {
            path: dir.into(),
            source,
        })?;
    Ok((root, n))
}
