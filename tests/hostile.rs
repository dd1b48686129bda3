//! A hand-made hostile peer against a real `server-sync` process: frames built with the
//! library's own codec (then corrupted byte by byte where the codec refuses to build them),
//! garbage, oversized and truncated frames, silent peers, forged data connections and lying
//! transfers. Every case checks that the server refused with a logged reason, wrote nothing
//! outside its DIR and nothing unverified inside it, and still serves an honest
//! `client-sync --once` afterwards.

mod support;

use server_sync::wire::list_file::{ListId, list_id};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use server_sync::core::hash::HashAlgorithm;
use server_sync::core::identity::ClientId;
use server_sync::core::manifest::{Entry, Kind, Meta, RelPath};
use server_sync::wire::codec::read_frame;
use server_sync::wire::{
    Capabilities, ControlMessage, DataMessage, ProtocolError, VERSION, WireMessage,
};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::runtime::Runtime;

use support::*;

// ---------------------------------------------------------------------------------------------
// The hostile peer

/// A raw TCP peer speaking through the library's `read` and `write`, one blocking call at a
/// time, so that a test reads as a script.
struct Peer {
    // Declared first so that it is dropped before the runtime it is registered with.
    stream: TcpStream,
    rt: Runtime,
}

impl Peer {
    fn connect(port: u16) -> Peer {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let stream = rt
            .block_on(TcpStream::connect(("127.0.0.1", port)))
            .expect("server accepts connections");
        Peer { stream, rt }
    }

    fn send(&mut self, m: &impl WireMessage) {
        self.rt
            .block_on(self.stream.write_all(&frame(m)))
            .expect("server takes what we send");
    }

    /// Raw bytes. The server may hang up halfway through them, which is what some cases want.
    fn send_raw(&mut self, bytes: &[u8]) {
        let _ = self.rt.block_on(self.stream.write_all(bytes));
    }

    /// Ends our side of the stream: the server reads end-of-file.
    fn shutdown_write(&mut self) {
        let _ = self.rt.block_on(self.stream.shutdown());
    }

    /// The next control message, `None` when the peer hung up; fails the test if nothing
    /// comes.
    fn recv(&mut self) -> Result<Option<ControlMessage>, ProtocolError> {
        self.recv_as()
    }

    /// The next data message (playing a server that reads a client's data connection).
    fn recv_data(&mut self) -> Result<Option<DataMessage>, ProtocolError> {
        self.recv_as()
    }

    fn recv_as<M: WireMessage>(&mut self) -> Result<Option<M>, ProtocolError> {
        let Peer { stream, rt } = self;
        // The timer must be created inside the runtime, hence the async block.
        rt.block_on(async { tokio::time::timeout(WAIT, read_frame(stream)).await })
            .unwrap_or_else(|_| panic!("peer sent nothing and kept the connection for {WAIT:?}"))?
            .map(M::decode)
            .transpose()
    }

    /// Reads until the server hangs up; returns what it sent before.
    fn until_closed(&mut self) -> Vec<ControlMessage> {
        let mut got = Vec::new();
        while let Ok(Some(m)) = self.recv() {
            got.push(m);
        }
        got
    }

    /// `Hello` → `Welcome`: the data port and session token. The peer says it is the world's
    /// client, whose tree the server's folder mirrors.
    fn hello(&mut self, w: &World) -> (u16, u64) {
        self.send(&hello(client_id(w), VERSION));
        match self.recv() {
            Ok(Some(ControlMessage::Welcome {
                data_port, token, ..
            })) => (data_port, token),
            other => panic!("expected welcome, got {other:?}"),
        }
    }
}

/// A `Hello` from a client with this ID, speaking `version`.
fn hello(client: ClientId, version: u32) -> ControlMessage {
    hello_with(client, version, Capabilities::NONE)
}

/// A `Hello` from `client`, speaking `version`, offering `capabilities`.
fn hello_with(client: ClientId, version: u32, capabilities: Capabilities) -> ControlMessage {
    ControlMessage::Hello {
        version,
        transfers: 1,
        hashes: vec![HashAlgorithm::Blake3],
        capabilities,
        machine: String::new(),
        root_chain: Vec::new(),
        client,
        take_over: false,
    }
}

/// The ID of the world's `client-sync` (made now if it has not run yet), kept in its state
/// directory under the world's home (see `isolate`).
fn client_id(w: &World) -> ClientId {
    let dir = w.home.path().join("state/server-sync");
    server_sync::store::state::client_id(&dir, ClientId(0x5ca1ab1e)).unwrap()
}

/// A message's whole frame, length prefix included.
fn frame(m: &impl WireMessage) -> Vec<u8> {
    let mut b = Vec::new();
    m.encode(&mut b);
    b
}

/// Replaces the single occurrence of `from` in `bytes` by `to` (same length): how a test
/// builds a frame the codec refuses to build, such as one carrying `../escape`, without
/// knowing the byte layout.
fn patch(mut bytes: Vec<u8>, from: &[u8], to: &[u8]) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let at: Vec<usize> = bytes
        .windows(from.len())
        .enumerate()
        .filter(|(_, w)| *w == from)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(at.len(), 1, "placeholder {from:?} must occur exactly once");
    bytes[at[0]..at[0] + to.len()].copy_from_slice(to);
    bytes
}

/// A valid path of the same length as `hostile`, to be patched into it.
fn placeholder(hostile: &[u8]) -> String {
    "p".repeat(hostile.len())
}

fn meta() -> Meta {
    Meta {
        mode: 0o644,
        mtime_secs: 1_600_000_000,
        mtime_nanos: 0,
    }
}

fn p(s: &str) -> RelPath {
    RelPath::new(s).unwrap()
}

fn file_entry(path: &str, content: &[u8]) -> Entry {
    Entry {
        path: p(path),
        kind: Kind::File {
            size: content.len() as u64,
            hash: HashAlgorithm::Blake3.of(content),
        },
        meta: meta(),
    }
}

/// A file list announcing one file at the raw, invalid `path`.
fn list_with_path(path: &[u8]) -> Vec<u8> {
    let ph = placeholder(path);
    patch(
        frame(&ControlMessage::FileList(vec![file_entry(&ph, b"owned")])),
        ph.as_bytes(),
        path,
    )
}

/// A `FileBegin` for the raw, invalid `path`.
fn begin_with_path(path: &[u8]) -> Vec<u8> {
    let ph = placeholder(path);
    patch(
        frame(&DataMessage::FileBegin { path: p(&ph) }),
        ph.as_bytes(),
        path,
    )
}

// ---------------------------------------------------------------------------------------------
// The world every case runs in

const OLD: &[u8] = b"old content";
const NEW: &[u8] = b"new content";

/// A server whose DIR mirrors a small client tree holding `victim` = OLD.
fn victim_world(extra: &[&str]) -> World {
    let w = World::start(extra);
    w.apply(&[
        write("victim", OLD),
        write("keep/file.txt", "keep"),
        write("top.txt", "top"),
    ]);
    w.sync_ok();
    w.assert_mirrored();
    w
}

/// The tree below `dir` as protocol entries, as an honest client would list it.
fn entries_of(dir: &Path) -> Vec<Entry> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<Entry>) {
        for ent in fs::read_dir(dir).unwrap() {
            let path = ent.unwrap().path();
            let md = fs::symlink_metadata(&path).unwrap();
            let rel = path.strip_prefix(root).unwrap().to_str().unwrap();
            let kind = if md.is_dir() {
                Kind::Dir
            } else {
                let content = fs::read(&path).unwrap();
                Kind::File {
                    size: content.len() as u64,
                    hash: HashAlgorithm::Blake3.of(&content),
                }
            };
            out.push(Entry {
                path: p(rel),
                kind,
                meta: Meta {
                    mode: md.mode() & 0o7777,
                    mtime_secs: md.mtime(),
                    mtime_nanos: md.mtime_nsec() as u32,
                },
            });
            if md.is_dir() {
                walk(root, &path, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out
}

/// Opens a session announcing the client's tree with `victim` changed to NEW, as a client
/// that changed it would. Returns the control connection, the data port and the token, once
/// the server has asked for `victim` and nothing else.
fn open_victim_session(w: &World) -> (Peer, u16, u64) {
    open_session_changing(w, "victim")
}

/// Like [`open_victim_session`], for any file of the client's tree.
fn open_session_changing(w: &World, changed: &str) -> (Peer, u16, u64) {
    let mut entries = entries_of(&w.client);
    let e = entries
        .iter_mut()
        .find(|e| e.path.as_str() == changed)
        .unwrap();
    e.kind = Kind::File {
        size: NEW.len() as u64,
        hash: HashAlgorithm::Blake3.of(NEW),
    };
    let mut control = Peer::connect(w.port());
    let (data_port, token) = control.hello(w);
    control.send(&ControlMessage::FileList(entries));
    control.send(&ControlMessage::FileListEnd);
    match control.recv() {
        Ok(Some(ControlMessage::FileRequest { paths, .. })) => assert_eq!(paths, [p(changed)]),
        other => panic!("expected a request for {changed}, got {other:?}"),
    }
    (control, data_port, token)
}

/// What every case ends with: nothing escaped, nothing half-written remains, and an honest
/// client is still served.
fn still_safe_and_serving(w: &World) {
    w.assert_contained();
    assert_eq!(temp_files(&w.server_dir), Vec::<String>::new());
    w.sync_ok();
    w.assert_mirrored();
}

/// Waits, polling, until `cond` holds; fails the test after [`WAIT`].
fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------------------------
// The control connection

/// Bytes sent on a fresh control connection (after a proper `Hello` when `after_hello`), and
/// the reason the server must log when it drops the session.
struct Attack {
    name: &'static str,
    after_hello: bool,
    bytes: Vec<u8>,
    /// Half-close after the bytes, for attacks that end in the middle of a frame.
    then_eof: bool,
    reason: &'static str,
}

fn attack(name: &'static str, after_hello: bool, bytes: Vec<u8>, reason: &'static str) -> Attack {
    Attack {
        name,
        after_hello,
        bytes,
        then_eof: false,
        reason,
    }
}

/// Runs each attack against a fresh server whose DIR mirrors a client: the session must end
/// with the reason logged, the DIR must be exactly as before, and an honest client must then
/// sync as usual.
fn check_attacks(attacks: Vec<Attack>) {
    for a in attacks {
        eprintln!("=== attack: {}", a.name);
        let w = victim_world(&[]);
        let before = tree(&w.server_dir);
        let mark = w.mark();
        let mut peer = Peer::connect(w.port());
        if a.after_hello {
            peer.hello(&w);
        }
        peer.send_raw(&a.bytes);
        if a.then_eof {
            peer.shutdown_write();
        }
        peer.until_closed();
        w.assert_logged(mark, "ended: ");
        w.assert_logged(mark, a.reason);
        let after = tree(&w.server_dir);
        assert_eq!(after, before, "{}: refused list changed the DIR", a.name);
        still_safe_and_serving(&w);
    }
}

#[test]
fn hostile_file_lists_are_refused() {
    let outside = {
        // Any absolute path will do; the one of a real directory makes the escape concrete.
        let w = World::new();
        w.outside.join("pwned").to_str().unwrap().to_owned()
    };
    let mut forged_count = frame(&ControlMessage::FileList(vec![]));
    let n = forged_count.len();
    forged_count[n - 4..].copy_from_slice(&u32::MAX.to_be_bytes());
    let mut bad_nanos = file_entry("a", b"a");
    bad_nanos.meta.mtime_nanos = 1_500_000_000;
    let symlink = Entry {
        path: p("evil"),
        kind: Kind::Symlink {
            target: outside.clone(),
        },
        meta: meta(),
    };
    check_attacks(vec![
        attack(
            "parent dir",
            true,
            list_with_path(b"../escape"),
            "'..' component",
        ),
        attack(
            "parent dir deeper",
            true,
            list_with_path(b"a/../../escape"),
            "'..' component",
        ),
        attack("dot", true, list_with_path(b"./x"), "'..' component"),
        attack(
            "absolute path",
            true,
            list_with_path(outside.as_bytes()),
            "absolute path",
        ),
        attack("NUL byte", true, list_with_path(b"a\0b"), "NUL byte"),
        attack(
            "reserved temporary name",
            true,
            list_with_path(b".server-sync-tmp.evil"),
            "reserved temporary-file prefix",
        ),
        attack(
            "invalid UTF-8",
            true,
            list_with_path(b"\xff\xfe"),
            "invalid UTF-8 in path",
        ),
        attack(
            "orphan",
            true,
            [
                frame(&ControlMessage::FileList(vec![file_entry(
                    "no-parent/x",
                    b"x",
                )])),
                frame(&ControlMessage::FileListEnd),
            ]
            .concat(),
            "parent is not a directory",
        ),
        attack(
            "file below a symlink",
            true,
            [
                frame(&ControlMessage::FileList(vec![
                    symlink,
                    file_entry("evil/pwned", b"x"),
                ])),
                frame(&ControlMessage::FileListEnd),
            ]
            .concat(),
            "parent is not a directory",
        ),
        attack(
            "duplicate",
            true,
            [
                frame(&ControlMessage::FileList(vec![file_entry("d", b"1")])),
                frame(&ControlMessage::FileList(vec![file_entry("d", b"2")])),
                frame(&ControlMessage::FileListEnd),
            ]
            .concat(),
            "is listed twice",
        ),
        attack(
            "mtime nanoseconds out of range",
            true,
            frame(&ControlMessage::FileList(vec![bad_nanos])),
            "malformed entry mtime",
        ),
        attack("forged entry count", true, forged_count, "list count"),
    ]);
}

#[test]
fn garbage_and_bad_frames_are_refused() {
    let mut truncated = 100u32.to_be_bytes().to_vec();
    truncated.extend_from_slice(&[1; 10]);
    let mut trailing = frame(&ControlMessage::FileListEnd);
    trailing[3] += 1;
    trailing.push(0);
    let mut attacks = vec![
        attack(
            "HTTP request",
            false,
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            "exceeds the 1048576-byte limit",
        ),
        attack(
            "unknown tag",
            false,
            vec![0, 0, 0, 4, 0xde, 0xad, 0xbe, 0xef],
            "unknown message tag 222",
        ),
        attack(
            "oversized frame",
            false,
            vec![0xff; 4],
            "frame of 4294967295 bytes exceeds",
        ),
        attack(
            "oversized frame mid-session",
            true,
            vec![0xff; 4],
            "frame of 4294967295 bytes exceeds",
        ),
        attack("empty frame", false, vec![0; 4], "empty frame"),
        attack(
            "bad magic",
            false,
            patch(frame(&hello(ClientId(1), VERSION)), b"SSYN", b"HTTP"),
            "bad magic",
        ),
        attack(
            "wrong version",
            false,
            frame(&hello(ClientId(1), 99)),
            "client speaks protocol version 99",
        ),
        attack(
            "no hello",
            false,
            frame(&ControlMessage::FileListEnd),
            "unexpected filelist-end message, expected hello",
        ),
        attack(
            "data hello on the control port",
            false,
            frame(&DataMessage::DataHello {
                token: 1,
                request: 0,
            }),
            "data-hello message on the wrong connection",
        ),
        attack(
            "request from the client",
            true,
            frame(&ControlMessage::FileRequest {
                id: 0,
                paths: vec![p("victim")],
            }),
            "unexpected filerequest message, expected filelist",
        ),
        attack(
            "trailing bytes",
            true,
            trailing,
            "malformed filelist-end message",
        ),
    ];
    attacks.push(Attack {
        then_eof: true,
        ..attack(
            "truncated frame",
            true,
            truncated,
            "connection closed in the middle of a frame",
        )
    });
    check_attacks(attacks);
}

#[test]
fn wrong_version_is_told_why() {
    let w = victim_world(&[]);
    let mut peer = Peer::connect(w.port());
    peer.send(&hello(ClientId(1), 99));
    match peer.until_closed().as_slice() {
        [ControlMessage::Error(e)] => assert!(e.contains("version 99"), "{e}"),
        other => panic!("expected one error message, got {other:?}"),
    }
    still_safe_and_serving(&w);
}

// ---------------------------------------------------------------------------------------------
// Data connections

#[test]
fn data_connections_with_a_bad_token_or_garbage_are_refused() {
    let w = victim_world(&[]);
    // While an honest session waits for its data connection, forged ones arrive.
    let mark = w.mark();
    let (mut control, data_port, token) = open_victim_session(&w);
    for (bytes, reason) in [
        (
            frame(&DataMessage::DataHello {
                token: token.wrapping_add(1),
                request: 0,
            }),
            "unknown session token",
        ),
        (b"garbage garbage".to_vec(), "exceeds"),
        (
            frame(&DataMessage::FileBegin { path: p("victim") }),
            "unexpected file-begin message, expected data-hello",
        ),
    ] {
        let mut forged = Peer::connect(data_port);
        forged.send_raw(&bytes);
        forged.until_closed();
        w.assert_logged(mark, "data connection from 127.0.0.1:");
        w.assert_logged(mark, reason);
    }
    // The honest session is unharmed.
    let mut data = Peer::connect(data_port);
    data.send(&DataMessage::DataHello { token, request: 0 });
    data.send(&DataMessage::FileBegin { path: p("victim") });
    data.send(&DataMessage::Chunk(Bytes::copy_from_slice(NEW)));
    data.send(&DataMessage::FileEnd { hash: None });
    drop(data);
    match control.recv() {
        Ok(Some(ControlMessage::SyncDone(s))) => assert!(s.failed.is_empty(), "{s:?}"),
        other => panic!("expected sync:done, got {other:?}"),
    }
    assert_eq!(fs::read(w.server_dir.join("victim")).unwrap(), NEW);
    still_safe_and_serving(&w);
}

/// How a lying transfer must end.
enum Expect {
    /// The session completes; `SyncDone` names `victim` as failed with this reason.
    Failed(&'static str),
    /// The session is dropped with this reason.
    Refused(&'static str),
}

struct DataAttack {
    name: &'static str,
    /// Frames after a valid `DataHello`; then the data connection is closed.
    frames: Vec<Vec<u8>>,
    expect: Expect,
    /// What the server must log.
    log: &'static str,
    /// `victim` on the server afterwards.
    victim: &'static [u8],
}

#[test]
fn lying_and_malformed_transfers_change_nothing() {
    let begin = |s: &str| frame(&DataMessage::FileBegin { path: p(s) });
    let chunk = |b: &[u8]| frame(&DataMessage::Chunk(Bytes::copy_from_slice(b)));
    let end = || frame(&DataMessage::FileEnd { hash: None });
    let outside = World::new().outside.join("pwned");
    let cases = vec![
        DataAttack {
            name: "content differs from the announced hash",
            frames: vec![begin("victim"), chunk(b"bad content"), end()],
            expect: Expect::Failed("content changed while being sent"),
            log: "Rejected file: victim: content changed while being sent",
            victim: OLD,
        },
        DataAttack {
            name: "file-end hash contradicts the announced one",
            frames: vec![
                begin("victim"),
                chunk(NEW),
                frame(&DataMessage::FileEnd {
                    hash: Some(HashAlgorithm::Blake3.of(b"something else")),
                }),
            ],
            expect: Expect::Failed("client ended the file with blake3"),
            log: "Rejected file: victim: client ended the file with blake3",
            victim: OLD,
        },
        DataAttack {
            name: "shorter than announced",
            frames: vec![begin("victim"), chunk(b"new"), end()],
            expect: Expect::Failed("content changed while being sent (3 bytes"),
            log: "Rejected file: victim",
            victim: OLD,
        },
        DataAttack {
            name: "longer than announced",
            frames: vec![begin("victim"), chunk(NEW), chunk(b" and more"), end()],
            expect: Expect::Failed("grew past the announced 11 bytes"),
            log: "Rejected file: victim: file grew past the announced 11 bytes",
            victim: OLD,
        },
        DataAttack {
            name: "aborted by the client",
            frames: vec![
                begin("victim"),
                chunk(b"new"),
                frame(&DataMessage::FileAbort {
                    reason: "vanished".into(),
                }),
            ],
            expect: Expect::Failed("vanished"),
            log: "Client could not send victim: vanished",
            victim: OLD,
        },
        DataAttack {
            name: "connection closed in the middle of the file",
            frames: vec![begin("victim"), chunk(b"new")],
            expect: Expect::Failed("connection closed in the middle of the file"),
            log: "failed=1",
            victim: OLD,
        },
        DataAttack {
            name: "nothing sent",
            frames: vec![],
            expect: Expect::Failed("requested but not sent"),
            log: "failed=1",
            victim: OLD,
        },
        DataAttack {
            name: "a file that was not requested",
            frames: vec![begin("other"), chunk(b"x"), end()],
            expect: Expect::Refused("peer sent other, which was not requested"),
            log: "peer sent other, which was not requested",
            victim: OLD,
        },
        DataAttack {
            name: "the requested file twice",
            frames: vec![begin("victim"), chunk(NEW), end(), begin("victim")],
            expect: Expect::Refused("peer sent victim, which was not requested"),
            log: "peer sent victim, which was not requested",
            // The first copy was complete and verified: it stands.
            victim: NEW,
        },
        DataAttack {
            name: "parent-directory path",
            frames: vec![begin_with_path(b"../escape"), chunk(b"x"), end()],
            expect: Expect::Refused("'..' component"),
            log: "'..' component",
            victim: OLD,
        },
        DataAttack {
            name: "absolute path",
            frames: vec![
                begin_with_path(outside.to_str().unwrap().as_bytes()),
                chunk(b"x"),
                end(),
            ],
            expect: Expect::Refused("absolute path"),
            log: "absolute path",
            victim: OLD,
        },
        DataAttack {
            name: "chunk before any file",
            frames: vec![chunk(NEW)],
            expect: Expect::Refused("unexpected chunk message, expected file-begin"),
            log: "unexpected chunk message",
            victim: OLD,
        },
        DataAttack {
            name: "a second begin inside a file",
            frames: vec![begin("victim"), begin("victim")],
            expect: Expect::Refused("unexpected file-begin message"),
            log: "unexpected file-begin message",
            victim: OLD,
        },
        DataAttack {
            name: "oversized chunk frame",
            frames: vec![begin("victim"), vec![0xff; 4]],
            expect: Expect::Refused("exceeds"),
            log: "frame of 4294967295 bytes exceeds",
            victim: OLD,
        },
    ];
    for a in cases {
        eprintln!("=== transfer attack: {}", a.name);
        let w = victim_world(&[]);
        let mark = w.mark();
        let (mut control, data_port, token) = open_victim_session(&w);
        let mut data = Peer::connect(data_port);
        data.send(&DataMessage::DataHello { token, request: 0 });
        for f in &a.frames {
            data.send_raw(f);
        }
        drop(data);
        match a.expect {
            Expect::Failed(reason) => match control.recv() {
                Ok(Some(ControlMessage::SyncDone(s))) => assert!(
                    s.failed
                        .iter()
                        .any(|f| f.path == "victim" && f.reason.contains(reason)),
                    "{}: victim not failed with {reason:?}: {s:?}",
                    a.name
                ),
                other => panic!("{}: expected sync:done, got {other:?}", a.name),
            },
            Expect::Refused(reason) => {
                let got = control.until_closed();
                assert!(
                    !got.iter().any(|m| matches!(m, ControlMessage::SyncDone(_))),
                    "{}: session completed: {got:?}",
                    a.name
                );
                w.assert_logged(mark, reason);
            }
        }
        w.assert_logged(mark, a.log);
        assert_eq!(
            fs::read(w.server_dir.join("victim")).unwrap(),
            a.victim,
            "{}: victim content",
            a.name
        );
        still_safe_and_serving(&w);
    }
}

#[test]
fn a_directory_swapped_for_a_symlink_mid_session_is_not_written_through() {
    // Someone on the server replaces a directory by a link to elsewhere after the server
    // planned its session and before the file arrives: the write must not follow the link.
    let w = victim_world(&[]);
    let (mut control, data_port, token) = open_session_changing(&w, "keep/file.txt");
    let keep = w.server_dir.join("keep");
    fs::remove_dir_all(&keep).unwrap();
    std::os::unix::fs::symlink(&w.outside, &keep).unwrap();

    let mut data = Peer::connect(data_port);
    data.send(&DataMessage::DataHello { token, request: 0 });
    data.send(&DataMessage::FileBegin {
        path: p("keep/file.txt"),
    });
    data.send(&DataMessage::Chunk(Bytes::copy_from_slice(NEW)));
    data.send(&DataMessage::FileEnd { hash: None });
    drop(data);
    match control.recv() {
        Ok(Some(ControlMessage::SyncDone(s))) => assert!(
            s.failed
                .iter()
                .any(|f| f.path == "keep/file.txt" && f.reason.contains("symlink")),
            "{s:?}"
        ),
        other => panic!("expected sync:done, got {other:?}"),
    }
    w.assert_logged(0, "Rejected file: keep/file.txt");
    still_safe_and_serving(&w);
}

// ---------------------------------------------------------------------------------------------
// Silent peers, connection limits, shutdown

#[test]
fn silent_peers_are_dropped_after_the_idle_timeout() {
    type Script = fn(&World) -> &'static str;
    // Each returns the reason the server must log; they run at once, each on its own server,
    // so the suite waits for one idle timeout, not five.
    let scripts: [(&str, Script); 6] = [
        ("silent before hello", |w| {
            let mut peer = Peer::connect(w.port());
            let start = Instant::now();
            assert!(peer.until_closed().is_empty());
            let waited = start.elapsed();
            assert!(waited >= Duration::from_millis(900), "dropped too early");
            assert!(waited < Duration::from_secs(10), "dropped after {waited:?}");
            "ended: peer went silent"
        }),
        ("silent in the middle of the file list", |w| {
            let mut peer = Peer::connect(w.port());
            peer.hello(w);
            peer.send(&ControlMessage::FileList(vec![file_entry("a", b"a")]));
            peer.until_closed();
            "peer went silent"
        }),
        ("silent data connection", |w| {
            let mut peer = Peer::connect(w.data_port());
            peer.until_closed();
            "closed: peer went silent"
        }),
        ("never opens the data connection", |w| {
            let (mut control, _, _) = open_victim_session(w);
            control.until_closed();
            "client did not open the data connection"
        }),
        ("stalls in the middle of a file", |w| {
            let (mut control, data_port, token) = open_victim_session(w);
            let mut data = Peer::connect(data_port);
            data.send(&DataMessage::DataHello { token, request: 0 });
            data.send(&DataMessage::FileBegin { path: p("victim") });
            data.send(&DataMessage::Chunk(Bytes::from_static(b"new")));
            // The half-written file exists while the peer stalls...
            wait_for("a temporary file", || !temp_files(&w.server_dir).is_empty());
            control.until_closed();
            // ... and is gone once the server gives up on it (checked by the caller).
            assert_eq!(fs::read(w.server_dir.join("victim")).unwrap(), OLD);
            "peer went silent"
        }),
        ("holds the session while another client waits", |w| {
            let mut peer = Peer::connect(w.port());
            peer.hello(w);
            // An honest client arrives while the silent one holds the session.
            let mark = w.mark();
            w.sync_ok();
            w.assert_logged(mark, "waits for another session to finish");
            "peer went silent"
        }),
    ];
    std::thread::scope(|s| {
        for (name, script) in scripts {
            s.spawn(move || {
                let w = victim_world(&["--idle-timeout", "1"]);
                let mark = w.mark();
                let reason = script(&w);
                w.assert_logged(mark, reason);
                still_safe_and_serving(&w);
                eprintln!("=== silent peer: {name}: ok");
            });
        }
    });
}

#[test]
fn connections_past_the_limit_are_refused() {
    let w = victim_world(&["--max-connections", "2"]);
    let mark = w.mark();
    let mut first = Peer::connect(w.port());
    let second = Peer::connect(w.port());
    let mut third = Peer::connect(w.port());
    // Told why, then closed.
    match &third.until_closed()[..] {
        [ControlMessage::Error(e)]
            if e.starts_with("server busy: already serving 2 connections") => {}
        other => panic!("third connection not turned away as busy: {other:?}"),
    }
    w.assert_logged(mark, "refusing connection from 127.0.0.1:");
    w.assert_logged(mark, "already serving 2 connections");
    // The admitted ones are still served.
    first.hello(&w);
    drop((first, second, third));
    w.server()
        .wait_for_log_count("ended: connection closed by the peer", 2, WAIT);
    still_safe_and_serving(&w);
}

#[test]
fn sigterm_during_a_transfer_leaves_no_temporary_file() {
    let mut w = victim_world(&[]);
    let mark = w.mark();
    let (mut control, data_port, token) = open_victim_session(&w);
    let mut data = Peer::connect(data_port);
    data.send(&DataMessage::DataHello { token, request: 0 });
    data.send(&DataMessage::FileBegin { path: p("victim") });
    data.send(&DataMessage::Chunk(Bytes::from_static(b"new")));
    wait_for("a temporary file", || !temp_files(&w.server_dir).is_empty());

    w.server().proc.signal(libc::SIGTERM);
    w.assert_logged(mark, "shutting down: waiting for");
    // The session in flight finishes: its unfinished file fails, its session completes.
    drop(data);
    match control.recv() {
        Ok(Some(ControlMessage::SyncDone(s))) => assert_eq!(s.failed.len(), 1, "{s:?}"),
        other => panic!("expected sync:done, got {other:?}"),
    }
    let status = w.server_mut().proc.wait_exit(WAIT).expect("server exits");
    assert_eq!(status.code(), Some(0));
    assert_eq!(temp_files(&w.server_dir), Vec::<String>::new());
    assert_eq!(fs::read(w.server_dir.join("victim")).unwrap(), OLD);
    w.assert_contained();
}

#[test]
fn sigterm_abandons_a_stalled_transfer_after_the_grace_period() {
    // A peer that stalls mid-file and never comes back: the server may wait for it for its
    // shutdown grace period (5 s), not for the whole idle timeout.
    let mut w = victim_world(&["--idle-timeout", "60"]);
    let mark = w.mark();
    let (_control, data_port, token) = open_victim_session(&w);
    let mut data = Peer::connect(data_port);
    data.send(&DataMessage::DataHello { token, request: 0 });
    data.send(&DataMessage::FileBegin { path: p("victim") });
    data.send(&DataMessage::Chunk(Bytes::from_static(b"new")));
    wait_for("a temporary file", || !temp_files(&w.server_dir).is_empty());

    let start = Instant::now();
    w.server().proc.signal(libc::SIGTERM);
    w.assert_logged(mark, "shutting down: waiting for");
    let status = w.server_mut().proc.wait_exit(Duration::from_secs(15));
    let waited = start.elapsed();
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "server still running {waited:?} after SIGTERM"
    );
    w.assert_logged(mark, "abandoning");
    assert_eq!(temp_files(&w.server_dir), Vec::<String>::new());
    assert_eq!(fs::read(w.server_dir.join("victim")).unwrap(), OLD);
    w.assert_contained();
}

// ---------------------------------------------------------------------------------------------
// A hostile server against the real client

/// Accepts one connection on `listener`, giving up after [`WAIT`].
fn accept(listener: std::net::TcpListener) -> Peer {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    listener.set_nonblocking(true).unwrap();
    let stream = rt.block_on(async {
        let l = tokio::net::TcpListener::from_std(listener).unwrap();
        let accepted = tokio::time::timeout(WAIT, l.accept()).await;
        accepted.expect("client connects in time").unwrap().0
    });
    Peer { stream, rt }
}

/// Plays the server's side of a session up to the file list, which it returns, with the
/// data connection's listener still to accept.
fn fake_server_session(
    client_dir: &Path,
    home: &Path,
) -> (Proc, Peer, Vec<Entry>, std::net::TcpListener) {
    let control_l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let data_l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = control_l.local_addr().unwrap().port();
    let client = Proc::spawn(client_command(client_dir, port, home));
    let mut control = accept(control_l);
    match control.recv() {
        Ok(Some(ControlMessage::Hello { .. })) => {}
        other => panic!("expected hello, got {other:?}"),
    }
    control.send(&ControlMessage::Welcome {
        version: VERSION,
        data_port: data_l.local_addr().unwrap().port(),
        token: 7,
        hash: HashAlgorithm::Blake3,
        capabilities: Capabilities::NONE,
    });
    let mut listed = Vec::new();
    loop {
        match control.recv() {
            Ok(Some(ControlMessage::FileList(batch))) => listed.extend(batch),
            Ok(Some(ControlMessage::FileListEnd)) => break,
            Ok(Some(ControlMessage::RootMeta(_) | ControlMessage::Ping)) => {}
            other => panic!("expected the file list, got {other:?}\n{}", client.report()),
        }
    }
    (client, control, listed, data_l)
}

#[test]
fn a_hostile_server_cannot_read_outside_the_client_dir() {
    let w = World::new();
    w.put_outside("secret.txt", "outside secret");
    let outside = w.outside.to_str().unwrap().to_owned();
    w.apply(&[
        write("victim", OLD),
        write("dir/inner", "inner"),
        symlink("link", &outside),
        symlink("flink", &format!("{outside}/secret.txt")),
    ]);
    let (mut client, mut control, listed, data_l) = fake_server_session(&w.client, w.home.path());
    let kinds: Vec<String> = listed
        .iter()
        .map(|e| format!("{} {}", e.path, e.kind.name()))
        .collect();
    assert_eq!(
        kinds.len(),
        5,
        "the client lists its tree, not what its links point to: {kinds:?}"
    );

    // Ask for the files, and for things that are not files of the tree.
    let asked = ["victim", "link/secret.txt", "flink", "dir", "not-there"];
    control.send(&ControlMessage::FileRequest {
        id: 0,
        paths: asked.iter().map(|s| p(s)).collect(),
    });
    let mut data = accept(data_l);
    match data.recv_data() {
        Ok(Some(DataMessage::DataHello { token: 7, .. })) => {}
        other => panic!("expected data-hello, got {other:?}"),
    }
    let mut sent: Vec<(String, Vec<u8>, Option<String>)> = Vec::new();
    while let Ok(Some(m)) = data.recv_data() {
        match m {
            DataMessage::FileBegin { path } => sent.push((path.to_string(), Vec::new(), None)),
            DataMessage::Chunk(c) => sent.last_mut().unwrap().1.extend(c),
            DataMessage::FileEnd { .. } => {}
            DataMessage::FileAbort { reason } => sent.last_mut().unwrap().2 = Some(reason),
            other => panic!("unexpected {other:?}"),
        }
    }
    control.send(&ControlMessage::SyncDone(Default::default()));
    let status = client.wait_exit(WAIT).expect("client exits");

    assert_eq!(sent.len(), asked.len(), "{sent:?}");
    for (path, content, aborted) in &sent {
        if path == "victim" {
            assert_eq!((content.as_slice(), aborted), (OLD, &None));
        } else {
            assert!(content.is_empty(), "{path}: sent {content:?}");
            let why = aborted.as_deref().unwrap_or_default();
            assert!(
                why.contains("not a file this client offered"),
                "{path}: {why:?}"
            );
        }
    }
    assert_eq!(status.code(), Some(0), "{}", client.report());
    w.assert_contained();
}

#[test]
fn a_hostile_server_request_with_parent_paths_is_refused() {
    let w = World::new();
    w.put_outside("secret.txt", "outside secret");
    w.apply(&[write("victim", OLD)]);
    let (mut client, mut control, _, data_l) = fake_server_session(&w.client, w.home.path());
    let hostile = b"../outside/secret.txt";
    let ph = placeholder(hostile);
    control.send_raw(&patch(
        frame(&ControlMessage::FileRequest {
            id: 0,
            paths: vec![p(&ph)],
        }),
        ph.as_bytes(),
        hostile,
    ));
    let status = client.wait_exit(WAIT).expect("client exits");
    assert_eq!(status.code(), Some(3), "{}", client.report());
    assert!(
        client.stderr.text().contains("'..' component"),
        "{}",
        client.report()
    );
    // It never opened a data connection to send anything.
    data_l.set_nonblocking(true).unwrap();
    assert!(
        data_l.accept().is_err(),
        "the client connected to send data"
    );
    w.assert_contained();
}

/// A client that knows the ID of the list the server holds (it is told) but sends changes
/// that do not make the list it announces, or that do not fit the list at all: the server
/// uses neither, asks for the whole list, and the mirror is as the honest client left it.
#[test]
fn changes_that_do_not_make_the_list_announced_are_not_used() {
    let w = victim_world(&[]);
    let before = tree(&w.server_dir);
    let mut listed = entries_of(&w.client);
    listed.sort_by(|a, b| a.path.cmp(&b.path));
    let honest = list_id(&listed);
    let lies: [(ListId, Vec<Entry>); 3] = [
        // Announces the unchanged list, but slips a change in.
        (honest, vec![file_entry("victim", NEW)]),
        // Announces some other list for no change.
        (ListId([7; 32]), Vec::new()),
        // A change whose parent does not exist.
        (ListId([8; 32]), vec![file_entry("no/such/dir", NEW)]),
    ];
    for (result, upserts) in lies {
        let mut control = Peer::connect(w.port());
        control.send(&hello_with(client_id(&w), VERSION, Capabilities::DELTA));
        let base = match (control.recv(), control.recv()) {
            (
                Ok(Some(ControlMessage::Welcome { .. })),
                Ok(Some(ControlMessage::Held(Some(id)))),
            ) => id,
            other => panic!("expected welcome and held, got {other:?}"),
        };
        assert_eq!(base, honest, "the server holds what the client sent");
        control.send(&ControlMessage::Since { base, result });
        control.send(&ControlMessage::FileList(upserts));
        control.send(&ControlMessage::FileListEnd);
        loop {
            match control.recv() {
                Ok(Some(ControlMessage::Ping)) => continue,
                Ok(Some(ControlMessage::Held(None))) => break,
                other => panic!("expected the whole list to be asked for, got {other:?}"),
            }
        }
        drop(control);
        assert_eq!(tree(&w.server_dir), before, "nothing changed");
    }
    still_safe_and_serving(&w);
}
