//! Watching a whole tree with inotify (Linux): which paths to look at again, and when events
//! were lost.
//!
//! Events are hints, never truth: the consumer lstat's and re-hashes every path named here, so
//! this module only has to be *complete* (every change leads to a report of its path, of a
//! directory above it with `subtree`, or to a rescan), never precise. inotify watches one
//! directory per watch, so every directory of the tree gets one, kept in a map from watch
//! descriptor to path; a directory that appears is walked and watched before it is reported.
//!
//! Walks are path-based (inotify takes paths) and never follow a symlink. A directory swapped
//! for another while it is walked cannot make a change go unseen: every swap is itself a
//! create, delete or move in a watched parent, reported and handled in turn.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::CString;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::inotify::{self, CreateFlags, ReadFlags, WatchFlags};
use rustix::fs::{FileType, Mode, OFlags};
use rustix::io::Errno;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::core::manifest::{RelPath, TEMP_PREFIX};

/// Why the whole tree must be rescanned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lost {
    /// IN_Q_OVERFLOW: the kernel's queue was full and it dropped events. The watches are
    /// checked again from the root before this is reported, so watching goes on complete.
    Overflow,
    /// The root was deleted or moved away. The watcher stops watching (it reports nothing
    /// more); make a new one once the root is back.
    RootGone,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seen {
    /// Look at `path` again; with `subtree`, everything below it too (a directory that
    /// appeared: created or moved in; its watches are already in place when this is returned,
    /// so a walk made after receiving it misses nothing). `writing`: the last event for this
    /// path was a modification not yet followed by IN_CLOSE_WRITE (a writer may still be at it).
    Path {
        path: RelPath,
        subtree: bool,
        writing: bool,
    },
    /// The root directory itself changed (its mode or mtime, or an entry directly in it).
    Root,
    /// Events were lost: rescan everything. The watcher goes on working (unless the root is
    /// gone: see [`Lost::RootGone`]).
    Rescan(Lost),
}

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// fs.inotify.max_user_watches reached: the caller should fall back to polling.
    #[error(
        "the inotify watch limit ({}) is reached; raise it with sysctl {}{KEEP}",
        setting(WATCHES, *.max),
        raised(WATCHES, *.max)
    )]
    Limit {
        /// The limit in force, when /proc could tell.
        max: Option<u64>,
    },
    /// fs.inotify.max_user_instances reached (or the process's descriptor limit: inotify_init
    /// says EMFILE for both).
    #[error(
        "the inotify instance limit ({}) or this process's file descriptor limit is reached; \
         raise the first with sysctl {}{KEEP}",
        setting(INSTANCES, *.max),
        raised(INSTANCES, *.max)
    )]
    Instances { max: Option<u64> },
    /// A file system on which inotify would miss changes: it reports only those made
    /// through this machine's kernel, and on a network or user-space file system the changes
    /// that matter may be made elsewhere (another machine, the file system's own daemon).
    #[error(
        "{fs} is a network or user-space file system: inotify would miss changes made elsewhere"
    )]
    Unsupported { fs: &'static str },
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl WatchError {
    fn limit() -> WatchError {
        WatchError::Limit {
            max: read_sysctl(WATCHES),
        }
    }
}

const WATCHES: &str = "max_user_watches";
const INSTANCES: &str = "max_user_instances";
const KEEP: &str = " (and in a file of /etc/sysctl.d to keep it)";

/// An inotify sysctl and, when known, its value: `fs.inotify.max_user_watches = 8192`.
fn setting(key: &str, max: Option<u64>) -> String {
    match max {
        Some(n) => format!("fs.inotify.{key} = {n}"),
        None => format!("fs.inotify.{key}"),
    }
}

/// The sysctl assignment that raises an inotify limit: double it.
fn raised(key: &str, max: Option<u64>) -> String {
    match max {
        Some(n) => format!("fs.inotify.{key}={}", n.saturating_mul(2).max(1024)),
        None => format!("fs.inotify.{key}=<a higher value>"),
    }
}

/// The current value of an inotify sysctl, for messages.
fn read_sysctl(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/sys/fs/inotify/{key}")).ok()?;
    text.trim().parse().ok()
}

/// What every directory is watched for. Symlinks are never followed (the tree's own, and
/// a directory swapped for one at the moment it is watched); IN_EXCL_UNLINK: a file deleted
/// while a process still has it open says nothing more.
const MASK: WatchFlags = WatchFlags::CREATE
    .union(WatchFlags::DELETE)
    .union(WatchFlags::MODIFY)
    .union(WatchFlags::CLOSE_WRITE)
    .union(WatchFlags::ATTRIB)
    .union(WatchFlags::MOVED_FROM)
    .union(WatchFlags::MOVED_TO)
    .union(WatchFlags::DELETE_SELF)
    .union(WatchFlags::MOVE_SELF)
    .union(WatchFlags::DONT_FOLLOW)
    .union(WatchFlags::ONLYDIR)
    .union(WatchFlags::EXCL_UNLINK);

/// Events that change which entries a directory holds (and so its mtime).
const NAMESPACE: ReadFlags = ReadFlags::CREATE
    .union(ReadFlags::DELETE)
    .union(ReadFlags::MOVED_FROM)
    .union(ReadFlags::MOVED_TO);

/// Bytes read from the queue at a time: room for at least 2,000 events.
const READ_SIZE: usize = 64 * 1024;
/// Reads per call to [`Watcher::next`]: a tree changing without pause still gets its events
/// reported now and then (the rest stays readable for the next call). 1 MiB holds the kernel's
/// whole default queue (16,384 events).
const MAX_READS: usize = 16;

/// File systems (statfs f_type) on which changes made elsewhere never reach inotify.
const REMOTE: &[(u32, &str)] = &[
    (0x6969, "nfs"),
    (0x517b, "smb"),
    (0xff53_4d42, "cifs"),
    (0xfe53_4d42, "smb2"),
    (0x6573_5546, "fuse"),
    (0x0102_1997, "9p"),
    (0x00c3_6400, "ceph"),
    (0x5346_414f, "afs"),
    (0x6b41_4653, "afs"),
    (0x7375_7245, "coda"),
    (0x564c, "ncpfs"),
    (0x0bd0_0bd0, "lustre"),
    (0x4750_4653, "gpfs"),
    (0x0116_1970, "gfs2"),
    (0x7461_636f, "ocfs2"),
    (0x786f_4256, "vboxsf"),
];

/// The name of a file system inotify cannot serve, by its statfs magic number.
fn remote_fs(magic: u32) -> Option<&'static str> {
    REMOTE
        .iter()
        .find(|(m, _)| *m == magic)
        .map(|(_, name)| *name)
}

/// One event as read from the queue.
struct Raw {
    wd: i32,
    mask: ReadFlags,
    name: Option<Vec<u8>>,
}

/// A directory tree under watch.
pub struct Watcher {
    /// The root, symlinks resolved once at the start: watches are set by path, and a path
    /// through a symlink cannot be watched without following it.
    root: PathBuf,
    fd: AsyncFd<OwnedFd>,
    buf: Box<[MaybeUninit<u8>]>,
    /// Every watch, with the directory it is on (`None`: the root).
    dirs: HashMap<i32, Option<RelPath>>,
    /// The same, the other way round, in component order: a directory's subtree is one range.
    paths: BTreeMap<RelPath, i32>,
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher")
            .field("root", &self.root)
            .field("watched", &self.watched())
            .finish_non_exhaustive()
    }
}

impl Watcher {
    /// Watches `root` and every directory below it (symlinks never followed: IN_DONT_FOLLOW,
    /// IN_ONLYDIR, IN_EXCL_UNLINK). Walks the whole tree, so it takes as long as listing every
    /// directory; must be called within a tokio runtime (the queue registers with its reactor).
    pub fn new(root: &Path) -> Result<Watcher, WatchError> {
        let root = std::fs::canonicalize(root)?;
        check_file_system(&root)?;
        let fd = match inotify::init(CreateFlags::CLOEXEC | CreateFlags::NONBLOCK) {
            Ok(fd) => fd,
            Err(Errno::MFILE) => {
                return Err(WatchError::Instances {
                    max: read_sysctl(INSTANCES),
                });
            }
            Err(e) => return Err(WatchError::Io(e.into())),
        };
        // SAFETY: the OwnedFd is moved into the AsyncFd, which alone owns it from here on: the
        // descriptor stays open and the same until the AsyncFd drops it.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .map_err(io::Error::from)?;
        let mut watcher = Watcher {
            root,
            fd,
            buf: vec![MaybeUninit::uninit(); READ_SIZE].into_boxed_slice(),
            dirs: HashMap::new(),
            paths: BTreeMap::new(),
        };
        watcher.watch_tree(None)?;
        Ok(watcher)
    }

    /// Waits until at least one event is readable, then returns everything readable now,
    /// coalesced: one `Seen::Path` per path (`subtree` if any event for it said so, `writing`
    /// if its last event was IN_MODIFY), in order of first sight. Directories that appeared are
    /// walked and watched before this returns. Never returns an empty list: events that report
    /// nothing (the server's temporary files, watches going away) are absorbed and the wait
    /// goes on.
    ///
    /// Cancel-safe: the only wait is for readiness; once events are read, everything up to the
    /// return runs without yielding. Walking a new directory is done inline (a few system
    /// calls per directory).
    pub async fn next(&mut self) -> Result<Vec<Seen>, WatchError> {
        loop {
            let raw = self.read_queued().await?;
            let seen = self.handle_all(raw)?;
            if !seen.is_empty() {
                return Ok(seen);
            }
        }
    }

    /// Number of directories watched (the root included).
    pub fn watched(&self) -> usize {
        self.dirs.len()
    }

    /// Waits for the queue to be readable, then reads it until it is empty (or [`MAX_READS`]
    /// buffers are full). Readiness is cleared only when a read says EAGAIN, so nothing left in
    /// the queue is forgotten.
    async fn read_queued(&mut self) -> io::Result<Vec<Raw>> {
        let Watcher { fd, buf, .. } = self;
        let mut guard = fd.readable().await?;
        let mut raw = Vec::new();
        for _ in 0..MAX_READS {
            match guard.try_io(|fd| read_once(fd.get_ref(), buf, &mut raw)) {
                Ok(read) => read?,
                Err(_would_block) => break,
            }
        }
        Ok(raw)
    }

    fn handle_all(&mut self, raw: Vec<Raw>) -> Result<Vec<Seen>, WatchError> {
        let mut batch = Batch::default();
        for event in raw {
            self.handle(event, &mut batch)?;
        }
        Ok(batch.seen)
    }

    fn handle(&mut self, event: Raw, out: &mut Batch) -> Result<(), WatchError> {
        if event.mask.contains(ReadFlags::QUEUE_OVERFLOW) {
            return self.overflowed(out);
        }
        // A watch already removed (a directory moved out, the root gone) may still have events
        // queued: they are about nothing we watch.
        let Some(dir) = self.dirs.get(&event.wd).cloned() else {
            return Ok(());
        };
        match event.name {
            None => self.handle_self(event.wd, event.mask, dir, out),
            Some(name) => self.handle_entry(dir, &name, event.mask, out),
        }
    }

    /// An event about a watched directory itself.
    fn handle_self(
        &mut self,
        wd: i32,
        mask: ReadFlags,
        dir: Option<RelPath>,
        out: &mut Batch,
    ) -> Result<(), WatchError> {
        let gone = ReadFlags::DELETE_SELF | ReadFlags::MOVE_SELF | ReadFlags::UNMOUNT;
        match dir {
            None if mask.intersects(gone | ReadFlags::IGNORED) => self.root_gone(out),
            None if mask.contains(ReadFlags::ATTRIB) => out.root(),
            None => {}
            // Deleted (its parent's watch reports the entry), or the kernel dropped the watch
            // for another reason (we removed it).
            Some(_) if mask.intersects(ReadFlags::DELETE_SELF | ReadFlags::IGNORED) => {
                self.forget(wd)
            }
            // The file system mounted there went away: the directory beneath shows instead.
            Some(path) if mask.contains(ReadFlags::UNMOUNT) => self.appeared(path, out)?,
            Some(path) if mask.contains(ReadFlags::ATTRIB) => out.path(path, false, false),
            // Moved: the parent's watch reports the entry, and its IN_MOVED_FROM the watches.
            Some(_) => {}
        }
        Ok(())
    }

    /// An event about an entry of a watched directory.
    fn handle_entry(
        &mut self,
        dir: Option<RelPath>,
        name: &[u8],
        mask: ReadFlags,
        out: &mut Batch,
    ) -> Result<(), WatchError> {
        let Some(path) = entry_path(dir.as_ref(), name) else {
            return Ok(());
        };
        if dir.is_none() && mask.intersects(NAMESPACE) {
            out.root();
        }
        let is_dir = mask.contains(ReadFlags::ISDIR);
        if is_dir && mask.intersects(ReadFlags::CREATE | ReadFlags::MOVED_TO) {
            self.appeared(path, out)?;
        } else if is_dir && mask.contains(ReadFlags::MOVED_FROM) {
            // Moved out of the tree or elsewhere in it: either way its watches would report
            // under the old path. A move within the tree brings the IN_MOVED_TO that watches
            // it again under its new one.
            self.unwatch_tree(&path);
            out.path(path, false, false);
        } else {
            out.path(path, false, mask.contains(ReadFlags::MODIFY));
        }
        Ok(())
    }

    /// A directory that appeared at `path`: watched with all below it, then reported.
    fn appeared(&mut self, path: RelPath, out: &mut Batch) -> Result<(), WatchError> {
        self.watch_tree(Some(path.clone()))?;
        out.path(path, true, false);
        Ok(())
    }

    /// The kernel dropped events, perhaps the creation of a directory (then unwatched) or a
    /// deletion (then a stale watch): the whole tree is watched again and watches nothing
    /// reached are removed, once per batch. The consumer rescans anyway, which costs more.
    fn overflowed(&mut self, out: &mut Batch) -> Result<(), WatchError> {
        out.lost(Lost::Overflow);
        if out.rewatched || self.dirs.is_empty() {
            return Ok(());
        }
        out.rewatched = true;
        let live: HashSet<i32> = match self.watch_tree(None) {
            Ok(live) => live.into_iter().collect(),
            // Only the root's own watch fails this way (below it, a vanished directory is
            // skipped).
            Err(WatchError::Io(e)) if is_vanished(&e) => {
                self.root_gone(out);
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let stale: Vec<i32> = self
            .dirs
            .keys()
            .filter(|wd| !live.contains(wd))
            .copied()
            .collect();
        for wd in stale {
            self.remove_watch(wd);
        }
        Ok(())
    }

    /// The root is deleted or moved away: everything is reported lost and watching stops
    /// (watches left on a moved root would report paths under a name that is not the root).
    fn root_gone(&mut self, out: &mut Batch) {
        out.lost(Lost::RootGone);
        let all: Vec<i32> = self.dirs.keys().copied().collect();
        for wd in all {
            self.remove_watch(wd);
        }
    }

    /// Watches the directory `top` (`None`: the root) and every directory below it, each
    /// before it is listed, so a directory created during the walk is either listed or
    /// reported by its watched parent. Returns the watches set. A directory that vanished or
    /// cannot be watched is skipped, unless it is the root.
    fn watch_tree(&mut self, top: Option<RelPath>) -> Result<Vec<i32>, WatchError> {
        let mut set = Vec::new();
        let mut pending = vec![top];
        while let Some(dir) = pending.pop() {
            let abs = self.absolute(dir.as_ref());
            let wd = match inotify::add_watch(self.fd.get_ref(), &abs, MASK) {
                Ok(wd) => wd,
                Err(Errno::NOSPC) => return Err(WatchError::limit()),
                Err(e) if dir.is_none() => return Err(WatchError::Io(e.into())),
                Err(e) if can_skip(e) => {
                    skipped(&abs, e);
                    continue;
                }
                Err(e) => return Err(WatchError::Io(e.into())),
            };
            self.record(wd, dir.clone());
            set.push(wd);
            for name in subdirectories(&abs)? {
                if let Some(child) = entry_path(dir.as_ref(), name.as_bytes()) {
                    pending.push(Some(child));
                }
            }
        }
        Ok(set)
    }

    /// Removes the watches of the directory `path` and of every directory below it.
    fn unwatch_tree(&mut self, path: &RelPath) {
        let below: Vec<i32> = self
            .paths
            .range(path..)
            .take_while(|(p, _)| p.is_within(path))
            .map(|(_, wd)| *wd)
            .collect();
        for wd in below {
            self.remove_watch(wd);
        }
    }

    fn remove_watch(&mut self, wd: i32) {
        // EINVAL: the kernel has dropped it already (its directory is gone); its IN_IGNORED may
        // still be queued and will find nothing.
        let _ = inotify::remove_watch(self.fd.get_ref(), wd);
        self.forget(wd);
    }

    /// Notes that `wd` watches `dir`. inotify gives an inode it already watches the same
    /// descriptor, so a directory met again under a new path (moved while events were lost)
    /// just changes path.
    fn record(&mut self, wd: i32, dir: Option<RelPath>) {
        self.forget(wd);
        if let Some(path) = &dir {
            // Any watch still under this path is on an inode no longer there: it keeps its
            // entry until its IN_IGNORED, but the path is this one's now.
            self.paths.insert(path.clone(), wd);
        }
        self.dirs.insert(wd, dir);
    }

    fn forget(&mut self, wd: i32) {
        if let Some(Some(path)) = self.dirs.remove(&wd) {
            if self.paths.get(&path) == Some(&wd) {
                self.paths.remove(&path);
            }
        }
    }

    fn absolute(&self, dir: Option<&RelPath>) -> PathBuf {
        match dir {
            None => self.root.clone(),
            Some(rel) => rel.to_path(&self.root),
        }
    }
}

/// Refuses a root on a file system where inotify would miss changes.
fn check_file_system(root: &Path) -> Result<(), WatchError> {
    let st = rustix::fs::statfs(root).map_err(io::Error::from)?;
    // f_type is as wide as a C long, or 32 bits on some targets; the magic numbers are 32-bit.
    #[allow(clippy::unnecessary_cast)]
    let magic = st.f_type as u32;
    match remote_fs(magic) {
        Some(fs) => Err(WatchError::Unsupported { fs }),
        None => Ok(()),
    }
}

/// Reads the queue once into `buf`, appending the events to `out`. EAGAIN when it is empty.
fn read_once(fd: &OwnedFd, buf: &mut [MaybeUninit<u8>], out: &mut Vec<Raw>) -> io::Result<()> {
    let mut reader = inotify::Reader::new(fd.as_fd(), buf);
    loop {
        let event = reader.next()?;
        out.push(Raw {
            wd: event.wd(),
            mask: event.events(),
            name: event.file_name().map(|n| n.to_bytes().to_vec()),
        });
        if reader.is_buffer_empty() {
            return Ok(());
        }
    }
}

/// The names of the directories in `dir`, which is not followed if it is a symlink now. A
/// directory that vanished, or that we may not list, has none.
fn subdirectories(dir: &Path) -> Result<Vec<CString>, WatchError> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = match rustix::fs::open(dir, flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(e) if can_skip(e) => {
            skipped(dir, e);
            return Ok(Vec::new());
        }
        Err(e) => return Err(WatchError::Io(e.into())),
    };
    match super::root::list(fd.as_fd()) {
        Ok(entries) => Ok(entries
            .into_iter()
            .filter(|(_, kind)| *kind == FileType::Directory)
            .map(|(name, _)| name)
            .collect()),
        Err(e) if is_vanished(&e) => Ok(Vec::new()),
        Err(e) => Err(WatchError::Io(e)),
    }
}

/// Errors that mean a directory below the root cannot be watched or listed now, which is not
/// an error of the watcher: gone or no longer a directory (a symlink now: ELOOP, ENOTDIR), not
/// ours to read, or too deep for a path.
fn can_skip(e: Errno) -> bool {
    matches!(
        e,
        Errno::NOENT | Errno::NOTDIR | Errno::LOOP | Errno::ACCESS | Errno::NAMETOOLONG
    )
}

fn is_vanished(e: &io::Error) -> bool {
    e.raw_os_error()
        .is_some_and(|n| matches!(Errno::from_raw_os_error(n), Errno::NOENT | Errno::NOTDIR))
}

/// A directory we cannot watch is a blind spot: worth a line in a debug log, not more (it is
/// gone, or its owner shut us out).
fn skipped(dir: &Path, e: Errno) {
    if !matches!(e, Errno::NOENT | Errno::NOTDIR) {
        tracing::debug!("not watching {}: {}", dir.display(), io::Error::from(e));
    }
}

/// The path of entry `name` of `dir`, unless it is to be ignored: the server's temporary
/// files and staging directory, and names the tree cannot hold (not UTF-8, not a valid
/// [`RelPath`]), which scans skip too.
fn entry_path(dir: Option<&RelPath>, name: &[u8]) -> Option<RelPath> {
    let name = std::str::from_utf8(name).ok()?;
    // RelPath refuses the prefix too; said here so that nothing depends on that.
    if name.starts_with(TEMP_PREFIX) {
        return None;
    }
    match dir {
        None => RelPath::new(name),
        Some(dir) => dir.join(name),
    }
    .ok()
}

/// What one call to [`Watcher::next`] reports, coalesced as it is gathered.
#[derive(Default)]
struct Batch {
    seen: Vec<Seen>,
    /// Where each path is in `seen`.
    at: HashMap<RelPath, usize>,
    root: bool,
    lost: Vec<Lost>,
    /// The tree was watched again after an overflow in this batch.
    rewatched: bool,
}

impl Batch {
    fn path(&mut self, path: RelPath, subtree: bool, modify: bool) {
        match self.at.entry(path) {
            Entry::Occupied(at) => {
                if let Seen::Path {
                    subtree: s,
                    writing,
                    ..
                } = &mut self.seen[*at.get()]
                {
                    *s |= subtree;
                    *writing = modify;
                }
            }
            Entry::Vacant(at) => {
                self.seen.push(Seen::Path {
                    path: at.key().clone(),
                    subtree,
                    writing: modify,
                });
                at.insert(self.seen.len() - 1);
            }
        }
    }

    fn root(&mut self) {
        if !self.root {
            self.root = true;
            self.seen.push(Seen::Root);
        }
    }

    fn lost(&mut self, why: Lost) {
        if !self.lost.contains(&why) {
            self.lost.push(why.clone());
            self.seen.push(Seen::Rescan(why));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::io::Write;
    use std::time::Duration;

    /// How long a test waits for the events it expects before failing.
    const WAIT: Duration = Duration::from_secs(10);

    /// Collects what `w` reports until `done` holds for all of it; fails after [`WAIT`].
    async fn until(w: &mut Watcher, mut done: impl FnMut(&[Seen]) -> bool) -> Vec<Seen> {
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut all = Vec::new();
        while !done(&all) {
            match tokio::time::timeout_at(deadline, w.next()).await {
                Ok(batch) => {
                    let batch = batch.expect("watching failed");
                    assert!(!batch.is_empty(), "next returned nothing");
                    all.extend(batch);
                }
                Err(_) => panic!("timed out; seen so far: {all:?}"),
            }
        }
        all
    }

    /// The last report of `path`, if any.
    fn last<'a>(all: &'a [Seen], path: &str) -> Option<&'a Seen> {
        all.iter()
            .rev()
            .find(|s| matches!(s, Seen::Path { path: p, .. } if p.as_str() == path))
    }

    fn reported(all: &[Seen], path: &str) -> bool {
        last(all, path).is_some()
    }

    /// Whether `path` was last reported as a closed write.
    fn written(all: &[Seen], path: &str) -> bool {
        matches!(last(all, path), Some(Seen::Path { writing: false, .. }))
    }

    fn paths(all: &[Seen]) -> Vec<&str> {
        all.iter()
            .filter_map(|s| match s {
                Seen::Path { path, .. } => Some(path.as_str()),
                _ => None,
            })
            .collect()
    }

    /// Every file below `dir`, relative to it.
    fn files_below(dir: &Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut pending = vec![dir.to_path_buf()];
        while let Some(d) = pending.pop() {
            for e in fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    pending.push(p);
                } else {
                    out.push(p.strip_prefix(dir).unwrap().display().to_string());
                }
            }
        }
        out
    }

    #[tokio::test]
    async fn files_written_in_the_root_and_below_are_reported_once_closed() {
        let tmp = tempfile::tempdir().unwrap();
        fs::create_dir(tmp.path().join("d")).unwrap();
        let mut w = Watcher::new(tmp.path()).unwrap();
        assert_eq!(w.watched(), 2);
        fs::write(tmp.path().join("f"), b"one").unwrap();
        fs::write(tmp.path().join("d/g"), b"two").unwrap();
        let all = until(&mut w, |all| written(all, "f") && written(all, "d/g")).await;
        // A new entry directly in the root changed the root.
        assert!(all.contains(&Seen::Root), "{all:?}");
        assert!(!all.iter().any(|s| matches!(s, Seen::Rescan(_))), "{all:?}");
    }

    #[tokio::test]
    async fn a_file_still_open_for_writing_is_reported_writing_until_closed() {
        let tmp = tempfile::tempdir().unwrap();
        let mut w = Watcher::new(tmp.path()).unwrap();
        let mut file = fs::File::create(tmp.path().join("f")).unwrap();
        file.write_all(b"partial").unwrap();
        until(&mut w, |all| {
            matches!(last(all, "f"), Some(Seen::Path { writing: true, .. }))
        })
        .await;
        drop(file);
        until(&mut w, |all| written(all, "f")).await;
    }

    #[tokio::test]
    async fn a_new_tree_is_watched_before_it_is_reported() {
        let tmp = tempfile::tempdir().unwrap();
        let mut w = Watcher::new(tmp.path()).unwrap();
        // Created and filled before the watcher reads anything: only `a` is announced, and
        // the walk the consumer makes after that finds the rest.
        fs::create_dir_all(tmp.path().join("a/b/c")).unwrap();
        fs::write(tmp.path().join("a/b/c/f"), b"x").unwrap();
        let all = until(&mut w, |all| reported(all, "a")).await;
        let expected = Seen::Path {
            path: RelPath::new("a").unwrap(),
            subtree: true,
            writing: false,
        };
        assert_eq!(last(&all, "a"), Some(&expected));
        assert_eq!(files_below(&tmp.path().join("a")), ["b/c/f"]);
        assert_eq!(w.watched(), 4);
        // The new directories' own watches are in place.
        fs::write(tmp.path().join("a/b/c/g"), b"y").unwrap();
        until(&mut w, |all| written(all, "a/b/c/g")).await;
    }

    #[tokio::test]
    async fn a_renamed_directory_is_reported_under_both_names_and_watched_under_the_new() {
        let tmp = tempfile::tempdir().unwrap();
        fs::create_dir_all(tmp.path().join("x/sub")).unwrap();
        let mut w = Watcher::new(tmp.path()).unwrap();
        fs::rename(tmp.path().join("x"), tmp.path().join("y")).unwrap();
        let all = until(&mut w, |all| reported(all, "x") && reported(all, "y")).await;
        assert!(
            matches!(last(&all, "y"), Some(Seen::Path { subtree: true, .. })),
            "{all:?}"
        );
        assert_eq!(w.watched(), 3);
        fs::write(tmp.path().join("y/sub/f"), b"x").unwrap();
        let all = until(&mut w, |all| written(all, "y/sub/f")).await;
        assert!(!paths(&all).iter().any(|p| p.starts_with("x")), "{all:?}");
    }

    #[tokio::test]
    async fn a_directory_moved_out_of_the_tree_is_no_longer_watched() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        fs::create_dir_all(root.join("x/sub")).unwrap();
        let mut w = Watcher::new(&root).unwrap();
        assert_eq!(w.watched(), 3);
        fs::rename(root.join("x"), tmp.path().join("outside")).unwrap();
        until(&mut w, |all| reported(all, "x")).await;
        assert_eq!(w.watched(), 1);
        fs::write(tmp.path().join("outside/sub/f"), b"x").unwrap();
        fs::write(root.join("sentinel"), b"x").unwrap();
        let all = until(&mut w, |all| written(all, "sentinel")).await;
        assert_eq!(
            paths(&all).iter().filter(|p| **p != "sentinel").count(),
            0,
            "{all:?}"
        );
    }

    #[tokio::test]
    async fn a_queue_overflow_asks_for_a_rescan_and_watching_goes_on() {
        let max: usize = fs::read_to_string("/proc/sys/fs/inotify/max_queued_events")
            .expect("reading max_queued_events")
            .trim()
            .parse()
            .expect("max_queued_events is a number");
        if max > 100_000 {
            eprintln!("skipped: fs.inotify.max_queued_events = {max}, too many events to make");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        fs::create_dir(tmp.path().join("d")).unwrap();
        let mut w = Watcher::new(tmp.path()).unwrap();
        // One IN_MODIFY per write: the kernel merges an event only into an identical one just
        // before it, so writes alternating between two files all count.
        let mut files = [
            fs::File::create(tmp.path().join("f1")).unwrap(),
            fs::File::create(tmp.path().join("f2")).unwrap(),
        ];
        for i in 0..max + 1000 {
            files[i % 2].write_all(b"x").unwrap();
        }
        // Its creation is among the events dropped: only watching the tree again finds it.
        fs::create_dir(tmp.path().join("late")).unwrap();
        let all = until(&mut w, |all| all.contains(&Seen::Rescan(Lost::Overflow))).await;
        assert!(!all.contains(&Seen::Rescan(Lost::RootGone)));
        assert_eq!(w.watched(), 3);
        fs::write(tmp.path().join("d/after"), b"x").unwrap();
        fs::write(tmp.path().join("late/after"), b"x").unwrap();
        until(&mut w, |all| {
            written(all, "d/after") && written(all, "late/after")
        })
        .await;
    }

    #[tokio::test]
    async fn temporary_names_are_not_reported_nor_watched() {
        let tmp = tempfile::tempdir().unwrap();
        fs::create_dir(tmp.path().join("d")).unwrap();
        let mut w = Watcher::new(tmp.path()).unwrap();
        let stage = tmp.path().join(format!("{TEMP_PREFIX}stage-1"));
        fs::create_dir(&stage).unwrap();
        fs::write(stage.join("f"), b"x").unwrap();
        fs::write(tmp.path().join(format!("{TEMP_PREFIX}1")), b"x").unwrap();
        fs::write(tmp.path().join(format!("d/{TEMP_PREFIX}2")), b"x").unwrap();
        fs::write(tmp.path().join("d/sentinel"), b"x").unwrap();
        let all = until(&mut w, |all| written(all, "d/sentinel")).await;
        // Not even the root: only temporary entries came and went in it.
        assert!(
            all.iter()
                .all(|s| matches!(s, Seen::Path { path, .. } if path.as_str() == "d/sentinel")),
            "{all:?}"
        );
        assert_eq!(w.watched(), 2);
    }

    #[tokio::test]
    async fn deleting_the_root_asks_for_a_rescan() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        fs::create_dir_all(root.join("a/b")).unwrap();
        fs::write(root.join("a/b/f"), b"x").unwrap();
        let mut w = Watcher::new(&root).unwrap();
        fs::remove_dir_all(&root).unwrap();
        until(&mut w, |all| all.contains(&Seen::Rescan(Lost::RootGone))).await;
        assert_eq!(w.watched(), 0);
    }

    #[tokio::test]
    async fn waiting_can_be_spawned() {
        fn send<T: Send>(_: &T) {}
        let tmp = tempfile::tempdir().unwrap();
        let mut w = Watcher::new(tmp.path()).unwrap();
        send(&w.next());
    }

    #[tokio::test]
    async fn a_missing_root_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let err = Watcher::new(&tmp.path().join("none")).err().unwrap();
        assert!(
            matches!(&err, WatchError::Io(e) if e.kind() == io::ErrorKind::NotFound),
            "{err:?}"
        );
    }

    #[test]
    fn limit_messages_name_the_sysctl_and_how_to_raise_it() {
        let known = WatchError::Limit { max: Some(8192) }.to_string();
        assert_eq!(
            known,
            "the inotify watch limit (fs.inotify.max_user_watches = 8192) is reached; raise it \
             with sysctl fs.inotify.max_user_watches=16384 (and in a file of /etc/sysctl.d to \
             keep it)"
        );
        let unknown = WatchError::Limit { max: None }.to_string();
        assert!(
            unknown.contains("sysctl fs.inotify.max_user_watches="),
            "{unknown}"
        );
        let instances = WatchError::Instances { max: Some(128) }.to_string();
        assert!(
            instances.contains("fs.inotify.max_user_instances = 128"),
            "{instances}"
        );
    }

    #[test]
    fn remote_file_systems_are_named() {
        assert_eq!(remote_fs(0x6969), Some("nfs"));
        assert_eq!(remote_fs(0xff53_4d42), Some("cifs"));
        assert_eq!(remote_fs(0x6573_5546), Some("fuse"));
        // ext4, tmpfs, btrfs, xfs
        for local in [0xef53, 0x0102_1994, 0x9123_683e, 0x5846_5342] {
            assert_eq!(remote_fs(local), None);
        }
        let err = WatchError::Unsupported { fs: "nfs" }.to_string();
        assert!(err.starts_with("nfs is a network"), "{err}");
    }
}
