//! Benchmark trees: deterministic generation, the seeded changes of W6, and the checks that a
//! destination really mirrors its source (metadata, and content byte for byte).
//!
//! Every byte comes from splitmix64 seeded per file, so the same dataset is the same bytes on
//! every machine and every run, and no two files (nor any changed file and an existing one) share
//! content: the product copies content it already holds instead of transferring it, and an
//! accidental duplicate would hand it work rsync has to do.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use xtask::fsops::SplitMix64;

/// A source tree: `files` files of `size` bytes spread evenly over `dirs` directories.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dataset {
    pub name: &'static str,
    pub files: u64,
    pub dirs: u64,
    pub size: u64,
    pub seed: u64,
}

/// Seed of one file's content: `a` and `b` mixed through splitmix64, so nearby inputs give
/// unrelated streams (file i of one dataset never equals file i+1 of another).
fn mix(a: u64, b: u64) -> u64 {
    let mut r = SplitMix64::new(a ^ b.rotate_left(29) ^ 0x5EED_0FBE_7C4D_A7A1);
    r.next_u64() ^ SplitMix64::new(b).next_u64()
}

/// Fills `buf` from `rng`: little-endian words, the last one cut short (the layout of
/// `fsops::Content::Generated`, so both generators agree).
pub fn fill(rng: &mut SplitMix64, buf: &mut [u8]) {
    for chunk in buf.chunks_mut(8) {
        let word = rng.next_u64().to_le_bytes();
        chunk.copy_from_slice(&word[..chunk.len()]);
    }
}

impl Dataset {
    /// Relative path of file `i`: `dNNNN/fNNNNNN.bin`, files dealt round-robin over the
    /// directories so each holds `files / dirs`.
    pub fn rel(&self, i: u64) -> PathBuf {
        let dir = i % self.dirs.max(1);
        PathBuf::from(format!("d{dir:04}")).join(format!("f{i:06}.bin"))
    }

    fn content_seed(&self, i: u64) -> u64 {
        mix(self.seed, i)
    }

    /// Writes the whole dataset under `root` (which must not exist yet).
    pub fn generate(&self, root: &Path) -> Result<()> {
        fs::create_dir_all(root).with_context(|| format!("mkdir {}", root.display()))?;
        for d in 0..self.dirs.min(self.files) {
            let dir = root.join(format!("d{d:04}"));
            fs::create_dir(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        }
        // One buffer for all small files; a big file is streamed through it in 1 MiB pieces.
        let mut buf = vec![0u8; self.size.min(1 << 20) as usize];
        for i in 0..self.files {
            write_generated(
                &root.join(self.rel(i)),
                self.size,
                self.content_seed(i),
                &mut buf,
            )?;
        }
        Ok(())
    }

    /// The content of file `i`, as [`generate`](Self::generate) writes it, in memory.
    pub fn file_bytes(&self, i: u64) -> Vec<u8> {
        let mut buf = vec![0u8; self.size as usize];
        fill(&mut SplitMix64::new(self.content_seed(i)), &mut buf);
        buf
    }

    /// Change round `round` of W6: rewrites `changed` existing files with new content of the
    /// same size and adds `added` new ones, all chosen and filled from seeds derived from
    /// `round`, so every run of the bench makes the same changes. Returns the paths touched.
    pub fn apply_change(
        &self,
        root: &Path,
        round: u64,
        changed: u64,
        added: u64,
    ) -> Result<Vec<PathBuf>> {
        let mut rng = SplitMix64::new(mix(self.seed ^ 0xC4A2_6E00, round));
        let mut picked = Vec::new();
        while (picked.len() as u64) < changed.min(self.files) {
            let i = rng.next_u64() % self.files;
            if !picked.contains(&i) {
                picked.push(i);
            }
        }
        let mut buf = vec![0u8; self.size.min(1 << 20) as usize];
        let mut touched = Vec::new();
        for (j, i) in picked.into_iter().enumerate() {
            let rel = self.rel(i);
            let seed = mix(self.seed ^ 0xC4A2_6E01, (round << 20) | j as u64);
            write_generated(&root.join(&rel), self.size, seed, &mut buf)?;
            touched.push(rel);
        }
        for j in 0..added {
            let dir = rng.next_u64() % self.dirs.min(self.files).max(1);
            let rel =
                PathBuf::from(format!("d{dir:04}")).join(format!("new-r{round:03}-{j:03}.bin"));
            let seed = mix(self.seed ^ 0xC4A2_6E02, (round << 20) | j);
            write_generated(&root.join(&rel), self.size, seed, &mut buf)?;
            touched.push(rel);
        }
        Ok(touched)
    }
}

/// Creates or truncates `path` and writes `size` bytes of the stream seeded with `seed`.
fn write_generated(path: &Path, size: u64, seed: u64, buf: &mut [u8]) -> Result<()> {
    let mut f = File::create(path).with_context(|| format!("create {}", path.display()))?;
    let mut rng = SplitMix64::new(seed);
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        fill(&mut rng, &mut buf[..n]);
        f.write_all(&buf[..n])
            .with_context(|| format!("write {}", path.display()))?;
        left -= n as u64;
    }
    Ok(())
}

/// What a mirror must agree on for one entry: kind, permission bits, and for a file its size
/// and mtime to the nanosecond (both tools preserve them). Content is compared apart, by
/// [`check_content`]: reading every file after every run would double the bench's reading.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Meta {
    kind: char,
    mode: u32,
    size: u64,
    mtime: (i64, i64),
}

/// Every entry under `root` (not `root` itself), by relative path.
pub fn snapshot(root: &Path) -> Result<BTreeMap<String, Meta>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, prefix)) = stack.pop() {
        for e in fs::read_dir(&dir).with_context(|| format!("list {}", dir.display()))? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            let rel = format!("{prefix}{name}");
            let m = fs::symlink_metadata(e.path())?;
            let ft = m.file_type();
            let kind = if ft.is_dir() {
                stack.push((e.path(), format!("{rel}/")));
                'd'
            } else if ft.is_file() {
                'f'
            } else if ft.is_symlink() {
                'l'
            } else {
                's'
            };
            let file = kind == 'f';
            out.insert(
                rel,
                Meta {
                    kind,
                    mode: m.permissions().mode() & 0o7777,
                    size: if file { m.len() } else { 0 },
                    mtime: if file {
                        (m.mtime(), m.mtime_nsec())
                    } else {
                        (0, 0)
                    },
                },
            );
        }
    }
    Ok(out)
}

/// Fails with the first few differences when `dst` does not mirror `src`.
pub fn check_mirror(src: &Path, dst: &Path) -> Result<()> {
    let (a, b) = (snapshot(src)?, snapshot(dst)?);
    let mut diffs = Vec::new();
    for (path, m) in &a {
        match b.get(path) {
            None => diffs.push(format!("missing {path}")),
            Some(n) if n != m => diffs.push(format!("differs {path}: {m:?} vs {n:?}")),
            _ => {}
        }
    }
    diffs.extend(
        b.keys()
            .filter(|p| !a.contains_key(*p))
            .map(|p| format!("extra {p}")),
    );
    if !diffs.is_empty() {
        let n = diffs.len();
        diffs.truncate(5);
        bail!(
            "{} does not mirror {}: {n} difference(s), e.g.\n  {}",
            dst.display(),
            src.display(),
            diffs.join("\n  ")
        );
    }
    Ok(())
}

/// The relative paths of every regular file under `root`.
pub fn files_under(root: &Path) -> Result<Vec<PathBuf>> {
    Ok(snapshot(root)?
        .into_iter()
        .filter(|(_, m)| m.kind == 'f')
        .map(|(p, _)| PathBuf::from(p))
        .collect())
}

/// Fails with the first few differences when a file of `paths` (relative) differs in content
/// between `src` and `dst`, or cannot be read on either side.
pub fn check_content(src: &Path, dst: &Path, paths: &[PathBuf]) -> Result<()> {
    let mut bufs = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut diffs = Vec::new();
    for rel in paths {
        let (a, b) = (src.join(rel), dst.join(rel));
        match same_content(&a, &b, &mut bufs) {
            Ok(true) => {}
            Ok(false) => diffs.push(format!("content of {}", rel.display())),
            Err(e) => diffs.push(format!("{}: {e:#}", rel.display())),
        }
    }
    if !diffs.is_empty() {
        let n = diffs.len();
        diffs.truncate(5);
        bail!(
            "{} does not mirror {}: {n} of {} file(s) differ in content, e.g.\n  {}",
            dst.display(),
            src.display(),
            paths.len(),
            diffs.join("\n  ")
        );
    }
    Ok(())
}

/// Whether two files hold the same bytes.
fn same_content(a: &Path, b: &Path, (ba, bb): &mut (Vec<u8>, Vec<u8>)) -> Result<bool> {
    let open = |p: &Path| File::open(p).with_context(|| format!("open {}", p.display()));
    let (mut fa, mut fb) = (open(a)?, open(b)?);
    if fa.metadata()?.len() != fb.metadata()?.len() {
        return Ok(false);
    }
    loop {
        let n = read_full(&mut fa, ba).with_context(|| format!("read {}", a.display()))?;
        let m = read_full(&mut fb, bb).with_context(|| format!("read {}", b.display()))?;
        if ba[..n] != bb[..m] {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
    }
}

/// Reads until `buf` is full or the file ends; returns the bytes read.
fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Deletes `root` and everything under it (best effort), one thread per core: unlinking a
/// million files is kernel work that spreads over cores when the threads work in different
/// directories. Returns how many entries it removed.
pub fn remove_tree_parallel(root: &Path) -> u64 {
    // Jobs are the directories two levels down (one destination or source tree each), so no
    // two threads contend for one directory; what is left is removed afterwards.
    let list = |d: &Path| -> Vec<PathBuf> {
        fs::read_dir(d)
            .map(|rd| rd.filter_map(|e| Some(e.ok()?.path())).collect())
            .unwrap_or_default()
    };
    let is_dir = |p: &Path| fs::symlink_metadata(p).is_ok_and(|m| m.is_dir());
    let jobs: Vec<PathBuf> = list(root)
        .into_iter()
        .filter(|p| is_dir(p))
        .flat_map(|p| list(&p))
        .filter(|p| is_dir(p))
        .collect();
    let jobs = std::sync::Mutex::new(jobs);
    let removed = std::sync::atomic::AtomicU64::new(0);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                while let Some(dir) = jobs.lock().unwrap_or_else(|e| e.into_inner()).pop() {
                    let n = remove_counting(&dir);
                    removed.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                }
            });
        }
    });
    removed.into_inner() + remove_counting(root)
}

/// Removes `path` and everything under it (best effort); returns the entries removed.
fn remove_counting(path: &Path) -> u64 {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return 0;
    };
    if !meta.is_dir() {
        return u64::from(fs::remove_file(path).is_ok());
    }
    let mut n = 0;
    if let Ok(rd) = fs::read_dir(path) {
        for e in rd.flatten() {
            n += remove_counting(&e.path());
        }
    }
    n + u64::from(fs::remove_dir(path).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use xtask::fsops::Content;

    const TINY: Dataset = Dataset {
        name: "tiny",
        files: 25,
        dirs: 4,
        size: 1000,
        seed: 7,
    };

    fn contents(root: &Path) -> BTreeMap<String, Vec<u8>> {
        snapshot(root)
            .unwrap()
            .into_iter()
            .filter(|(_, m)| m.kind == 'f')
            .map(|(p, _)| (p.clone(), fs::read(root.join(&p)).unwrap()))
            .collect()
    }

    #[test]
    fn generation_and_changes_are_deterministic() {
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        TINY.generate(&a).unwrap();
        TINY.generate(&b).unwrap();
        let ca = contents(&a);
        assert_eq!(ca.len(), 25);
        let rel = TINY.rel(7).to_string_lossy().into_owned();
        assert_eq!(TINY.file_bytes(7), ca[&rel]);
        assert_eq!(ca, contents(&b));
        assert!(ca.values().all(|v| v.len() == 1000));
        let distinct: std::collections::BTreeSet<_> = ca.values().collect();
        assert_eq!(distinct.len(), 25, "no two files share content");

        let ta = TINY.apply_change(&a, 1, 3, 2).unwrap();
        let tb = TINY.apply_change(&b, 1, 3, 2).unwrap();
        assert_eq!(ta, tb);
        assert_eq!(ta.len(), 5);
        let (ca2, cb2) = (contents(&a), contents(&b));
        assert_eq!(ca2, cb2);
        assert_eq!(ca2.len(), 27);
        let changed = ca.iter().filter(|(p, v)| ca2[*p] != **v).count();
        assert_eq!(changed, 3);
        let distinct: std::collections::BTreeSet<_> = ca2.values().collect();
        assert_eq!(distinct.len(), 27, "changed content duplicates no file");
    }

    #[test]
    fn fill_matches_the_scenario_generator() {
        let mut v = Vec::new();
        Content::Generated { size: 21, seed: 9 }
            .write_to(&mut v)
            .unwrap();
        let mut buf = [0u8; 21];
        fill(&mut SplitMix64::new(9), &mut buf);
        assert_eq!(v, buf);
    }

    #[test]
    fn check_mirror_finds_differences() {
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        TINY.generate(&a).unwrap();
        xtask::fsops::clone_tree(&a, &b).unwrap();
        check_mirror(&a, &b).unwrap();
        let files = files_under(&a).unwrap();
        assert_eq!(files.len(), 25);
        check_content(&a, &b, &files).unwrap();
        // Same size and mtime, other bytes: only the content check sees it.
        let f = b.join(TINY.rel(5));
        let mtime = fs::metadata(&f).unwrap().modified().unwrap();
        let mut bytes = fs::read(&f).unwrap();
        bytes[999] ^= 1;
        fs::write(&f, &bytes).unwrap();
        File::options()
            .write(true)
            .open(&f)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        check_mirror(&a, &b).unwrap();
        let err = check_content(&a, &b, &files).unwrap_err().to_string();
        assert!(err.contains("1 of 25 file(s) differ"), "{err}");
        check_content(&a, &b, &[TINY.rel(4)]).unwrap();
        fs::remove_file(b.join(TINY.rel(3))).unwrap();
        fs::write(b.join("extra"), "x").unwrap();
        let err = check_mirror(&a, &b).unwrap_err().to_string();
        assert!(err.contains("2 difference(s)"), "{err}");
        // 25 files and 4 directories under each of a and b, plus a, b and the root itself.
        assert_eq!(remove_tree_parallel(&t.path().join("x")), 0);
        assert_eq!(remove_tree_parallel(t.path()), 2 * (25 + 4) + 3);
        assert!(!t.path().exists());
    }
}
