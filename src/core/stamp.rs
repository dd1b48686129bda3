//! What identifies one version of a file without reading it, and when that may be trusted.

/// Files modified this close to a scan are not cached: a write later in the same clock tick
/// would leave size and mtime unchanged (git's "racily clean" problem). Two seconds: the
/// coarsest timestamps of a file system Linux mounts (FAT's mtime).
pub const RACY_NS: i64 = 2_000_000_000;
/// The same for a file system that keeps timestamps to the nanosecond (ext4, XFS, Btrfs,
/// tmpfs, …): it stamps writes from the kernel's coarse clock, whose tick is 1 to 10 ms, so a
/// write one tick after a reading already carries a later time. Ten ticks of the slowest
/// clock, for margin.
pub const FINE_RACY_NS: i64 = 100_000_000;

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
    /// changed less than one clock tick of its file system before (see [`Stamp::window`]),
    /// since a later write in the same tick could leave the stamp as it is.
    pub fn settled_at(&self, at_ns: i64) -> bool {
        at_ns - self.mtime_ns.max(self.ctime_ns) >= self.window(self.mtime_ns)
    }

    /// Whether a file this process has just written, verified and given an mtime of its
    /// peer's, may be cached at once: yes when that mtime is older than `at_ns` by more than
    /// a tick of this file system's clock. Its ctime is recent (the write, the rename), but
    /// any later write moves the mtime to the present, away from the old one recorded, so a
    /// change in the same clock tick is still seen. (A writer that also puts the mtime back
    /// within that tick is not: the price of not reading every received file again.)
    pub fn settled_own_write(&self, at_ns: i64) -> bool {
        // The mtime is the peer's, and says nothing of this file system: its ctime does.
        at_ns - self.mtime_ns >= self.window(self.ctime_ns)
    }

    /// How long after a change this file's stamp can be trusted: [`FINE_RACY_NS`] when its
    /// times (`time_ns` and the ctime this file system set) have detail below a millisecond,
    /// which only a file system keeping nanoseconds gives (by chance, one file in a million
    /// has none, and just waits longer); [`RACY_NS`] otherwise (FAT, exFAT, HFS+, ext4 with
    /// small inodes, and whatever else keeps coarse times).
    fn window(&self, time_ns: i64) -> i64 {
        let fine = |t: i64| t % 1_000_000 != 0;
        match fine(time_ns) && fine(self.ctime_ns) {
            true => FINE_RACY_NS,
            false => RACY_NS,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(mtime_ns: i64, ctime_ns: i64) -> Stamp {
        Stamp {
            size: 1,
            mtime_ns,
            ctime_ns,
            ino: 1,
            dev: 1,
        }
    }

    const NOW: i64 = 1_800_000_000_000_000_000;

    /// (mtime before now, ctime before now, whole milliseconds only, settled): one line each.
    #[test]
    fn a_stamp_is_trusted_one_tick_of_its_file_system_after_its_last_change() {
        let cases: &[(i64, i64, bool, bool)] = &[
            (150_000_000, 150_000_000, false, true),
            (50_000_000, 150_000_000, false, false),
            (150_000_000, 50_000_000, false, false),
            (1_500_000_000, 1_500_000_000, true, false),
            (2_500_000_000, 2_500_000_000, true, true),
            (-1, -1, false, false),
        ];
        for &(m, c, coarse, settled) in cases {
            let detail = if coarse { 0 } else { 123 };
            let s = stamp(NOW - m - detail, NOW - c - detail);
            assert_eq!(s.settled_at(NOW), settled, "{m} {c} {coarse}");
        }
    }

    #[test]
    fn an_own_write_is_trusted_by_its_old_mtime_on_this_file_system() {
        // The peer's mtime 150 ms old, our ctime just now: fine here, coarse here.
        assert!(stamp(NOW - 150_000_123, NOW - 123).settled_own_write(NOW));
        assert!(!stamp(NOW - 150_000_123, NOW - 1_000_000).settled_own_write(NOW));
        assert!(stamp(NOW - 2_000_000_123, NOW - 1_000_000).settled_own_write(NOW));
        assert!(!stamp(NOW - 50_000_123, NOW - 123).settled_own_write(NOW));
    }
}
