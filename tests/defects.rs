//! Regression tests for the defects found by trying to break the tool: a hash cache placed
//! inside the synced tree, idle connections locking clients out, a client waiting for ever on
//! a peer that does not answer, SIGHUP leaving temporary files, and misleading messages and
//! exit statuses. Each asserts what a user sees: exit status, stderr, logs and trees.

mod support;

use std::path::Path;
use std::process::{Command, Output};

use support::*;

/// Runs `cmd` and checks that it failed with `code` and a single stderr line containing
/// `error`; returns that line.
fn expect_one_line_error(w: &World, cmd: Command, code: i32, error: &str) -> String {
    let out = w.run(cmd);
    check_one_line_error(&out, code, error)
}

fn check_one_line_error(out: &Output, code: i32, error: &str) -> String {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(code), "wrong exit status:\n{err}");
    assert_eq!(err.lines().count(), 1, "want a one-line error, got:\n{err}");
    assert!(err.contains(error), "stderr lacks {error:?}:\n{err}");
    err.trim_end().to_owned()
}

/// `bin ARGS...` run from `cwd`, its cache and home kept inside `home`.
fn command_in(bin: &str, cwd: &Path, args: &[&str], home: &Path) -> Command {
    let mut cmd = Command::new(bin);
    cmd.current_dir(cwd).args(args);
    isolate(&mut cmd, home);
    cmd
}

// ---------------------------------------------------------------------------------------------
// 1. A cache directory inside the synced tree

#[test]
fn a_cache_dir_inside_dir_is_refused_before_it_exists() {
    let w = World::start(&[]);
    w.apply(&[write("a.txt", "a")]);
    let (tmp, home) = (w.tmp.path(), w.home.path());
    let port = w.port().to_string();
    let refused = "is inside the synced directory";
    let client_before = tree(&w.client);

    // As typed by a user, relative to the working directory, the cache not created yet.
    let client = [
        "client",
        "--once",
        "--server",
        "127.0.0.1",
        "--port",
        &port,
        "--cache-dir",
        "client/.cache",
    ];
    let err = expect_one_line_error(&w, command_in(CLIENT_BIN, tmp, &client, home), 2, refused);
    assert!(
        err.starts_with("client-sync: cache directory client/.cache"),
        "{err}"
    );
    let server = |dir: &str, cache: &str| {
        let args = [
            dir,
            "--bind",
            "127.0.0.1",
            "--port",
            "0",
            "--data-port",
            "0",
            "--cache-dir",
            cache,
        ];
        command_in(SERVER_BIN, tmp, &args, home)
    };
    expect_one_line_error(&w, server("server", "server/.cache"), 2, refused);
    // Through `..` and into a DIR the server would have created.
    expect_one_line_error(&w, server("server", "outside/../server/c"), 2, refused);
    expect_one_line_error(&w, server("new", "new/.cache"), 2, refused);

    // Nothing was created: no cache in either tree, no `new` DIR, and the client was not
    // synced (the server never saw it).
    assert_eq!(tree(&w.client), client_before);
    assert_eq!(tree(&w.server_dir), "");
    w.assert_contained();
}
