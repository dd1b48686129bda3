//! A server folder mirrors one client, and never its own source: the two defects of "Defects
//! found trying to break it". Nested roots on one machine (the server's directory inside the
//! client's, the client's inside the server's, or the same one) are refused with exit 2 and
//! nothing changed; a second client is refused with exit 1 and nothing changed, unless it
//! takes the folder over with `--take-over`. Each case checks exit status, stderr, the
//! server's log and both trees.

mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use support::*;

/// `client-sync DIR --once` against `port`, its state (and so its ID) in `state`: each
/// directory given as `state` is another client.
fn client_as(dir: &Path, port: u16, home: &Path, state: &Path) -> Command {
    let mut cmd = client_command(dir, port, home);
    cmd.env("XDG_STATE_HOME", state);
    cmd
}

/// The server's flags: its state (the client it mirrors) in `state`.
fn server_flags(state: &Path) -> Vec<&str> {
    vec!["--state-dir", state.to_str().unwrap()]
}

/// The ID the client whose state is in `state` has made for itself.
fn id_of(state: &Path) -> String {
    fs::read_to_string(state.join("server-sync/client-id"))
        .unwrap()
        .trim()
        .to_owned()
}

/// The only line on stderr, checked to be there alone, with exit status `code`.
fn one_line_error(out: &Output, code: i32) -> String {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(code), "wrong exit status:\n{err}");
    assert_eq!(err.lines().count(), 1, "want a one-line error, got:\n{err}");
    err.trim_end().to_owned()
}

fn canonical(p: &Path) -> String {
    fs::canonicalize(p).unwrap().display().to_string()
}

// ---------------------------------------------------------------------------------------------
// 1. Nested roots

/// One way of nesting the two directories, below a fresh temporary directory `top`.
struct Nest {
    name: &'static str,
    /// The server's DIR and the client's DIR, relative to `top`.
    server: &'static str,
    client: &'static str,
    /// Words of the client's error besides "nested roots".
    says: &'static str,
}

const NESTS: &[Nest] = &[
    Nest {
        name: "server DIR inside the client DIR",
        server: "c/mirror",
        client: "c",
        says: "is inside the client's directory",
    },
    Nest {
        name: "client DIR inside the server DIR",
        server: "s",
        client: "s/home/docs",
        says: "the client's directory is inside the server directory",
    },
    Nest {
        name: "the same directory",
        server: "d",
        client: "d",
        says: "is the client's directory itself",
    },
    Nest {
        name: "the same directory through a symlink",
        server: "d",
        client: "link-to-d",
        says: "is the client's directory itself",
    },
];

#[test]
fn nested_roots_on_one_machine_are_refused_and_nothing_changes() {
    if server_sync::store::state::machine_id().is_none() {
        // Documented: without a machine identifier there is no check, and nothing is said.
        eprintln!("SKIPPED: this machine has no /etc/machine-id or /var/lib/dbus/machine-id");
        return;
    }
    for nest in NESTS {
        eprintln!("=== {}", nest.name);
        let (top, home, state) = (tempdir(), tempdir(), tempdir());
        let top = top.path();
        for (path, text) in [
            ("c/a.txt", "a"),
            ("c/sub/b.txt", "b"),
            ("s/other.txt", "the server's own"),
            ("s/home/docs/a.txt", "a"),
            ("s/home/docs/sub/b.txt", "b"),
            ("d/a.txt", "a"),
        ] {
            apply(top, &write(path, text).action);
        }
        std::os::unix::fs::symlink(top.join("d"), top.join("link-to-d")).unwrap();
        let (server_dir, client_dir) = (top.join(nest.server), top.join(nest.client));
        let server = Server::start(&server_dir, home.path(), &server_flags(state.path()));
        // After the server's start, which creates its DIR if need be.
        let before = tree(top);

        let out = run(client_as(
            &client_dir,
            server.port,
            home.path(),
            home.path(),
        ))
        .output;
        let fail = || format!("{}\n--- server log\n{}", nest.name, server.log());
        let after = tree(top);
        assert_eq!(
            after,
            before,
            "{}: something changed:\n{}\n{}",
            nest.name,
            diff(&before, &after),
            fail()
        );
        let err = one_line_error(&out, 2);
        assert!(err.starts_with("client-sync: "), "{err}");
        assert!(err.contains("nested roots"), "{err}\n{}", fail());
        assert!(err.contains(nest.says), "{err}\n{}", fail());
        // Both directories are named: the client's own, and the server's.
        assert!(err.contains(&canonical(&client_dir)), "{err}");
        assert!(err.contains(&canonical(&server_dir)), "{err}");
        assert!(
            server
                .proc
                .stdout
                .wait_until(WAIT, |t| t.contains("ended: nested roots")),
            "server did not log the refusal\n{}",
            fail()
        );
    }
}

#[test]
fn directories_side_by_side_on_one_machine_still_sync() {
    // Directories are compared, not names: `server2` beside the server's `server` shares a
    // prefix of its name and its parents, and is not nested with it.
    let server_state = tempdir();
    let w = World::start(&server_flags(server_state.path()));
    let beside = w.extra_dir("server2");
    apply(&beside, &write("x.txt", "x").action);
    let out = w.sync_dir(&beside);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_same_tree(&beside, &w.server_dir);
}

fn tempdir() -> tempfile::TempDir {
    tempfile::TempDir::new().unwrap()
}

// ---------------------------------------------------------------------------------------------
// 2. A second client

/// A client of its own: a directory with one file, and a state directory.
struct Client {
    dir: PathBuf,
    state: PathBuf,
}

fn client(w: &World, name: &str, file: &str) -> Client {
    let dir = w.extra_dir(name);
    apply(&dir, &write(file, name).action);
    let state = w.home.path().join(format!("state-{name}"));
    Client { dir, state }
}

impl Client {
    fn sync(&self, w: &World, extra: &[&str]) -> Output {
        let mut cmd = client_as(&self.dir, w.port(), w.home.path(), &self.state);
        cmd.args(extra);
        w.run(cmd)
    }
}

#[test]
fn a_second_client_is_refused_until_it_takes_the_folder_over() {
    let server_state = tempdir();
    let w = World::start(&server_flags(server_state.path()));
    let a = client(&w, "a", "onlyA.txt");
    let b = client(&w, "b", "onlyB.txt");

    // A's first sync: the folder mirrors A from now on.
    let out = a.sync(&w, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_same_tree(&a.dir, &w.server_dir);

    // B, another client with another tree, is refused before anything changes.
    let before = tree(&w.server_dir);
    let mark = w.mark();
    let out = b.sync(&w, &[]);
    let after = tree(&w.server_dir);
    assert_eq!(
        after,
        before,
        "B's refused sync changed the mirror:\n{}",
        diff(&before, &after)
    );
    w.assert_not_logged(mark, "Deleting file: onlyA.txt");
    let err = one_line_error(&out, 1);
    let a_id = id_of(&a.state);
    w.assert_logged(0, &format!("this folder now mirrors client {a_id}"));
    assert_eq!(
        err,
        format!(
            "client-sync: server refused the sync: this folder mirrors another client \
             (ID {a_id}); run client-sync --take-over to replace its contents with this \
             directory's"
        )
    );
    w.assert_logged(mark, "ended: this folder mirrors another client");
    assert_ne!(id_of(&b.state), a_id, "each client has an ID of its own");

    // A is still welcome, from another of its directories too: the ID is the client's.
    let out = a.sync(&w, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let a_elsewhere = Client {
        dir: w.extra_dir("a2"),
        state: a.state.clone(),
    };
    apply(&a_elsewhere.dir, &write("a2.txt", "a2").action);
    let out = a_elsewhere.sync(&w, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_same_tree(&a_elsewhere.dir, &w.server_dir);
    let out = a.sync(&w, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_same_tree(&a.dir, &w.server_dir);

    // B takes the folder over: it now mirrors B...
    let mark = w.mark();
    let out = b.sync(&w, &["--take-over"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_same_tree(&b.dir, &w.server_dir);
    let b_id = id_of(&b.state);
    w.assert_logged(
        mark,
        &format!("takes over this folder, which mirrored client {a_id}"),
    );
    w.assert_logged(mark, "Deleting file: onlyA.txt");
    w.assert_logged(mark, &format!("this folder now mirrors client {b_id}"));

    // ...and A is the one refused, with B's ID, and nothing changes.
    let before = tree(&w.server_dir);
    let out = a.sync(&w, &[]);
    let err = one_line_error(&out, 1);
    assert!(err.contains(&format!("(ID {b_id})")), "{err}");
    assert_eq!(tree(&w.server_dir), before);
    // B, no longer taking over, is simply its owner.
    let out = b.sync(&w, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[test]
fn the_server_remembers_its_client_across_restarts_in_a_private_file() {
    let (home, server_state) = (tempdir(), tempdir());
    let (a, b) = (tempdir(), tempdir());
    apply(a.path(), &write("onlyA.txt", "a").action);
    apply(b.path(), &write("onlyB.txt", "b").action);
    let (mirror, a_state, b_state) = (tempdir(), tempdir(), tempdir());
    // Not there yet: the server makes it, private.
    let server_state = server_state.path().join("state");
    let flags = server_flags(&server_state);

    let mut server = Server::start(mirror.path(), home.path(), &flags);
    let out = run(client_as(
        a.path(),
        server.port,
        home.path(),
        a_state.path(),
    ))
    .output;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    server.stop();

    // A new server on the same folder and state refuses B, leaving A's mirror as it is.
    let server = Server::start(mirror.path(), home.path(), &flags);
    let out = run(client_as(
        b.path(),
        server.port,
        home.path(),
        b_state.path(),
    ))
    .output;
    assert_same_tree(a.path(), mirror.path());
    let err = one_line_error(&out, 1);
    assert!(err.contains("this folder mirrors another client"), "{err}");

    // From one record, named after the served directory like its hash cache, private; beside
    // it, the list last taken from that client, named alike.
    let mut records: Vec<PathBuf> = fs::read_dir(&server_state)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    records.sort();
    assert_eq!(records.len(), 2, "{records:?}");
    let record = &records[1];
    assert!(record.to_str().unwrap().ends_with(".client"), "{record:?}");
    assert_eq!(records[0], record.with_extension("acked"));
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&records[0]), 0o600);
    assert_eq!(
        fs::read_to_string(record).unwrap().trim(),
        id_of(a_state.path())
    );
    assert_eq!(mode(record), 0o600);
    assert_eq!(mode(record.parent().unwrap()), 0o700);
}

#[test]
fn the_client_id_is_kept_private_in_its_state_dir() {
    let state = tempdir();
    let given = state.path().join("given");
    let w = World::start(&server_flags(&state.path().join("server")));
    w.apply(&[write("a.txt", "a")]);
    let mut cmd = w.client_command(&w.client);
    cmd.arg("--state-dir").arg(&given);
    let out = w.run(cmd);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let file = given.join("client-id");
    let id = fs::read_to_string(&file).unwrap();
    assert_eq!(id.trim().len(), 32, "{id:?}");
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!((mode(&given), mode(&file)), (0o700, 0o600));

    // The same state directory is the same client: welcome again, ID unchanged. The default
    // one (under the world's home) is another client: refused.
    let mut cmd = w.client_command(&w.client);
    cmd.arg("--state-dir").arg(&given);
    assert_eq!(w.run(cmd).status.code(), Some(0));
    assert_eq!(fs::read_to_string(&file).unwrap(), id);
    let out = w.sync();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));

    // An ID file that is not one is a local error, not a new identity.
    fs::write(&file, "garbage\n").unwrap();
    let mut cmd = w.client_command(&w.client);
    cmd.arg("--state-dir").arg(&given);
    let err = one_line_error(&w.run(cmd), 2);
    assert!(err.contains("not a client ID"), "{err}");
    assert!(err.contains(&file.display().to_string()), "{err}");
}

#[test]
fn take_over_is_for_one_sync_and_both_flags_are_documented() {
    let w = World::new();
    // A daemon that took over at every cycle would fight another client for ever.
    let mut cmd = Command::new(CLIENT_BIN);
    cmd.arg(&w.client).arg("--take-over");
    isolate(&mut cmd, w.home.path());
    let out = w.run(cmd);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--once"), "{}", stderr(&out));

    for (bin, words) in [
        (
            CLIENT_BIN,
            &[
                "--state-dir",
                "--take-over",
                "~/.local/state/server-sync",
                "or the server's folder mirrors another client",
                "directory nested",
            ][..],
        ),
        (
            SERVER_BIN,
            &["--state-dir", "~/.local/state/server-sync", "--take-over"][..],
        ),
    ] {
        let help = w.help(bin);
        for words in words {
            assert!(
                help.contains(words),
                "{bin} --help lacks {words:?}:\n{help}"
            );
        }
    }
}

#[test]
fn the_server_refuses_a_state_dir_inside_dir_or_a_corrupt_record_at_start() {
    let w = World::new();
    let dir = w.tmp.path().join("new-mirror");
    let inside = dir.join("state");
    let mut cmd = Command::new(SERVER_BIN);
    cmd.arg(&dir).arg("--state-dir").arg(&inside);
    isolate(&mut cmd, w.home.path());
    let err = one_line_error(&w.run(cmd), 2);
    assert!(
        err.contains("state directory") && err.contains("is inside the synced directory"),
        "{err}"
    );
    assert!(!dir.exists(), "a refused setup leaves nothing behind");

    let state = w.home.path().join("server-state");
    let record = server_sync::store::state::owner_file(&state, &w.server_dir).unwrap();
    fs::create_dir_all(&state).unwrap();
    fs::write(&record, "not an id\n").unwrap();
    let mut cmd = Command::new(SERVER_BIN);
    cmd.arg(&w.server_dir).arg("--state-dir").arg(&state);
    isolate(&mut cmd, w.home.path());
    let err = one_line_error(&w.run(cmd), 2);
    assert!(err.contains(&record.display().to_string()), "{err}");
    assert!(err.contains("not a client ID"), "{err}");
}
