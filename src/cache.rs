//! Persistent hash cache: each file's MD5 with the metadata it had when hashed, so that a file
//! whose metadata has not changed is never read again.
//!
//! A record is trusted only when size, mtime, inode and ctime all still match: a file
//! rewritten with its old mtime restored still changes ctime, and a file replaced by another
//! (rename over it) changes inode. The cache lives outside the synced tree, is written
//! atomically (temp file, rename), and a missing, truncated or corrupt cache is simply rebuilt.

use std::collections::HashMap;
use std::fs::{self, Metadata};
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use md5::Digest;

use crate::manifest::Md5;

const MAGIC: &[u8; 8] = b"SSHCACH1";

/// Files modified this close to the scan are not cached: a write later in the same clock tick
/// would leave size and mtime unchanged (git's "racily clean" problem).
const RACY_NS: i128 = 2_000_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    ino: u64,
    dev: u64,
}

impl Stamp {
    fn of(m: &Metadata) -> Stamp {
        Stamp {
            size: m.size(),
            mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
            ctime_ns: m.ctime() as i128 * 1_000_000_000 + m.ctime_nsec() as i128,
            ino: m.ino(),
            dev: m.dev(),
        }
    }
}

/// The cache of one directory tree.
#[derive(Debug)]
pub struct HashCache {
    file: PathBuf,
    old: HashMap<String, (Stamp, Md5)>,
    /// What this scan saw; saving keeps only these, so deleted files drop out.
    new: HashMap<String, (Stamp, Md5)>,
    pub(crate) now_ns: i128,
    pub hits: u64,
    pub misses: u64,
}

impl HashCache {
    /// Where the cache of `dir` lives under `cache_dir`: one file per directory, named by the
    /// MD5 of its canonical path.
    pub fn file_for(cache_dir: &Path, dir: &Path) -> PathBuf {
        let canon = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned());
        let key = Md5::of(canon.as_os_str().as_encoded_bytes());
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
        let canon = |p: &Path| fs::canonicalize(p).unwrap_or_else(|_| p.to_owned());
        if canon(&cache_dir).starts_with(canon(dir)) {
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
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128);
        HashCache {
            file,
            old,
            new: HashMap::new(),
            now_ns: now,
            hits: 0,
            misses: 0,
        }
    }

    /// The MD5 recorded for `rel`, if its metadata is unchanged since it was hashed.
    pub fn lookup(&mut self, rel: &str, m: &Metadata) -> Option<Md5> {
        let stamp = Stamp::of(m);
        match self.old.get(rel) {
            Some((s, md5)) if *s == stamp => {
                self.hits += 1;
                self.new.insert(rel.to_owned(), (stamp, *md5));
                Some(*md5)
            }
            _ => {
                self.misses += 1;
                None
            }
        }
    }

    /// Remembers a freshly computed MD5, unless the file changed too recently to be sure.
    pub fn record(&mut self, rel: &str, m: &Metadata, md5: Md5) {
        let stamp = Stamp::of(m);
        if self.now_ns - stamp.mtime_ns.max(stamp.ctime_ns) < RACY_NS {
            return;
        }
        self.new.insert(rel.to_owned(), (stamp, md5));
    }

    /// Writes what this scan saw, atomically.
    pub fn save(&self) -> io::Result<()> {
        if self.new == self.old {
            return Ok(());
        }
        let dir = self.file.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir)?;
        let mut tmp = crate::root::TempFile::new_in(dir)?;
        tmp.file().write_all(&encode(&self.new))?;
        tmp.persist_to(&self.file)
    }
}

fn encode(map: &HashMap<String, (Stamp, Md5)>) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + map.len() * 96);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(map.len() as u64).to_le_bytes());
    for (path, (s, md5)) in map {
        out.extend_from_slice(&(path.len() as u32).to_le_bytes());
        out.extend_from_slice(path.as_bytes());
        out.extend_from_slice(&s.size.to_le_bytes());
        out.extend_from_slice(&s.mtime_ns.to_le_bytes());
        out.extend_from_slice(&s.ctime_ns.to_le_bytes());
        out.extend_from_slice(&s.ino.to_le_bytes());
        out.extend_from_slice(&s.dev.to_le_bytes());
        out.extend_from_slice(&md5.0);
    }
    let sum = Md5::of(&out);
    out.extend_from_slice(&sum.0);
    out
}

fn decode(b: &[u8]) -> Option<HashMap<String, (Stamp, Md5)>> {
    let (body, sum) = b.split_at_checked(b.len().checked_sub(16)?)?;
    if md5::Md5::digest(body).as_slice() != sum || !body.starts_with(MAGIC) {
        return None;
    }
    let mut r = &body[MAGIC.len()..];
    let mut take = |n: usize| -> Option<&[u8]> {
        let (h, t) = r.split_at_checked(n)?;
        r = t;
        Some(h)
    };
    let n = u64::from_le_bytes(take(8)?.try_into().ok()?);
    let mut map = HashMap::new();
    for _ in 0..n {
        let len = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
        let path = String::from_utf8(take(len)?.to_vec()).ok()?;
        let stamp = Stamp {
            size: u64::from_le_bytes(take(8)?.try_into().ok()?),
            mtime_ns: i128::from_le_bytes(take(16)?.try_into().ok()?),
            ctime_ns: i128::from_le_bytes(take(16)?.try_into().ok()?),
            ino: u64::from_le_bytes(take(8)?.try_into().ok()?),
            dev: u64::from_le_bytes(take(8)?.try_into().ok()?),
        };
        let md5 = Md5(take(16)?.try_into().ok()?);
        map.insert(path, (stamp, md5));
    }
    Some(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cache whose clock is far enough ahead that fresh test files are not "racy".
    fn cache(file: &Path) -> HashCache {
        let mut c = HashCache::load(file.to_owned());
        c.now_ns += 10 * RACY_NS;
        c
    }

    #[test]
    fn round_trip_and_corruption() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("a");
        fs::write(&f, "x").unwrap();
        let file = d.path().join("c/cache");
        let mut c = cache(&file);
        let m = fs::metadata(&f).unwrap();
        assert_eq!(c.lookup("a", &m), None);
        c.record("a", &m, Md5::of(b"x"));
        c.save().unwrap();

        let mut c = cache(&file);
        assert_eq!(c.lookup("a", &m), Some(Md5::of(b"x")));
        assert_eq!(c.lookup("b", &m), None);

        // Any flipped byte is detected by the trailing checksum: the cache starts empty.
        let mut bytes = fs::read(&file).unwrap();
        bytes[20] ^= 1;
        fs::write(&file, &bytes).unwrap();
        assert_eq!(cache(&file).lookup("a", &m), None);
        fs::write(&file, &bytes[..10]).unwrap();
        assert_eq!(cache(&file).lookup("a", &m), None);
        fs::write(&file, "").unwrap();
        assert_eq!(cache(&file).lookup("a", &m), None);
    }

    #[test]
    fn racy_files_are_not_recorded() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("a");
        fs::write(&f, "x").unwrap();
        let file = d.path().join("cache");
        let mut c = HashCache::load(file.clone());
        c.record("a", &fs::metadata(&f).unwrap(), Md5::of(b"x"));
        c.save().unwrap();
        let mut c = cache(&file);
        assert_eq!(c.lookup("a", &fs::metadata(&f).unwrap()), None);
    }
}
