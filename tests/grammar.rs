//! The session grammar of `src/wire/mod.rs` is what the code does: real sessions between the
//! library's server and client (and a few scripted peers for the server's refusals) are
//! recorded message by message, every conversation must follow the grammar, and every arrow
//! of the grammar must have been taken by one of them.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use server_sync::client;
use server_sync::core::hash::HashAlgorithm;
use server_sync::core::identity::ClientId;
use server_sync::core::manifest::{Entry, Kind, Meta, RelPath};
use server_sync::events::{Event, EventSink};
use server_sync::server;
use server_sync::wire::list_file::ListId;
use server_sync::wire::{
    ARROWS, Arrow, Capabilities, Connection, ControlConnection, ControlMessage, Grammar, Side,
    VERSION, tag,
};
use tokio::net::TcpStream;
use tracing_subscriber::layer::SubscriberExt;

/// One message as a connection saw it: which connection, sent or received, its tag.
#[derive(Clone, Copy, Debug)]
struct Seen {
    conn: u64,
    sent: bool,
    tag: u8,
}

/// Collects the wire layer's trace events.
#[derive(Clone, Default)]
struct Tap(Arc<Mutex<Vec<Seen>>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Tap {
    fn on_event(&self, e: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if e.metadata().target() != "server_sync::wire" {
            return;
        }
        #[derive(Default)]
        struct Fields {
            conn: u64,
            sent: bool,
            tag: u8,
        }
        impl tracing::field::Visit for Fields {
            fn record_u64(&mut self, f: &tracing::field::Field, v: u64) {
                match f.name() {
                    "conn" => self.conn = v,
                    "tag" => self.tag = v as u8,
                    _ => {}
                }
            }
            fn record_str(&mut self, f: &tracing::field::Field, v: &str) {
                if f.name() == "dir" {
                    self.sent = v == "send";
                }
            }
            fn record_debug(&mut self, _: &tracing::field::Field, _: &dyn std::fmt::Debug) {}
        }
        let mut f = Fields::default();
        e.record(&mut f);
        self.0.lock().unwrap().push(Seen {
            conn: f.conn,
            sent: f.sent,
            tag: f.tag,
        });
    }
}

/// Deletes a file of the client's tree once its list is sent: the server then requests a file
/// the client can no longer open, which it aborts.
struct VanishAfterList(std::path::PathBuf);

impl EventSink for VanishAfterList {
    fn emit(&self, event: Event) {
        if matches!(event, Event::ListSent { .. }) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

fn write(dir: &Path, rel: &str, content: &[u8]) {
    let p = dir.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, content).unwrap();
}

/// A 2 MiB file that is a hole but for 3 bytes in the middle.
fn sparse(dir: &Path, rel: &str) {
    use std::io::{Seek, Write};
    let mut f = std::fs::File::create(dir.join(rel)).unwrap();
    f.seek(std::io::SeekFrom::Start(1 << 20)).unwrap();
    f.write_all(b"abc").unwrap();
    f.set_len(2 << 20).unwrap();
}

fn client_config(dir: &Path, port: u16, cache: &Path) -> client::Config {
    client::Config {
        transfers: 1,
        // Ping at every turn of a scan or hash: those arrows are taken whatever the speed.
        keepalive: Duration::ZERO,
        defer_above: 1 << 20,
        cache_file: Some(cache.join("client")),
        // Lists acknowledged between sessions: re-syncs send changes `Since` the last.
        acked_file: Some(cache.join("client.sent")),
        // One client throughout, scripted ones included: the folder mirrors it.
        client_id: ClientId(1),
        ..client::Config::new(dir, "127.0.0.1", port)
    }
}

/// A scripted client: says hello, returns its connection and the welcome.
async fn scripted(port: u16) -> ControlConnection<TcpStream> {
    scripted_with(port, Capabilities::NONE).await
}

async fn scripted_with(port: u16, capabilities: Capabilities) -> ControlConnection<TcpStream> {
    let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut conn: ControlConnection<TcpStream> = Connection::new(stream);
    conn.send_now(&ControlMessage::Hello {
        version: VERSION,
        transfers: 1,
        hashes: vec![HashAlgorithm::Blake3],
        capabilities,
        machine: String::new(),
        root_chain: Vec::new(),
        client: ClientId(1),
        take_over: false,
    })
    .await
    .unwrap();
    // Pinged while the session before (or its leftovers) holds the turn.
    let welcome = loop {
        match conn.recv().await.unwrap() {
            Some(ControlMessage::Ping) => continue,
            other => break other,
        }
    };
    match welcome {
        Some(ControlMessage::Welcome { capabilities, .. })
            if capabilities.has(Capabilities::DELTA) =>
        {
            match conn.recv().await.unwrap() {
                Some(ControlMessage::Held(_)) => conn,
                other => panic!("expected held, got {other:?}"),
            }
        }
        Some(ControlMessage::Welcome { .. }) => conn,
        other => panic!("expected welcome, got {other:?}"),
    }
}

/// Reads until the server's `Error`, which must come.
async fn until_error(conn: &mut ControlConnection<TcpStream>) -> String {
    loop {
        match conn.recv().await.unwrap() {
            Some(ControlMessage::Error(e)) => return e,
            Some(_) => continue,
            None => panic!("closed without an error"),
        }
    }
}

fn file(path: &str, content: &[u8]) -> Entry {
    Entry {
        path: RelPath::new(path).unwrap(),
        kind: Kind::File {
            size: content.len() as u64,
            hash: HashAlgorithm::Blake3.of(content),
        },
        meta: Meta::default(),
    }
}

async fn sessions(port: u16, client_dir: &Path, server_dir: &Path, cache: &Path) {
    // 1. Many files (two request batches), a large one, a sparse one, one that vanishes.
    for i in 0..600 {
        write(
            client_dir,
            &format!("d/f{i:03}"),
            format!("file {i}").as_bytes(),
        );
    }
    // Large enough that hashing it outlasts a timer tick: the client pings while it hashes.
    write(client_dir, "big", &vec![7u8; 32 << 20]);
    sparse(client_dir, "sparse");
    write(client_dir, "vanish", b"here for the list only");
    let cfg = client::Config {
        events: Arc::new(VanishAfterList(client_dir.join("vanish"))),
        ..client_config(client_dir, port, cache)
    };
    let report = client::sync_once(&cfg).await.unwrap();
    assert_eq!(report.summary.failed_total, 1, "{report:?}");

    // 2. The large file renamed: the server asks for its hash, finds it, moves it.
    std::fs::rename(client_dir.join("big"), client_dir.join("big2")).unwrap();
    let cfg = client_config(client_dir, port, cache);
    let report = client::sync_once(&cfg).await.unwrap();
    assert_eq!(report.summary.renamed, 1, "{report:?}");

    // 3. Two at once: one waits for its turn, pinged meanwhile.
    write(client_dir, "big3", &vec![9u8; 8 << 20]);
    let (a, b) = tokio::join!(client::sync_once(&cfg), client::sync_once(&cfg));
    a.unwrap();
    b.unwrap();

    // 4. No hash in common: refused at once.
    let none = client::Config {
        hashes: Vec::new(),
        ..client_config(client_dir, port, cache)
    };
    let err = client::sync_once(&none).await.unwrap_err();
    assert!(
        err.to_string().contains("no content hash in common"),
        "{err}"
    );

    // 5. A client gone silent in the middle of its list.
    let mut conn = scripted(port).await;
    conn.send_file_list(&[]).await.unwrap();
    conn.flush().await.unwrap();
    assert!(until_error(&mut conn).await.contains("silent"));

    // 6. An invalid list (a path twice).
    let mut conn = scripted(port).await;
    let twice = [file("x", b"1"), file("x", b"2")];
    conn.send_file_list(&twice).await.unwrap();
    conn.send_now(&ControlMessage::FileListEnd).await.unwrap();
    assert!(until_error(&mut conn).await.contains("listed twice"));

    // 7. A client that never opens the data connection it is asked for.
    let mut conn = scripted(port).await;
    conn.send_file_list(&[file("never-sent", b"data")])
        .await
        .unwrap();
    conn.send_now(&ControlMessage::FileListEnd).await.unwrap();
    assert!(until_error(&mut conn).await.contains("data connection"));

    // 8. A session that is not live sends changes after its sync: refused.
    let mut conn = scripted(port).await;
    conn.send_now(&ControlMessage::FileListEnd).await.unwrap();
    conn.send_now(&ControlMessage::Changes).await.unwrap();
    assert!(until_error(&mut conn).await.contains("unexpected"));

    // 9. A live session whose changes do not fit the list held: refused.
    let mut conn = scripted_with(port, Capabilities::LIVE).await;
    conn.send_now(&ControlMessage::FileListEnd).await.unwrap();
    conn.send_now(&ControlMessage::Changes).await.unwrap();
    conn.send_file_list(&[file("no-such-dir/x", b"1")])
        .await
        .unwrap();
    conn.send_now(&ControlMessage::FileListEnd).await.unwrap();
    assert!(until_error(&mut conn).await.contains("parent"));

    // 10. Changes since a list the server does not hold: it asks for the whole list.
    let mut conn = scripted_with(port, Capabilities::DELTA).await;
    let (base, result) = (ListId([1; 32]), ListId([2; 32]));
    conn.send_now(&ControlMessage::Since { base, result })
        .await
        .unwrap();
    conn.send_now(&ControlMessage::FileListEnd).await.unwrap();
    loop {
        match conn.recv().await.unwrap() {
            Some(ControlMessage::Held(None)) => break,
            Some(ControlMessage::Ping) => continue,
            other => panic!("expected held, got {other:?}"),
        }
    }
    conn.send_now(&ControlMessage::FileListEnd).await.unwrap();
    loop {
        match conn.recv().await.unwrap() {
            Some(ControlMessage::SyncDone(_)) => break,
            Some(ControlMessage::Ping) => continue,
            other => panic!("expected sync:done, got {other:?}"),
        }
    }
    drop(conn);

    // 11. A watching daemon: changes, a removal, the root's mtime, a change behind the
    // mirror's back, full rescans every second.
    live(port, client_dir, server_dir, cache).await;
}

/// Runs a watching daemon through every kind of batch, each awaited as its outcome on the
/// server's side.
async fn live(port: u16, client_dir: &Path, server_dir: &Path, cache: &Path) {
    let done = Arc::new(tokio::sync::Notify::new());
    let cfg = client::Config {
        watch: true,
        events: Arc::new(Wake(done.clone())),
        ..client_config(client_dir, port, cache)
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let daemon = tokio::spawn(async move {
        client::run(&cfg, Duration::from_secs(1), async {
            let _ = stopped.await;
        })
        .await
    });
    let mirrored = || {
        let listing = |d: &Path| {
            let mut v: Vec<String> = walk(d).into_iter().collect();
            v.sort();
            v
        };
        listing(client_dir) == listing(server_dir)
    };
    wait_for(&done, &mirrored).await;
    write(client_dir, "live/new", b"new");
    std::fs::remove_file(client_dir.join("d/f000")).unwrap();
    wait_for(&done, &mirrored).await;
    write(server_dir, "behind-its-back", b"junk");
    wait_for(&done, &|| !server_dir.join("behind-its-back").exists()).await;
    // Two more rounds: a full rescan has come by then.
    for _ in 0..3 {
        tokio::time::timeout(Duration::from_secs(30), done.notified())
            .await
            .expect("a full rescan every second");
    }
    stop.send(()).unwrap();
    daemon.await.unwrap();
}

/// Wakes a waiter at every completed batch.
struct Wake(Arc<tokio::sync::Notify>);

impl EventSink for Wake {
    fn emit(&self, event: Event) {
        if matches!(event, Event::SyncDone) {
            self.0.notify_waiters();
        }
    }
}

/// Waits until `ok` holds, looking again after each batch (and every 100 ms, for a batch that
/// came before the wait began).
async fn wait_for(done: &tokio::sync::Notify, ok: &dyn Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !ok() {
        assert!(tokio::time::Instant::now() < deadline, "timed out");
        let _ = tokio::time::timeout(Duration::from_millis(100), done.notified()).await;
    }
}

/// Every path below `dir` with its content, for comparing two trees.
fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().into_string().unwrap();
        let p = e.path();
        if name.starts_with(".server-sync-tmp.") {
            continue; // the server's files in flight
        }
        if p.is_dir() {
            out.extend(walk(&p).into_iter().map(|s| format!("{name}/{s}")));
            out.push(name);
        } else if let Ok(content) = std::fs::read(&p) {
            out.push(format!("{name}={}", content.len()));
        }
    }
    out
}

/// Replays one connection's messages through the grammar: a control connection as its
/// server end saw them (the server reads one message at a time: its order has no races), a
/// data connection as its client end sent them (the server reads their first frame raw).
fn replay(seen: &[Seen], taken: &mut HashSet<Arrow>) -> Result<(), String> {
    let (mut g, client_end) = match seen.first() {
        Some(s) if !s.sent && s.tag == tag::HELLO => (Grammar::control(), false),
        Some(s) if s.sent && s.tag == tag::DATA_HELLO => (Grammar::data(), true),
        _ => return Ok(()), // the other end of a conversation replayed from this one
    };
    for s in seen {
        let side = match s.sent == client_end {
            true => Side::Client,
            false => Side::Server,
        };
        taken.insert(g.step(side, s.tag)?);
    }
    Ok(())
}

#[test]
fn every_arrow_of_the_grammar_is_taken_and_nothing_else() {
    let tap = Tap::default();
    let subscriber = tracing_subscriber::registry()
        .with(tap.clone())
        .with(tracing_subscriber::filter::LevelFilter::TRACE);
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let d = tempfile::tempdir().unwrap();
    let (server_dir, client_dir, cache) = (d.path().join("s"), d.path().join("c"), d.path());
    std::fs::create_dir_all(&server_dir).unwrap();
    std::fs::create_dir_all(&client_dir).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (control, data) = server::bind("127.0.0.1", 0, 0).await.unwrap();
        let port = control.local_addr().map(|a: SocketAddr| a.port()).unwrap();
        let config = server::Config {
            idle_timeout: Duration::from_millis(500),
            keepalive: Duration::from_millis(1),
            cache_file: Some(cache.join("server")),
            // A state directory: the folder mirrors one client, and keeps its last list.
            owner_file: Some(cache.join("state/folder.client")),
            ..server::Config::new(&server_dir)
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = tokio::spawn(server::run(config, control, data, async {
            let _ = stopped.await;
        }));
        sessions(port, &client_dir, &server_dir, cache).await;
        // A live session between batches when the server stops: told so.
        let mut idle = scripted_with(port, Capabilities::LIVE).await;
        idle.send_now(&ControlMessage::FileListEnd).await.unwrap();
        loop {
            match idle.recv().await.unwrap() {
                Some(ControlMessage::SyncDone(_)) => break,
                Some(_) => continue,
                None => panic!("closed before its sync:done"),
            }
        }
        stop.send(()).unwrap();
        assert!(until_error(&mut idle).await.contains("shutting down"));
        serving.await.unwrap().unwrap();
    });

    let seen = tap.0.lock().unwrap().clone();
    let mut by_conn: HashMap<u64, Vec<Seen>> = HashMap::new();
    for s in seen {
        by_conn.entry(s.conn).or_default().push(s);
    }
    let mut taken = HashSet::new();
    let mut broken = Vec::new();
    for (conn, seen) in &by_conn {
        if let Err(e) = replay(seen, &mut taken) {
            let names: Vec<String> = seen
                .iter()
                .map(|s| format!("{}{}", if s.sent { "C:" } else { "S:" }, tag::name(s.tag)))
                .collect();
            broken.push(format!("connection {conn}: {e}\n  {}", names.join(" ")));
        }
    }
    assert!(broken.is_empty(), "off the grammar:\n{}", broken.join("\n"));
    let missed: Vec<String> = ARROWS
        .iter()
        .filter(|a| !taken.contains(a))
        .map(|a| {
            format!(
                "{:?} {:?}: {} -> {:?}",
                a.from,
                a.side,
                tag::name(a.tag),
                a.to
            )
        })
        .collect();
    assert!(
        missed.is_empty(),
        "arrows never taken:\n{}",
        missed.join("\n")
    );
}
