//! Carries out the local part of a plan on the synced directory: staged copies and moves,
//! deletes, new directories, symlinks, and metadata. Blocking; run it off the async runtime.
//! A mirror's tree is the client's to overwrite; a two-way side passes the tree as it scanned
//! it, and a path a local process changed since is left for the next round.

use std::fs::File;
use std::io::{self, Read, Write};

use tracing::warn;

use crate::core::hash::{ContentHash, HashAlgorithm};
use crate::core::manifest::{Manifest, RelPath, Wanted};
use crate::core::plan::{LocalCopy, Plan};
use crate::events::{Event, EventSink};
use crate::store::root::{Root, RootError, Stage, TempFile};
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
    /// Paths left as they were because they changed since the scan (two-way only): not
    /// failures, but not made as planned either.
    pub changed: Vec<RelPath>,
}

impl Outcome {
    /// Records an error, or a path found changed since the scan.
    fn fail_or_changed(
        &mut self,
        events: &dyn EventSink,
        action: &'static str,
        path: &RelPath,
        err: RootError,
    ) {
        match err {
            RootError::Changed { path } => {
                warn!(
                    "{}: changed since it was scanned, left for the next round",
                    crate::core::text::Escaped(path.as_str())
                );
                self.changed.push(path);
            }
            err => self.fail(events, action, path, err),
        }
    }

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

/// Phases 1 to 4 of [`Plan`]: everything that needs nothing from the other side. `scanned`:
/// the tree as this side scanned it, when nothing that changed since may be overwritten or
/// deleted (each path is checked right before); `None` in a mirror.
pub fn apply_local(
    root: &Root,
    plan: &Plan,
    scanned: Option<&Manifest>,
    events: &dyn EventSink,
) -> Outcome {
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
                    from: None,
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
        let removed = match scanned {
            None => root.remove(path),
            Some(m) => match m.get(path) {
                Some(e) => root.remove_unchanged(path, e),
                None => Err(RootError::Changed { path: path.clone() }),
            },
        };
        match removed {
            Ok(dir) => {
                events.emit(Event::Deleted {
                    path: path.clone(),
                    dir,
                });
                out.deleted += 1;
            }
            Err(e) => out.fail_or_changed(events, "delete", path, e),
        }
    }

    for path in &plan.mkdirs {
        match root.mkdir(path) {
            Ok(()) => events.emit(Event::DirCreated { path: path.clone() }),
            Err(e) => out.fail(events, "create directory", path, e),
        }
    }

    for (from, to, tmp) in taken {
        match place(root, tmp, to, scanned) {
            Ok(()) => {
                events.emit(Event::DirMoved {
                    src: from.clone(),
                    dst: to.clone(),
                });
                out.renamed += 1;
            }
            Err(e) => out.fail_or_changed(events, "move directory to", to, e),
        }
    }

    for (c, tmp) in staged {
        match place(root, tmp, &c.dst, scanned) {
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
            Err(e) => out.fail_or_changed(events, "place", &c.dst, e),
        }
    }

    for (path, target) in &plan.symlinks {
        let made = match scanned {
            Some(m) => root
                .check_unchanged(path, m.get(path))
                .and_then(|()| root.symlink(path, target)),
            None => root.symlink(path, target),
        };
        match made {
            Ok(()) => events.emit(Event::SymlinkCreated {
                path: path.clone(),
                target: target.clone(),
            }),
            Err(e) => out.fail_or_changed(events, "create symlink", path, e),
        }
    }
    out
}

/// Renames a staged file or directory onto `to`: checked against the scan when there is one.
fn place(
    root: &Root,
    tmp: TempFile,
    to: &RelPath,
    scanned: Option<&Manifest>,
) -> Result<(), RootError> {
    match scanned {
        Some(m) => root.place_unchanged(tmp, to, m.get(to)),
        None => root.place(tmp, to),
    }
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

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::core::manifest::{Entry, Kind};
    use crate::core::plan::plan;
    use crate::events::Recorder;
    use crate::store::Store;
    use crate::store::scan::Options;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    /// The tree `dir` holds now, hashed.
    fn scan(root: &Root) -> Manifest {
        let scan = root
            .list(None, Options::new(HashAlgorithm::Blake3))
            .unwrap();
        Manifest::from_entries(scan.entries).unwrap()
    }

    fn file(path: &str, content: &str, like: &Entry) -> Entry {
        Entry {
            path: p(path),
            kind: Kind::File {
                size: content.len() as u64,
                hash: HashAlgorithm::Blake3.of(content.as_bytes()),
            },
            meta: like.meta,
        }
    }

    #[test]
    fn with_the_scan_as_guard_nothing_changed_since_is_overwritten_or_deleted() {
        for guarded in [true, false] {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path();
            fs::write(dir.join("a"), "x").unwrap();
            fs::write(dir.join("b"), "y").unwrap();
            fs::write(dir.join("gone"), "z").unwrap();
            fs::write(dir.join("keep"), "k").unwrap();
            fs::create_dir(dir.join("d")).unwrap();
            fs::write(dir.join("d/old"), "o").unwrap();
            let root = Root::new(dir);
            let scanned = scan(&root);
            let like = scanned.get(&p("a")).unwrap().clone();
            // The other side's tree: a takes b's content, c keep's; gone and d go.
            let target = Manifest::from_entries([
                file("a", "y", &like),
                file("b", "y", &like),
                file("c", "k", &like),
                file("keep", "k", &like),
            ])
            .unwrap();
            let plan = plan(&target, &scanned);

            // A local process, after the scan.
            fs::write(dir.join("a"), "local edit").unwrap();
            fs::write(dir.join("gone"), "changed").unwrap();
            fs::write(dir.join("d/new"), "new").unwrap();

            let events = Recorder::default();
            let out = apply_local(&root, &plan, guarded.then_some(&scanned), &events);
            let read = |f: &str| fs::read_to_string(dir.join(f)).ok();
            assert_eq!(read("c").as_deref(), Some("k"), "copied either way");
            if guarded {
                assert_eq!(read("a").as_deref(), Some("local edit"));
                assert_eq!(read("gone").as_deref(), Some("changed"));
                assert_eq!(read("d/new").as_deref(), Some("new"));
                assert_eq!(read("d/old"), None, "unchanged: deleted");
                let mut changed = out.changed.clone();
                changed.sort();
                assert_eq!(changed, vec![p("a"), p("gone")]);
                // `d` is not empty any more: its removal fails, as it must.
                assert_eq!(out.failed.len(), 1, "{:?}", out.failed);
                assert!(out.failed[0].path == "d", "{:?}", out.failed);
            } else {
                // A mirror overwrites: the tree is the client's.
                assert_eq!(read("a").as_deref(), Some("y"));
                assert_eq!(read("gone"), None);
                assert!(out.changed.is_empty());
            }
        }
    }
}
