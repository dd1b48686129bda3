//! Regression tests for the defects found by trying to break the tool: a hash cache placed
//! inside the synced tree, idle connections locking clients out, a client waiting for ever on
//! a peer that does not answer, SIGHUP leaving temporary files, and misleading messages and
//! exit statuses. Each asserts what a user sees: exit status, stderr, logs and trees.

mod support;

use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use server_sync::core::hash::HashAlgorithm;
use server_sync::core::identity::ClientId;
use server_sync::core::manifest::{Entry, Kind, Meta, RelPath};
use server_sync::server;
use server_sync::wire::codec::read_frame_blocking;
use server_sync::wire::{
    Capabilities, ControlMessage, DataMessage, Failure, ProtocolError, Summary, VERSION,
    WireMessage,
};
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
// Hand-made peers and servers, for what the real binaries cannot be made to do

/// A raw blocking connection speaking through the library's codec, one call at a time.
struct Peer(TcpStream);

impl Peer {
    fn connect(port: u16) -> Peer {
        Peer::from_ip(Ipv4Addr::LOCALHOST, port)
    }

    /// A connection to the server on 127.0.0.1 from the loopback address `from`: how one
    /// machine plays several hosts.
    fn from_ip(from: Ipv4Addr, port: u16) -> Peer {
        Peer::new(connect_from(from, port).expect("server accepts connections"))
    }

    fn new(s: TcpStream) -> Peer {
        s.set_read_timeout(Some(WAIT)).unwrap();
        Peer(s)
    }

    fn send(&mut self, m: &impl WireMessage) {
        let mut frame = Vec::new();
        m.encode(&mut frame);
        std::io::Write::write_all(&mut self.0, &frame).expect("peer takes what we send");
    }

    /// The next message; `Ok(None)` when the other side hung up, `Err(Idle)` after [`WAIT`].
    fn recv(&mut self) -> Result<Option<ControlMessage>, ProtocolError> {
        read_frame_blocking(&mut self.0)?
            .map(|b| ControlMessage::decode(&b))
            .transpose()
    }

    /// `Hello` → `Welcome`: the data port and session token.
    fn hello(&mut self) -> (u16, u64) {
        self.send(&hello());
        match self.recv() {
            Ok(Some(ControlMessage::Welcome {
                data_port, token, ..
            })) => (data_port, token),
            other => panic!("expected welcome, got {other:?}"),
        }
    }

    /// Plays the server: reads the client's `Hello`.
    fn expect_hello(&mut self) {
        match self.recv() {
            Ok(Some(ControlMessage::Hello { .. })) => {}
            other => panic!("expected hello, got {other:?}"),
        }
    }

    /// Plays the server: reads the client's file list up to its end, keepalives included.
    fn read_list(&mut self) -> Vec<Entry> {
        let mut entries = Vec::new();
        loop {
            match self.recv() {
                Ok(Some(ControlMessage::FileList(batch))) => entries.extend(batch),
                Ok(Some(ControlMessage::FileListEnd)) => return entries,
                Ok(Some(ControlMessage::RootMeta(_) | ControlMessage::Ping)) => {}
                other => panic!("expected the file list, got {other:?}"),
            }
        }
    }
}

fn hello() -> ControlMessage {
    ControlMessage::Hello {
        version: VERSION,
        transfers: 1,
        hashes: vec![HashAlgorithm::Blake3],
        capabilities: Capabilities::NONE,
        machine: String::new(),
        root_chain: Vec::new(),
        client: ClientId(1),
        take_over: false,
    }
}

fn welcome() -> ControlMessage {
    ControlMessage::Welcome {
        version: VERSION,
        data_port: 9,
        token: 7,
        hash: HashAlgorithm::Blake3,
        capabilities: Capabilities::NONE,
    }
}

/// `Ping`: the keepalive of both sides.
fn keepalive() -> ControlMessage {
    ControlMessage::Ping
}

/// A TCP connection from `from` (a loopback address) to 127.0.0.1:`port`.
fn connect_from(from: Ipv4Addr, port: u16) -> std::io::Result<TcpStream> {
    use std::os::fd::FromRawFd;
    let sockaddr = |ip: Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket calls on a descriptor we own, handed to `TcpStream` (which closes
    // it) before any early return; the addresses are valid for `len` bytes.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let stream = TcpStream::from_raw_fd(fd);
        let (local, remote) = (sockaddr(from, 0), sockaddr(Ipv4Addr::LOCALHOST, port));
        if libc::bind(fd, (&raw const local).cast(), len) != 0
            || libc::connect(fd, (&raw const remote).cast(), len) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(stream)
    }
}

/// A fake server on a loopback port: accepts one connection and plays `script` on it, in a
/// thread whose panic (a script expectation not met) fails the test when joined.
fn fake_server(script: impl FnOnce(Peer) + Send + 'static) -> (u16, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let thread = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        script(Peer::new(stream));
    });
    (port, thread)
}

/// Runs `client-sync --once` of the world's client directory against `port`, with `extra`
/// flags; returns its output and how long it took.
fn client_against(w: &World, port: u16, extra: &[&str]) -> (Output, Duration) {
    let mut cmd = client_command(&w.client, port, w.home.path());
    cmd.args(extra);
    let start = Instant::now();
    let out = w.run(cmd);
    (out, start.elapsed())
}

/// Waits, polling, until `cond` holds; fails the test after [`WAIT`].
fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "no {what} within {WAIT:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A server run in this process, for settings the command line does not offer; stopped when
/// dropped.
struct InProcessServer {
    port: u16,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl InProcessServer {
    fn start(config: server::Config) -> InProcessServer {
        let (port_tx, port_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let (control, data) = server::bind("127.0.0.1", 0, 0).await.unwrap();
                port_tx.send(control.local_addr().unwrap().port()).unwrap();
                let stopped = async {
                    let _ = stopped.await;
                };
                server::run(config, control, data, stopped).await.unwrap();
            });
        });
        let port = port_rx
            .recv_timeout(WAIT)
            .expect("in-process server listens");
        InProcessServer {
            port,
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for InProcessServer {
    fn drop(&mut self) {
        let _ = self.stop.take().unwrap().send(());
        let _ = self.thread.take().unwrap().join();
    }
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
// 2. Idle connections locking clients out

/// What a connection that sent nothing got from the server: told it is busy, or closed.
#[derive(Debug, PartialEq)]
enum Fate {
    Busy(String),
    Closed(Duration),
}

/// Waits for what the server does with each idle connection, timed from `opened`.
fn fates(conns: Vec<Peer>, opened: Instant) -> Vec<Fate> {
    let fates: Vec<Fate> = conns
        .into_iter()
        .map(|mut c| match c.recv() {
            Ok(Some(ControlMessage::Error(e))) => Fate::Busy(e),
            // Closed: end of stream, or reset since we never read (ours is unread).
            Ok(None) | Err(ProtocolError::Io(_)) | Err(ProtocolError::Truncated) => {
                Fate::Closed(opened.elapsed())
            }
            other => panic!("an idle connection got {other:?}"),
        })
        .collect();
    fates
}

#[test]
fn idle_connections_from_one_host_do_not_lock_out_another() {
    // The reported attack, with the default settings: 64 connections that say nothing, all
    // from one host (127.0.0.2). Before, they took every slot for the whole 60 s idle timeout.
    let w = World::start(&[]);
    w.apply(&[write("a.txt", "a")]);
    let attacker = Ipv4Addr::new(127, 0, 0, 2);
    let opened = Instant::now();
    let idle: Vec<Peer> = (0..64).map(|_| Peer::from_ip(attacker, w.port())).collect();

    // A client on another address syncs at once.
    w.sync_ok();
    w.assert_mirrored();

    // The attacker holds 8 connections (the per-address cap) for the 5 s handshake timeout,
    // not the 60 s idle timeout; the other 56 are told the server is busy.
    let fates = fates(idle, opened);
    let busy = format!("server busy: already 8 connections from {attacker}, try again later");
    let (told, closed): (Vec<&Fate>, Vec<&Fate>) =
        fates.iter().partition(|f| matches!(f, Fate::Busy(_)));
    assert_eq!((told.len(), closed.len()), (56, 8), "{fates:?}");
    assert!(
        told.iter().all(|f| **f == Fate::Busy(busy.clone())),
        "{told:?}"
    );
    for f in closed {
        let Fate::Closed(after) = f else {
            unreachable!()
        };
        assert!(
            *after >= Duration::from_secs(4) && *after < Duration::from_secs(20),
            "an idle connection was dropped after {after:?}, not the 5 s handshake timeout"
        );
    }
    // The server logs after closing: wait for its lines.
    let silent = "ended: peer went silent for 5 s without saying hello";
    w.server().wait_for_log_count(silent, 8, WAIT);
    let log = w.server().log();
    assert_eq!(log.matches(silent).count(), 8, "{log}");
    assert_eq!(
        log.matches("refusing connection from 127.0.0.2:").count(),
        56,
        "{log}"
    );
}

#[test]
fn idle_connections_from_the_same_host_delay_a_client_only_until_their_handshake_times_out() {
    // All loopback: the idle connections take this host's 8 slots, so the client is told the
    // server is busy (promptly, exit 3) until the server drops them, then syncs.
    let w = World::start(&[]);
    w.apply(&[write("a.txt", "a")]);
    let opened = Instant::now();
    let idle: Vec<Peer> = (0..16).map(|_| Peer::connect(w.port())).collect();
    let (out, took) = client_against(&w, w.port(), &[]);
    check_one_line_error(
        &out,
        3,
        "client-sync: server refused the sync: server busy: already 8 connections from \
         127.0.0.1, try again later",
    );
    assert!(took < Duration::from_secs(3), "told after {took:?}");

    let fates = fates(idle, opened);
    let closed = fates.iter().filter(|f| matches!(f, Fate::Closed(_)));
    assert_eq!(closed.count(), 8, "{fates:?}");
    w.sync_ok();
    w.assert_mirrored();
}

#[test]
fn a_full_server_says_busy_and_the_client_exits_3() {
    let cases = [
        (
            "--max-connections",
            "server busy: already serving 2 connections, try again later",
        ),
        (
            "--max-per-address",
            "server busy: already 2 connections from 127.0.0.1, try again later",
        ),
    ];
    for (flag, busy) in cases {
        let w = World::start(&[flag, "2"]);
        w.apply(&[write("a.txt", "a")]);
        // Two real sessions: one under way, one waiting for its turn.
        let mut first = Peer::connect(w.port());
        first.hello();
        let mut second = Peer::connect(w.port());
        second.send(&hello());
        w.server()
            .wait_for_log("waits for another session to finish", WAIT);

        let (out, took) = client_against(&w, w.port(), &[]);
        let err = check_one_line_error(&out, 3, busy);
        assert_eq!(err, format!("client-sync: server refused the sync: {busy}"));
        assert!(took < Duration::from_secs(3), "{flag}: told after {took:?}");

        // Once they are gone, the client gets in.
        drop((first, second));
        w.server().wait_for_log_count("ended: ", 2, WAIT);
        w.sync_ok();
        w.assert_mirrored();
    }
}

// ---------------------------------------------------------------------------------------------
// 3. A peer that does not answer

#[test]
fn the_client_gives_up_on_a_listener_that_never_answers() {
    // Like `python3 -m http.server`: accepts (the kernel does, from its backlog) and waits
    // for a request line that never comes.
    let w = World::new();
    w.apply(&[write("a.txt", "a")]);
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let (out, took) = client_against(&w, port, &["--idle-timeout", "1"]);
    let err = check_one_line_error(&out, 3, "did not answer within 1 s");
    assert_eq!(
        err,
        format!(
            "client-sync: server 127.0.0.1:{port} did not answer within 1 s (not a \
             server-sync, or not responding)"
        )
    );
    assert!(took < Duration::from_secs(5), "gave up after {took:?}");
}

#[test]
fn the_client_gives_up_on_a_listener_that_never_answers_within_10_s_by_default() {
    let w = World::new();
    w.apply(&[write("a.txt", "a")]);
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let (out, took) = client_against(&w, silent.local_addr().unwrap().port(), &[]);
    check_one_line_error(&out, 3, "did not answer within 10 s");
    assert!(
        took >= Duration::from_secs(9) && took < Duration::from_secs(20),
        "gave up after {took:?}"
    );
}

#[test]
fn the_client_gives_up_on_a_stopped_server() {
    let w = World::start(&[]);
    w.apply(&[write("a.txt", "a")]);
    w.server().proc.signal(libc::SIGSTOP);
    let (out, took) = client_against(&w, w.port(), &["--idle-timeout", "2"]);
    w.server().proc.signal(libc::SIGCONT);
    check_one_line_error(&out, 3, "did not answer within 2 s");
    assert!(took < Duration::from_secs(10), "gave up after {took:?}");
    // Running again, it serves.
    w.sync_ok();
    w.assert_mirrored();
}

#[test]
fn the_client_gives_up_on_a_server_silent_in_the_middle_of_the_sync() {
    let w = World::new();
    w.apply(&[write("a.txt", "a")]);
    let (port, server) = fake_server(|mut p| {
        p.expect_hello();
        p.send(&welcome());
        p.read_list();
        // Silent from here on, until the client hangs up.
        assert!(matches!(p.recv(), Ok(None) | Err(ProtocolError::Io(_))));
    });
    let (out, took) = client_against(&w, port, &["--idle-timeout", "1"]);
    check_one_line_error(
        &out,
        3,
        "client-sync: server went silent for 1 s in the middle of the sync",
    );
    assert!(took < Duration::from_secs(5), "gave up after {took:?}");
    server.join().unwrap();
}

#[test]
fn keepalives_keep_a_client_waiting_on_a_slow_server() {
    // A server that keeps the client waiting, first for its welcome then for the end of the
    // sync, three times its idle limit each, but says it is alive meanwhile.
    let w = World::new();
    w.apply(&[write("a.txt", "a")]);
    let (port, server) = fake_server(|mut p| {
        let stall = |p: &mut Peer| {
            let until = Instant::now() + Duration::from_secs(3);
            while Instant::now() < until {
                p.send(&keepalive());
                std::thread::sleep(Duration::from_millis(100));
            }
        };
        p.expect_hello();
        stall(&mut p);
        p.send(&welcome());
        p.read_list();
        stall(&mut p);
        p.send(&ControlMessage::SyncDone(Summary::default()));
    });
    let (out, _) = client_against(&w, port, &["--idle-timeout", "1"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    server.join().unwrap();
}

#[test]
fn the_server_keeps_a_client_waiting_for_its_turn_alive() {
    // The server side of the keepalives: a client waits for its turn behind a session that
    // lasts longer than the client's idle limit, and still syncs.
    let w = World::new();
    w.apply(&[write("a.txt", "a")]);
    let mut config = server::Config::new(&w.server_dir);
    config.keepalive = Duration::from_millis(100);
    let srv = InProcessServer::start(config);
    let mut holder = Peer::connect(srv.port);
    holder.hello();

    let mut cmd = client_command(&w.client, srv.port, w.home.path());
    cmd.args(["--idle-timeout", "1"]);
    let client = std::thread::spawn(move || run(cmd));
    // A second waiter, behind the client, counts the keepalives it gets: once it has had
    // 2 s of them, the client, there before it, has waited twice its idle limit.
    let mut probe = Peer::connect(srv.port);
    probe.send(&hello());
    for _ in 0..20 {
        assert_eq!(probe.recv().unwrap(), Some(keepalive()));
    }
    drop((probe, holder));

    let ran = client.join().unwrap();
    assert_eq!(ran.output.status.code(), Some(0), "{}", ran.report());
    w.assert_mirrored();
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
            hash: HashAlgorithm::Blake3.of(&big),
        },
        meta: Meta {
            mode: 0o644,
            mtime_secs: 1_600_000_000,
            mtime_nanos: 0,
        },
    };
    let mut control = Peer::connect(w.port());
    let (data_port, token) = control.hello();
    control.send(&ControlMessage::FileList(vec![entry.clone()]));
    control.send(&ControlMessage::FileListEnd);
    let request = match control.recv() {
        Ok(Some(ControlMessage::FileRequest { id, paths })) if paths == [entry.path.clone()] => id,
        other => panic!("expected a request for big, got {other:?}"),
    };
    let mut data = Peer::connect(data_port);
    data.send(&DataMessage::DataHello { token, request });
    data.send(&DataMessage::FileBegin {
        path: entry.path.clone(),
    });
    data.send(&DataMessage::Chunk(Bytes::copy_from_slice(
        &big[..256 << 10],
    )));
    wait_for("temporary file", || !temp_files(&w.server_dir).is_empty());

    w.server().proc.signal(libc::SIGHUP);
    w.assert_logged(mark, "shutting down: waiting for");
    // The session in flight finishes without the unfinished file.
    drop(data);
    match control.recv() {
        Ok(Some(ControlMessage::SyncDone(s))) => assert_eq!(s.failed_total, 1, "{s:?}"),
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

// ---------------------------------------------------------------------------------------------
// 5. Messages and exit statuses

#[test]
fn a_port_in_use_is_reported_with_its_cause_once() {
    let w = World::new();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let dir = w.server_dir.to_str().unwrap();
    let args = [
        dir,
        "--bind",
        "127.0.0.1",
        "--port",
        &port,
        "--data-port",
        "0",
    ];
    let err = expect_one_line_error(
        &w,
        command_in(SERVER_BIN, w.tmp.path(), &args, w.home.path()),
        2,
        "cannot listen on control port",
    );
    assert_eq!(
        err.matches("Address already in use").count(),
        1,
        "the cause is printed more than once: {err}"
    );
}

#[test]
fn each_way_a_sync_ends_has_its_exit_status() {
    type Script = fn(Peer);
    // What the fake server does, the exit status, and how the client's one-line stderr starts
    // (empty: nothing on stderr).
    let cases: [(&str, Script, i32, &str); 7] = [
        (
            "clean sync",
            |mut p| {
                p.expect_hello();
                p.send(&welcome());
                p.read_list();
                p.send(&ControlMessage::SyncDone(Summary::default()));
            },
            0,
            "",
        ),
        (
            "some entries failed",
            |mut p| {
                p.expect_hello();
                p.send(&welcome());
                p.read_list();
                let mut s = Summary::default();
                s.set_failures(vec![Failure::new("a.txt", "disk full")]);
                p.send(&ControlMessage::SyncDone(s));
            },
            1,
            "client-sync: not synced: a.txt: disk full",
        ),
        (
            "refused before the session",
            |mut p| {
                p.expect_hello();
                p.send(&ControlMessage::Error("not today".into()));
            },
            3,
            "client-sync: server refused the sync: not today",
        ),
        (
            "ended during the session",
            |mut p| {
                p.expect_hello();
                p.send(&welcome());
                p.read_list();
                p.send(&ControlMessage::Error(
                    "cannot scan the server directory".into(),
                ));
            },
            3,
            "client-sync: server ended the sync: cannot scan the server directory",
        ),
        (
            "connection lost in the middle of the sync",
            |mut p| {
                p.expect_hello();
                p.send(&welcome());
                p.read_list();
            },
            3,
            "client-sync: server closed the connection in the middle of the sync",
        ),
        (
            "not a server-sync",
            |mut p| {
                p.expect_hello();
                std::io::Write::write_all(&mut p.0, b"HTTP/1.0 400 Bad request\r\n\r\n").unwrap();
            },
            3,
            "client-sync: connection to the server failed: frame of",
        ),
        (
            "a request for a path outside DIR",
            |mut p| {
                p.expect_hello();
                p.send(&welcome());
                p.read_list();
                let mut frame = Vec::new();
                let paths = vec![RelPath::new("xxa.txt").unwrap()];
                ControlMessage::FileRequest { id: 0, paths }.encode(&mut frame);
                let at = frame.windows(3).position(|w| w == b"xxa").unwrap();
                frame[at..at + 3].copy_from_slice(b"../");
                std::io::Write::write_all(&mut p.0, &frame).unwrap();
            },
            3,
            "client-sync: connection to the server failed: invalid path in message",
        ),
    ];
    for (name, script, code, error) in cases {
        let w = World::new();
        w.apply(&[write("a.txt", "a")]);
        let (port, server) = fake_server(script);
        let (out, _) = client_against(&w, port, &[]);
        server.join().unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(code), "{name}:\n{err}");
        assert_eq!(
            err.lines().count(),
            usize::from(!error.is_empty()),
            "{name}:\n{err}"
        );
        assert!(
            err.starts_with(error),
            "{name}: stderr is not {error:?}...:\n{err}"
        );
    }
}

#[test]
fn help_documents_the_new_exit_statuses_and_flags() {
    let w = World::new();
    let cases: [(&str, &[&str]); 2] = [
        (
            CLIENT_BIN,
            &[
                "1 some entries failed",
                "3 the server could not be used",
                "busy",
                "SIGHUP",
                "--idle-timeout",
            ],
        ),
        (
            SERVER_BIN,
            &["SIGHUP", "--max-per-address", "told the server is busy"],
        ),
    ];
    for (bin, words) in cases {
        let help = w.help(bin);
        for words in words {
            assert!(
                help.contains(words),
                "{bin} --help lacks {words:?}:\n{help}"
            );
        }
    }
}
