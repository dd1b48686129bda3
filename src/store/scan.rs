//! Walks a directory and lists it as entries: files with their content hash, directories,
//! symlinks (never followed), special files (sockets, FIFOs, devices: listed as such, so the
//! server can delete its own and the client can leave them out) and what could not be read.
//! Names that are not valid UTF-8 are skipped with a warning.

use std::ffi::{CStr, OsStr};
use std::fs::{self, File, Metadata};
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, CWD, FileType, Mode, OFlags, RawDir, Stat};
use rustix::path::Arg;

use crate::core::hash::{ContentHash, HashAlgorithm};
pub use crate::core::manifest::Scope;
use crate::core::manifest::{Entry, Kind, Meta, RelPath, TEMP_PREFIX, normalise};
use crate::store::cache::{HashCache, Stamp};
use crate::store::root::Root;

/// What a walk found: entries in component order (parents first), and warnings about what it
/// skipped.
#[derive(Debug, Default)]
pub struct Scan {
    pub entries: Vec<Entry>,
    /// The scanned directory's own mode and mtime (no entry names it).
    pub root: Meta,
    pub warnings: Vec<String>,
    /// Files whose hash goes into the hash cache, in two ascending lists of their index in
    /// `entries`: those the cache vouched for (their stamp is the one the cache holds), and
    /// those hashed now, with their stamp.
    hits: Vec<u32>,
    cacheable: Vec<(usize, Stamp)>,
}

impl Scan {
    /// Entries that exist but could not be read, with the reason.
    pub fn unreadable(&self) -> impl Iterator<Item = (&RelPath, &str)> {
        self.entries.iter().filter_map(|e| match &e.kind {
            Kind::Unreadable { reason } => Some((&e.path, reason.as_str())),
            _ => None,
        })
    }

    /// Saves what this scan learnt into `cache`'s file.
    pub fn save_cache(&self, cache: &HashCache) -> io::Result<()> {
        let (mut hits, mut hashed) = (
            self.hits.iter().peekable(),
            self.cacheable.iter().peekable(),
        );
        // Both lists merged, in walk order.
        let records = std::iter::from_fn(move || {
            let (i, stamp) = match (hits.peek(), hashed.peek()) {
                (Some(&&h), Some(&&(c, _))) if (h as usize) > c => {
                    hashed.next().map(|&(c, s)| (c, Some(s)))?
                }
                (Some(_), _) => (*hits.next()? as usize, None),
                (None, _) => hashed.next().map(|&(c, s)| (c, Some(s)))?,
            };
            let e = &self.entries[i];
            Some((
                e.path.as_str(),
                stamp,
                e.hash().expect("only files are cacheable"),
            ))
        });
        cache.save_scan(records)
    }
}

pub fn meta_of(m: &Metadata) -> Meta {
    Meta {
        mode: m.mode() & 0o7777,
        mtime_secs: m.mtime(),
        mtime_nanos: m.mtime_nsec() as u32,
    }
}

/// [`meta_of`] from a raw `fstatat`, as the walk takes them.
fn meta_of_stat(st: &Stat) -> Meta {
    Meta {
        mode: st.st_mode & 0o7777,
        mtime_secs: st.st_mtime,
        mtime_nanos: st.st_mtime_nsec as u32,
    }
}

/// How a side scans.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// The session's content hash.
    pub algorithm: HashAlgorithm,
    /// Read a file this process owns but may not read (mode 0000 on a server that is not
    /// root) by granting owner-read for the moment of opening it, and list a directory it owns
    /// but may not list or enter by granting owner read/search until the scan ends: the server
    /// must know what its own mirror holds. Those modes change through a [`Root`] of the
    /// scanned directory, and are put back.
    pub read_own: bool,
    /// List files at least this large that the cache cannot vouch for as `Unhashed` instead
    /// of reading them now: their hash is computed while they are sent, or when the server
    /// asks for it, so a new large file is read once rather than twice in a row.
    pub defer_above: Option<u64>,
}

impl Options {
    /// A plain scan in `algorithm`: nothing deferred, nothing of its own forced open.
    pub fn new(algorithm: HashAlgorithm) -> Options {
        Options {
            algorithm,
            read_own: false,
            defer_above: None,
        }
    }
}

/// Lists the tree below `root` (the root itself is not an entry; its metadata is
/// `Scan::root`). Fails only when the root cannot be read at all; anything below that cannot
/// be read becomes an `Unreadable` entry. Files are hashed after the metadata walk, on every
/// core, except those `cache` vouches for.
pub fn scan(root: &Path, mut cache: Option<&mut HashCache>, opts: Options) -> io::Result<Scan> {
    let mut scan = Scan {
        root: meta_of(&fs::symlink_metadata(root)?),
        ..Scan::default()
    };
    let mut pending = Vec::new();
    let mut walker = Walker::new(root, &mut scan, &mut pending, &mut cache, &opts);
    // The root may be given as a symlink to the tree: followed, unlike anything below it.
    let dir = rustix::fs::openat(
        CWD,
        root,
        DIR_FLAGS.difference(OFlags::NOFOLLOW),
        Mode::empty(),
    )?;
    let top = read_names(dir.as_fd(), &mut walker.dents)?;
    let own = opts.read_own.then(|| Root::new(root));
    // Directories opened up for the walk stay so until their files are hashed.
    let _restore = own.as_ref().map(Root::restoring_modes);
    walker.own = own.as_ref();
    walker.held = 1;
    walker.walk(Some(dir.as_fd()), &top);
    hash_pending(&mut scan, &pending, root, (opts.algorithm, own.as_ref()));
    Ok(scan)
}

/// Scans `dir`, using and then updating the hash cache in `cache_file` if there is one.
pub fn scan_cached(dir: &Path, cache_file: Option<PathBuf>, opts: Options) -> io::Result<Scan> {
    let Some(file) = cache_file else {
        return scan(dir, None, opts);
    };
    let mut cache = HashCache::load(&file, opts.algorithm);
    let found = scan(dir, Some(&mut cache), opts)?;
    tracing::debug!("hash cache: {} hits, {} misses", cache.hits, cache.misses);
    if let Err(e) = found.save_cache(&cache) {
        tracing::warn!("failed to save the hash cache: {e}");
    }
    Ok(found)
}

/// Hashes the files at `pending` (indices into `scan.entries`, ascending) on every core, each
/// thread writing into its own stretch of the entries. A file that vanished since the walk is
/// dropped; one that could not be read becomes `Unreadable`. Neither, nor a file whose size
/// changed since the walk, stays cacheable.
fn hash_pending(
    scan: &mut Scan,
    pending: &[usize],
    root: &Path,
    (alg, own): (HashAlgorithm, Option<&Root>),
) {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = pending.len().div_ceil(threads).max(1);
    // Per thread: the files no longer cacheable, and those that vanished.
    let outcomes: Vec<(Vec<usize>, Vec<usize>)> = std::thread::scope(|s| {
        let mut rest: &mut [Entry] = &mut scan.entries;
        let mut base = 0;
        let mut workers = Vec::new();
        for part in pending.chunks(chunk) {
            let end = part.last().expect("chunks are not empty") + 1;
            let (mine, tail) = std::mem::take(&mut rest).split_at_mut(end - base);
            let first = base;
            (rest, base) = (tail, end);
            workers.push(s.spawn(move || hash_part(mine, first, part, root, (alg, own))));
        }
        workers
            .into_iter()
            .map(|w| w.join().expect("hashing does not panic"))
            .collect()
    });
    let mut uncacheable = Vec::new();
    let mut vanished = Vec::new();
    for (u, v) in outcomes {
        uncacheable.extend(u);
        vanished.extend(v);
    }
    if !uncacheable.is_empty() || !vanished.is_empty() {
        // Both ascending, as `cacheable` is.
        let (mut u, mut v) = (uncacheable.iter().peekable(), vanished.iter().peekable());
        scan.cacheable.retain(|&(i, _)| {
            let skip = |it: &mut std::iter::Peekable<std::slice::Iter<usize>>| {
                while it.next_if(|&&x| x < i).is_some() {}
                it.peek() == Some(&&i)
            };
            !skip(&mut u) & !skip(&mut v)
        });
    }
    if vanished.is_empty() {
        return;
    }
    // Drop what disappeared since the walk, and shift the cacheable indices to match.
    let mut i = 0;
    scan.entries.retain(|_| {
        i += 1;
        vanished.binary_search(&(i - 1)).is_err()
    });
    for (idx, _) in &mut scan.cacheable {
        *idx -= vanished.partition_point(|g| g < idx);
    }
    for idx in &mut scan.hits {
        *idx -= vanished.partition_point(|&g| g < *idx as usize) as u32;
    }
}

/// One thread's share of [`hash_pending`]: the files at `pending` (indices into the whole
/// list), of which `entries` is the stretch from index `first`. Returns the indices of the
/// files that may not be cached after all, and of those that vanished.
fn hash_part(
    entries: &mut [Entry],
    first: usize,
    pending: &[usize],
    root: &Path,
    (alg, own): (HashAlgorithm, Option<&Root>),
) -> (Vec<usize>, Vec<usize>) {
    let (mut uncacheable, mut vanished) = (Vec::new(), Vec::new());
    for &index in pending {
        let e = &mut entries[index - first];
        let res = match (hash_file(&root.join(e.path.as_str()), alg), own) {
            // A file this process owns but may not read: `own` opens it beneath its handle
            // by granting owner-read for the moment of opening.
            (Err(err), Some(own)) if err.kind() == io::ErrorKind::PermissionDenied => own
                .open_read_own(&e.path)
                .and_then(|mut f| hash_reader(&mut f, alg)),
            (r, _) => r,
        };
        match res {
            Ok((size, hash)) => {
                // A file that changed size while read is hashed again next time, not cached.
                if !matches!(e.kind, Kind::File { size: walked, .. } if walked == size) {
                    uncacheable.push(index);
                }
                e.kind = Kind::File { size, hash };
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => vanished.push(index),
            Err(err) => {
                uncacheable.push(index);
                e.kind = Kind::Unreadable {
                    reason: err.to_string(),
                };
                e.meta = Meta::default();
            }
        }
    }
    (uncacheable, vanished)
}

/// How the walk opens a directory to list it and find its entries: never through a symlink
/// (one swapped in since the `lstat` is not followed).
const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

/// Directories the walk holds open at most, each the one its entries are found from (one
/// component to look up per entry, where a whole path costs a lookup of every component).
/// Deeper than that, entries are found by their whole path: a tree that deep is rare, and the
/// descriptors it would hold could run out (1024 is a usual limit).
const HELD_DIRS: usize = 64;

/// The getdents buffer: a directory of a few thousand entries in one call.
const DENTS_SIZE: usize = 64 << 10;

/// The names in a directory, in byte order (which is the component order of the paths they
/// make), each with its NUL, in one buffer: no allocation per name.
#[derive(Default)]
struct Names {
    buf: Vec<u8>,
    /// Where each name (with its NUL) is in `buf`, sorted.
    spans: Vec<(usize, usize)>,
}

impl Names {
    fn iter(&self) -> impl Iterator<Item = &CStr> {
        self.spans.iter().map(|&(start, end)| {
            CStr::from_bytes_with_nul(&self.buf[start..end]).expect("one NUL, at the end")
        })
    }
}

/// Lists the directory `dir` (open for reading), `.` and `..` aside, using `dents` as the
/// getdents buffer.
fn read_names(dir: BorrowedFd<'_>, dents: &mut Vec<u8>) -> io::Result<Names> {
    let mut names = Names::default();
    let mut raw = RawDir::new(dir, dents.spare_capacity_mut());
    while let Some(ent) = raw.next() {
        let ent = ent?;
        let name = ent.file_name().to_bytes_with_nul();
        if name != b".\0" && name != b"..\0" {
            let start = names.buf.len();
            names.buf.extend_from_slice(name);
            names.spans.push((start, names.buf.len()));
        }
    }
    // With their NULs: a name that is a prefix of another still sorts first, as NUL is below
    // every byte a name holds.
    let buf = &names.buf;
    names
        .spans
        .sort_unstable_by(|a, b| buf[a.0..a.1].cmp(&buf[b.0..b.1]));
    Ok(names)
}

/// What a walk carries from entry to entry.
struct Walker<'a, 'c> {
    scan: &'a mut Scan,
    pending: &'a mut Vec<usize>,
    cache: &'a mut Option<&'c mut HashCache>,
    opts: &'a Options,
    own: Option<&'a Root>,
    root: &'a Path,
    /// The path of the directory being listed ("" for the root), which its entries' paths
    /// extend: each entry's path is built once, in one allocation.
    prefix: String,
    /// How many directories the walk holds open.
    held: usize,
    /// The getdents buffer, reused for every directory.
    dents: Vec<u8>,
}

impl<'a, 'c> Walker<'a, 'c> {
    fn new(
        root: &'a Path,
        scan: &'a mut Scan,
        pending: &'a mut Vec<usize>,
        cache: &'a mut Option<&'c mut HashCache>,
        opts: &'a Options,
    ) -> Self {
        Walker {
            scan,
            pending,
            cache,
            opts,
            own: None,
            root,
            prefix: String::new(),
            held: 0,
            dents: Vec::with_capacity(DENTS_SIZE),
        }
    }

    /// Lists the entries `names` of the directory at `self.prefix`, and everything below
    /// them. `dir` is that directory, open; without it (too deep to hold it open), entries
    /// are found by their whole path.
    fn walk(&mut self, dir: Option<BorrowedFd<'_>>, names: &Names) {
        for name in names.iter() {
            let Ok(utf8) = std::str::from_utf8(name.to_bytes()) else {
                let mut path = self.root.to_path_buf();
                if !self.prefix.is_empty() {
                    path.push(&self.prefix);
                }
                path.push(OsStr::from_bytes(name.to_bytes()));
                self.scan.warnings.push(format!(
                    "skipping {}: name is not valid UTF-8",
                    path.display()
                ));
                continue;
            };
            if utf8.starts_with(TEMP_PREFIX) {
                continue;
            }
            let mut path = String::with_capacity(self.prefix.len() + 1 + utf8.len());
            if !self.prefix.is_empty() {
                path.push_str(&self.prefix);
                path.push('/');
            }
            path.push_str(utf8);
            let rel = match RelPath::new(path) {
                Ok(r) => r,
                Err(e) => {
                    self.scan.warnings.push(format!("skipping {utf8:?}: {e}"));
                    continue;
                }
            };
            match dir {
                Some(dir) => self.visit(rel, dir, name, true),
                None => {
                    let path = rel.to_path(self.root);
                    self.visit(rel, CWD, &*path, true)
                }
            };
        }
    }

    /// Lists the entry at `rel`, found as `name` in the directory `dir` (`CWD` with a whole
    /// path), and with `deep` everything below it. Returns whether it was a directory.
    fn visit<P: Arg + Copy>(
        &mut self,
        rel: RelPath,
        dir: BorrowedFd<'_>,
        name: P,
        deep: bool,
    ) -> bool {
        let unreadable = |rel: RelPath, e: io::Error| Entry {
            path: rel,
            kind: Kind::Unreadable {
                reason: e.to_string(),
            },
            meta: Meta::default(),
        };
        let st = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            // Vanished since it was listed: it is simply not there any more.
            Err(rustix::io::Errno::NOENT) => return false,
            Err(e) => {
                self.scan.entries.push(unreadable(rel, e.into()));
                return false;
            }
        };
        let meta = meta_of_stat(&st);
        let kind = match FileType::from_raw_mode(st.st_mode) {
            FileType::Directory => {
                if deep {
                    self.list_dir(rel, dir, name, &st, meta);
                } else {
                    self.scan.entries.push(Entry {
                        path: rel,
                        kind: Kind::Dir,
                        meta,
                    });
                }
                return true;
            }
            FileType::RegularFile => self.file(&rel, &st),
            FileType::Symlink => match rustix::fs::readlinkat(dir, name, Vec::new()) {
                Ok(t) => match t.into_string() {
                    Ok(target) => Kind::Symlink { target },
                    Err(_) => {
                        self.scan
                            .warnings
                            .push(format!("skipping symlink {rel}: target is not valid UTF-8"));
                        return false;
                    }
                },
                Err(e) => {
                    self.scan.entries.push(unreadable(rel, e.into()));
                    return false;
                }
            },
            FileType::Fifo => Kind::Special {
                what: "FIFO".into(),
            },
            FileType::Socket => Kind::Special {
                what: "socket".into(),
            },
            _ => Kind::Special {
                what: "device".into(),
            },
        };
        self.scan.entries.push(Entry {
            path: rel,
            kind,
            meta,
        });
        false
    }

    /// The kind of the regular file at `rel`: hashed if the cache vouches for it, else left
    /// for `hash_pending` (or deferred).
    fn file(&mut self, rel: &RelPath, st: &Stat) -> Kind {
        let stamp = Stamp::of_stat(st);
        let cached = self
            .cache
            .as_deref_mut()
            .and_then(|c| c.lookup(rel.as_str(), &stamp));
        let index = self.scan.entries.len();
        let size = stamp.size;
        match cached {
            Some(hash) => {
                // Beyond 4 billion entries, simply not cached.
                self.scan.hits.extend(u32::try_from(index).ok());
                Kind::File { size, hash }
            }
            None if self.opts.defer_above.is_some_and(|t| size >= t) => Kind::Unhashed { size },
            None => {
                self.pending.push(index);
                // Cached once hashed, unless it changes meanwhile (see `hash_pending`).
                if self.cache.as_deref().is_some_and(|c| c.may_record(&stamp)) {
                    self.scan.cacheable.push((index, stamp));
                }
                // Filled in by `hash_pending`.
                Kind::File {
                    size,
                    hash: placeholder(self.opts.algorithm),
                }
            }
        }
    }

    /// Lists the directory at `rel` (`name` in `dir`, whose `lstat` is `st`) and everything
    /// below it. With `own` (the server scanning its own mirror), a directory this process
    /// owns but may not list or enter (mode 000 on a server that is not root) is opened up
    /// first; the scan puts its mode back when it ends.
    fn list_dir<P: Arg + Copy>(
        &mut self,
        rel: RelPath,
        dir: BorrowedFd<'_>,
        name: P,
        st: &Stat,
        meta: Meta,
    ) {
        if let Some(own) = self.own {
            let euid = rustix::process::geteuid();
            if !euid.is_root() && st.st_uid == euid.as_raw() && st.st_mode & 0o500 != 0o500 {
                // Should that fail, listing it says why.
                let _ = own.open_up_dir(&rel);
            }
        }
        let hold = self.held < HELD_DIRS;
        let listed = rustix::fs::openat(dir, name, DIR_FLAGS, Mode::empty())
            .map_err(io::Error::from)
            .and_then(|fd| Ok((read_names(fd.as_fd(), &mut self.dents)?, fd)));
        let (names, fd) = match listed {
            Ok(l) => l,
            Err(e) => {
                self.scan.entries.push(Entry {
                    path: rel,
                    kind: Kind::Unreadable {
                        reason: e.to_string(),
                    },
                    meta: Meta::default(),
                });
                return;
            }
        };
        let fd: Option<OwnedFd> = hold.then_some(fd);
        // Its entries' paths extend this one: `rel` is the prefix and one more name, or (a
        // scope of `scan_paths`) the prefix is empty.
        let mark = self.prefix.len();
        self.prefix.push_str(&rel.as_str()[mark..]);
        self.scan.entries.push(Entry {
            path: rel,
            kind: Kind::Dir,
            meta,
        });
        self.held += usize::from(fd.is_some());
        self.walk(fd.as_ref().map(|f| f.as_fd()), &names);
        self.held -= usize::from(fd.is_some());
        self.prefix.truncate(mark);
    }
}

/// Lists part of the tree below `root`, as [`scan`] would list it: for each scope, its
/// ancestors (as they are now), the entry at its path if there is one, and with `deep`
/// everything below it. Entries come in component order, once each. A scope below an
/// ancestor that is no longer a directory lists only that ancestor: nothing can be below it.
/// The hash cache in `cache_file`, if any, is read (not updated).
pub fn scan_paths(
    root: &Path,
    scopes: &[Scope],
    cache_file: Option<PathBuf>,
    opts: Options,
) -> io::Result<Scan> {
    let mut scan = Scan {
        root: meta_of(&fs::symlink_metadata(root)?),
        ..Scan::default()
    };
    let mut pending = Vec::new();
    let own = opts.read_own.then(|| Root::new(root));
    let _restore = own.as_ref().map(Root::restoring_modes);
    // Scopes are visited in component order, as the cache's records are kept: a directory
    // renamed on the other side is found here without reading its files again.
    let mut loaded = cache_file.map(|f| HashCache::load(&f, opts.algorithm));
    let mut cache = loaded.as_mut();
    let mut walker = Walker::new(root, &mut scan, &mut pending, &mut cache, &opts);
    walker.own = own.as_ref();
    // Ancestors already listed, and whether each is a directory.
    let mut listed: std::collections::HashMap<RelPath, bool> = std::collections::HashMap::new();
    for scope in normalise(scopes) {
        let ancestors: Vec<RelPath> =
            std::iter::successors(scope.path.parent(), RelPath::parent).collect();
        let mut below_a_dir = true;
        for a in ancestors.into_iter().rev() {
            let is_dir = match listed.get(&a) {
                Some(&d) => d,
                None => {
                    let d = walker.visit(a.clone(), CWD, &*a.to_path(root), false);
                    listed.insert(a, d);
                    d
                }
            };
            if !is_dir {
                below_a_dir = false;
                break;
            }
        }
        if below_a_dir && !listed.contains_key(&scope.path) {
            let path = scope.path.to_path(root);
            let d = walker.visit(scope.path.clone(), CWD, &*path, scope.deep);
            listed.insert(scope.path, d);
        }
    }
    hash_pending(&mut scan, &pending, root, (opts.algorithm, own.as_ref()));
    if !scan.entries.is_sorted_by(|a, b| a.path < b.path) {
        scan.entries.sort_by(|a, b| a.path.cmp(&b.path));
        scan.entries.dedup_by(|a, b| a.path == b.path);
    }
    Ok(scan)
}

/// Size and hash of a file just opened that must not change while it is read: its stamp is
/// taken before and after, and a difference is an error (the file is being written to). Also
/// the stamp, when it had settled before the read, so that the hash may be cached.
pub fn hash_stable(
    mut f: File,
    alg: HashAlgorithm,
) -> io::Result<(u64, ContentHash, Option<Stamp>)> {
    let opened = crate::store::cache::now_ns();
    let before = Stamp::of(&f.metadata()?);
    let (size, hash) = hash_reader(&mut f, alg)?;
    if Stamp::of(&f.metadata()?) != before {
        return Err(io::Error::other("changed while being hashed"));
    }
    Ok((size, hash, before.settled_at(opened).then_some(before)))
}

/// Size and hash of a file, read in bounded chunks.
pub fn hash_file(path: &Path, alg: HashAlgorithm) -> io::Result<(u64, ContentHash)> {
    hash_reader(&mut File::open(path)?, alg)
}

/// Bytes read at a time when hashing: large enough that system calls do not dominate.
const READ_SIZE: usize = 256 << 10;

/// A hash of the right algorithm for an entry whose real hash is computed later.
fn placeholder(alg: HashAlgorithm) -> ContentHash {
    ContentHash::new(alg, &[0; 32][..alg.digest_len()]).expect("length of the algorithm")
}

fn hash_reader(f: &mut File, alg: HashAlgorithm) -> io::Result<(u64, ContentHash)> {
    // One buffer per thread, reused: a fresh 256 KiB zeroed for each small file was most of
    // the cost of hashing a directory of 1 KiB files.
    thread_local! {
        static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    BUF.with_borrow_mut(|buf| {
        if buf.len() < READ_SIZE {
            buf.resize(READ_SIZE, 0);
        }
        hash_into(f, alg, buf)
    })
}

fn hash_into(f: &mut File, alg: HashAlgorithm, buf: &mut [u8]) -> io::Result<(u64, ContentHash)> {
    let mut h = alg.hasher();
    let mut size = 0u64;
    loop {
        let n = match f.read(buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        h.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, h.finish()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn listing(scan: &Scan) -> Vec<String> {
        scan.entries
            .iter()
            .map(|e| match &e.kind {
                Kind::File { size, hash } => format!("{} file {size} {hash}", e.path),
                Kind::Symlink { target } => format!("{} -> {target}", e.path),
                k => format!("{} {}", e.path, k.name()),
            })
            .collect()
    }

    #[test]
    fn lists_tree_in_component_order_without_following_links() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        fs::create_dir_all(r.join("a/b")).unwrap();
        fs::write(r.join("a/b/f"), "hello").unwrap();
        fs::write(r.join("a b"), "").unwrap();
        fs::create_dir(r.join("empty")).unwrap();
        symlink("/etc", r.join("link")).unwrap();
        fs::write(r.join(".server-sync-tmp.123"), "partial").unwrap();
        let s = scan(r, None, Options::new(HashAlgorithm::Md5)).unwrap();
        assert_eq!(
            listing(&s),
            [
                "a dir",
                "a/b dir",
                "a/b/f file 5 5d41402abc4b2a76b9719d911017c592",
                "a b file 0 d41d8cd98f00b204e9800998ecf8427e",
                "empty dir",
                "link -> /etc",
            ]
        );
        assert!(s.warnings.is_empty(), "{:?}", s.warnings);
    }

    /// Scans `dir` through a cache whose clock runs far ahead, so files just written by the
    /// test are old enough to be cached.
    fn scan_through(dir: &Path, cache_file: &Path) -> (Scan, u64) {
        let mut cache = HashCache::load(cache_file, HashAlgorithm::Md5);
        cache.now_ns += 3600 * 1_000_000_000;
        let s = scan(dir, Some(&mut cache), Options::new(HashAlgorithm::Md5)).unwrap();
        s.save_cache(&cache).unwrap();
        (s, cache.hits)
    }

    /// Warms a cache on `a` = "old content", applies `change`, and checks that the next
    /// cached scan reports the true MD5 of `a`.
    fn check_cache(change: impl FnOnce(&Path, &Path), want: &[u8]) {
        let d = tempfile::tempdir().unwrap();
        let (dir, cache) = (d.path().join("t"), d.path().join("cache"));
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("a"), "old content").unwrap();
        fs::write(dir.join("b"), "stays").unwrap();
        scan_through(&dir, &cache);
        assert_eq!(
            scan_through(&dir, &cache).1,
            2,
            "warm cache answers both files"
        );
        let file = HashCache::load(&cache, HashAlgorithm::Md5)
            .file()
            .to_owned();
        change(&dir, &file);
        let (s, _) = scan_through(&dir, &cache);
        let a = s.entries.iter().find(|e| e.path.as_str() == "a").unwrap();
        assert_eq!(a.hash(), Some(HashAlgorithm::Md5.of(want)));
    }

    /// Records the cache vouched for are written back with the stamps the file held, beside
    /// those hashed anew; a scan that finds everything unchanged leaves the file alone.
    #[test]
    fn a_changed_file_does_not_cost_the_others_their_records() {
        let d = tempfile::tempdir().unwrap();
        let (dir, cache) = (d.path().join("t"), d.path().join("cache"));
        fs::create_dir_all(dir.join("c")).unwrap();
        for f in ["a", "b", "c/d", "e"] {
            fs::write(dir.join(f), f).unwrap();
        }
        assert_eq!(scan_through(&dir, &cache).1, 0);
        assert_eq!(scan_through(&dir, &cache).1, 4);
        let file = HashCache::load(&cache, HashAlgorithm::Md5)
            .file()
            .to_owned();
        let ino = || fs::metadata(&file).unwrap().ino();
        let before = ino();
        assert_eq!(scan_through(&dir, &cache).1, 4);
        assert_eq!(ino(), before, "an unchanged cache is not rewritten");
        fs::write(dir.join("b"), "new b").unwrap();
        fs::remove_file(dir.join("e")).unwrap();
        assert_eq!(scan_through(&dir, &cache).1, 2, "a and c/d");
        assert_ne!(ino(), before);
        let (s, hits) = scan_through(&dir, &cache);
        assert_eq!(hits, 3, "a, b and c/d");
        let b = s.entries.iter().find(|e| e.path.as_str() == "b").unwrap();
        assert_eq!(b.hash(), Some(HashAlgorithm::Md5.of(b"new b")));
    }

    #[test]
    fn cache_never_hides_a_change() {
        let restore_mtime = |p: &Path, f: &dyn Fn()| {
            let before = fs::metadata(p).unwrap();
            f();
            let t = before.modified().unwrap();
            fs::File::options()
                .write(true)
                .open(p)
                .unwrap()
                .set_modified(t)
                .unwrap();
        };
        // Size changed, mtime put back.
        check_cache(
            |d, _| restore_mtime(&d.join("a"), &|| fs::write(d.join("a"), "new").unwrap()),
            b"new",
        );
        // Same size, mtime put back: only ctime tells.
        check_cache(
            |d, _| {
                restore_mtime(&d.join("a"), &|| {
                    fs::write(d.join("a"), "new content").unwrap()
                })
            },
            b"new content",
        );
        // Replaced by another file with the same size and mtime: inode and ctime differ.
        check_cache(
            |d, _| {
                let t = fs::metadata(d.join("a")).unwrap().modified().unwrap();
                fs::write(d.join("n"), "NEW CONTENT").unwrap();
                fs::File::options()
                    .write(true)
                    .open(d.join("n"))
                    .unwrap()
                    .set_modified(t)
                    .unwrap();
                fs::rename(d.join("n"), d.join("a")).unwrap();
            },
            b"NEW CONTENT",
        );
        // Cache deleted, truncated or corrupted: rebuilt, not trusted.
        check_cache(|_, c| fs::remove_file(c).unwrap(), b"old content");
        check_cache(
            |d, c| {
                fs::write(d.join("a"), "changed").unwrap();
                let b = fs::read(c).unwrap();
                fs::write(c, &b[..b.len() / 2]).unwrap();
            },
            b"changed",
        );
        check_cache(|_, c| fs::write(c, "garbage").unwrap(), b"old content");
    }

    /// Each directory's names are sorted by their bytes, which must give the component order
    /// of the whole paths (a directory right before its contents, `a` before `a b`).
    #[test]
    fn entries_come_in_component_order() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        for dir in ["a", "a-", "ab", "Z", "é"] {
            fs::create_dir(r.join(dir)).unwrap();
            for f in ["x", "x y", "x.y", "xy", "X"] {
                fs::write(r.join(dir).join(f), "").unwrap();
            }
        }
        for f in ["a b", "a.b", "a-b", "b", "\u{7f}"] {
            fs::write(r.join(f), "").unwrap();
        }
        let s = scan(r, None, Options::new(HashAlgorithm::Md5)).unwrap();
        let paths: Vec<&str> = s.entries.iter().map(|e| e.path.as_str()).collect();
        let mut sorted = paths.clone();
        sorted.sort_by(|a, b| a.split('/').cmp(b.split('/')));
        assert_eq!(paths, sorted);
        assert_eq!(paths.len(), 5 * 6 + 5);
    }

    /// Below the directories the walk holds open, entries are found by their whole path: all
    /// of a tree that deep is still listed, in order, and its files hashed.
    #[test]
    fn a_tree_deeper_than_the_open_directories_is_listed_whole() {
        let d = tempfile::tempdir().unwrap();
        let mut deep = d.path().to_path_buf();
        let (mut want, mut files) = (Vec::new(), Vec::new());
        for level in 0..HELD_DIRS + 5 {
            deep.push("d");
            fs::create_dir(&deep).unwrap();
            let content = level.to_string();
            fs::write(deep.join("f"), &content).unwrap();
            symlink("f", deep.join("l")).unwrap();
            let rel = vec!["d"; level + 1].join("/");
            want.push(format!("{rel} dir"));
            let hash = HashAlgorithm::Md5.of(content.as_bytes());
            files.push([
                format!("{rel}/f file {} {hash}", content.len()),
                format!("{rel}/l -> f"),
            ]);
        }
        // "d" sorts first: each level's files come after everything deeper.
        want.extend(files.into_iter().rev().flatten());
        let s = scan(d.path(), None, Options::new(HashAlgorithm::Md5)).unwrap();
        assert_eq!(listing(&s), want);
        assert!(s.warnings.is_empty(), "{:?}", s.warnings);
    }

    #[test]
    fn names_that_are_not_utf8_are_skipped_with_a_warning() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir(d.path().join("a")).unwrap();
        fs::write(d.path().join("a").join(OsStr::from_bytes(b"bad\xff")), "").unwrap();
        fs::write(d.path().join("a/good"), "").unwrap();
        let s = scan(d.path(), None, Options::new(HashAlgorithm::Md5)).unwrap();
        let paths: Vec<&str> = s.entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["a", "a/good"]);
        let shown = d.path().join("a").join(OsStr::from_bytes(b"bad\xff"));
        assert_eq!(
            s.warnings,
            [format!(
                "skipping {}: name is not valid UTF-8",
                shown.display()
            )]
        );
    }

    #[test]
    fn special_files_are_listed_as_such() {
        let d = tempfile::tempdir().unwrap();
        let _sock = std::os::unix::net::UnixListener::bind(d.path().join("sock")).unwrap();
        let s = scan(d.path(), None, Options::new(HashAlgorithm::Md5)).unwrap();
        assert_eq!(listing(&s), ["sock special"]);
        assert!(s.warnings.is_empty());
    }

    #[test]
    fn a_part_of_the_tree_is_listed_with_its_ancestors() {
        let d = tempfile::tempdir().unwrap();
        for f in ["a/b/c/f", "a/b/g", "a/x", "top", "n/m/deep"] {
            let p = d.path().join(f);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, f).unwrap();
        }
        let scope = |p: &str, deep| Scope {
            path: RelPath::new(p).unwrap(),
            deep,
        };
        let scopes = [
            scope("a/b/c/f", false),
            scope("a/b", false),
            scope("n", true),
            scope("n/m/deep", false),
            scope("gone", false),
            scope("top/under-a-file", false),
        ];
        let opts = Options::new(HashAlgorithm::Blake3);
        let s = scan_paths(d.path(), &scopes, None, opts).unwrap();
        let paths: Vec<String> = s.entries.iter().map(|e| e.path.to_string()).collect();
        // Ancestors as they are, the shallow scopes alone, the deep one whole, nothing for
        // what is gone, and only the file where a directory was expected above a scope.
        assert_eq!(
            paths,
            [
                "a", "a/b", "a/b/c", "a/b/c/f", "n", "n/m", "n/m/deep", "top"
            ]
        );
        let f = s
            .entries
            .iter()
            .find(|e| e.path.as_str() == "a/b/c/f")
            .unwrap();
        assert_eq!(f.hash(), Some(HashAlgorithm::Blake3.of(b"a/b/c/f")));
    }
}
