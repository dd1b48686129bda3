//! Regression tests for the defects found by trying to break the tool: a hash cache placed
//! inside the synced tree, idle connections locking clients out, a client waiting for ever on
//! a peer that does not answer, SIGHUP leaving temporary files, and misleading messages and
//! exit statuses. Each asserts what a user sees: exit status, stderr, logs and trees.

mod support;

use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use server_sync::manifest::{Entry, Kind, Md5, Meta, RelPath};
use server_sync::protocol::{self, Message, ProtocolError, VERSION};
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

// ---------------------------------------------------------------------------------------------
// A hand-made peer, for what the real client cannot be made to do

/// A raw blocking connection speaking through the library's codec, one call at a time.
struct Peer(TcpStream);

impl Peer {
    fn connect(port: u16) -> Peer {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("server accepts connections");
        s.set_read_timeout(Some(WAIT)).unwrap();
        Peer(s)
    }

    fn send(&mut self, m: &Message) {
        protocol::write_blocking(&mut self.0, m).expect("server takes what we send");
    }

    /// The next message; `Ok(None)` when the server hung up, `Err(Idle)` after [`WAIT`].
    fn recv(&mut self) -> Result<Option<Message>, ProtocolError> {
        protocol::read_blocking(&mut self.0)
    }
}

/// Waits, polling, until `cond` holds; fails the test after [`WAIT`].
fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "no {what} within {WAIT:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------------------------
// 4. SIGHUP

#[test]
fn sighup_during_a_transfer_stops_the_server_cleanly() {
    let mut w = World::start(&[]);
    let mark = w.mark();
    // A session that announces a large file, starts sending it, and stalls half-way.
    let big = vec![7u8; 16 << 20];
    let entry = Entry {
        path: RelPath::new("big").unwrap(),
        kind: Kind::File {
            size: big.len() as u64,
            md5: Md5::of(&big),
        },
        meta: Meta {
            mode: 0o644,
            mtime_secs: 1_600_000_000,
            mtime_nanos: 0,
        },
    };
    let mut control = Peer::connect(w.port());
    control.send(&Message::Hello {
        version: VERSION,
        transfers: 1,
    });
    let (data_port, token) = match control.recv() {
        Ok(Some(Message::Welcome {
            data_port, token, ..
        })) => (data_port, token),
        other => panic!("expected welcome, got {other:?}"),
    };
    control.send(&Message::FileList(vec![entry.clone()]));
    control.send(&Message::FileListEnd);
    let request = match control.recv() {
        Ok(Some(Message::FileRequest { id, paths })) if paths == [entry.path.clone()] => id,
        other => panic!("expected a request for big, got {other:?}"),
    };
    let mut data = Peer::connect(data_port);
    data.send(&Message::DataHello { token, request });
    data.send(&Message::FileBegin {
        path: entry.path.clone(),
    });
    data.send(&Message::Chunk(big[..256 << 10].to_vec()));
    wait_for("temporary file", || !temp_files(&w.server_dir).is_empty());

    w.server().proc.signal(libc::SIGHUP);
    w.assert_logged(mark, "shutting down: waiting for");
    // The session in flight finishes without the unfinished file.
    drop(data);
    match control.recv() {
        Ok(Some(Message::SyncDone(s))) => assert_eq!(s.failed_total, 1, "{s:?}"),
        other => panic!("expected sync:done, got {other:?}"),
    }
    let status = w.server_mut().proc.wait_exit(WAIT).expect("server exits");
    assert_eq!(status.code(), Some(0), "{status}");
    w.assert_logged(mark, "server stopped");
    assert_eq!(temp_files(&w.server_dir), Vec::<String>::new());
    assert_eq!(tree(&w.server_dir), "");
}

#[test]
fn sighup_stops_the_daemon_client() {
    let w = World::start(&[]);
    w.apply(&[write("a.txt", "a")]);
    // Without --once: syncs every second until stopped.
    let mut daemon = Command::new(CLIENT_BIN);
    daemon.arg(&w.client).args([
        "--server",
        "127.0.0.1",
        "--port",
        &w.port().to_string(),
        "--interval",
        "1",
    ]);
    isolate(&mut daemon, w.home.path());
    let mut client = Proc::spawn(daemon);
    assert!(
        client.stdout.wait_count("sync:done", 1, WAIT),
        "no first sync\n{}",
        client.report()
    );
    client.signal(libc::SIGHUP);
    let status = client.wait_exit(WAIT).expect("client exits after SIGHUP");
    assert_eq!(status.code(), Some(0), "{}", client.report());
    assert!(client.stdout.text().contains("client stopped"));
    w.assert_mirrored();
}
