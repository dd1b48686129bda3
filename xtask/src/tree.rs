//! Directory listings: scan a tree (kind, mode, size, MD5, mtime, symlink target), compare two, render.
//!
//! The listing is the harness's notion of "what a mirror must reproduce": it ignores nothing under
//! the root (temporary files included), so a stray file fails the comparison. The integration
//! tests use the same scan (leniently, through [`Tree::scan_lenient`] and [`Tree::listing`]).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use md5::{Digest, Md5};
use serde::Deserialize;

/// The kind of a tree entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    File,
    Dir,
    Symlink,
    /// FIFOs, sockets and devices: never part of a mirror, but listed so that they are seen.
    Special,
}

impl Kind {
    fn letter(self) -> char {
        match self {
            Kind::File => 'f',
            Kind::Dir => 'd',
            Kind::Symlink => 'l',
            Kind::Special => 's',
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::File => "file",
            Kind::Dir => "dir",
            Kind::Symlink => "symlink",
            Kind::Special => "special file",
        }
    }
}

/// How precisely modification times must agree for two entries to be the same.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MtimePrecision {
    /// Exactly, to the nanosecond.
    Ns,
    /// To the whole second (what most tools and file systems promise).
    #[default]
    Second,
    /// Not compared at all.
    Ignore,
}

/// One entry of a tree; `path` is relative to the root with `/` separators.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub path: String,
    pub kind: Kind,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// Byte size of files; 0 for everything else (directory sizes depend on the file system).
    pub size: u64,
    /// Hex MD5 of files.
    pub md5: Option<String>,
    /// Target of symlinks, as stored (never followed).
    pub target: Option<String>,
    pub mtime: (i64, u32),
    /// Which kind of special file: `"fifo"`, `"socket"` or `"device"`; `None` for other kinds.
    pub special: Option<&'static str>,
}

/// A scanned tree, sorted by path.
#[derive(Clone, Debug)]
pub struct Tree {
    pub root: PathBuf,
    pub entries: BTreeMap<String, Entry>,
    /// What a lenient scan could not read, by path (`.` for the root): `cannot list: …`,
    /// `cannot stat: …` or `unreadable: …` (a file's content, whose entry then has no MD5).
    /// Always empty after a strict [`Tree::scan`], which fails instead.
    pub problems: BTreeMap<String, String>,
}

/// Hex MD5 of a file's content, streamed.
pub fn md5_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut hasher = Md5::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// Hex MD5 of bytes in memory.
pub fn md5_bytes(bytes: &[u8]) -> String {
    hex(&Md5::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::with_capacity(32), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Reads one entry (not following symlinks); `rel` is its listing path.
pub fn entry_at(path: &Path, rel: &str) -> Result<Entry> {
    let mut e = stat_entry(path, rel)?;
    if e.kind == Kind::File {
        e.md5 = Some(md5_file(path)?);
    }
    Ok(e)
}

/// Everything about one entry but the MD5 of a file's content.
fn stat_entry(path: &Path, rel: &str) -> Result<Entry> {
    let meta = fs::symlink_metadata(path).with_context(|| format!("stat {}", path.display()))?;
    let ft = meta.file_type();
    let (kind, special) = if ft.is_symlink() {
        (Kind::Symlink, None)
    } else if ft.is_dir() {
        (Kind::Dir, None)
    } else if ft.is_file() {
        (Kind::File, None)
    } else if ft.is_fifo() {
        (Kind::Special, Some("fifo"))
    } else if ft.is_socket() {
        (Kind::Special, Some("socket"))
    } else {
        (Kind::Special, Some("device"))
    };
    Ok(Entry {
        path: rel.to_string(),
        kind,
        mode: meta.mode() & 0o7777,
        size: if kind == Kind::File { meta.len() } else { 0 },
        md5: None,
        target: if kind == Kind::Symlink {
            let t = fs::read_link(path).with_context(|| format!("readlink {}", path.display()))?;
            Some(t.to_string_lossy().into_owned())
        } else {
            None
        },
        mtime: (meta.mtime(), meta.mtime_nsec() as u32),
        special,
    })
}

impl Tree {
    /// Scans everything under `root` (the root itself is not an entry). A missing root is empty.
    /// Anything that cannot be read fails the scan.
    pub fn scan(root: &Path) -> Result<Tree> {
        let mut w = Walk::new(root, false);
        if root.exists() {
            w.dir(root, "")?;
        }
        Ok(w.into_tree())
    }

    /// [`Tree::scan`] without reading any file's content (no MD5s): a cheap first look for a
    /// wait that compares two trees again and again while a sync is under way. Two such trees
    /// that differ differ in full too; two that match must still be compared in full.
    pub fn scan_stat(root: &Path) -> Result<Tree> {
        let mut w = Walk::new(root, false);
        w.hash = false;
        if root.exists() {
            w.dir(root, "")?;
        }
        Ok(w.into_tree())
    }

    /// Scans everything under `root`, recording what cannot be read in [`Tree::problems`]
    /// instead of failing (for tests that make entries unreadable on purpose).
    pub fn scan_lenient(root: &Path) -> Tree {
        let mut w = Walk::new(root, true);
        w.dir(root, "")
            .expect("a lenient walk records problems instead of failing");
        w.into_tree()
    }

    /// The tree as sorted text lines, one per entry, for tests that compare two trees as text:
    /// `path file SIZE MD5 MODE MTIME`, `path dir MODE MTIME`, `path -> TARGET MTIME`,
    /// `path fifo|socket|device MODE`, and `path <problem>` for what could not be read (a file
    /// whose content cannot be read shows `<unreadable: …>` in place of its MD5). MTIME is
    /// `SECONDS.NANOSECONDS`.
    pub fn listing(&self) -> String {
        let mut lines = Vec::with_capacity(self.entries.len() + self.problems.len());
        for e in self.entries.values() {
            let p = &e.path;
            let (mode, mtime) = (e.mode, format!("{}.{:09}", e.mtime.0, e.mtime.1));
            lines.push(match e.kind {
                Kind::File => {
                    let md5 = match (&e.md5, self.problems.get(p)) {
                        (Some(m), _) => m.clone(),
                        (None, problem) => format!("<{}>", problem.map_or("no md5", |s| s)),
                    };
                    format!("{p} file {} {md5} {mode:04o} {mtime}", e.size)
                }
                Kind::Dir => format!("{p} dir {mode:04o} {mtime}"),
                Kind::Symlink => format!("{p} -> {} {mtime}", e.target.as_deref().unwrap_or("")),
                Kind::Special => format!("{p} {} {mode:04o}", e.special.unwrap_or("special")),
            });
        }
        for (p, problem) in &self.problems {
            if self.entries.get(p).is_none_or(|e| e.kind != Kind::File) {
                lines.push(format!("{p} <{problem}>"));
            }
        }
        lines.sort();
        lines.into_iter().map(|l| l + "\n").collect()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// One line per entry, for people: kind, mode, size, MD5, mtime (UTC), path, symlink target.
    pub fn render(&self, with_mtime: bool, limit: usize) -> String {
        let mut out = String::new();
        if self.entries.is_empty() {
            out.push_str("(empty)\n");
        }
        for (i, e) in self.entries.values().enumerate() {
            if i == limit {
                let _ = writeln!(out, "… and {} more entries", self.entries.len() - limit);
                break;
            }
            out.push_str(&render_entry(e, with_mtime));
            out.push('\n');
        }
        out
    }

    /// Files whose name contains `marker` (the implementation's temporary files).
    pub fn temp_files(&self, marker: &str) -> Vec<String> {
        self.entries
            .keys()
            .filter(|p| p.rsplit('/').next().is_some_and(|n| n.contains(marker)))
            .cloned()
            .collect()
    }
}

/// One scan in progress: strict (the first problem is the error) or lenient (problems recorded).
struct Walk {
    root: PathBuf,
    lenient: bool,
    /// Whether files' MD5s are computed.
    hash: bool,
    entries: BTreeMap<String, Entry>,
    problems: BTreeMap<String, String>,
}

impl Walk {
    fn new(root: &Path, lenient: bool) -> Walk {
        Walk {
            root: root.to_path_buf(),
            lenient,
            hash: true,
            entries: BTreeMap::new(),
            problems: BTreeMap::new(),
        }
    }

    fn into_tree(self) -> Tree {
        Tree {
            root: self.root,
            entries: self.entries,
            problems: self.problems,
        }
    }

    /// Strict: fails with `e`. Lenient: notes `what: cause` for `rel` and carries on.
    fn problem(&mut self, rel: &str, what: &str, e: anyhow::Error) -> Result<()> {
        if !self.lenient {
            return Err(e);
        }
        let rel = if rel.is_empty() { "." } else { rel };
        self.problems
            .insert(rel.to_string(), format!("{what}: {}", e.root_cause()));
        Ok(())
    }

    fn dir(&mut self, dir: &Path, prefix: &str) -> Result<()> {
        let rd = match fs::read_dir(dir) {
            Ok(rd) => rd,
            Err(e) => {
                let e = anyhow::Error::new(e).context(format!("read dir {}", dir.display()));
                return self.problem(prefix, "cannot list", e);
            }
        };
        for item in rd {
            let item = item.with_context(|| format!("read dir {}", dir.display()))?;
            let name = item.file_name().to_string_lossy().into_owned();
            let rel = if prefix.is_empty() {
                name
            } else {
                format!("{prefix}/{name}")
            };
            let path = item.path();
            let mut entry = match stat_entry(&path, &rel) {
                Ok(e) => e,
                Err(e) => {
                    self.problem(&rel, "cannot stat", e)?;
                    continue;
                }
            };
            if entry.kind == Kind::File && self.hash {
                match md5_file(&path) {
                    Ok(m) => entry.md5 = Some(m),
                    Err(e) => self.problem(&rel, "unreadable", e)?,
                }
            }
            let is_dir = entry.kind == Kind::Dir;
            self.entries.insert(rel.clone(), entry);
            if is_dir {
                self.dir(&path, &rel)?;
            }
        }
        Ok(())
    }
}

/// Shows a path as is, unless it holds control characters (then quoted and escaped).
pub fn show_path(p: &str) -> String {
    if p.chars().any(char::is_control) {
        format!("{p:?}")
    } else {
        p.to_string()
    }
}

/// `f 0644        12 5d41…c592  2026-01-02 03:04:05.123456789  hello.txt`
pub fn render_entry(e: &Entry, with_mtime: bool) -> String {
    let mut s = format!("{} {:04o} ", e.kind.letter(), e.mode);
    match e.kind {
        Kind::File => {
            let _ = write!(s, "{:>9} {}", e.size, e.md5.as_deref().unwrap_or(""));
        }
        _ => {
            let _ = write!(s, "{:>9} {:32}", "-", "");
        }
    }
    if with_mtime {
        let _ = write!(s, "  {}", format_time(e.mtime.0, e.mtime.1));
    }
    let _ = write!(s, "  {}", show_path(&e.path));
    match e.kind {
        Kind::Dir => s.push('/'),
        Kind::Symlink => {
            let _ = write!(s, " -> {}", e.target.as_deref().unwrap_or(""));
        }
        _ => {}
    }
    s
}

/// UTC `YYYY-MM-DD hh:mm:ss.nnnnnnnnn` without a date-time crate (civil-from-days algorithm).
pub fn format_time(secs: i64, nanos: u32) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{nanos:09}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// (year, month, day) to days since 1970-01-01; the inverse of `civil_from_days`.
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// What differs between two entries at the same path (empty when they agree).
pub fn entry_differences(a: &Entry, b: &Entry, mtime: MtimePrecision) -> Vec<String> {
    let mut d = Vec::new();
    if a.kind != b.kind {
        d.push(format!("kind {} vs {}", a.kind.name(), b.kind.name()));
        return d;
    }
    if a.size != b.size {
        d.push(format!("size {} vs {}", a.size, b.size));
    }
    if a.md5 != b.md5 {
        d.push(format!(
            "md5 {} vs {}",
            a.md5.as_deref().unwrap_or("-"),
            b.md5.as_deref().unwrap_or("-")
        ));
    }
    if a.target != b.target {
        d.push(format!(
            "target {} vs {}",
            a.target.as_deref().unwrap_or("-"),
            b.target.as_deref().unwrap_or("-")
        ));
    }
    if a.mode != b.mode {
        d.push(format!("mode {:04o} vs {:04o}", a.mode, b.mode));
    }
    // Symlink times are not part of the mirror contract (only files and directories are), and
    // special files never reach the mirror.
    let timed = matches!(a.kind, Kind::File | Kind::Dir);
    let mtime_differs = match mtime {
        MtimePrecision::Ns => a.mtime != b.mtime,
        MtimePrecision::Second => a.mtime.0 != b.mtime.0,
        MtimePrecision::Ignore => false,
    };
    if timed && mtime_differs {
        d.push(format!(
            "mtime {} vs {}",
            format_time(a.mtime.0, a.mtime.1),
            format_time(b.mtime.0, b.mtime.1)
        ));
    }
    d
}

/// A readable diff of two trees, one line per differing path; empty when identical.
///
/// `-` only in the first tree, `+` only in the second, `~` in both but different.
pub fn diff(a: &Tree, b: &Tree, a_name: &str, b_name: &str, mtime: MtimePrecision) -> Vec<String> {
    let mut out = Vec::new();
    let mut ia = a.entries.values().peekable();
    let mut ib = b.entries.values().peekable();
    loop {
        match (ia.peek(), ib.peek()) {
            (None, None) => break,
            (Some(x), Some(y)) if x.path == y.path => {
                let d = entry_differences(x, y, mtime);
                if !d.is_empty() {
                    out.push(format!(
                        "~ {}: {} ({a_name} vs {b_name})",
                        show_path(&x.path),
                        d.join(", ")
                    ));
                }
                ia.next();
                ib.next();
            }
            (Some(x), y) if y.is_none_or(|y| x.path < y.path) => {
                out.push(format!(
                    "- {}: {} only in {a_name}",
                    show_path(&x.path),
                    x.kind.name()
                ));
                ia.next();
            }
            (_, Some(y)) => {
                out.push(format!(
                    "+ {}: {} only in {b_name}",
                    show_path(&y.path),
                    y.kind.name()
                ));
                ib.next();
            }
            (Some(_), None) => unreachable!("handled by the guard above"),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_round_trip() {
        assert_eq!(format_time(0, 0), "1970-01-01 00:00:00.000000000");
        assert_eq!(
            format_time(1_000_000_000, 5),
            "2001-09-09 01:46:40.000000005"
        );
        assert_eq!(days_from_civil(2001, 9, 9), 11_574);
        for days in [-800_000, -1, 0, 59, 60, 11_017, 20_000, 2_000_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn md5_of_known_values() {
        assert_eq!(md5_bytes(b""), "d41d8cd98f00b204e9800998ecf8427e");
        assert_eq!(md5_bytes(b"hello"), "5d41402abc4b2a76b9719d911017c592");
    }

    #[test]
    fn diff_lists_every_kind_of_difference() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        for d in [&a, &b] {
            fs::create_dir(d).unwrap();
            fs::write(d.join("same.txt"), "x").unwrap();
        }
        fs::write(a.join("only-a.txt"), "a").unwrap();
        fs::write(b.join("only-b.txt"), "b").unwrap();
        fs::write(a.join("changed.txt"), "one").unwrap();
        fs::write(b.join("changed.txt"), "three").unwrap();
        let (ta, tb) = (Tree::scan(&a).unwrap(), Tree::scan(&b).unwrap());
        let d = diff(&ta, &tb, "client", "server", MtimePrecision::Ignore);
        assert_eq!(d.len(), 3, "{d:?}");
        assert!(
            d[0].starts_with("~ changed.txt: size 3 vs 5, md5 "),
            "{d:?}"
        );
        assert_eq!(d[1], "- only-a.txt: file only in client");
        assert_eq!(d[2], "+ only-b.txt: file only in server");
    }

    #[test]
    fn lenient_listing_shows_every_kind_and_what_it_cannot_read() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        // Through fsops, which sets modes exactly (whatever the umask).
        let hello = crate::fsops::Content::Text("hello".into());
        crate::fsops::write(&root.join("a.txt"), &hello, None).unwrap();
        crate::fsops::mkdir_p(&root.join("d"), 0o755).unwrap();
        std::os::unix::fs::symlink("a.txt", root.join("l")).unwrap();
        crate::fsops::mkfifo(&root.join("p")).unwrap();
        crate::fsops::set_mtime(&root.join("a.txt"), 86_400, 5).unwrap();
        let t = Tree::scan_lenient(root);
        let listing = t.listing();
        let lines: Vec<&str> = listing.lines().collect();
        assert_eq!(lines.len(), 4, "{listing}");
        assert_eq!(
            lines[0],
            "a.txt file 5 5d41402abc4b2a76b9719d911017c592 0644 86400.000000005"
        );
        assert!(lines[1].starts_with("d dir 0755 "), "{listing}");
        assert!(lines[2].starts_with("l -> a.txt "), "{listing}");
        assert_eq!(lines[3], "p fifo 0644");
        assert!(t.problems.is_empty());

        // A missing root is a problem of ".", not a failure; the strict scan calls it empty.
        let gone = root.join("gone");
        assert!(
            Tree::scan_lenient(&gone)
                .listing()
                .starts_with(". <cannot list: ")
        );
        assert!(Tree::scan(&gone).unwrap().is_empty());
    }
}
