//! Waiting until a change is on the server: a fine-grained poll of the paths the step changed,
//! the same for every tool.
//!
//! The poll reads the server's directory with plain stat, open and read calls (no inotify on
//! it: an event says something was written, not that the content is complete). It checks only
//! what the step changed, because a whole-tree comparison of 100,000 files takes about a second
//! and would swamp millisecond figures; the whole tree is compared once afterwards, untimed.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{ErrorKind, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The shortest pause between two passes: fine next to the millisecond figures measured, and
/// long enough that an idle wait costs the tools little CPU.
const MIN_PAUSE: Duration = Duration::from_micros(500);

/// What one changed path must look like on the server.
#[derive(Clone, Debug)]
pub enum Expect {
    /// A regular file holding exactly these bytes.
    File { rel: PathBuf, bytes: Vec<u8> },
    /// Nothing at all at this path.
    Absent(PathBuf),
    /// A directory whose entries are exactly these names. For a renamed directory: both tools
    /// write a file under a temporary name and rename it into place, so a final name is a
    /// complete file and a temporary one is an extra name; listing the names takes one pass of
    /// getdents where reading 10,000 files would take tens of milliseconds.
    Names {
        rel: PathBuf,
        names: BTreeSet<OsString>,
    },
}

impl Expect {
    /// Whether the path under `root` looks as expected now; `buf` is scratch space.
    pub fn holds(&self, root: &Path, buf: &mut Vec<u8>) -> bool {
        match self {
            Expect::File { rel, bytes } => file_holds(&root.join(rel), bytes, buf),
            Expect::Absent(rel) => {
                matches!(fs::symlink_metadata(root.join(rel)), Err(e) if e.kind() == ErrorKind::NotFound)
            }
            Expect::Names { rel, names } => names_hold(&root.join(rel), names),
        }
    }

    /// The path this expectation is about, for messages.
    pub fn rel(&self) -> &Path {
        match self {
            Expect::File { rel, .. } | Expect::Absent(rel) | Expect::Names { rel, .. } => rel,
        }
    }
}

fn file_holds(path: &Path, want: &[u8], buf: &mut Vec<u8>) -> bool {
    let Ok(mut f) = File::open(path) else {
        return false;
    };
    match f.metadata() {
        Ok(m) if m.is_file() && m.len() == want.len() as u64 => {}
        _ => return false,
    }
    buf.clear();
    f.read_to_end(buf).is_ok() && buf.as_slice() == want
}

fn names_hold(dir: &Path, names: &BTreeSet<OsString>) -> bool {
    let Ok(entries) = fs::read_dir(dir) else {
        return false;
    };
    let mut seen = 0;
    for e in entries {
        match e {
            Ok(e) if names.contains(&e.file_name()) => seen += 1,
            _ => return false,
        }
    }
    // Names in a directory are unique: as many as expected, none unexpected, means the same set.
    seen == names.len()
}

/// How a wait ended.
#[derive(Debug, PartialEq)]
pub enum Waited {
    /// Everything held: the time from `t0` to the end of the first pass that found it so.
    Identical(Duration),
    /// Still not so at the deadline: how many expectations were left, and the first of them.
    Timeout { left: usize, first: PathBuf },
}

/// Polls `root` until every expectation holds, or until `timeout` after `t0`.
///
/// Expectations are checked in order, each until it first holds (what has arrived is not read
/// again: the whole tree is compared afterwards), and a pass stops at the first one that does not
/// hold yet, so a pass is cheap while the tool is still busy. Between passes the poll pauses as
/// long as the pass took, at least [`MIN_PAUSE`], so it never takes more than half a core from
/// the tools it waits for.
pub fn wait_identical(root: &Path, expects: &[Expect], t0: Instant, timeout: Duration) -> Waited {
    let mut next = 0;
    let mut buf = Vec::new();
    loop {
        let pass = Instant::now();
        while next < expects.len() && expects[next].holds(root, &mut buf) {
            next += 1;
        }
        if next == expects.len() {
            return Waited::Identical(t0.elapsed());
        }
        if t0.elapsed() >= timeout {
            return Waited::Timeout {
                left: expects.len() - next,
                first: expects[next].rel().to_owned(),
            };
        }
        std::thread::sleep(pass.elapsed().max(MIN_PAUSE));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_and_times_out() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        fs::create_dir(root.join("d")).unwrap();
        fs::write(root.join("d/a"), "abc").unwrap();
        fs::write(root.join("d/b"), "").unwrap();
        let file = |rel: &str, bytes: &str| Expect::File {
            rel: rel.into(),
            bytes: bytes.into(),
        };
        let names = |v: &[&str]| Expect::Names {
            rel: "d".into(),
            names: v.iter().map(OsString::from).collect(),
        };
        let mut buf = Vec::new();
        assert!(file("d/a", "abc").holds(root, &mut buf));
        assert!(!file("d/a", "abd").holds(root, &mut buf));
        assert!(!file("d/a", "abcd").holds(root, &mut buf));
        assert!(
            !file("d", "").holds(root, &mut buf),
            "a directory is no file"
        );
        assert!(Expect::Absent("x".into()).holds(root, &mut buf));
        assert!(!Expect::Absent("d/b".into()).holds(root, &mut buf));
        assert!(names(&["a", "b"]).holds(root, &mut buf));
        assert!(!names(&["a"]).holds(root, &mut buf), "an extra name");
        assert!(
            !names(&["a", "b", "c"]).holds(root, &mut buf),
            "a missing name"
        );

        let all = [file("d/a", "abc"), names(&["a", "b"])];
        let t0 = Instant::now();
        assert!(matches!(
            wait_identical(root, &all, t0, Duration::from_secs(60)),
            Waited::Identical(_)
        ));
        let never = [file("d/a", "abc"), Expect::Absent("d/b".into()), names(&[])];
        assert_eq!(
            wait_identical(root, &never, Instant::now(), Duration::ZERO),
            Waited::Timeout {
                left: 2,
                first: "d/b".into()
            }
        );
    }
}
