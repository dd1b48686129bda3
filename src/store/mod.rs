//! The store layer: the only code that touches the synced tree (walks, reads, writes, the hash
//! cache behind them). `tests/tidy.rs` checks that no other layer uses the file system.

pub mod apply;
pub mod cache;
pub mod read;
pub mod root;
pub mod scan;

use std::path::{Path, PathBuf};

use root::Root;

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
