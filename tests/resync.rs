//! Re-syncs send only what changed since the list the server acknowledged last (both sides
//! keep it in their state directory), and every way that list can be lost, damaged or stale
//! falls back to the whole list, never to a wrong mirror.

mod support;

use std::fs;
use std::path::PathBuf;

use support::*;

const WHOLE: &str = "Sending file list:";
const CHANGES: &str = "Sending only the changes since the last sync";

/// The one file of the state directory named with `ext` (`acked`: the server's list, `sent`:
/// the client's).
fn state_file(w: &World, ext: &str) -> PathBuf {
    let dir = w.home.path().join("state/server-sync");
    let found: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    assert_eq!(found.len(), 1, "one .{ext} file in {}", dir.display());
    found.into_iter().next().unwrap()
}

/// A world whose client has synced a small tree once (the whole list) and holds the list the
/// server acknowledged.
fn synced() -> World {
    let w = World::start(&[]);
    w.apply(&[
        mkdir("d"),
        write("d/a", "alpha"),
        write("d/b", "beta"),
        write("c", "gamma"),
    ]);
    let first = stdout(&w.sync_ok());
    assert!(first.contains(WHOLE) && !first.contains(CHANGES), "{first}");
    w.assert_mirrored();
    w
}

#[test]
fn a_resync_sends_only_what_changed() {
    let w = synced();
    w.apply(&[write("d/a", "alpha 2"), rm("c"), write("e", "new")]);
    let mark = w.mark();
    let out = stdout(&w.sync_ok());
    assert!(
        out.contains(&format!("{CHANGES}: 2 entries added or changed, 1 removed")),
        "{out}"
    );
    w.assert_logged(mark, "Received changes from");
    w.assert_logged(mark, "Requesting file: d/a");
    w.assert_logged(mark, "Deleting file: c");
    w.assert_mirrored();
    let again = w.sync_ok();
    assert!(
        stdout(&again).contains(&format!("{CHANGES}: 0 entries added or changed, 0 removed")),
        "{}",
        stdout(&again)
    );
    assert_eq!(
        summary(&again),
        "requested=0 copied=0 renamed=0 deleted=0 failed=0 bytes=0"
    );
}

/// The client's list lost (its state directory wiped), or the server's.
#[test]
fn a_lost_list_on_either_side_sends_the_whole_list() {
    for ext in ["sent", "acked"] {
        let w = synced();
        fs::remove_file(state_file(&w, ext)).unwrap();
        w.apply(&[write("d/b", "beta 2")]);
        let out = stdout(&w.sync_ok());
        assert!(
            out.contains(WHOLE) && !out.contains(CHANGES),
            "{ext}: {out}"
        );
        w.assert_mirrored();
        // Kept again: the next one is a delta.
        assert!(stdout(&w.sync_ok()).contains(CHANGES), "{ext}");
    }
}

#[test]
fn a_damaged_list_on_either_side_is_never_used() {
    for ext in ["acked", "sent"] {
        let w = synced();
        let file = state_file(&w, ext);
        let mut bytes = fs::read(&file).unwrap();
        // An entry's byte, not the ID at the end: the ID still matches the other side's.
        let at = bytes.len() / 2;
        bytes[at] ^= 0x01;
        fs::write(&file, &bytes).unwrap();
        w.apply(&[write("d/a", "alpha 2"), write("d/new", "n")]);
        let mark = w.mark();
        let out = stdout(&w.sync_ok());
        assert!(out.contains(WHOLE), "{ext}: {out}");
        if ext == "acked" {
            // The client sent changes, the server could not use them and asked again.
            assert!(out.contains(CHANGES), "{out}");
            w.assert_logged(mark, "asking for the whole list");
        }
        w.assert_mirrored();
        assert!(stdout(&w.sync_ok()).contains(CHANGES), "{ext}: kept again");
    }
}

#[test]
fn a_list_from_another_directory_is_not_taken_for_this_one() {
    let w = synced();
    // The same client syncs another directory to the same server: the folder is replaced
    // whole (the list IDs differ), and back again.
    let other = w.extra_dir("other");
    fs::write(other.join("x"), "x").unwrap();
    let out = stdout(&w.sync_dir(&other));
    assert!(out.contains(WHOLE) && !out.contains(CHANGES), "{out}");
    assert_same_tree(&other, &w.server_dir);
    let out = stdout(&w.sync_ok());
    assert!(!out.contains(CHANGES), "{out}");
    w.assert_mirrored();
}

#[test]
fn the_server_tree_changed_behind_its_back_is_put_right_by_a_delta() {
    let w = synced();
    let s = &w.server_dir;
    // Same size, mtime put back: only the cache's ctime tells.
    let a = s.join("d/a");
    let mtime = fs::metadata(&a).unwrap().modified().unwrap();
    fs::write(&a, "ALPHA").unwrap();
    fs::File::options()
        .write(true)
        .open(&a)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    fs::remove_file(s.join("d/b")).unwrap();
    fs::write(s.join("junk"), "junk").unwrap();
    let mark = w.mark();
    let out = stdout(&w.sync_ok());
    assert!(
        out.contains(&format!("{CHANGES}: 0 entries added or changed, 0 removed")),
        "{out}"
    );
    w.assert_logged(mark, "Requesting file: d/a");
    w.assert_logged(mark, "Requesting file: d/b");
    w.assert_logged(mark, "Deleting file: junk");
    w.assert_mirrored();
}
