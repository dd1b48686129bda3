//! One client's session, step by step: handshake, its turn, the two lists, hashes of large
//! files that may already be here, the plan and its local part, the fetch, the finish.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::{MutexGuard, mpsc};

use crate::core::hash::HashAlgorithm;
use crate::core::identity::{Admission, ClientId, FileId, Nesting};
use crate::core::manifest::{Changes, Entry, Kind, Manifest, ManifestError, Meta, RelPath};
use crate::core::plan::{self, Plan};
use crate::events::{Counts, Event, Events};
use crate::server::fetch::{batches, fetch};
use crate::server::route::Registration;
use crate::server::{MAX_ENTRIES, MAX_LIST_BYTES, MAX_TRANSFERS};
use crate::store::Store;
use crate::store::apply::Outcome;
use crate::store::cache::{HashCache, Learned};
use crate::store::root::Root;
use crate::store::scan;
use crate::store::state::{self, StateError};
use crate::transfer::Received;
use crate::wire::list_file::{ListId, list_id};
use crate::wire::{
    BATCH, Capabilities, Connection, ControlConnection, ControlMessage, Failure,
    MAX_FAILURES_NAMED, NESTED_ROOTS, OTHER_CLIENT, ProtocolError, Summary, VERSION, WireMessage,
};

/// What every connection task of a server shares.
pub struct Shared {
    pub root: Root,
    pub idle: Duration,
    /// How long a new connection may take to say hello.
    pub handshake: Duration,
    pub keepalive: Duration,
    pub data_port: u16,
    pub cache_file: Option<PathBuf>,
    /// Where the record of the client this folder mirrors is kept; `None`: any client.
    pub owner_file: Option<PathBuf>,
    /// Where the list last taken from that client is kept (`DELTA`); `None`: no deltas.
    pub acked_file: Option<PathBuf>,
    /// This machine's identifier, to recognise a client on the same machine.
    pub machine_id: Option<String>,
    pub events: Events,
    /// Held for a whole session: two clients never interleave their changes.
    pub session: tokio::sync::Mutex<()>,
    /// Sessions waiting for data connections, by token.
    pub waiting: Mutex<HashMap<u64, mpsc::Sender<(u32, TcpStream)>>>,
    /// Set when a shutdown begins: a session that gets its turn after that does not start.
    pub stopping: AtomicBool,
    /// Becomes `true` when a shutdown begins: what live sessions wait on between batches.
    pub stop: tokio::sync::watch::Sender<bool>,
    /// Data connections being received on blocking threads, which no task abort can stop:
    /// shutting their sockets down is how an abandoned transfer is ended.
    pub receiving: Mutex<HashMap<u64, std::net::TcpStream>>,
    /// Connections open per source address, control and data apart (`true`: data).
    pub per_address: Mutex<HashMap<(std::net::IpAddr, bool), usize>>,
}

/// Why a session ended early. Logged by the server, and told to the client; the other
/// sessions go on.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("client speaks protocol version {0}, this server speaks {VERSION}")]
    Version(u32),
    #[error("invalid file list: {0}")]
    Manifest(#[from] ManifestError),
    #[error("file list longer than {MAX_ENTRIES} entries or {MAX_LIST_BYTES} bytes")]
    TooManyEntries,
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("client did not open the data connection")]
    NoDataConnection,
    #[error("peer went silent for {} s without saying hello", .0.as_secs_f64())]
    NoHello(Duration),
    #[error("cannot scan the server directory: {0}")]
    Scan(std::io::Error),
    #[error("no content hash in common: the client offers {0:?}, this server knows blake3 and md5")]
    NoCommonHash(Vec<HashAlgorithm>),
    #[error("client sent a {got} hash for {path} in a {session} session")]
    WrongHash {
        path: RelPath,
        got: HashAlgorithm,
        session: HashAlgorithm,
    },
    #[error("{NESTED_ROOTS}: {}", nesting_text(.nesting, .server_dir))]
    Nested {
        nesting: Nesting,
        server_dir: PathBuf,
    },
    #[error(
        "{OTHER_CLIENT} (ID {owner}); run client-sync --take-over to replace its contents with this directory's"
    )]
    OtherClient { owner: ClientId },
    #[error(transparent)]
    State(#[from] StateError),
}

/// How the two directories overlap, in words the client prints after its own directory.
fn nesting_text(nesting: &Nesting, server_dir: &std::path::Path) -> String {
    let s = server_dir.display();
    match nesting {
        Nesting::Same => format!("the server directory {s} is the client's directory itself"),
        Nesting::ServerInsideClient => {
            format!("the server directory {s} is inside the client's directory")
        }
        Nesting::ClientInsideServer => {
            format!("the client's directory is inside the server directory {s}")
        }
    }
}

/// What the handshake settled.
#[derive(Clone, Copy, Debug)]
pub(super) struct Terms {
    pub addr: SocketAddr,
    pub transfers: usize,
    pub algorithm: HashAlgorithm,
    pub client: ClientId,
    pub take_over: bool,
    /// The optional features both sides support.
    pub capabilities: Capabilities,
}

pub async fn session(
    shared: &Shared,
    stream: TcpStream,
    addr: SocketAddr,
) -> Result<(), SessionError> {
    let mut conn: ControlConnection<TcpStream> = Connection::new(stream);
    let terms = match greet(shared, &mut conn, addr).await {
        Ok(t) => t,
        // Told why only when it said hello: a silent or garbled peer gets nothing back.
        Err(
            e @ (SessionError::Version(_)
            | SessionError::NoCommonHash(_)
            | SessionError::Nested { .. }
            | SessionError::Scan(_)),
        ) => {
            return Err(refuse(&mut conn, e).await);
        }
        Err(e) => return Err(e),
    };
    let turn = match wait_turn(shared, &mut conn, addr).await {
        Ok(t) => t,
        Err(e) => return Err(refuse(&mut conn, e).await),
    };
    // Only now, in its turn: another session may have changed whom the folder mirrors.
    let admission = match admit(shared, terms) {
        Ok(a) => a,
        Err(e) => return Err(refuse(&mut conn, e).await),
    };
    shared.events.emit(Event::SessionStarted {
        peer: addr,
        hash: terms.algorithm,
    });
    let token = crate::process::random_u64();
    let (tx, mut rx) = mpsc::channel(MAX_TRANSFERS);
    shared.waiting.lock().unwrap().insert(token, tx);
    let _registration = Registration { shared, token };
    conn.send_now(&ControlMessage::Welcome {
        version: VERSION,
        data_port: shared.data_port,
        token,
        hash: terms.algorithm,
        capabilities: terms.capabilities,
    })
    .await?;
    // Watching starts before the first scan: nothing changed after it goes unseen.
    let watched = terms
        .capabilities
        .has(Capabilities::LIVE)
        .then(|| crate::server::live::start_watching(shared))
        .flatten();
    let acked = match announce_held(shared, &mut conn, terms).await {
        Ok(a) => a,
        Err(e) => return Err(refuse(&mut conn, e).await),
    };
    let held = match sync(shared, &mut conn, &mut rx, terms, (admission, acked)).await {
        Ok(held) => held,
        Err(e) => return Err(refuse(&mut conn, e).await),
    };
    // The folder is free for others between batches: a live session waits for its turn
    // for each one.
    drop(turn);
    // The first sync's lists and plan are free by now; a live session may idle for days.
    crate::process::release_freed_memory();
    let live = crate::server::live::serve(shared, &mut conn, &mut rx, terms, (held, watched));
    match live.await {
        Ok(()) => Ok(()),
        Err(e) => Err(refuse(&mut conn, e).await),
    }
}

impl Shared {
    /// The optional features this server offers: deltas only where it can keep lists.
    fn supported(&self) -> Capabilities {
        match self.acked_file {
            Some(_) => Capabilities(Capabilities::LIVE.0 | Capabilities::DELTA.0),
            None => Capabilities::LIVE,
        }
    }
}

/// With `DELTA`: tells the client which of its lists this server holds (`Held`), and starts
/// reading it, for the changes the client may send against it. `None` without `DELTA`.
async fn announce_held(
    shared: &Shared,
    conn: &mut ControlConnection<TcpStream>,
    terms: Terms,
) -> Result<Option<Acked>, SessionError> {
    let Some(file) = shared
        .acked_file
        .clone()
        .filter(|_| terms.capabilities.has(Capabilities::DELTA))
    else {
        return Ok(None);
    };
    let (alg, owner) = (terms.algorithm, terms.client.0);
    let id = {
        let file = file.clone();
        tokio::task::spawn_blocking(move || state::acked_id(&file, alg, owner))
            .await
            .expect("reading an ID does not panic")
    };
    conn.send_now(&ControlMessage::Held(id)).await?;
    // Read while the client scans: it is needed as soon as its changes arrive.
    let loading = id.map(|id| {
        let file = file.clone();
        tokio::task::spawn_blocking(move || {
            state::read_acked(&file, alg, owner).filter(|found| found.id == id)
        })
    });
    Ok(Some(Acked { file, id, loading }))
}

impl Acked {
    /// For a whole list (a full rescan in a live session): kept, but no changes are taken.
    pub(super) fn whole(shared: &Shared, terms: Terms) -> Option<Acked> {
        let file = shared.acked_file.clone()?;
        terms
            .capabilities
            .has(Capabilities::DELTA)
            .then_some(Acked {
                file,
                id: None,
                loading: None,
            })
    }
}

/// The list a server holds from its client, between sessions.
pub(super) struct Acked {
    file: PathBuf,
    /// Its ID, as told to the client.
    id: Option<ListId>,
    /// The list itself, being read.
    loading: Option<tokio::task::JoinHandle<Option<state::AckedList>>>,
}

/// Tells the client why the session ends, if it still listens; returns the error to report.
async fn refuse(conn: &mut ControlConnection<TcpStream>, e: SessionError) -> SessionError {
    let _ = conn.send_now(&ControlMessage::Error(e.to_string())).await;
    e
}

/// Reads the client's `Hello` within the handshake time and picks the session's hash.
async fn greet(
    shared: &Shared,
    conn: &mut ControlConnection<TcpStream>,
    addr: SocketAddr,
) -> Result<Terms, SessionError> {
    let hello = match conn.recv_within(shared.handshake).await {
        Err(ProtocolError::Idle) => return Err(SessionError::NoHello(shared.handshake)),
        hello => hello?,
    };
    match hello {
        ControlMessage::Hello {
            version,
            transfers,
            hashes,
            capabilities,
            machine,
            root_chain,
            client,
            take_over,
        } if version == VERSION => {
            let algorithm = HashAlgorithm::negotiate(&HashAlgorithm::ALL, &hashes)
                .ok_or(SessionError::NoCommonHash(hashes))?;
            check_nesting(shared, &machine, &root_chain)?;
            Ok(Terms {
                addr,
                transfers: usize::from(transfers).clamp(1, MAX_TRANSFERS),
                algorithm,
                client,
                take_over,
                capabilities: capabilities.common(shared.supported()),
            })
        }
        ControlMessage::Hello { version, .. } => Err(SessionError::Version(version)),
        m => Err(m.unexpected("hello").into()),
    }
}

/// Refuses a client on this machine whose directory is this server's, or inside it, or holds
/// it: the mirror would swallow its own source. A client on another machine (or a machine
/// without an identifier, either side) is not checked.
fn check_nesting(
    shared: &Shared,
    machine: &str,
    client_chain: &[FileId],
) -> Result<(), SessionError> {
    match &shared.machine_id {
        Some(ours) if !machine.is_empty() && machine == ours => {}
        _ => return Ok(()),
    }
    let server_chain = state::dir_chain(shared.root.path()).map_err(SessionError::Scan)?;
    match Nesting::of(&server_chain, client_chain) {
        Some(nesting) => Err(SessionError::Nested {
            nesting,
            server_dir: state::real_path(shared.root.path()),
        }),
        None => Ok(()),
    }
}

/// Whether this client may sync into the folder, given the client it mirrors: refused before
/// anything changes when it is another's (unless taken over).
pub(super) fn admit(shared: &Shared, terms: Terms) -> Result<Admission, SessionError> {
    let Some(file) = &shared.owner_file else {
        return Ok(Admission::Owner);
    };
    let owner = state::read_owner(file)?;
    match Admission::decide(owner, terms.client, terms.take_over) {
        Admission::Refused { owner } => Err(SessionError::OtherClient { owner }),
        a @ Admission::TakeOver { from } => {
            shared.events.emit(Event::TakingOver {
                peer: terms.addr,
                client: terms.client,
                from,
            });
            Ok(a)
        }
        a => Ok(a),
    }
}

/// After a session that went through: records the client the folder now mirrors, when it
/// was the first or took over. A failure is reported with the session's.
async fn record_client(
    shared: &Shared,
    admission: Admission,
    client: ClientId,
    summary: &mut Summary,
) {
    let Some(file) = shared.owner_file.clone().filter(|_| admission.records()) else {
        return;
    };
    // Flushed to disk (blocking): a record lost in a crash would let another client in.
    let written = tokio::task::spawn_blocking(move || state::write_owner(&file, client))
        .await
        .expect("writing a record does not panic");
    match written {
        Ok(()) => shared.events.emit(Event::MirrorOf { client }),
        Err(e) => {
            tracing::warn!("{e}");
            if summary.failed.len() < MAX_FAILURES_NAMED {
                summary.failed.push(Failure::new("", e.to_string()));
            }
            summary.failed_total += 1;
        }
    }
}

/// Waits for this session's turn (pinging the client meanwhile); refuses it once the server
/// is stopping.
pub(super) async fn wait_turn<'a>(
    shared: &'a Shared,
    conn: &mut ControlConnection<TcpStream>,
    addr: SocketAddr,
) -> Result<MutexGuard<'a, ()>, SessionError> {
    let turn = match shared.session.try_lock() {
        Ok(g) => g,
        Err(_) => {
            shared.events.emit(Event::SessionWaiting { peer: addr });
            keepalive(shared.keepalive, conn, shared.session.lock()).await
        }
    };
    if shared.stopping.load(Ordering::SeqCst) {
        return Err(SessionError::ShuttingDown);
    }
    Ok(turn)
}

/// The first sync of a session: the whole list against the whole tree. Returns the client's
/// list as the server now holds it.
async fn sync(
    shared: &Shared,
    conn: &mut ControlConnection<TcpStream>,
    data: &mut mpsc::Receiver<(u32, TcpStream)>,
    terms: Terms,
    (admission, acked): (Admission, Option<Acked>),
) -> Result<Manifest, SessionError> {
    let lists = lists(shared, conn, terms, acked).await?;
    let keep_after = lists.keep_after.clone();
    let (mut finished, held) = round(shared, conn, data, terms, lists.planned()).await?;
    record_client(shared, admission, terms.client, &mut finished.summary).await;
    done(shared, conn, terms, finished).await?;
    Ok(keep_later(shared, conn, terms, keep_after, held).await)
}

/// Keeps `held` in `file` (if any) once the client has its `SyncDone`: its wait is not
/// lengthened by it, and the turn is still this session's, so the next finds it written.
pub(super) async fn keep_later(
    shared: &Shared,
    conn: &mut ControlConnection<TcpStream>,
    terms: Terms,
    file: Option<PathBuf>,
    held: Manifest,
) -> Manifest {
    match file {
        Some(file) => keep(shared, conn, terms, file, held).await,
        None => held,
    }
}

/// The two lists of a round, and where the client's is to be kept once it is served.
pub(super) struct Lists {
    pub client: Manifest,
    pub server: Manifest,
    pub root: Option<Meta>,
    /// Where to keep the client's list after `SyncDone` (see [`keep_later`]).
    pub keep_after: Option<PathBuf>,
}

impl Lists {
    /// What [`round`] plans.
    pub fn planned(self) -> (Manifest, Manifest, Option<Meta>) {
        (self.client, self.server, self.root)
    }
}

/// One batch's work, from the two lists to the summary: hashes asked where they matter, the
/// plan and its local part, the fetch, the finish. Returns the client's list as planned.
pub(super) async fn round(
    shared: &Shared,
    conn: &mut ControlConnection<TcpStream>,
    data: &mut mpsc::Receiver<(u32, TcpStream)>,
    terms: Terms,
    (client, server, root_meta): (Manifest, Manifest, Option<Meta>),
) -> Result<(Finished, Manifest), SessionError> {
    let client = hash_where_it_matters(shared, conn, client, &server, terms).await?;
    let (outcome, mut plan, client) = plan_and_apply(shared, conn, client, server).await;
    // Moved, not copied: the plan has no other use for them.
    let mut requests = std::mem::take(&mut plan.requests);
    requests.extend(outcome.refetch.iter().cloned());
    let received: Vec<RelPath> = requests.iter().map(|w| w.path.clone()).collect();
    let batches = batches(requests, terms.transfers);
    let got = fetch(
        shared,
        conn,
        data,
        batches,
        (terms.transfers, terms.algorithm),
    )
    .await?;
    let done = (plan, outcome, got);
    let finished = finish(shared, conn, done, (received, root_meta)).await;
    Ok((finished, client))
}

/// Ends a batch: `SyncDone` to the client, `sync:done` in the log.
/// Then the hashes of what was received and verified go into the cache (they need not be read
/// again next session), still in this session's turn but no longer in the client's wait.
pub(super) async fn done(
    shared: &Shared,
    conn: &mut ControlConnection<TcpStream>,
    terms: Terms,
    Finished { summary, learned }: Finished,
) -> Result<(), SessionError> {
    conn.send_now(&ControlMessage::SyncDone(summary.clone()))
        .await?;
    shared.events.emit(Event::SessionDone {
        peer: terms.addr,
        counts: Counts {
            requested: summary.requested,
            received: summary.received,
            copied: summary.copied,
            renamed: summary.renamed,
            deleted: summary.deleted,
            failed: summary.failed_total,
            bytes: summary.bytes,
        },
    });
    if let Some(file) = shared.cache_file.clone().filter(|_| !learned.is_empty()) {
        let alg = terms.algorithm;
        let caching = tokio::task::spawn_blocking(move || HashCache::remember(&file, alg, learned));
        if let Err(e) = keepalive(shared.keepalive, conn, caching)
            .await
            .expect("caching does not panic")
        {
            tracing::warn!("failed to save the hash cache: {e}");
        }
    }
    Ok(())
}

/// The client's list, and the server's own tree, walked meanwhile. Whatever the client does,
/// the scan is this session's work: it is waited for before the session ends, so that
/// sessions never overlap, even in their leftovers.
pub(super) async fn lists(
    shared: &Shared,
    conn: &mut ControlConnection<TcpStream>,
    terms: Terms,
    acked: Option<Acked>,
) -> Result<Lists, SessionError> {
    let (root, cache_file) = (shared.root.clone(), shared.cache_file.clone());
    let opts = scan::Options {
        read_own: true,
        ..scan::Options::new(terms.algorithm)
    };
    let scanning = tokio::task::spawn_blocking(move || {
        let scan = root.list(cache_file, opts).map_err(SessionError::Scan)?;
        for w in &scan.warnings {
            tracing::warn!("{w}");
        }
        Ok::<_, SessionError>(Manifest::from_entries(scan.entries)?)
    });
    let listed = read_list(conn, shared.idle).await;
    let server = keepalive(shared.keepalive, conn, scanning)
        .await
        .expect("scan does not panic");
    let listed = listed?;
    let server = server?;
    let (client, root, keep_after) = client_list(shared, conn, terms, listed, acked).await?;
    shared.events.emit(Event::ListReceived {
        peer: terms.addr,
        entries: client.len(),
        bytes: client.file_bytes(),
    });
    Ok(Lists {
        client,
        server,
        root,
        keep_after,
    })
}

/// What the client sent as its list.
enum Listed {
    /// The whole list, and the metadata of its root if it sent it.
    Whole(Vec<Entry>, Option<Meta>),
    /// What changed since the list `base`, making the list `result`.
    Since {
        base: ListId,
        result: ListId,
        changes: Changes,
        root: Option<Meta>,
    },
}

/// The client's list as a manifest: the whole list it sent, or the list held with its changes
/// applied, checked against the ID the client announced. Changes that do not fit (the list
/// held is gone, damaged or another; the result is not the list announced) are answered with
/// `Held(None)`, and the whole list is read instead. A list new to this server is kept for the
/// client's next session: now when the session may change it (files sent unhashed, whose
/// hashes the server may ask for), else once it is served (the file to keep it in is returned).
async fn client_list(
    shared: &Shared,
    conn: &mut ControlConnection<TcpStream>,
    terms: Terms,
    listed: Listed,
    mut acked: Option<Acked>,
) -> Result<(Manifest, Option<Meta>, Option<PathBuf>), SessionError> {
    let (client, root, id) = match listed {
        Listed::Whole(entries, root) => (whole(entries, terms)?, root, None),
        Listed::Since {
            base,
            result,
            changes,
            root,
        } => {
            check_algorithm(&changes.upserts, terms.algorithm)?;
            let (upserts, removed) = (changes.upserts.len(), changes.removed.len());
            match fit(acked.as_mut(), (base, result), changes).await {
                Ok(client) => {
                    shared.events.emit(Event::ChangesReceived {
                        peer: terms.addr,
                        upserts,
                        removed,
                    });
                    (client, root, Some(result))
                }
                Err(why) => {
                    tracing::info!(
                        "changes from {} since list {base}: {why}; asking for the whole list",
                        terms.addr
                    );
                    conn.send_now(&ControlMessage::Held(None)).await?;
                    match read_list(conn, shared.idle).await? {
                        Listed::Whole(entries, root) => (whole(entries, terms)?, root, None),
                        Listed::Since { .. } => {
                            return Err(ProtocolError::Unexpected {
                                got: "since",
                                expected: "the whole list",
                            }
                            .into());
                        }
                    }
                }
            }
        }
    };
    let unhashed = || {
        client
            .iter()
            .any(|e| matches!(e.kind, Kind::Unhashed { .. }))
    };
    match acked {
        // The list held is this very list: nothing to keep.
        Some(a) if id.is_some() && id == a.id => Ok((client, root, None)),
        Some(a) if unhashed() => Ok((keep(shared, conn, terms, a.file, client).await, root, None)),
        Some(a) => Ok((client, root, Some(a.file))),
        None => Ok((client, root, None)),
    }
}

/// A whole list from the client, checked.
fn whole(entries: Vec<Entry>, terms: Terms) -> Result<Manifest, SessionError> {
    check_algorithm(&entries, terms.algorithm)?;
    Ok(Manifest::from_entries(entries)?)
}

/// The list held with `changes` applied, when it is the list `base` and the result is the
/// list `result`; else why not.
async fn fit(
    acked: Option<&mut Acked>,
    (base, result): (ListId, ListId),
    changes: Changes,
) -> Result<Manifest, String> {
    let acked = acked.ok_or("this server keeps no lists")?;
    if acked.id != Some(base) {
        return Err("the server holds another list".into());
    }
    let loading = acked
        .loading
        .take()
        .ok_or("the list held was read already")?;
    let entries = loading
        .await
        .expect("reading a list does not panic")
        .ok_or("the list held is gone or damaged")?
        .entries;
    let applying = tokio::task::spawn_blocking(move || {
        let start = std::time::Instant::now();
        let mut m = Manifest::from_entries(entries)
            .map_err(|e| format!("the list held is not a tree ({e})"))?;
        m.apply(&changes)
            .map_err(|e| format!("they do not fit the list held ({e})"))?;
        if m.len() > MAX_ENTRIES {
            return Err(format!(
                "they make a list longer than {MAX_ENTRIES} entries"
            ));
        }
        // No changes to a list whose entries were checked against its ID when read: the
        // same ID, without hashing it again.
        let got = match changes.is_empty() {
            true => base,
            false => list_id(m.entries()),
        };
        tracing::debug!("changes applied to the list held in {:?}", start.elapsed());
        match got {
            got if got == result => Ok(m),
            got => Err(format!("they make the list {got}, not {result}")),
        }
    });
    applying.await.expect("applying changes does not panic")
}

/// Keeps `client` in `file` as the list acknowledged to the client, for its next session. A
/// list that cannot be kept costs that session the whole list, nothing else: a warning.
async fn keep(
    shared: &Shared,
    conn: &mut ControlConnection<TcpStream>,
    terms: Terms,
    file: PathBuf,
    client: Manifest,
) -> Manifest {
    let (alg, owner) = (terms.algorithm, terms.client.0);
    let writing = tokio::task::spawn_blocking(move || {
        let kept = state::write_acked(&file, alg, owner, client.entries());
        if kept.is_err() {
            // An older list left in place would still be told as held.
            state::forget_acked(&file);
        }
        (client, kept)
    });
    let (client, kept) = keepalive(shared.keepalive, conn, writing)
        .await
        .expect("writing a list does not panic");
    if let Err(e) = kept {
        tracing::warn!("{e}; the next session sends the whole list");
    }
    client
}

/// Reads the client's file list up to `FileListEnd` (the whole list, or changes `Since` a
/// list held), within the session's limits; and the metadata of its root, if it sent it.
async fn read_list(
    conn: &mut ControlConnection<TcpStream>,
    idle: Duration,
) -> Result<Listed, SessionError> {
    let mut entries = Vec::new();
    let mut root = None;
    let mut bytes = 0usize;
    loop {
        match conn.recv_within(idle).await? {
            ControlMessage::Since { base, result } if entries.is_empty() && root.is_none() => {
                let (changes, root) = read_changes(conn, idle).await?;
                return Ok(Listed::Since {
                    base,
                    result,
                    changes,
                    root,
                });
            }
            ControlMessage::Ping => {}
            ControlMessage::RootMeta(meta) => root = Some(meta),
            ControlMessage::FileList(batch) => {
                bytes += batch.iter().map(entry_bytes).sum::<usize>();
                if entries.len() + batch.len() > MAX_ENTRIES || bytes > MAX_LIST_BYTES {
                    return Err(SessionError::TooManyEntries);
                }
                entries.extend(batch);
            }
            ControlMessage::FileListEnd => return Ok(Listed::Whole(entries, root)),
            m => return Err(m.unexpected("filelist").into()),
        }
    }
}

/// Reads one batch of changes up to `FileListEnd`.
pub(super) async fn read_changes(
    conn: &mut ControlConnection<TcpStream>,
    idle: Duration,
) -> Result<(Changes, Option<Meta>), SessionError> {
    let mut changes = Changes::default();
    let mut root = None;
    loop {
        match conn.recv_within(idle).await? {
            ControlMessage::FileList(batch) => changes.upserts.extend(batch),
            ControlMessage::Removed(paths) => changes.removed.extend(paths),
            ControlMessage::RootMeta(meta) => root = Some(meta),
            ControlMessage::FileListEnd => return Ok((changes, root)),
            m => return Err(m.unexpected("filelist, removed or filelist-end").into()),
        }
        if changes.upserts.len() + changes.removed.len() > MAX_ENTRIES {
            return Err(SessionError::TooManyEntries);
        }
    }
}

/// Roughly what an entry costs in memory.
fn entry_bytes(e: &Entry) -> usize {
    let text = match &e.kind {
        Kind::Symlink { target } => target.len(),
        Kind::Unreadable { reason: t } | Kind::Special { what: t } => t.len(),
        _ => 0,
    };
    std::mem::size_of::<Entry>() + e.path.as_str().len() + text
}

/// Refuses entries hashed in another algorithm than the session's: they could never match
/// anything, and would be requested and rejected forever.
pub(super) fn check_algorithm(
    entries: &[Entry],
    session: HashAlgorithm,
) -> Result<(), SessionError> {
    match entries.iter().find_map(|e| {
        e.hash()
            .filter(|h| h.algorithm() != session)
            .map(|h| (e, h))
    }) {
        Some((e, h)) => Err(SessionError::WrongHash {
            path: e.path.clone(),
            got: h.algorithm(),
            session,
        }),
        None => Ok(()),
    }
}

/// Asks the client for the hash of the files it announced unhashed that the server might
/// already hold, at this path or another: those whose size equals a file of the server's.
/// Knowing the hash, the plan can leave them alone, copy or move them locally; the others are
/// simply requested, their hash following their content.
async fn hash_where_it_matters(
    shared: &Shared,
    conn: &mut ControlConnection<TcpStream>,
    client: Manifest,
    server: &Manifest,
    terms: Terms,
) -> Result<Manifest, SessionError> {
    // Most lists have none: the server's sizes are not gathered for nothing.
    if !client
        .iter()
        .any(|e| matches!(e.kind, Kind::Unhashed { .. }))
    {
        return Ok(client);
    }
    let sizes: HashSet<u64> = server
        .iter()
        .filter_map(|e| match e.kind {
            Kind::File { size, .. } => Some(size),
            _ => None,
        })
        .collect();
    let wanted: Vec<RelPath> = client
        .iter()
        .filter(|e| matches!(e.kind, Kind::Unhashed { size } if sizes.contains(&size)))
        .map(|e| e.path.clone())
        .collect();
    if wanted.is_empty() {
        return Ok(client);
    }
    shared.events.emit(Event::HashesRequested {
        count: wanted.len(),
        hash: terms.algorithm,
    });
    let mut answers: HashMap<RelPath, Entry> = HashMap::with_capacity(wanted.len());
    for batch in wanted.chunks(BATCH) {
        conn.send_now(&ControlMessage::HashRequest(batch.to_vec()))
            .await?;
        let entries = loop {
            match conn.recv_within(shared.idle).await? {
                ControlMessage::Ping => continue, // while the client hashes
                ControlMessage::HashAnswer(e) => break e,
                m => return Err(m.unexpected("hash-answer").into()),
            }
        };
        let fits = |(want, e): (&RelPath, &Entry)| {
            *want == e.path && matches!(e.kind, Kind::File { .. } | Kind::Unreadable { .. })
        };
        if entries.len() != batch.len() || !batch.iter().zip(&entries).all(fits) {
            return Err(ProtocolError::Malformed("hash answer").into());
        }
        check_algorithm(&entries, terms.algorithm)?;
        answers.extend(entries.into_iter().map(|e| (e.path.clone(), e)));
    }
    let entries = client
        .into_entries()
        .into_iter()
        .map(|e| answers.remove(&e.path).unwrap_or(e));
    Ok(Manifest::from_entries(entries)?)
}

/// The plan, and its local phases carried out (copies, moves, deletes, directories, links).
/// The client's list comes back, for the session to hold.
async fn plan_and_apply(
    shared: &Shared,
    conn: &mut ControlConnection<TcpStream>,
    client: Manifest,
    server: Manifest,
) -> (Outcome, Plan, Manifest) {
    let (root, events) = (shared.root.clone(), shared.events.clone());
    let planning = tokio::task::spawn_blocking(move || {
        let plan = plan::plan(&client, &server);
        (root.apply(&plan, None, &*events), plan, client)
    });
    keepalive(shared.keepalive, conn, planning)
        .await
        .expect("plan and apply do not panic")
}

/// Entries a batch may change and still be flushed one `fsync` at a time.
const FEW: usize = 64;

/// After the fetch: metadata, one flush; the session's summary, and the hashes learnt on the
/// way (cached once the client has its `SyncDone`: see [`done`]).
async fn finish(
    shared: &Shared,
    conn: &mut ControlConnection<TcpStream>,
    (plan, mut outcome, got): (Plan, Outcome, Received),
    (received, root_meta): (Vec<RelPath>, Option<Meta>),
) -> Finished {
    let requested = received.len() as u64;
    let mut summary = Summary {
        requested,
        received: got.files,
        copied: outcome.copied,
        renamed: outcome.renamed,
        deleted: outcome.deleted,
        bytes: got.bytes,
        ..Summary::default()
    };
    outcome.failed.extend(got.failed);
    let (root, events) = (shared.root.clone(), shared.events.clone());
    let learned = got.learned;
    let changed = requested > 0 || !plan.is_empty() || !outcome.refetch.is_empty();
    let finishing = tokio::task::spawn_blocking(move || {
        root.finish(&plan, &mut outcome, &*events);
        // Last: every change at the top moved the root's mtime.
        if let Some(m) = root_meta
            && let Err(e) = Store::set_root_mtime(&root, &m)
        {
            tracing::warn!("failed to set the mtime of the synced directory: {e}");
            outcome
                .failed
                .push(Failure::new(".", format!("failed to set the mtime: {e}")));
        }
        // An unchanged tree costs no flush: nothing of ours is dirty; a few entries changed
        // cost an fsync each, not a wait for everything the file system holds.
        let (files, mut dirs) = plan.written(&received);
        if root_meta.is_some() {
            dirs.push(None);
        }
        let flushed = match files.len() + dirs.len() {
            _ if !changed => Ok(()),
            n if n <= FEW => root.flush_paths(&files, &dirs),
            _ => root.flush(),
        };
        if let Err(e) = flushed {
            tracing::warn!("failed to flush the file system: {e}");
            outcome
                .failed
                .push(Failure::new("", format!("failed to flush to disk: {e}")));
        }
        outcome
    });
    let outcome = keepalive(shared.keepalive, conn, finishing)
        .await
        .expect("apply does not panic");
    summary.set_failures(outcome.failed);
    Finished { summary, learned }
}

/// A batch done: what to tell the client, and what to cache after.
pub(super) struct Finished {
    pub summary: Summary,
    learned: Vec<Learned>,
}

/// Awaits `work`, pinging the client every `every` to say the server is still at it. A
/// client that is gone does not cut the work short (a session always waits for its own
/// work): the pings just stop, and the next real message fails.
pub async fn keepalive<T>(
    every: Duration,
    conn: &mut ControlConnection<TcpStream>,
    work: impl Future<Output = T>,
) -> T {
    tokio::pin!(work);
    let mut tick = crate::process::ticks(every);
    let mut alive = true;
    loop {
        tokio::select! {
            done = &mut work => return done,
            _ = tick.tick(), if alive => {
                alive = conn.send_now(&ControlMessage::Ping).await.is_ok();
            }
        }
    }
}
