//! End-to-end tests of the two binaries as a user runs them: the seven seed cases, what the
//! mirror must get right (directories, names, metadata, symlinks, special files, a large file,
//! confinement, unreadable files, concurrent clients), and every command-line error and exit
//! status. Each test runs a real `server-sync` on ports the system picks and `client-sync`
//! against it, then compares the two trees as text.

mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use support::*;

// ---------------------------------------------------------------------------------------------
// The sync cases, as data

/// One sync scenario: both sides start from `before` (applied, synced, checked mirrored), then
/// `change` is applied on either side and the sync under test runs.
#[derive(Default)]
struct Case {
    before: Vec<Step>,
    change: Vec<Step>,
    /// Server log lines the sync under test must print.
    logs: &'static [&'static str],
    /// Server log text the sync under test must not print.
    no_logs: &'static [&'static str],
}

/// The summary of a sync that had nothing to do.
const NOTHING_DONE: &str = "requested=0 copied=0 renamed=0 deleted=0 failed=0 bytes=0";

/// Runs a case on a fresh world; returns the world and the output of the sync under test.
fn check(case: Case) -> (World, Output) {
    check_in(World::start(&[]), case)
}

fn check_in(w: World, case: Case) -> (World, Output) {
    w.apply(&case.before);
    w.sync_ok();
    w.assert_mirrored();

    w.apply(&case.change);
    let mark = w.mark();
    let out = w.sync_ok();
    w.assert_mirrored();
    for l in case.logs {
        w.assert_logged(mark, l);
    }
    for l in case.no_logs {
        w.assert_not_logged(mark, l);
    }

    // A mirror is stable: the next sync finds nothing to do.
    let mark = w.mark();
    let again = w.sync_ok();
    assert_eq!(
        summary(&again),
        NOTHING_DONE,
        "a second sync still had work to do"
    );
    for verb in ["Requesting", "Copying", "Renaming", "Deleting", "Creating"] {
        w.assert_not_logged(mark, verb);
    }
    w.assert_contained();
    (w, out)
}

#[test]
fn seed_001_file_added_on_client_is_sent() {
    let (_w, out) = check(Case {
        change: vec![write("test001.txt", "content of test 001\n")],
        logs: &[
            "Requesting file: test001.txt",
            "Received file: test001.txt (20 bytes, blake3 ok)",
        ],
        ..Case::default()
    });
    let log = stdout(&out);
    for line in [
        "Sending file list: 1 entries, 20 bytes",
        "Sending file: test001.txt",
        "sync:done",
    ] {
        assert!(log.contains(line), "client did not log {line:?}");
    }
    assert_eq!(
        summary(&out),
        "requested=1 copied=0 renamed=0 deleted=0 failed=0 bytes=20"
    );
}

#[test]
fn seed_002_file_deleted_on_client_is_deleted() {
    check(Case {
        before: vec![write("test002.txt", "two")],
        change: vec![rm("test002.txt")],
        logs: &["Deleting file: test002.txt"],
        no_logs: &["Requesting file"],
    });
}

#[test]
fn seed_003_rename_on_client_is_a_rename_not_a_transfer() {
    check(Case {
        before: vec![write("test003a.txt", "three")],
        change: vec![mv("test003a.txt", "test003b.txt")],
        logs: &["Copying file: test003a.txt and renaming to test003b.txt (moved)"],
        no_logs: &["Requesting file", "Deleting file"],
    });
}

#[test]
fn seed_004_modified_file_is_sent_again() {
    check(Case {
        before: vec![write("test004.txt", "old")],
        change: vec![write("test004.txt", "new content")],
        logs: &[
            "Requesting file: test004.txt",
            "Received file: test004.txt (11 bytes, blake3 ok)",
        ],
        ..Case::default()
    });
}

#[test]
fn seed_005_duplicate_md5_is_copied_locally() {
    check(Case {
        before: vec![write("test005a.txt", "five")],
        change: vec![write("test005b.txt", "five")],
        logs: &["Copying file: test005a.txt and renaming to test005b.txt"],
        no_logs: &["Requesting file"],
    });
}

#[test]
fn seed_006_file_added_on_server_is_removed() {
    check(Case {
        before: vec![write("test006.txt", "six")],
        change: vec![write("added-on-server.txt", "not the client's").on_server()],
        logs: &["Deleting file: added-on-server.txt"],
        no_logs: &["Requesting file"],
    });
}

#[test]
fn seed_007_file_deleted_on_server_is_sent_again() {
    check(Case {
        before: vec![write("test007.txt", "seven")],
        change: vec![rm("test007.txt").on_server()],
        logs: &[
            "Requesting file: test007.txt",
            "Received file: test007.txt (5 bytes, blake3 ok)",
        ],
        ..Case::default()
    });
}

/// The public MD5 collision pair: `one` and `two` share an MD5 and differ in six bytes. With
/// the default hash the server must not take one for the other, neither for a local copy of
/// new content nor for a file overwritten in place by its twin. (Tree listings compare by MD5
/// too, so the bytes are compared directly.)
#[test]
fn md5_collisions_mirror_exactly_with_the_default_hash() {
    let (a, b) = server_sync::core::hash::md5_collision_pair();
    let w = World::start(&[]);
    w.apply(&[write("one", &a)]);
    w.sync_ok();
    w.apply(&[write("two", &b)]);
    let mark = w.mark();
    w.sync_ok();
    w.assert_logged(mark, "Requesting file: two");
    w.assert_not_logged(mark, "Copying file");
    assert_eq!(fs::read(w.server_dir.join("two")).unwrap(), b);

    // Overwritten in place by its twin: same size, same MD5, other bytes.
    let mtime = fs::metadata(w.client.join("one"))
        .unwrap()
        .modified()
        .unwrap();
    w.apply(&[write("one", &b)]);
    fs::File::options()
        .write(true)
        .open(w.client.join("one"))
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    w.sync_ok();
    assert_eq!(fs::read(w.server_dir.join("one")).unwrap(), b);
    w.assert_mirrored();
}

/// `--hash md5` is the seed's behaviour: MD5 on the wire and in the log, and trusted for
/// local copies, which the help text warns about.
#[test]
fn hash_md5_is_the_seeds_behaviour() {
    let w = World::start(&[]);
    w.apply(&[write("a.txt", "hello")]);
    let mut cmd = w.client_command(&w.client);
    cmd.args(["--hash", "md5"]);
    let mark = w.mark();
    let out = w.run(cmd);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    w.assert_logged(mark, "connected (md5)");
    w.assert_logged(mark, "Received file: a.txt (5 bytes, md5 ok)");
    w.assert_mirrored();
    // Then the default: a session of its own algorithm, not fooled by the other's cache.
    w.apply(&[write("b.txt", "hello")]);
    let mark = w.mark();
    w.sync_ok();
    w.assert_logged(mark, "connected (blake3)");
    w.assert_logged(mark, "Copying file: a.txt and renaming to b.txt");
    w.assert_mirrored();

    let mut bad = w.client_command(&w.client);
    bad.args(["--hash", "sha1"]);
    let out = w.run(bad);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("unknown hash algorithm"),
        "{}",
        stderr(&out)
    );
}

/// A file the server has just received and verified is not read again at the next session:
/// its hash is cached with the stamp it has in place. (Its mtime, the client's, is old; a
/// file whose mtime is recent is hashed again, see the next test.)
#[test]
fn a_received_file_is_not_hashed_again() {
    let w = World::start(&["-v"]);
    w.apply(&[write("a.txt", "content"), mtime("a.txt", 1_600_000_000, 0)]);
    w.sync_ok();
    let mark = w.mark();
    let out = w.sync_ok();
    assert_eq!(summary(&out), NOTHING_DONE);
    w.assert_logged(mark, "hash cache: 1 hits, 0 misses");
}

/// The racy window stays honest for the server's own writes: a file changed on the server
/// right after it was placed, in the same clock tick, with the same size, is still noticed.
#[test]
fn a_write_right_after_placing_is_noticed() {
    let w = World::start(&["-v"]);
    w.apply(&[write("a.txt", "content"), mtime("a.txt", 1_600_000_000, 0)]);
    w.sync_ok();
    // At once: the same size, other bytes.
    fs::write(w.server_dir.join("a.txt"), "CONTENT").unwrap();
    let mark = w.mark();
    w.sync_ok();
    w.assert_logged(mark, "Requesting file: a.txt");
    w.assert_mirrored();

    // A file whose own mtime is recent is not trusted at once: hashed again next time. (An
    // hour ahead: recent whatever the speed of this machine; with nanoseconds, as a file
    // system that keeps them would give.)
    let soon = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
        + 3600;
    w.apply(&[
        write("new.txt", "fresh"),
        mtime("new.txt", soon, 123_456_789),
    ]);
    w.sync_ok();
    let mark = w.mark();
    w.sync_ok();
    w.assert_logged(mark, "hash cache: 1 hits, 1 misses");
}

/// A file name cannot forge a log line: control characters in paths are printed escaped, on
/// both sides, so the fake WARN line stays inside the real one that names the file.
#[test]
fn file_names_cannot_forge_log_lines() {
    let forged = "2026-01-01T00:00:00.000000Z  WARN refusing connection from 10.6.6.6:1: forged";
    let name = format!("x\n{forged}");
    let w = World::start(&[]);
    w.apply(&[write(&name, "x"), write("esc\x1b[2J", "y")]);
    let out = w.sync_ok();
    w.assert_mirrored();
    for (side, log) in [("server", w.server().log()), ("client", stdout(&out))] {
        for line in log.lines().filter(|l| l.contains("10.6.6.6")) {
            assert!(
                line.contains("x\\n2026-01-01"),
                "{side} log has a line the file name forged: {line:?}"
            );
        }
        assert!(
            !log.contains('\x1b'),
            "{side} log holds a raw escape: {log:?}"
        );
    }
    w.assert_logged(
        0,
        "Received file: x\\n2026-01-01T00:00:00.000000Z  WARN refusing",
    );
}

#[test]
fn nested_directories_are_created_with_their_files() {
    check(Case {
        change: vec![
            write("a/b/c/deep.txt", "deep"),
            write("a/top.txt", "top"),
            write("x/y.txt", "y"),
        ],
        logs: &[
            "Creating directory: a/b/c",
            "Received file: a/b/c/deep.txt (4 bytes, blake3 ok)",
            "Received file: x/y.txt",
        ],
        ..Case::default()
    });
}

#[test]
fn rename_across_directories_moves_the_file() {
    check(Case {
        before: vec![write("a/b/c/deep.txt", "deep"), mkdir("x")],
        change: vec![mv("a/b/c/deep.txt", "x/deep.txt")],
        logs: &["Copying file: a/b/c/deep.txt and renaming to x/deep.txt (moved)"],
        no_logs: &["Requesting file", "Deleting file"],
    });
}

#[test]
fn renamed_directory_moves_its_files() {
    check(Case {
        before: vec![write("old/one.txt", "1"), write("old/sub/two.txt", "2")],
        change: vec![mv("old", "new")],
        // Moved whole: one rename, nothing inside it touched.
        logs: &["Moving directory: old to new"],
        no_logs: &["Requesting file", "Deleting", "Copying file"],
    });
}

#[test]
fn empty_directories_are_created_and_removed() {
    check(Case {
        before: vec![mkdir("stays"), mkdir("goes/inner/innermost")],
        change: vec![rm("goes"), mkdir("new/empty/deeper")],
        logs: &[
            "Deleting directory: goes/inner/innermost",
            "Deleting directory: goes",
            "Creating directory: new/empty/deeper",
        ],
        no_logs: &["Requesting file"],
    });
}

#[test]
fn empty_files_are_content_too() {
    check(Case {
        before: vec![write("empty", ""), write("shrinks", "data")],
        change: vec![write("dir/another empty", ""), write("shrinks", "")],
        // Both need the empty content, which the server already holds in `empty`.
        logs: &[
            "Copying file: empty and renaming to dir/another empty",
            "Copying file: empty and renaming to shrinks",
        ],
        no_logs: &["Requesting file"],
    });
}

#[test]
fn file_and_directory_swap_kinds() {
    check(Case {
        before: vec![write("was-file", "f"), write("was-dir/inner", "i")],
        change: vec![
            rm("was-file"),
            write("was-file/now-inside", "n"),
            rm("was-dir"),
            write("was-dir", "now a file"),
        ],
        logs: &[
            "Deleting file: was-file",
            "Deleting file: was-dir/inner",
            "Deleting directory: was-dir",
            "Received file: was-file/now-inside",
            "Received file: was-dir",
        ],
        ..Case::default()
    });
}

#[test]
fn swapped_contents_are_copied_not_transferred() {
    check(Case {
        before: vec![
            write("left", "left content"),
            write("right", "right content"),
        ],
        change: vec![mv("left", "tmp"), mv("right", "left"), mv("tmp", "right")],
        logs: &[
            "Copying file: right and renaming to left",
            "Copying file: left and renaming to right",
        ],
        no_logs: &["Requesting file"],
    });
}

#[test]
fn unicode_space_and_odd_names() {
    let names = [
        "ünïcödé/日本語 ファイル.txt",
        "with space.txt",
        "trailing space ",
        "emoji 🚀/naïve café",
        "-leading-dash",
        "..two-dots-prefix",
        ".hidden",
        "back\\slash",
        "tab\there",
    ];
    let (w, _) = check(Case {
        change: names.iter().map(|n| write(n, format!("{n}\n"))).collect(),
        logs: &[
            "Received file: ünïcödé/日本語 ファイル.txt",
            "Received file: with space.txt",
            "Received file: emoji 🚀/naïve café",
        ],
        ..Case::default()
    });
    // And a rename between two such names is still a rename.
    w.apply(&[mv("ünïcödé/日本語 ファイル.txt", "with space 2.txt")]);
    let mark = w.mark();
    w.sync_ok();
    w.assert_mirrored();
    w.assert_logged(
        mark,
        "Copying file: ünïcödé/日本語 ファイル.txt and renaming to with space 2.txt (moved)",
    );
}

#[test]
fn more_entries_than_one_batch() {
    // Past the protocol's 512-entry batches: several file-list frames, several requests and
    // data connections in one session.
    let (_w, out) = check(Case {
        change: (0..600)
            .map(|i| write(&format!("many/f{i:04}"), format!("file number {i}\n")))
            .collect(),
        logs: &["Received file: many/f0000", "Received file: many/f0599"],
        ..Case::default()
    });
    assert!(summary(&out).starts_with("requested=600 copied=0"));
}

#[test]
fn any_number_of_parallel_transfers_mirrors_the_same() {
    for transfers in ["1", "4"] {
        let w = World::start(&[]);
        w.apply(
            &(0..300)
                .map(|i| write(&format!("d{}/f{i:03}", i % 7), format!("file {i}\n")))
                .collect::<Vec<_>>(),
        );
        let mut cmd = w.client_command(&w.client);
        cmd.args(["--transfers", transfers]);
        let out = w.run(cmd);
        assert!(
            out.status.success(),
            "--transfers {transfers}: {}",
            w.dump()
        );
        w.assert_mirrored();
        assert!(summary(&out).starts_with("requested=300 copied=0"));
    }
}

// ---------------------------------------------------------------------------------------------
// Metadata

#[test]
fn permission_changes_are_applied_without_transfer() {
    let (_w, out) = check(Case {
        before: vec![
            write("script.sh", "#!/bin/sh\n"),
            write("secret", "s"),
            mkdir("private"),
            write("private/inside", "i"),
        ],
        change: vec![
            chmod("script.sh", 0o755),
            chmod("secret", 0o600),
            chmod("private", 0o700),
        ],
        no_logs: &["Requesting file", "Received file: ", "Copying file"],
        ..Case::default()
    });
    assert_eq!(summary(&out), NOTHING_DONE);
}

/// A sparse file stays sparse: the client sends its holes as holes (rsync's `-S`), the server
/// leaves them unwritten. 256 MiB of which one block holds data: a few KiB cross the wire
/// and are allocated on the server.
#[test]
fn sparse_files_stay_sparse() {
    use std::io::{Seek, SeekFrom, Write};
    use std::os::unix::fs::MetadataExt;
    let w = World::start(&[]);
    let mut f = fs::File::create(w.client.join("sparse")).unwrap();
    f.set_len(256 << 20).unwrap();
    f.seek(SeekFrom::Start(100 << 20)).unwrap();
    f.write_all(b"data").unwrap();
    drop(f);
    let mark = w.mark();
    let out = w.sync_ok();
    w.assert_mirrored();
    w.assert_logged(mark, "Received file: sparse (268435456 bytes, blake3 ok)");
    let allocated = fs::metadata(w.server_dir.join("sparse")).unwrap().blocks() * 512;
    assert!(
        allocated < 1 << 20,
        "{allocated} bytes allocated on the server"
    );
    let sent: u64 = summary(&out)
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("bytes="))
        .unwrap()
        .parse()
        .unwrap();
    assert!(sent < 1 << 20, "{sent} bytes sent for one block of data");
}

/// The synced directory's own mtime is mirrored too (`rsync -a` carries it), also when
/// nothing else changed, and after changes at the top that move it on the server.
#[test]
fn the_top_directorys_mtime_is_mirrored() {
    use std::os::unix::fs::MetadataExt;
    let w = World::start(&[]);
    let mtime = |p: &Path| {
        let m = fs::metadata(p).unwrap();
        (m.mtime(), m.mtime_nsec())
    };
    w.apply(&[write("a.txt", "a")]);
    set_mtime(&w.client, 1_500_000_000, 7).unwrap();
    w.sync_ok();
    assert_eq!(mtime(&w.server_dir), (1_500_000_000, 7));
    set_mtime(&w.client, 1_600_000_000, 0).unwrap();
    let out = w.sync_ok();
    assert_eq!(summary(&out), NOTHING_DONE);
    assert_eq!(mtime(&w.server_dir), (1_600_000_000, 0));
}

#[test]
fn mtime_changes_are_applied_without_transfer() {
    let (_w, out) = check(Case {
        before: vec![
            write("old.txt", "x"),
            mkdir("d"),
            write("d/f", "f"),
            symlink("link", "old.txt"),
        ],
        change: vec![
            mtime("old.txt", 1_000_000_000, 123_456_789),
            mtime("d/f", 0, 0),
            mtime("d", 946_684_800, 5),
            mtime("link", 1_234_567_890, 42),
        ],
        no_logs: &["Requesting file", "Received file: ", "Creating symlink"],
        ..Case::default()
    });
    assert_eq!(summary(&out), NOTHING_DONE);
}

#[test]
fn new_files_arrive_with_their_mode_and_mtime() {
    check(Case {
        change: vec![
            write("ro.txt", "read only"),
            chmod("ro.txt", 0o444),
            write("exec", "x"),
            chmod("exec", 0o750),
            write("none", "no permissions at all"),
            chmod("none", 0o000),
            write("old", "from the past"),
            mtime("old", 86_400, 999_999_999),
            mkdir("sticky"),
            chmod("sticky", 0o1777),
        ],
        ..Case::default()
    });
}

// ---------------------------------------------------------------------------------------------
// Symlinks and special files

#[test]
fn symlinks_are_mirrored_as_links_never_followed() {
    let w = World::start(&[]);
    // A client link into a directory full of things: only the link may travel.
    w.put_outside("secret.txt", "must not be copied");
    let outside = w.outside.to_str().unwrap().to_owned();
    let (w, _) = check_in(
        w,
        Case {
            change: vec![
                write("target.txt", "t"),
                symlink("relative", "target.txt"),
                symlink("dangling", "does/not/exist"),
                mkdir("sub"),
                symlink("sub/up", "../target.txt"),
                symlink("dirlink", "sub"),
                symlink("absolute", &outside),
                symlink("odd target", "spaces and ünïcode"),
            ],
            logs: &[
                "Creating symlink: relative -> target.txt",
                "Creating symlink: dangling -> does/not/exist",
                "Creating symlink: sub/up -> ../target.txt",
            ],
            no_logs: &["secret.txt"],
            ..Case::default()
        },
    );
    let link = w.server_dir.join("absolute");
    assert!(fs::symlink_metadata(&link).unwrap().is_symlink());
    assert_eq!(fs::read_link(&link).unwrap(), w.outside);
}

#[test]
fn symlink_changes_and_kind_changes() {
    check(Case {
        before: vec![
            write("f", "x"),
            symlink("retarget", "f"),
            write("file-to-link", "x2"),
            symlink("link-to-file", "f"),
            write("dir-to-link/inner", "i"),
        ],
        change: vec![
            symlink("retarget", "elsewhere"),
            rm("file-to-link"),
            symlink("file-to-link", "f"),
            rm("link-to-file"),
            write("link-to-file", "now a file"),
            rm("dir-to-link"),
            symlink("dir-to-link", "f"),
        ],
        logs: &[
            "Creating symlink: retarget -> elsewhere",
            "Creating symlink: file-to-link -> f",
            "Received file: link-to-file",
            "Creating symlink: dir-to-link -> f",
        ],
        ..Case::default()
    });
}

#[test]
fn special_files_and_non_utf8_names_are_skipped_with_a_warning() {
    use std::os::unix::ffi::OsStrExt;
    let w = World::start(&[]);
    w.apply(&[write("sub/normal.txt", "n"), fifo("sub/pipe")]);
    let _sock = std::os::unix::net::UnixListener::bind(w.client.join("sub/sock")).unwrap();
    let bad = w
        .client
        .join(std::ffi::OsStr::from_bytes(b"sub/bad-\xff-name"));
    fs::write(&bad, "b").unwrap();

    let out = w.sync_ok();
    let log = stdout(&out);
    for warning in [
        "skipping sub/pipe: a FIFO is not synced",
        "skipping sub/sock: a socket is not synced",
        "name is not valid UTF-8",
    ] {
        assert!(log.contains(warning), "client did not warn {warning:?}");
    }
    // Everything else is mirrored.
    let skipped =
        |l: &&str| l.contains(" fifo ") || l.contains(" socket ") || l.contains('\u{fffd}');
    let expected: String = tree(&w.client)
        .lines()
        .filter(|l| !skipped(l))
        .map(|l| format!("{l}\n"))
        .collect();
    let got = tree(&w.server_dir);
    assert_eq!(got, expected, "{}", diff(&expected, &got));
}

// ---------------------------------------------------------------------------------------------
// A large file

/// Writes `len` bytes of seeded pseudo-random content (xorshift64*), returning its MD5.
fn write_random(path: &Path, len: usize, mut seed: u64) -> String {
    use md5::Digest;
    use std::io::Write;
    let mut f = std::io::BufWriter::new(fs::File::create(path).unwrap());
    let mut h = md5::Md5::new();
    let mut block = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        for word in block.chunks_exact_mut(8) {
            seed ^= seed >> 12;
            seed ^= seed << 25;
            seed ^= seed >> 27;
            word.copy_from_slice(&seed.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
        }
        let n = left.min(block.len());
        h.update(&block[..n]);
        f.write_all(&block[..n]).unwrap();
        left -= n;
    }
    f.flush().unwrap();
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Peak resident memory of a process, from /proc, in KiB.
fn peak_rss_kib(pid: libc::pid_t) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Peak resident memory of the largest child this process has waited for, in KiB.
fn children_peak_rss_kib() -> u64 {
    // SAFETY: getrusage only writes into the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(
        unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) },
        0
    );
    ru.ru_maxrss as u64
}

/// Seeded content larger than the client's threshold for announcing files unhashed (8 MiB).
fn large(seed: u64) -> Vec<u8> {
    let mut x = seed;
    (0..(9 << 20) / 8)
        .flat_map(|_| {
            // splitmix64
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            (z ^ (z >> 31)).to_le_bytes()
        })
        .collect()
}

#[test]
fn large_file_renamed_is_moved_not_sent() {
    // Announced unhashed (new to the client's cache), but the server holds a file of that
    // size: it asks for the MD5 and moves its copy.
    check(Case {
        before: vec![write("big.bin", large(1))],
        change: vec![mv("big.bin", "moved.bin")],
        logs: &[
            "Asking the client for the blake3 of 1 large file(s)",
            "Copying file: big.bin and renaming to moved.bin (moved)",
        ],
        no_logs: &["Requesting file"],
    });
}

#[test]
fn large_duplicate_is_copied_not_sent() {
    check(Case {
        before: vec![write("a.bin", large(2))],
        change: vec![write("b.bin", large(2))],
        logs: &["Copying file: a.bin and renaming to b.bin"],
        no_logs: &["Requesting file"],
    });
}

#[test]
fn large_file_changed_in_place_with_the_same_size_is_sent() {
    check(Case {
        before: vec![write("big.bin", large(3))],
        change: vec![write("big.bin", large(4))],
        logs: &[
            "Asking the client for the blake3 of 1 large file(s)",
            "Requesting file: big.bin",
            "Received file: big.bin (9437184 bytes, blake3 ok)",
        ],
        ..Case::default()
    });
}

#[test]
fn large_file_of_64_mib_arrives_intact_in_bounded_memory() {
    const LEN: usize = 64 << 20;
    let w = World::start(&[]);
    let md5 = write_random(&w.client.join("big.bin"), LEN, 0x5eed_1234_abcd_0001);
    let mark = w.mark();
    let out = w.sync_ok();
    assert_eq!(
        md5_file(&w.server_dir.join("big.bin")).unwrap(),
        md5,
        "content differs"
    );
    w.assert_mirrored();
    w.assert_logged(mark, "Received file: big.bin (67108864 bytes, blake3 ok)");
    assert_eq!(
        summary(&out),
        "requested=1 copied=0 renamed=0 deleted=0 failed=0 bytes=67108864"
    );
    // Streamed in bounded buffers: neither side ever holds a large part of the file. The
    // client is the only child this test process has waited for so far.
    let limit_kib = (LEN as u64 / 1024) / 2;
    let server_kib = peak_rss_kib(w.server().proc.pid());
    let client_kib = children_peak_rss_kib();
    assert!(
        server_kib < limit_kib,
        "server peak RSS {server_kib} KiB for a 64 MiB file"
    );
    assert!(
        client_kib < limit_kib,
        "client peak RSS {client_kib} KiB for a 64 MiB file"
    );
    w.assert_contained();
}

// ---------------------------------------------------------------------------------------------
// Confinement and failures

#[test]
fn server_side_symlinks_are_replaced_never_written_through() {
    let mut w = World::new();
    w.put_outside("precious.txt", "precious");
    let outside = w.outside.clone();
    let link = |name: &str, target: &Path| {
        std::os::unix::fs::symlink(target, w.server_dir.join(name)).unwrap();
    };
    link("link", &outside);
    link("deep", &outside);
    link("file-link", &outside.join("precious.txt"));
    w.apply(&[
        write("link/x", "must land in the server DIR"),
        write("deep/sub/y", "y"),
        write("file-link", "must not overwrite precious.txt"),
    ]);
    w.start_server(&[]);
    let mark = w.mark();
    w.sync_ok();
    w.assert_contained();
    w.assert_mirrored();
    for path in ["link", "deep"] {
        assert!(
            fs::symlink_metadata(w.server_dir.join(path))
                .unwrap()
                .is_dir()
        );
    }
    assert!(
        fs::symlink_metadata(w.server_dir.join("file-link"))
            .unwrap()
            .is_file()
    );
    w.assert_logged(mark, "Deleting file: link");
    w.assert_logged(mark, "Received file: link/x");
}

/// Whether this process may run a child as another user (root in most containers can).
fn can_run_as_nobody() -> Result<(), String> {
    let out = Command::new(CLIENT_BIN)
        .arg("--version")
        .uid(65534)
        .gid(65534)
        .output()
        .map_err(|e| format!("cannot run client-sync as uid 65534: {e}"))?;
    if !out.status.success() {
        return Err(format!("client-sync as uid 65534 failed: {out:?}"));
    }
    Ok(())
}

#[test]
fn unreadable_client_entries_are_reported_and_kept_on_the_server() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        // Root reads through any permission bits, so the client runs as `nobody` instead:
        // then chmod 000 means what it means for a user.
        if let Err(why) = can_run_as_nobody() {
            eprintln!("SKIPPED: running as root and {why}");
            return;
        }
    }
    let w = World::start(&[]);
    w.apply(&[
        write("secret.txt", "v1"),
        write("locked/inner.txt", "inner v1"),
        write("public.txt", "p1"),
    ]);
    w.sync_ok();
    w.assert_mirrored();

    // The client changes everything, but can no longer read two of the entries.
    w.apply(&[
        write("secret.txt", "v2, never readable"),
        chmod("secret.txt", 0o000),
        write("locked/inner.txt", "inner v2"),
        chmod("locked", 0o000),
        write("never-synced.txt", "n"),
        chmod("never-synced.txt", 0o000),
        write("public.txt", "p2"),
    ]);
    let mut cmd = w.client_command(&w.client);
    if root {
        fs::set_permissions(w.tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
        // The cache lives in root's private directory: the unprivileged client goes without.
        // It is still the same client: its ID, copied where it can read it.
        let state = nobodys_dir(&w, "client-state");
        let id = state.join("client-id");
        fs::copy(w.home.path().join("state/server-sync/client-id"), &id).unwrap();
        std::os::unix::fs::chown(&id, Some(65534), Some(65534)).unwrap();
        cmd.arg("--no-cache").arg("--state-dir").arg(&state);
        cmd.uid(65534).gid(65534);
    }
    let mark = w.mark();
    let out = w.run(cmd);
    assert_eq!(
        out.status.code(),
        Some(1),
        "expected exit 1 (some entries failed)"
    );
    let err = stderr(&out);
    for path in ["secret.txt", "locked", "never-synced.txt"] {
        let named = format!("client-sync: not synced: {path}: cannot read");
        assert!(err.contains(&named), "stderr does not name {path}: {err}");
    }
    assert!(!err.contains("public.txt"));

    let server = |p: &str| fs::read_to_string(w.server_dir.join(p)).ok();
    assert_eq!(
        server("secret.txt").as_deref(),
        Some("v1"),
        "server copy lost"
    );
    assert_eq!(server("locked/inner.txt").as_deref(), Some("inner v1"));
    assert_eq!(
        server("public.txt").as_deref(),
        Some("p2"),
        "readable files still sync"
    );
    assert_eq!(server("never-synced.txt"), None);
    w.assert_not_logged(mark, "Deleting file");
    w.assert_contained();
    // Let the temporary directory be cleaned up.
    fs::set_permissions(w.client.join("locked"), fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn special_files_on_the_server_do_not_block_the_mirror() {
    let w = World::start(&[]);
    w.apply(&[
        fifo("blocker").on_server(),
        fifo("stray").on_server(),
        write("blocker/x", "x"),
    ]);
    w.sync_ok();
    w.assert_mirrored();
}

/// When this process is root, hands the server DIR over to `nobody` so that a server started
/// with [`nobody`] can run as that user. Returns false (test skipped) when that is impossible
/// here.
fn as_unprivileged_server(w: &World) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return true;
    }
    if let Err(why) = can_run_as_nobody() {
        eprintln!("SKIPPED: running as root and {why}");
        return false;
    }
    fs::set_permissions(w.tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::chown(&w.server_dir, Some(65534), Some(65534)).unwrap();
    true
}

/// A world whose server runs as `nobody` (when this process is root), or `None` when that is
/// impossible here (the test is then skipped, with the reason printed).
fn unprivileged_world() -> Option<World> {
    let mut w = World::new();
    if !as_unprivileged_server(&w) {
        return None;
    }
    // SAFETY: geteuid has no preconditions.
    let state = (unsafe { libc::geteuid() } == 0).then(|| nobodys_dir(&w, "server-state"));
    w.start_server_with(&[], |cmd| nobody(cmd, state.as_deref()));
    Some(w)
}

/// A directory beside the world's trees that `nobody` owns.
fn nobodys_dir(w: &World, name: &str) -> PathBuf {
    let dir = w.extra_dir(name);
    std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
    dir
}

/// Runs the server as `nobody` when this process is root, with its state in `state`.
fn nobody(cmd: &mut Command, state: Option<&Path>) {
    if let Some(state) = state {
        // The hash cache lives in root's private directory: the unprivileged server goes
        // without. Its state (the client it mirrors) it cannot go without.
        cmd.arg("--no-cache").arg("--state-dir").arg(state);
        cmd.uid(65534).gid(65534);
    }
}

#[test]
fn unprivileged_server_keeps_read_only_directories_in_sync() {
    let Some(w) = unprivileged_world() else {
        return;
    };
    w.apply(&[write("ro/f", "one"), write("ro/g", "g"), chmod("ro", 0o555)]);
    w.sync_ok();
    w.assert_mirrored();
    w.apply(&[
        chmod("ro", 0o755),
        write("ro/f", "two"),
        rm("ro/g"),
        chmod("ro", 0o555),
    ]);
    w.sync_ok();
    w.assert_mirrored();
}

#[test]
fn unprivileged_server_mirrors_modes_and_stays_stable() {
    let Some(w) = unprivileged_world() else {
        return;
    };
    check_in(
        w,
        Case {
            change: vec![
                write("plain", "p"),
                write("ro.txt", "read only"),
                chmod("ro.txt", 0o444),
                write("exec", "x"),
                chmod("exec", 0o750),
                mkdir("private"),
                chmod("private", 0o700),
            ],
            ..Case::default()
        },
    );
}

#[test]
fn unprivileged_server_does_not_resend_files_it_cannot_read() {
    let Some(w) = unprivileged_world() else {
        return;
    };
    check_in(
        w,
        Case {
            change: vec![write("none", "n"), chmod("none", 0o000)],
            ..Case::default()
        },
    );
}

#[test]
fn two_clients_at_once_are_serialised() {
    let w = World::start(&[]);
    let a = w.extra_dir("client-a");
    let b = w.extra_dir("client-b");
    for i in 0..40 {
        apply(&a, &write(&format!("a/f{i}"), format!("a {i}")).action);
        apply(&b, &write(&format!("b/g{i}"), format!("b {i}")).action);
    }
    apply(&a, &write("shared.txt", "from a").action);
    apply(&b, &write("shared.txt", "from b, longer").action);

    let (out_a, out_b) = std::thread::scope(|s| {
        let ta = s.spawn(|| w.sync_dir(&a));
        let tb = s.spawn(|| w.sync_dir(&b));
        (ta.join().unwrap(), tb.join().unwrap())
    });
    assert_eq!(out_a.status.code(), Some(0), "{}", stderr(&out_a));
    assert_eq!(out_b.status.code(), Some(0), "{}", stderr(&out_b));
    w.server().wait_for_log_count(SESSION_DONE, 2, WAIT);
    // Not interleaved: the server holds exactly one client's tree, whichever went last.
    let got = tree(&w.server_dir);
    assert!(
        got == tree(&a) || got == tree(&b),
        "server holds a mix of both clients:\n{got}"
    );
    w.assert_contained();
}

// ---------------------------------------------------------------------------------------------
// Command-line errors and exit statuses

/// `bin ARGS...` with its cache and home kept inside `home`.
fn command(bin: &str, args: &[&str], home: &Path) -> Command {
    let mut cmd = Command::new(bin);
    cmd.args(args);
    isolate(&mut cmd, home);
    cmd
}

fn server_command(args: &[&str], home: &Path) -> Command {
    command(SERVER_BIN, args, home)
}

/// Runs a command that must fail at once with `code`, and (when given) a single stderr line
/// containing `error`.
fn expect_failure(w: &World, cmd: Command, code: i32, error: Option<&str>) {
    let out = w.run(cmd);
    assert_eq!(out.status.code(), Some(code), "wrong exit status");
    assert!(
        !stdout(&out).contains("listening"),
        "a failed server must not listen"
    );
    let err = stderr(&out);
    match error {
        Some(e) => {
            assert_eq!(err.lines().count(), 1, "want a one-line error, got:\n{err}");
            assert!(err.contains(e), "stderr lacks {e:?}:\n{err}");
        }
        // clap's usage errors: several lines, always starting with `error:`.
        None => assert!(err.contains("error:"), "no usage error on stderr:\n{err}"),
    }
}

#[test]
fn server_refuses_bad_setup_with_exit_2() {
    let w = World::new();
    let home = w.home.path();
    let file = w.client.join("a-file");
    fs::write(&file, "not a directory").unwrap();
    let under_file = file.join("sub");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port().to_string();
    let dir = w.server_dir.to_str().unwrap();
    let inside_cache = w.server_dir.join("cache");
    let local = ["--bind", "127.0.0.1"];

    let cases: Vec<(Vec<&str>, Option<&str>)> = vec![
        (
            vec![file.to_str().unwrap(), "--port", "0", "--data-port", "0"],
            Some("is not a directory"),
        ),
        (
            vec![
                under_file.to_str().unwrap(),
                "--port",
                "0",
                "--data-port",
                "0",
            ],
            Some("cannot create directory"),
        ),
        (
            [
                &[dir, "--port", &taken_port, "--data-port", "0"],
                &local[..],
            ]
            .concat(),
            Some("cannot listen on control port"),
        ),
        (
            [
                &[dir, "--port", "0", "--data-port", &taken_port],
                &local[..],
            ]
            .concat(),
            Some("cannot listen on data port"),
        ),
        // TEST-NET-1: an address no interface of this machine has.
        (
            vec![
                dir,
                "--bind",
                "192.0.2.1",
                "--port",
                "0",
                "--data-port",
                "0",
            ],
            Some("cannot listen on control port 192.0.2.1"),
        ),
        (
            vec![
                dir,
                "--port",
                "0",
                "--data-port",
                "0",
                "--cache-dir",
                inside_cache.to_str().unwrap(),
            ],
            Some("is inside the synced directory"),
        ),
        (vec![], None),
        (vec![dir, "--port", "seventy"], None),
        (vec![dir, "--port", "70000"], None),
        (vec![dir, "--idle-timeout", "0"], None),
        (vec![dir, "--max-connections", "0"], None),
        (vec![dir, "--no-such-flag"], None),
        (vec![dir, "-v", "-q"], None),
        (vec![dir, "--no-cache", "--cache-dir", "/tmp/x"], None),
        (vec![dir, "extra-positional"], None),
    ];
    for (args, error) in cases {
        expect_failure(&w, server_command(&args, home), 2, error);
    }
    assert_eq!(fs::read_to_string(&file).unwrap(), "not a directory");
    drop(taken);
}

#[test]
fn server_creates_a_missing_dir() {
    let mut w = World::new();
    fs::remove_dir(&w.server_dir).unwrap();
    w.apply(&[write("a.txt", "a")]);
    w.start_server(&[]);
    assert!(w.server_dir.is_dir());
    w.sync_ok();
    w.assert_mirrored();
}

fn client_args(args: &[&str], home: &Path) -> Command {
    command(CLIENT_BIN, args, home)
}

#[test]
fn client_usage_and_local_errors_exit_2() {
    let w = World::new();
    let home = w.home.path();
    let dead = DeadPort::new();
    let port = dead.port.to_string();
    let missing = w.client.join("missing");
    let file = w.client.join("a-file");
    fs::write(&file, "x").unwrap();
    let (missing, file) = (missing.to_str().unwrap(), file.to_str().unwrap());
    let client = w.client.to_str().unwrap();
    let inside_cache = w.client.join("cache");
    let p = ["--server", "127.0.0.1", "--port", &port];

    let cases: Vec<(Vec<&str>, Option<&str>)> = vec![
        ([&[missing, "--once"], &p[..]].concat(), Some("cannot read")),
        ([&[missing], &p[..]].concat(), Some("cannot read")),
        (
            [&[file, "--once"], &p[..]].concat(),
            Some("is not a directory"),
        ),
        ([&[file], &p[..]].concat(), Some("is not a directory")),
        (
            [
                &[
                    client,
                    "--once",
                    "--cache-dir",
                    inside_cache.to_str().unwrap(),
                ],
                &p[..],
            ]
            .concat(),
            Some("is inside the synced directory"),
        ),
        (vec![], None),
        (vec![client, "--once", "--port", "x"], None),
        (vec![client, "--interval", "0"], None),
        (vec![client, "--interval", "soon"], None),
        (vec![client, "--once", "--bogus"], None),
        (vec![client, "--once", "-v", "-q"], None),
    ];
    for (args, error) in cases {
        expect_failure(&w, client_args(&args, home), 2, error);
    }
}

#[test]
fn client_exits_3_when_no_server_listens() {
    let w = World::new();
    w.apply(&[write("a", "a")]);
    let dead = DeadPort::new();
    let out = w.run(client_command(&w.client, dead.port, w.home.path()));
    assert_eq!(out.status.code(), Some(3));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("cannot reach server 127.0.0.1:"), "{err}");
}

/// Both binaries' `--help`, word for word, against `tests/snapshots/cli__*-help.snap`: a flag
/// added, removed or reworded is a snapshot change to review (`cargo insta review`), so no flag
/// goes unexplained. (clap is built without `wrap_help`, so the text does not depend on the
/// terminal's width.)
#[test]
fn help_explains_every_flag() {
    let w = World::new();
    let home = w.home.path();
    for (name, bin) in [("server-sync", SERVER_BIN), ("client-sync", CLIENT_BIN)] {
        let mut cmd = Command::new(bin);
        cmd.arg("--help");
        isolate(&mut cmd, home);
        let out = w.run(cmd);
        assert_eq!(out.status.code(), Some(0));
        insta::assert_snapshot!(format!("{name}-help"), stdout(&out));

        let mut cmd = Command::new(bin);
        cmd.arg("--version");
        let out = w.run(cmd);
        assert_eq!(out.status.code(), Some(0));
        assert!(stdout(&out).contains(env!("CARGO_PKG_VERSION")));
    }
}

#[test]
fn server_stops_cleanly_on_sigterm_and_sigint() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let mut w = World::start(&[]);
        w.apply(&[write("a/b.txt", "b"), write("c.txt", "c")]);
        w.sync_ok();
        let server = w.server_mut();
        server.proc.signal(sig);
        let status = server
            .proc
            .wait_exit(WAIT)
            .expect("server exits after a signal");
        assert_eq!(status.code(), Some(0), "signal {sig}: {status}");
        assert!(w.server().log().contains("server stopped"));
        assert_eq!(temp_files(&w.server_dir), Vec::<String>::new());
        w.assert_mirrored();
    }
}

/// A client without --once, syncing every second, its output captured.
fn daemon(w: &World, port: u16) -> Proc {
    let mut cmd = Command::new(CLIENT_BIN);
    cmd.arg(&w.client).args([
        "--server",
        "127.0.0.1",
        "--port",
        &port.to_string(),
        "--interval",
        "1",
    ]);
    isolate(&mut cmd, w.home.path());
    Proc::spawn(cmd)
}

/// Waits until `after` appears in `log` after the first occurrence of `first`.
fn wait_in_order(p: &Proc, first: &str, after: &str) -> bool {
    p.stdout.wait_until(WAIT, |t| {
        t.find(first).is_some_and(|i| t[i..].contains(after))
    })
}

#[test]
fn daemon_client_syncs_on_its_interval_and_stops_on_sigterm() {
    let w = World::start(&[]);
    w.apply(&[write("a.txt", "first")]);
    let mut client = daemon(&w, w.port());
    let fail = |p: &Proc, what: &str| -> ! { panic!("{what}\n{}", p.report()) };
    if !client.stdout.wait_count("sync:done", 1, WAIT) {
        fail(&client, "no first sync");
    }
    w.assert_mirrored();

    // Changed between two cycles: picked up by a later one without any action from us.
    w.apply(&[write("a.txt", "second, longer"), write("b.txt", "new")]);
    if !wait_in_order(&client, "Sending file: b.txt", "sync:done") {
        fail(&client, "the change was never synced");
    }
    w.assert_mirrored();

    let status = client.terminate();
    assert_eq!(status.code(), Some(0), "{}", client.report());
    assert!(client.stdout.text().contains("client stopped"));
    assert!(client.stdout.text().matches("sync:done").count() >= 2);
}

/// A watching daemon's batch is planned over the paths it names, but content the mirror holds
/// anywhere else is still copied locally, not fetched (the seed's case 005, live). The interval
/// is long: no full rescan comes by to do it instead.
#[test]
fn a_watching_daemon_copies_known_content_locally() {
    let w = World::start(&[]);
    w.apply(&[mkdir("d"), write("d/a.txt", "the same content\n")]);
    let mut cmd = Command::new(CLIENT_BIN);
    cmd.arg(&w.client)
        .args(["--server", "127.0.0.1", "--port", &w.port().to_string()])
        .args(["--interval", "3600"]);
    isolate(&mut cmd, w.home.path());
    let mut client = Proc::spawn(cmd);
    assert!(
        client.stdout.wait_count("sync:done", 1, WAIT),
        "no first sync\n{}",
        client.report()
    );
    let mark = w.mark();
    w.apply(&[write("b.txt", "the same content\n")]);
    w.server()
        .wait_for_log("Copying file: d/a.txt and renaming to b.txt", WAIT);
    w.server().wait_for_log_count("sync:done", 2, WAIT);
    w.assert_not_logged(mark, "Requesting file: b.txt");
    w.assert_mirrored();
    assert_eq!(client.terminate().code(), Some(0), "{}", client.report());
}

#[test]
fn daemon_client_retries_until_the_server_comes_up() {
    let w = World::new();
    w.apply(&[write("a.txt", "waited for")]);
    let dead = DeadPort::new();
    let port = dead.port;
    let mut client = daemon(&w, port);
    assert!(
        client
            .stdout
            .wait_until(WAIT, |t| t.contains("retrying in")),
        "no retry logged\n{}",
        client.report()
    );
    // Now the server takes the port the client keeps trying.
    drop(dead);
    let mut cmd = server_command(
        &[
            w.server_dir.to_str().unwrap(),
            "--bind",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--data-port",
            "0",
        ],
        w.home.path(),
    );
    cmd.current_dir(w.home.path());
    let server = Server::spawn(cmd);
    assert!(
        client.stdout.wait_count("sync:done", 1, WAIT),
        "no sync once the server came up\n{}\n{}",
        client.report(),
        server.proc.report()
    );
    w.assert_mirrored();
    assert_eq!(client.terminate().code(), Some(0));
}

#[test]
fn stale_temp_files_are_removed_at_start_and_never_listed() {
    let mut w = World::new();
    w.apply(&[
        write(".server-sync-tmp.crashed", "partial").on_server(),
        write("sub/.server-sync-tmp.x", "partial").on_server(),
        write(".server-sync-tmp.stage-dead/staged", "partial").on_server(),
        write("sub/keep.txt", "keep").on_server(),
        write("sub/keep.txt", "keep"),
        // A client-side file with the reserved name is never sent.
        write("sub/.server-sync-tmp.client", "client temp"),
    ]);
    w.start_server(&[]);
    // Swept before the server listens.
    assert_eq!(temp_files(&w.server_dir), Vec::<String>::new());
    assert!(
        w.server()
            .log()
            .contains("removed 3 stale temporary file(s)")
    );

    w.sync_ok();
    let expected: String = tree(&w.client)
        .lines()
        .filter(|l| !l.contains(".server-sync-tmp."))
        .map(|l| format!("{l}\n"))
        .collect();
    let got = tree(&w.server_dir);
    assert_eq!(got, expected, "{}", diff(&expected, &got));
}

#[test]
fn default_host_localhost_works_on_both_sides() {
    let w = World::new();
    w.apply(&[write("a.txt", "a")]);
    // No --bind, no --server: both default to localhost.
    let server = Server::spawn(server_command(
        &[
            w.server_dir.to_str().unwrap(),
            "--port",
            "0",
            "--data-port",
            "0",
        ],
        w.home.path(),
    ));
    let out = w.run(client_args(
        &[
            w.client.to_str().unwrap(),
            "--port",
            &server.port.to_string(),
            "--once",
        ],
        w.home.path(),
    ));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        stderr(&out),
        server.proc.report()
    );
    w.assert_mirrored();
}

#[test]
fn log_level_flags_and_rust_log() {
    // (server flags, RUST_LOG, INFO lines expected, DEBUG lines expected)
    let cases: [(&[&str], Option<&str>, bool, bool); 4] = [
        (&[], None, true, false),
        (&["-q"], None, false, false),
        (&["-v"], None, true, true),
        (&["-v"], Some("warn"), false, false),
    ];
    for (flags, rust_log, info, debug) in cases {
        let w = World::new();
        w.apply(&[write("a.txt", "a"), mkdir("d")]);
        let mut args = vec![
            w.server_dir.to_str().unwrap(),
            "--bind",
            "127.0.0.1",
            "--port",
            "0",
            "--data-port",
            "0",
        ];
        args.extend_from_slice(flags);
        let mut cmd = server_command(&args, w.home.path());
        if let Some(level) = rust_log {
            cmd.env("RUST_LOG", level);
        }
        let server = Server::spawn(cmd);
        let out = w.run(client_command(&w.client, server.port, w.home.path()));
        assert_eq!(out.status.code(), Some(0));
        let mut server = server;
        server.stop();
        let log = server.log();
        let what = format!("flags {flags:?} RUST_LOG={rust_log:?}:\n{log}");
        // The listening line is output, not logging: always there.
        assert!(log.starts_with("listening control="), "{what}");
        assert_eq!(log.contains(" INFO "), info, "{what}");
        assert_eq!(log.contains("DEBUG "), debug, "{what}");
    }
}
