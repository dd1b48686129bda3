//! Persistent hash cache: each file's content hash with the metadata it had when hashed, so that a file
//! whose metadata has not changed is never read again.
//!
//! A record is trusted only when size, mtime, inode and ctime all still match: a file
//! rewritten with its old mtime restored still changes ctime, and a file replaced by another
//! (rename over it) changes inode. The cache lives outside the synced tree, is written
//! atomically (temp file, rename), and a missing, truncated or corrupt cache is simply rebuilt.

use std::cmp::Ordering;
use std::fs::{self, File, Metadata};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Component, Path, PathBuf};

use crate::core::hash::{ContentHash, HashAlgorithm};
use crate::core::manifest::cmp_components;

pub use crate::core::stamp::Stamp;

impl Stamp {
    /// The stamp of a file as `lstat`/`fstat` reports it.
    pub fn of(m: &Metadata) -> Stamp {
        Stamp {
            size: m.size(),
            mtime_ns: m.mtime().saturating_mul(1_000_000_000) + m.mtime_nsec(),
            ctime_ns: m.ctime().saturating_mul(1_000_000_000) + m.ctime_nsec(),
            ino: m.ino(),
            dev: m.dev(),
        }
    }

    /// The same from a raw `fstatat` (the scan's walk): the kernel encodes `st_dev` as glibc's
    /// `makedev` does for `statx`'s major and minor, which is what [`Stamp::of`] sees, so
    /// records stay valid whichever call took them.
    pub fn of_stat(st: &rustix::fs::Stat) -> Stamp {
        let ns = |secs: i64, nanos: i64| secs.saturating_mul(1_000_000_000) + nanos;
        Stamp {
            size: st.st_size as u64,
            mtime_ns: ns(st.st_mtime, st.st_mtime_nsec as i64),
            ctime_ns: ns(st.st_ctime, st.st_ctime_nsec as i64),
            ino: st.st_ino,
            dev: st.st_dev,
        }
    }
}

/// Now, in nanoseconds since the epoch, as stamps count.
pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

use crate::wire::cache_file::{self, CacheFileReader, CacheFileWriter, CacheRecord as Record, Sum};

/// A hash learnt outside a scan, for [`HashCache::remember`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Learned {
    pub path: String,
    pub stamp: Stamp,
    pub hash: ContentHash,
}

/// The cache of one directory tree, as loaded. Its file is verified whole when loaded, then
/// its records are read one at a time as lookups advance: they are in walk (component) order,
/// and a scan asks in that same order. So a cache costs a read buffer, not a copy of itself.
#[derive(Debug)]
pub struct HashCache {
    file: PathBuf,
    algorithm: HashAlgorithm,
    /// The file as loaded, `None` when there was none (or none that could be trusted).
    old: Option<Old>,
    pub(crate) now_ns: i64,
    pub hits: u64,
    pub misses: u64,
}

/// A verified cache file being read.
#[derive(Debug)]
struct Old {
    /// Its checksum: a save whose records give the same one would rewrite the same file.
    sum: Sum,
    /// How many records it holds.
    count: u64,
    /// The file, for reading it again from the start (see [`Old::reread`]).
    file: File,
    len: u64,
    algorithm: HashAlgorithm,
    records: CacheFileReader<At>,
    /// The next record not yet passed, once read.
    next: Record,
    state: Cursor,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cursor {
    /// `next` must be read before it is looked at.
    Unread,
    /// `next` holds the record the cursor is at.
    At,
    /// No record left.
    End,
    /// Reading failed after the file was verified (an I/O error): no record left either.
    Failed,
}

impl Old {
    /// Verifies the cache file at `path` and opens it for reading its records.
    fn open(path: &Path, algorithm: HashAlgorithm) -> Option<Old> {
        let file = File::open(path).ok()?;
        let len = file.metadata().ok()?.len();
        let (sum, count) = cache_file::check(At::start(&file).ok()?, len, algorithm)?;
        Some(Old {
            sum,
            count,
            records: CacheFileReader::open(At::start(&file).ok()?, len, algorithm).ok()??,
            file,
            len,
            algorithm,
            next: Record::empty(algorithm),
            state: Cursor::Unread,
        })
    }

    /// The file's records again, from the first, whatever lookups have read so far.
    fn reread(&self) -> io::Result<Rereading> {
        let records = CacheFileReader::open(At::start(&self.file)?, self.len, self.algorithm)?
            .ok_or_else(|| io::Error::other("the hash cache changed since it was loaded"))?;
        Ok(Rereading {
            records,
            rec: Record::empty(self.algorithm),
        })
    }

    /// The record at the cursor, if any is left.
    fn peek(&mut self) -> Option<&Record> {
        if self.state == Cursor::Unread {
            self.state = match self.records.next_into(&mut self.next) {
                Ok(true) => Cursor::At,
                Ok(false) => Cursor::End,
                Err(e) => {
                    tracing::debug!("hash cache: {e}");
                    Cursor::Failed
                }
            };
        }
        (self.state == Cursor::At).then_some(&self.next)
    }

    /// Moves the cursor past the record it is at.
    fn advance(&mut self) {
        if self.state == Cursor::At {
            self.state = Cursor::Unread;
        }
    }
}

/// Reads a file from its own position, so that readers of one file do not move each other.
#[derive(Debug)]
struct At {
    file: File,
    pos: u64,
}

impl At {
    fn start(file: &File) -> io::Result<At> {
        Ok(At {
            file: file.try_clone()?,
            pos: 0,
        })
    }
}

impl io::Read for At {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// The loaded cache file read again, for the stamps of records a scan found unchanged.
struct Rereading {
    records: CacheFileReader<At>,
    rec: Record,
}

impl Rereading {
    /// The stamp of the record of `path`, which must come after those asked for before.
    fn stamp_of(&mut self, path: &str) -> io::Result<Stamp> {
        loop {
            if self.rec.path == path {
                return Ok(self.rec.stamp);
            }
            if !self.records.next_into(&mut self.rec)? {
                return Err(io::Error::other(
                    "the hash cache changed since it was loaded",
                ));
            }
        }
    }
}

impl HashCache {
    /// Where the cache of `dir` lives under `cache_dir`: one file per directory, named by the
    /// MD5 of its canonical path.
    pub fn file_for(cache_dir: &Path, dir: &Path) -> PathBuf {
        cache_dir.join(format!("{}.hashes", dir_key(dir)))
    }

    /// The default cache directory: `$XDG_CACHE_HOME/server-sync` or `~/.cache/server-sync`.
    pub fn default_dir() -> Option<PathBuf> {
        let base = std::env::var_os("XDG_CACHE_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
        Some(base.join("server-sync"))
    }

    /// The cache file to use for `dir`: under `cache_dir` if given, else under the default
    /// directory; `None` when there is no default (no HOME). Refuses a cache inside `dir`,
    /// where it would be synced, and on the server deleted, as part of the tree.
    pub fn file_for_dir(cache_dir: Option<&Path>, dir: &Path) -> Result<Option<PathBuf>, String> {
        let Some(cache_dir) = cache_dir.map(Path::to_owned).or_else(Self::default_dir) else {
            return Ok(None);
        };
        check_outside("cache", &cache_dir, dir)?;
        Ok(Some(Self::file_for(&cache_dir, dir)))
    }

    /// Loads the cache of `algorithm`'s hashes kept beside `base` (the path `file_for` gives):
    /// one file per algorithm, so a server serving clients of both keeps both. Anything
    /// unreadable, or holding another algorithm's hashes, starts an empty cache. The file is
    /// read through once here to verify it; its records are read again as lookups need them.
    pub fn load(base: &Path, algorithm: HashAlgorithm) -> HashCache {
        let file = base.with_extension(format!("{algorithm}.hashes"));
        let old = Old::open(&file, algorithm);
        let now = now_ns();
        HashCache {
            file,
            algorithm,
            old,
            now_ns: now,
            hits: 0,
            misses: 0,
        }
    }

    pub fn algorithm(&self) -> HashAlgorithm {
        self.algorithm
    }

    /// The file this cache is kept in.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// The hash recorded for `rel`, if its stamp is unchanged since it was hashed. Calls must
    /// come in component order (as a walk makes them); out of order, they only miss.
    pub fn lookup(&mut self, rel: &str, stamp: &Stamp) -> Option<ContentHash> {
        if let Some(old) = &mut self.old {
            while let Some(r) = old.peek() {
                match cmp_components(&r.path, rel) {
                    Ordering::Less => old.advance(),
                    Ordering::Equal if r.stamp == *stamp => {
                        self.hits += 1;
                        return Some(r.hash);
                    }
                    _ => break,
                }
            }
        }
        self.misses += 1;
        None
    }

    /// Whether a freshly hashed file may be recorded: not if it changed too recently to be
    /// sure the stamp will change with its next write.
    pub fn may_record(&self, stamp: &Stamp) -> bool {
        stamp.settled_at(self.now_ns)
    }

    /// Adds hashes learnt outside a scan (files hashed while being sent or received) to the
    /// cache beside `base`, replacing records of the same paths. Records whose stamp is not
    /// settled, or whose hash is of another algorithm, are left out. The old records are
    /// streamed from the file into the new one, merged with the learnt ones on the way.
    pub fn remember(
        base: &Path,
        algorithm: HashAlgorithm,
        mut learned: Vec<Learned>,
    ) -> io::Result<()> {
        // Callers vouch for their stamps (`settled_at`, or `settled_own_write` for files
        // this process wrote); both imply this much. Checked before the cache is loaded: a
        // batch of files just written has nothing to add, and loading verifies the whole file.
        let now = now_ns();
        learned.retain(|l| l.stamp.settled_own_write(now) && l.hash.algorithm() == algorithm);
        if learned.is_empty() {
            return Ok(());
        }
        let mut cache = HashCache::load(base, algorithm);
        // In walk order, one record per path, the last learnt: a file both hashed on request
        // and hashed while sent is learnt twice, and duplicates would make the whole cache
        // unreadable. Sorted as indices, which the stable sort keeps in learning order among
        // equal paths, so as not to move (or copy) the records themselves.
        let mut order: Vec<usize> = (0..learned.len()).collect();
        order.sort_by(|&a, &b| cmp_components(&learned[a].path, &learned[b].path));
        order.dedup_by(|later, kept| {
            let same = learned[*later].path == learned[*kept].path;
            if same {
                *kept = *later;
            }
            same
        });
        let mut new = order.iter().map(|&i| &learned[i]).peekable();
        let mut old = cache.old.take();
        let old_sum = old.as_ref().map(|o| o.sum);
        let written = cache.write(old_sum, |file| {
            loop {
                let o = old.as_mut().and_then(Old::peek);
                let (path, stamp, hash) = match (o, new.peek()) {
                    (Some(o), Some(n)) if cmp_components(&o.path, &n.path) == Ordering::Less => {
                        (o.path.as_str(), o.stamp, o.hash)
                    }
                    (Some(o), Some(n)) => {
                        if o.path == n.path {
                            // Replaced by what was learnt.
                            old.as_mut().map(Old::advance);
                        }
                        let n = new.next().expect("peeked");
                        file.push(&n.path, &n.stamp, &n.hash)?;
                        continue;
                    }
                    (Some(o), None) => (o.path.as_str(), o.stamp, o.hash),
                    (None, Some(_)) => {
                        let n = new.next().expect("peeked");
                        file.push(&n.path, &n.stamp, &n.hash)?;
                        continue;
                    }
                    (None, None) => break,
                };
                file.push(path, &stamp, &hash)?;
                old.as_mut().map(Old::advance);
            }
            match old {
                Some(Old {
                    state: Cursor::Failed,
                    ..
                }) => Err(io::Error::other(
                    "the old hash cache could not be read again",
                )),
                _ => Ok(()),
            }
        });
        written.map(drop)
    }

    /// Replaces the cache file with `records` (in walk order), atomically; skipped when they
    /// are exactly what was loaded.
    pub fn save<'a>(
        &self,
        records: impl Iterator<Item = (&'a str, Stamp, ContentHash)> + Clone,
    ) -> io::Result<()> {
        self.save_scan(records.map(|(path, stamp, hash)| (path, Some(stamp), hash)))
    }

    /// [`HashCache::save`] for a scan through this cache: a record without a stamp is one
    /// that [`HashCache::lookup`] found unchanged, whose stamp is read back from the file as
    /// loaded rather than kept by the scan in the meantime. `records` is gone through twice.
    pub fn save_scan<'a>(
        &self,
        records: impl Iterator<Item = (&'a str, Option<Stamp>, ContentHash)> + Clone,
    ) -> io::Result<()> {
        let (mut n, mut all_hits) = (0u64, true);
        for (_, stamp, hash) in records.clone() {
            debug_assert_eq!(hash.algorithm(), self.algorithm);
            n += 1;
            all_hits &= stamp.is_none();
        }
        // Hits come in file order, each equal to its record: as many as there were, they are
        // the file.
        let same = match &self.old {
            Some(old) => all_hits && n == old.count,
            None => n == 0,
        };
        if same {
            return Ok(());
        }
        let mut loaded = self.old.as_ref().map(Old::reread).transpose()?;
        let unchanged = self.old.as_ref().map(|o| o.sum);
        let written = self.write(unchanged, |file| {
            for (path, stamp, hash) in records {
                let stamp = match (stamp, &mut loaded) {
                    (Some(s), _) => s,
                    (None, Some(loaded)) => loaded.stamp_of(path)?,
                    (None, None) => return Err(io::Error::other("a hit without a cache")),
                };
                file.push(path, &stamp, &hash)?;
            }
            Ok(())
        });
        written.map(drop)
    }

    /// Writes a new cache file with what `fill` pushes, and puts it in place, atomically,
    /// unless its checksum is `unchanged` (the same file as the one there). Whether it was put
    /// in place.
    fn write(
        &self,
        unchanged: Option<Sum>,
        fill: impl FnOnce(&mut CacheFileWriter<&mut File>) -> io::Result<()>,
    ) -> io::Result<bool> {
        let dir = self.file.parent().unwrap_or(Path::new("."));
        // It lists every path of the tree: private, like the files themselves may be.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let mut tmp = crate::store::root::TempFile::new_in(dir)?;
        let mut file = CacheFileWriter::new(tmp.file(), self.algorithm);
        fill(&mut file)?;
        let (_, sum) = file.finish()?;
        if unchanged == Some(sum) {
            // Dropping the temporary file deletes it.
            return Ok(false);
        }
        tmp.persist_to(&self.file)?;
        Ok(true)
    }

    /// Every record of the file as loaded (tests look at what a cache holds).
    #[cfg(test)]
    fn records(mut self) -> Vec<Record> {
        let mut out = Vec::new();
        if let Some(old) = &mut self.old {
            while let Some(r) = old.peek() {
                out.push(r.clone());
                old.advance();
            }
        }
        out
    }
}

/// What names the files kept for the synced directory `dir` (its cache, its record of the
/// client it mirrors): the MD5 of its canonical path.
pub(crate) fn dir_key(dir: &Path) -> String {
    HashAlgorithm::Md5
        .of(resolve(dir).as_os_str().as_encoded_bytes())
        .to_string()
}

/// Refuses a `what` directory (cache, state) inside the synced directory `dir`, where it would
/// be synced, and on the server deleted, as part of the tree.
pub(crate) fn check_outside(what: &str, kept: &Path, dir: &Path) -> Result<(), String> {
    // Either may not exist yet (the directory is created on first save, the server's DIR at
    // start): compare where they will be, not just what exists now.
    if resolve(kept).starts_with(resolve(dir)) {
        return Err(format!(
            "{what} directory {} is inside the synced directory {}",
            kept.display(),
            dir.display()
        ));
    }
    Ok(())
}

/// Where `p` is or would be once created: its deepest existing ancestor canonicalized (so
/// symlinks and `..` there are resolved), then the rest of `p` appended. That rest does not
/// exist, so it holds no symlink and its `..` can be applied lexically.
fn resolve(p: &Path) -> PathBuf {
    let abs = match std::env::current_dir() {
        Ok(cwd) if p.is_relative() => cwd.join(p),
        _ => p.to_owned(),
    };
    for base in abs.ancestors() {
        let Ok(mut out) = fs::canonicalize(base) else {
            continue;
        };
        let rest = abs.strip_prefix(base).unwrap_or(Path::new(""));
        for c in rest.components() {
            match c {
                Component::ParentDir => {
                    out.pop();
                }
                Component::CurDir => {}
                c => out.push(c),
            }
        }
        return out;
    }
    abs
}

#[cfg(test)]
mod tests {
    use super::*;

    const B3: HashAlgorithm = HashAlgorithm::Blake3;

    fn stamp(size: u64) -> Stamp {
        Stamp {
            size,
            mtime_ns: 1,
            ctime_ns: 1,
            ino: 7,
            dev: 1,
        }
    }

    #[test]
    fn round_trip_lookup_in_walk_order_and_corruption() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("c/cache");
        let c = HashCache::load(&file, B3);
        let recs = [("a", 1), ("a/b", 2), ("a b", 3)];
        c.save(
            recs.iter()
                .map(|(p, n)| (*p, stamp(*n), B3.of(p.as_bytes()))),
        )
        .unwrap();

        let mut c = HashCache::load(&file, B3);
        assert_eq!(c.lookup("a", &stamp(1)), Some(B3.of(b"a")));
        assert_eq!(c.lookup("a/a", &stamp(2)), None, "absent");
        assert_eq!(c.lookup("a/b", &stamp(9)), None, "stamp differs");
        assert_eq!(c.lookup("a b", &stamp(3)), Some(B3.of(b"a b")));
        assert_eq!((c.hits, c.misses), (2, 2));

        // Any flipped byte is caught by the trailing checksum; anything short is refused.
        let bytes = fs::read(&c.file).unwrap();
        for bad in [
            {
                let mut b = bytes.clone();
                b[20] ^= 1;
                b
            },
            bytes[..10].to_vec(),
            Vec::new(),
            b"garbage that is long enough to hold a checksum".to_vec(),
        ] {
            fs::write(c.file.clone(), &bad).unwrap();
            assert!(HashCache::load(&file, B3).records().is_empty());
        }
    }

    #[test]
    fn unchanged_cache_is_not_rewritten() {
        let d = tempfile::tempdir().unwrap();
        let base = d.path().join("cache");
        let recs = || [("a", stamp(1), B3.of(b"a"))].into_iter();
        HashCache::load(&base, B3).save(recs()).unwrap();
        let file = HashCache::load(&base, B3).file().to_owned();
        let before = fs::metadata(&file).unwrap().ino();
        HashCache::load(&base, B3).save(recs()).unwrap();
        assert_eq!(fs::metadata(&file).unwrap().ino(), before, "not replaced");
        HashCache::load(&base, B3).save(std::iter::empty()).unwrap();
        assert_ne!(
            fs::metadata(&file).unwrap().ino(),
            before,
            "a file dropped out"
        );
    }

    #[test]
    fn learnt_hashes_merge_into_the_cache() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("cache");
        let h = |s: &str| B3.of(s.as_bytes());
        let recs = [("a", stamp(1), h("a")), ("c", stamp(3), h("c"))];
        HashCache::load(&file, B3).save(recs.into_iter()).unwrap();
        let mut fresh = stamp(2);
        fresh.mtime_ns = i64::MAX; // racy: never recorded
        let learned = |path: &str, stamp, hash| Learned {
            path: path.into(),
            stamp,
            hash,
        };
        HashCache::remember(
            &file,
            B3,
            vec![
                learned("b", stamp(2), h("b")),
                learned("b", stamp(2), h("b")),
                learned("c", stamp(4), h("c2")),
                learned("d", fresh, h("d")),
                learned("e", stamp(5), HashAlgorithm::Md5.of(b"e")),
            ],
        )
        .unwrap();
        let mut c = HashCache::load(&file, B3);
        assert_eq!(c.lookup("a", &stamp(1)), Some(h("a")));
        assert_eq!(c.lookup("b", &stamp(2)), Some(h("b")));
        assert_eq!(c.lookup("c", &stamp(4)), Some(h("c2")));
        assert_eq!(c.lookup("d", &fresh), None);
        assert_eq!(c.lookup("e", &stamp(5)), None, "another algorithm's hash");
    }

    #[test]
    fn a_cache_of_another_algorithm_is_not_used() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("cache");
        let c = HashCache::load(&file, B3);
        c.save([("a", stamp(1), B3.of(b"a"))].into_iter()).unwrap();
        // Kept apart: the MD5 cache of the same tree is another file, empty here...
        assert!(
            HashCache::load(&file, HashAlgorithm::Md5)
                .records()
                .is_empty()
        );
        // ...and a BLAKE3 cache put where the MD5 one belongs is refused, not misread.
        let md5_file = HashCache::load(&file, HashAlgorithm::Md5).file;
        fs::copy(&c.file, &md5_file).unwrap();
        assert!(
            HashCache::load(&file, HashAlgorithm::Md5)
                .records()
                .is_empty()
        );
        assert_eq!(HashCache::load(&file, B3).records().len(), 1);
    }

    #[test]
    fn a_cache_inside_the_synced_directory_is_refused_even_before_it_exists() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("tree");
        fs::create_dir(&dir).unwrap();
        std::os::unix::fs::symlink(&dir, d.path().join("link")).unwrap();
        for inside in [
            dir.join(".cache"),
            dir.join("a/b/.cache"),
            dir.join("a/../.cache"),
            d.path().join("link/new/.cache"),
            d.path().join("elsewhere/../tree/.cache"),
        ] {
            let got = HashCache::file_for_dir(Some(&inside), &dir);
            assert!(got.is_err(), "{} accepted: {got:?}", inside.display());
        }
        // A server DIR that does not exist yet is compared where it will be.
        let missing = d.path().join("new-tree");
        assert!(HashCache::file_for_dir(Some(&missing.join("c")), &missing).is_err());
        for outside in [
            d.path().join("tree-cache"),
            dir.join("../cache"),
            d.path().join("c/d"),
        ] {
            let got = HashCache::file_for_dir(Some(&outside), &dir);
            assert!(got.is_ok(), "{} refused: {got:?}", outside.display());
        }
        assert!(!dir.join(".cache").exists() && !dir.join("a").exists());
    }

    #[test]
    fn racy_stamps_are_not_recorded() {
        let c = HashCache::load(Path::new("/nonexistent"), B3);
        let mut s = stamp(1);
        s.mtime_ns = c.now_ns - 1;
        assert!(!c.may_record(&s));
        s.mtime_ns = c.now_ns - 3 * crate::core::stamp::RACY_NS;
        s.ctime_ns = c.now_ns - 1;
        assert!(!c.may_record(&s), "ctime counts too");
        s.ctime_ns = s.mtime_ns;
        assert!(c.may_record(&s));
    }
}
