//! Persistent hash cache: each file's MD5 with the metadata it had when hashed, so that a file
//! whose metadata has not changed is never read again.
//!
//! A record is trusted only when size, mtime, inode and ctime all still match: a file
//! rewritten with its old mtime restored still changes ctime, and a file replaced by another
//! (rename over it) changes inode. The cache lives outside the synced tree, is written
//! atomically (temp file, rename), and a missing, truncated or corrupt cache is simply rebuilt.

use std::cmp::Ordering;
use std::fs::{self, Metadata};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Component, Path, PathBuf};

use md5::Digest;

use crate::manifest::{Md5, cmp_components};

const MAGIC: &[u8; 8] = b"SSHCACH2";

/// Files modified this close to the scan are not cached: a write later in the same clock tick
/// would leave size and mtime unchanged (git's "racily clean" problem).
const RACY_NS: i64 = 2_000_000_000;

/// What identifies one version of a file without reading it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
    ino: u64,
    dev: u64,
}

impl Stamp {
    pub fn of(m: &Metadata) -> Stamp {
        Stamp {
            size: m.size(),
            mtime_ns: m.mtime().saturating_mul(1_000_000_000) + m.mtime_nsec(),
            ctime_ns: m.ctime().saturating_mul(1_000_000_000) + m.ctime_nsec(),
            ino: m.ino(),
            dev: m.dev(),
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether a file with this stamp, read at time `at_ns`, may be cached: not when it
    /// changed less than 2 s before, since a later write in the same clock tick could leave
    /// the stamp as it is.
    pub fn settled_at(&self, at_ns: i64) -> bool {
        at_ns - self.mtime_ns.max(self.ctime_ns) >= RACY_NS
    }
}

/// Now, in nanoseconds since the epoch, as stamps count.
pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

#[derive(Debug)]
struct Record {
    path: String,
    stamp: Stamp,
    md5: Md5,
}

/// The cache of one directory tree, as loaded. Records are kept in walk order (component
/// order), so a scan, which asks in that same order, finds each one by advancing a cursor.
#[derive(Debug)]
pub struct HashCache {
    file: PathBuf,
    old: Vec<Record>,
    cursor: usize,
    pub(crate) now_ns: i64,
    pub hits: u64,
    pub misses: u64,
}

impl HashCache {
    /// Where the cache of `dir` lives under `cache_dir`: one file per directory, named by the
    /// MD5 of its canonical path.
    pub fn file_for(cache_dir: &Path, dir: &Path) -> PathBuf {
        let key = Md5::of(resolve(dir).as_os_str().as_encoded_bytes());
        cache_dir.join(format!("{key}.hashes"))
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
        // Either may not exist yet (the cache directory is created on first save, the
        // server's DIR at start): compare where they will be, not just what exists now.
        if resolve(&cache_dir).starts_with(resolve(dir)) {
            return Err(format!(
                "cache directory {} is inside the synced directory {}",
                cache_dir.display(),
                dir.display()
            ));
        }
        Ok(Some(Self::file_for(&cache_dir, dir)))
    }

    /// Loads the cache file; anything unreadable starts an empty cache.
    pub fn load(file: PathBuf) -> HashCache {
        let old = fs::read(&file)
            .ok()
            .and_then(|b| decode(&b))
            .unwrap_or_default();
        let now = now_ns();
        HashCache {
            file,
            old,
            cursor: 0,
            now_ns: now,
            hits: 0,
            misses: 0,
        }
    }

    /// The MD5 recorded for `rel`, if its stamp is unchanged since it was hashed. Calls must
    /// come in component order (as a walk makes them); out of order, they only miss.
    pub fn lookup(&mut self, rel: &str, stamp: &Stamp) -> Option<Md5> {
        while let Some(r) = self.old.get(self.cursor) {
            match cmp_components(&r.path, rel) {
                Ordering::Less => self.cursor += 1,
                Ordering::Equal if r.stamp == *stamp => {
                    self.hits += 1;
                    return Some(r.md5);
                }
                _ => break,
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

    /// Adds MD5s learnt outside a scan (files hashed while being sent) to the cache in `file`,
    /// replacing records of the same paths. Callers pass only stamps that were settled when
    /// the file was read (`Stamp::settled_at`).
    pub fn remember(file: PathBuf, learned: Vec<(String, Stamp, Md5)>) -> io::Result<()> {
        let cache = HashCache::load(file);
        // One record per path, the last learnt: a file both hashed on request and hashed while
        // sent is learnt twice, and duplicates would make the whole cache unreadable.
        let latest: std::collections::HashMap<String, (Stamp, Md5)> = learned
            .into_iter()
            .filter(|(_, stamp, _)| cache.may_record(stamp))
            .map(|(path, stamp, md5)| (path, (stamp, md5)))
            .collect();
        let mut new: Vec<Record> = latest
            .into_iter()
            .map(|(path, (stamp, md5))| Record { path, stamp, md5 })
            .collect();
        if new.is_empty() {
            return Ok(());
        }
        new.sort_by(|a, b| cmp_components(&a.path, &b.path));
        let (mut old, mut new) = (cache.old.iter().peekable(), new.iter().peekable());
        let mut merged = Vec::with_capacity(cache.old.len() + new.len());
        loop {
            let next = match (old.peek(), new.peek()) {
                (Some(o), Some(n)) => match cmp_components(&o.path, &n.path) {
                    Ordering::Less => old.next(),
                    Ordering::Equal => {
                        old.next();
                        new.next()
                    }
                    Ordering::Greater => new.next(),
                },
                (Some(_), None) => old.next(),
                (None, _) => new.next(),
            };
            let Some(r) = next else { break };
            merged.push((r.path.as_str(), r.stamp, r.md5));
        }
        cache.save(merged.into_iter())
    }

    /// Replaces the cache file with `records` (in walk order), atomically; skipped when they
    /// are exactly what was loaded.
    pub fn save<'a>(&self, records: impl Iterator<Item = (&'a str, Stamp, Md5)>) -> io::Result<()> {
        let mut body = Vec::with_capacity(16 + self.old.len() * 80);
        body.extend_from_slice(MAGIC);
        let mut n = 0usize;
        let mut same = true;
        for (path, s, md5) in records {
            same &= self
                .old
                .get(n)
                .is_some_and(|r| r.path == path && r.stamp == s && r.md5 == md5);
            n += 1;
            body.extend_from_slice(&(path.len() as u32).to_le_bytes());
            body.extend_from_slice(path.as_bytes());
            for v in [s.size, s.mtime_ns as u64, s.ctime_ns as u64, s.ino, s.dev] {
                body.extend_from_slice(&v.to_le_bytes());
            }
            body.extend_from_slice(&md5.0);
        }
        if same && n == self.old.len() {
            return Ok(());
        }
        let sum = Md5::of(&body);
        body.extend_from_slice(&sum.0);
        let dir = self.file.parent().unwrap_or(Path::new("."));
        // It lists every path of the tree: private, like the files themselves may be.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let mut tmp = crate::root::TempFile::new_in(dir)?;
        tmp.file().write_all(&body)?;
        tmp.persist_to(&self.file)
    }
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

fn take<'a>(r: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    let (head, tail) = r.split_at_checked(n)?;
    *r = tail;
    Some(head)
}

fn take_u64(r: &mut &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(take(r, 8)?.try_into().ok()?))
}

fn decode(b: &[u8]) -> Option<Vec<Record>> {
    let (body, sum) = b.split_at_checked(b.len().checked_sub(16)?)?;
    if md5::Md5::digest(body).as_slice() != sum || !body.starts_with(MAGIC) {
        return None;
    }
    let mut r = &body[MAGIC.len()..];
    let mut out: Vec<Record> = Vec::new();
    while !r.is_empty() {
        let len = u32::from_le_bytes(take(&mut r, 4)?.try_into().ok()?) as usize;
        let path = String::from_utf8(take(&mut r, len)?.to_vec()).ok()?;
        let stamp = Stamp {
            size: take_u64(&mut r)?,
            mtime_ns: take_u64(&mut r)? as i64,
            ctime_ns: take_u64(&mut r)? as i64,
            ino: take_u64(&mut r)?,
            dev: take_u64(&mut r)?,
        };
        let md5 = Md5(take(&mut r, 16)?.try_into().ok()?);
        // Out of order means not ours, or damaged: start afresh.
        if out
            .last()
            .is_some_and(|p| cmp_components(&p.path, &path) != Ordering::Less)
        {
            return None;
        }
        out.push(Record { path, stamp, md5 });
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let c = HashCache::load(file.clone());
        let recs = [("a", 1), ("a/b", 2), ("a b", 3)];
        c.save(
            recs.iter()
                .map(|(p, n)| (*p, stamp(*n), Md5::of(p.as_bytes()))),
        )
        .unwrap();

        let mut c = HashCache::load(file.clone());
        assert_eq!(c.lookup("a", &stamp(1)), Some(Md5::of(b"a")));
        assert_eq!(c.lookup("a/a", &stamp(2)), None, "absent");
        assert_eq!(c.lookup("a/b", &stamp(9)), None, "stamp differs");
        assert_eq!(c.lookup("a b", &stamp(3)), Some(Md5::of(b"a b")));
        assert_eq!((c.hits, c.misses), (2, 2));

        // Any flipped byte is caught by the trailing checksum; anything short is refused.
        let bytes = fs::read(&file).unwrap();
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
            fs::write(&file, &bad).unwrap();
            assert!(HashCache::load(file.clone()).old.is_empty());
        }
    }

    #[test]
    fn unchanged_cache_is_not_rewritten() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("cache");
        let recs = || [("a", stamp(1), Md5::of(b"a"))].into_iter();
        HashCache::load(file.clone()).save(recs()).unwrap();
        let before = fs::metadata(&file).unwrap().ino();
        HashCache::load(file.clone()).save(recs()).unwrap();
        assert_eq!(fs::metadata(&file).unwrap().ino(), before, "not replaced");
        HashCache::load(file.clone())
            .save(std::iter::empty())
            .unwrap();
        assert_ne!(
            fs::metadata(&file).unwrap().ino(),
            before,
            "a file dropped out"
        );
    }

    #[test]
    fn learnt_md5s_merge_into_the_cache() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("cache");
        let md5 = |s: &str| Md5::of(s.as_bytes());
        let recs = [("a", stamp(1), md5("a")), ("c", stamp(3), md5("c"))];
        HashCache::load(file.clone())
            .save(recs.into_iter())
            .unwrap();
        let mut fresh = stamp(2);
        fresh.mtime_ns = i64::MAX; // racy: never recorded
        HashCache::remember(
            file.clone(),
            vec![
                ("b".into(), stamp(2), md5("b")),
                ("b".into(), stamp(2), md5("b")),
                ("c".into(), stamp(4), md5("c2")),
                ("d".into(), fresh, md5("d")),
            ],
        )
        .unwrap();
        let mut c = HashCache::load(file);
        assert_eq!(c.lookup("a", &stamp(1)), Some(md5("a")));
        assert_eq!(c.lookup("b", &stamp(2)), Some(md5("b")));
        assert_eq!(c.lookup("c", &stamp(4)), Some(md5("c2")));
        assert_eq!(c.lookup("d", &fresh), None);
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
        let c = HashCache::load(PathBuf::from("/nonexistent"));
        let mut s = stamp(1);
        s.mtime_ns = c.now_ns - 1;
        assert!(!c.may_record(&s));
        s.mtime_ns = c.now_ns - 3 * RACY_NS;
        s.ctime_ns = c.now_ns - 1;
        assert!(!c.may_record(&s), "ctime counts too");
        s.ctime_ns = s.mtime_ns;
        assert!(c.may_record(&s));
    }
}
