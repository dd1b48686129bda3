//! Carries out the local part of a plan on the server's directory: staged copies and moves,
//! deletes, new directories, symlinks, and metadata. Blocking; run it off the async runtime.

use std::fs::File;
use std::io::{self, Read, Write};

use tracing::warn;

use crate::core::hash::{ContentHash, HashAlgorithm};
use crate::core::manifest::RelPath;
use crate::core::manifest::Wanted;
use crate::core::plan::{LocalCopy, Plan};
use crate::events::{Event, EventSink};
use crate::store::root::{Root, Stage, TempFile};
use crate::wire::Failure;

/// What the local phases did. Failures are recorded and the rest goes on.
#[derive(Debug, Default)]
pub struct Outcome {
    pub copied: u64,
    pub renamed: u64,
    pub deleted: u64,
    pub failed: Vec<Failure>,
    /// Local copies that could not be made (source gone or changed): ask the client instead.
    pub refetch: Vec<Wanted>,
}

impl Outcome {
    fn fail(
        &mut self,
        events: &dyn EventSink,
        action: &'static str,
        path: &RelPath,
        err: impl std::fmt::Display,
    ) {
        let error = err.to_string();
        self.failed.push(Failure::new(
            path.as_str(),
            format!("failed to {action}: {error}"),
        ));
        events.emit(Event::Failed {
            path: path.clone(),
            action,
            error,
        });
    }
}

/// Phases 1 to 4 of [`Plan`]: everything that needs nothing from the client.
pub fn apply_local(root: &Root, plan: &Plan, events: &dyn EventSink) -> Outcome {
    let mut out = Outcome::default();
    let mut staged: Vec<(&LocalCopy, TempFile)> = Vec::new();
    let stage = if plan.copies.is_empty() && plan.dir_moves.is_empty() {
        None
    } else {
        match root.stage() {
            Ok(s) => Some(s),
            Err(e) => {
                warn!("failed to create a staging directory, requesting instead: {e}");
                None
            }
        }
    };

    for c in &plan.copies {
        let res = match &stage {
            Some(stage) => stage_one(root, stage, c),
            None => Err(io::Error::other("no staging directory")),
        };
        match res {
            Ok(tmp) => staged.push((c, tmp)),
            Err(e) => {
                warn!(
                    "cannot reuse {} for {}, requesting it instead: {e}",
                    c.src, c.dst
                );
                out.refetch.push(Wanted {
                    path: c.dst.clone(),
                    size: c.size,
                    hash: Some(c.hash),
                    meta: c.meta,
                });
            }
        }
    }

    // Directories moved whole: taken after the copies were read (a copy may come from
    // inside one), put in place once their new parents exist.
    let mut taken: Vec<(&RelPath, &RelPath, TempFile)> = Vec::new();
    for (from, to) in &plan.dir_moves {
        let res = match &stage {
            Some(stage) => stage.take(from).map_err(io::Error::other),
            None => Err(io::Error::other("no staging directory")),
        };
        match res {
            Ok(tmp) => taken.push((from, to, tmp)),
            Err(e) => out.fail(events, "move directory", from, e),
        }
    }

    for path in &plan.deletes {
        match root.remove(path) {
            Ok(dir) => {
                events.emit(Event::Deleted {
                    path: path.clone(),
                    dir,
                });
                out.deleted += 1;
            }
            Err(e) => out.fail(events, "delete", path, e),
        }
    }

    for path in &plan.mkdirs {
        match root.mkdir(path) {
            Ok(()) => events.emit(Event::DirCreated { path: path.clone() }),
            Err(e) => out.fail(events, "create directory", path, e),
        }
    }

    for (from, to, tmp) in taken {
        match root.place(tmp, to) {
            Ok(()) => {
                events.emit(Event::DirMoved {
                    src: from.clone(),
                    dst: to.clone(),
                });
                out.renamed += 1;
            }
            Err(e) => out.fail(events, "move directory to", to, e),
        }
    }

    for (c, tmp) in staged {
        match root.place(tmp, &c.dst) {
            Ok(()) if c.is_move => {
                events.emit(Event::Moved {
                    src: c.src.clone(),
                    dst: c.dst.clone(),
                });
                out.renamed += 1;
            }
            Ok(()) => {
                events.emit(Event::Copied {
                    src: c.src.clone(),
                    dst: c.dst.clone(),
                });
                out.copied += 1;
            }
            Err(e) => out.fail(events, "place", &c.dst, e),
        }
    }

    for (path, target) in &plan.symlinks {
        match root.symlink(path, target) {
            Ok(()) => events.emit(Event::SymlinkCreated {
                path: path.clone(),
                target: target.clone(),
            }),
            Err(e) => out.fail(events, "create symlink", path, e),
        }
    }
    out
}

/// Phase 6 of [`Plan`]: metadata of entries whose content was already right, then
/// directories, deepest first; last, the modes of directories of ours that the session had to
/// open up (mode 000 or read-only on a server that is not root) and that the plan did not set.
pub fn apply_meta(root: &Root, plan: &Plan, out: &mut Outcome, events: &dyn EventSink) {
    for (path, meta) in plan.file_meta.iter().chain(&plan.dir_meta) {
        match root.set_meta(path, meta) {
            Ok(()) => events.emit(Event::MetaUpdated { path: path.clone() }),
            Err(e) => out.fail(events, "set metadata of", path, e),
        }
    }
    for (path, err) in root.restore_modes() {
        warn!(
            "failed to put back the mode of {}: {err}",
            crate::core::text::Escaped(&path)
        );
        out.failed.push(Failure::new(
            path,
            format!("failed to put back the mode: {err}"),
        ));
    }
}

/// Puts the content for `c.dst` into the staging area, verified against its MD5, with the
/// client's permission bits and mtime already applied.
fn stage_one(root: &Root, stage: &Stage, c: &LocalCopy) -> io::Result<TempFile> {
    let tmp = if c.is_move {
        let tmp = stage.take(&c.src).map_err(io::Error::other)?;
        // Moved, not yet trusted: a file modified behind our back since the scan is refused.
        let alg = c.hash.algorithm();
        check_hash(copy_hashing(&mut tmp.open_read()?, None, alg)?, c.hash)?;
        tmp
    } else {
        let mut tmp = stage.temp_file()?;
        let mut from = root.open_read_own(&c.src)?;
        let alg = c.hash.algorithm();
        check_hash(copy_hashing(&mut from, Some(tmp.file()), alg)?, c.hash)?;
        tmp
    };
    tmp.set_meta(&c.meta)?;
    Ok(tmp)
}

/// Bytes read at a time by a local copy.
const COPY_BUF: usize = 256 << 10;

/// The hash of what `from` holds, written to `to` as it is read when there is one.
fn copy_hashing(
    from: &mut File,
    mut to: Option<&mut File>,
    alg: HashAlgorithm,
) -> io::Result<ContentHash> {
    let mut h = alg.hasher();
    // Sized to the file (most are small): a zeroed 256 KiB per copy cost more than the copy.
    let len = from.metadata().map_or(COPY_BUF as u64, |m| m.len());
    let mut buf = vec![0u8; (len as usize).saturating_add(1).clamp(4096, COPY_BUF)];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        h.update(&buf[..n]);
        if let Some(to) = to.as_mut() {
            to.write_all(&buf[..n])?;
        }
    }
    Ok(h.finish())
}

fn check_hash(got: ContentHash, want: ContentHash) -> io::Result<()> {
    if got != want {
        return Err(io::Error::other(format!(
            "content changed since the scan ({} {got}, expected {want})",
            got.algorithm()
        )));
    }
    Ok(())
}
