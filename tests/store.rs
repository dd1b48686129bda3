//! The server's store against permission bits that would lock a server that is not root out
//! of its own mirror: a directory of mode 000 must be read, entered and put back, so the mirror
//! converges and stays stable instead of failing and re-sending every cycle.

mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::Command;

use support::*;

/// The summary of a sync that had nothing to do.
const NOTHING_DONE: &str = "requested=0 copied=0 renamed=0 deleted=0 failed=0 bytes=0";

/// A world whose server runs as `nobody` (uid 65534) when this process is root, as in the CLI
/// tests, or `None` (test skipped, reason printed) when this process cannot do that. As any
/// other user, the server simply runs as that user, for whom mode 000 means the same.
fn unprivileged_world() -> Option<World> {
    let mut w = World::new();
    if rustix::process::geteuid().is_root() {
        let tried = Command::new(SERVER_BIN)
            .arg("--version")
            .uid(65534)
            .gid(65534)
            .output();
        if !tried.is_ok_and(|o| o.status.success()) {
            eprintln!("SKIPPED: running as root and cannot run server-sync as uid 65534");
            return None;
        }
        fs::set_permissions(w.tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::chown(&w.server_dir, Some(65534), Some(65534)).unwrap();
        // The hash cache lives in root's private directory: the unprivileged server goes
        // without.
        w.start_server_with(&[], |cmd| {
            cmd.arg("--no-cache").uid(65534).gid(65534);
        });
    } else {
        w.start_server(&[]);
    }
    Some(w)
}

#[test]
fn unprivileged_server_converges_on_a_directory_of_mode_000() {
    let Some(w) = unprivileged_world() else {
        return;
    };
    w.apply(&[
        write("locked/x", "inside a locked directory"),
        write("locked/deeper/y", "two levels down"),
        chmod("locked/deeper", 0o000),
        chmod("locked", 0o000),
    ]);
    w.sync_ok();
    w.assert_mirrored();

    for _ in 0..2 {
        let mark = w.mark();
        let out = w.sync_ok();
        assert_eq!(summary(&out), NOTHING_DONE, "the mirror did not converge");
        for verb in [
            "Requesting",
            "Received file:",
            "Deleting",
            "Creating",
            "WARN",
        ] {
            w.assert_not_logged(mark, verb);
        }
        w.assert_mirrored();
    }

    // The server can still change what is inside, and puts the modes back afterwards.
    w.apply(&[
        chmod("locked", 0o755),
        chmod("locked/deeper", 0o755),
        write("locked/deeper/y", "changed"),
        rm("locked/x"),
        write("locked/z", "new"),
        chmod("locked/deeper", 0o000),
        chmod("locked", 0o000),
    ]);
    w.sync_ok();
    w.assert_mirrored();
    let out = w.sync_ok();
    assert_eq!(summary(&out), NOTHING_DONE, "the mirror did not converge");
    w.assert_mirrored();
    w.assert_contained();
}
