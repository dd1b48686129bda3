//! What identifies one version of a file without reading it, and when that may be trusted.

/// Files modified this close to a scan are not cached: a write later in the same clock tick
/// would leave size and mtime unchanged (git's "racily clean" problem).
pub const RACY_NS: i64 = 2_000_000_000;

/// Size, mtime, ctime, inode and device of a file. A cached hash is trusted only while all
/// five match: a file rewritten with its old mtime restored still changes ctime, and a file
/// replaced by another (rename over it) changes inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub ino: u64,
    pub dev: u64,
}

impl Stamp {
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether a file with this stamp, read at time `at_ns`, may be cached: not when it
    /// changed less than 2 s before, since a later write in the same clock tick could leave
    /// the stamp as it is.
    pub fn settled_at(&self, at_ns: i64) -> bool {
        at_ns - self.mtime_ns.max(self.ctime_ns) >= RACY_NS
    }

    /// Whether a file this process has just written, verified and given an mtime of its
    /// peer's, may be cached at once: yes when that mtime is at least 2 s older than `at_ns`.
    /// Its ctime is recent (the write, the rename), but any later write moves the mtime to
    /// the present, away from the old one recorded, so a change in the same clock tick is
    /// still seen. (A writer that also puts the mtime back within that tick is not: the
    /// price of not reading every received file again.)
    pub fn settled_own_write(&self, at_ns: i64) -> bool {
        at_ns - self.mtime_ns >= RACY_NS
    }
}
