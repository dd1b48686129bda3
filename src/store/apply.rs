//! Carries out the local part of a plan on the server's directory: staged copies and moves,
//! deletes, new directories, symlinks, and metadata. Blocking; run it off the async runtime.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::PathBuf;

use tracing::{debug, info, warn};

use crate::core::hash::ContentHash;
use crate::core::manifest::{RelPath, TEMP_PREFIX};
use crate::core::plan::{LocalCopy, Plan, Request};
use crate::store::root::{Root, TempFile, in_dir};

/// What the local phases did. Failures are recorded and the rest goes on.
#[derive(Debug, Default)]
pub struct Outcome {
    pub copied: u64,
    pub renamed: u64,
    pub deleted: u64,
    pub failed: Vec<(String, String)>,
    /// Local copies that could not be made (source gone or changed): ask the client instead.
    pub refetch: Vec<Request>,
}

impl Outcome {
    fn fail(&mut self, what: &str, path: &RelPath, err: impl std::fmt::Display) {
        warn!("failed to {what} {path}: {err}");
        self.failed
            .push((path.as_str().to_owned(), format!("failed to {what}: {err}")));
    }
}

/// A directory at the root holding staged copies until they are renamed into place; removed
/// with whatever is left in it when dropped.
struct Stage {
    dir: PathBuf,
}

impl Stage {
    fn new(root: &Root) -> io::Result<Stage> {
        let dir = root.path().join(format!(
            "{TEMP_PREFIX}stage-{:016x}",
            crate::process::random_u64()
        ));
        fs::create_dir(&dir)?;
        Ok(Stage { dir })
    }
}

impl Drop for Stage {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Phases 1 to 4 of [`Plan`]: everything that needs nothing from the client.
pub fn apply_local(root: &Root, plan: &Plan) -> Outcome {
    let mut out = Outcome::default();
    let mut staged: Vec<(&LocalCopy, TempFile)> = Vec::new();
    let stage = if plan.copies.is_empty() {
        None
    } else {
        match Stage::new(root) {
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
                out.refetch.push(Request {
                    path: c.dst.clone(),
                    size: c.size,
                    hash: Some(c.hash),
                    meta: c.meta,
                });
            }
        }
    }

    for path in &plan.deletes {
        match root.remove(path) {
            Ok(is_dir) => {
                let what = if is_dir { "directory" } else { "file" };
                info!("Deleting {what}: {path}");
                out.deleted += 1;
            }
            Err(e) => out.fail("delete", path, e),
        }
    }

    for path in &plan.mkdirs {
        match root.mkdir(path) {
            Ok(()) => info!("Creating directory: {path}"),
            Err(e) => out.fail("create directory", path, e),
        }
    }

    for (c, tmp) in staged {
        match root.place(tmp, &c.dst) {
            // The seed's wording for a rename: the content is found locally and renamed into
            // place (here by moving it, as the source is gone on the client).
            Ok(()) if c.is_move => {
                info!("Copying file: {} and renaming to {} (moved)", c.src, c.dst);
                out.renamed += 1;
            }
            Ok(()) => {
                info!("Copying file: {} and renaming to {}", c.src, c.dst);
                out.copied += 1;
            }
            Err(e) => out.fail("place", &c.dst, e),
        }
    }

    for (path, target) in &plan.symlinks {
        match root.symlink(path, target) {
            Ok(()) => info!("Creating symlink: {path} -> {target}"),
            Err(e) => out.fail("create symlink", path, e),
        }
    }
    out
}

/// Phase 6 of [`Plan`]: metadata of entries whose content was already right, then
/// directories, deepest first.
pub fn apply_meta(root: &Root, plan: &Plan, out: &mut Outcome) {
    for (path, meta) in plan.file_meta.iter().chain(&plan.dir_meta) {
        match root.set_meta(path, meta) {
            Ok(()) => debug!("Updating metadata: {path}"),
            Err(e) => out.fail("set metadata of", path, e),
        }
    }
}

/// Puts the content for `c.dst` into the staging area, verified against its MD5, with the
/// client's permission bits and mtime already applied.
fn stage_one(root: &Root, stage: &Stage, c: &LocalCopy) -> io::Result<TempFile> {
    let src = root.resolve(&c.src).map_err(io::Error::other)?;
    let tmp = if c.is_move {
        let tmp = TempFile::adopt(
            stage
                .dir
                .join(format!("{:016x}", crate::process::random_u64())),
        );
        let src_dir = src.parent().expect("resolved paths are below the root");
        in_dir(src_dir, || fs::rename(&src, tmp.path()))?;
        // Moved, not yet trusted: a file modified behind our back since the scan is refused.
        let (_, hash) = crate::store::scan::hash_file(tmp.path(), c.hash.algorithm())?;
        check_hash(hash, c.hash)?;
        tmp
    } else {
        let mut tmp = TempFile::new_in(&stage.dir)?;
        let mut from = File::open(&src)?;
        let mut h = c.hash.algorithm().hasher();
        let mut buf = vec![0u8; COPY_BUF];
        loop {
            let n = from.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            tmp.file().write_all(&buf[..n])?;
        }
        check_hash(h.finish(), c.hash)?;
        tmp
    };
    tmp.set_meta(&c.meta)?;
    Ok(tmp)
}

/// Bytes read at a time by a local copy.
const COPY_BUF: usize = 256 << 10;

fn check_hash(got: ContentHash, want: ContentHash) -> io::Result<()> {
    if got != want {
        return Err(io::Error::other(format!(
            "content changed since the scan ({} {got}, expected {want})",
            got.algorithm()
        )));
    }
    Ok(())
}
