//! One sync, step by step: connect and say hello, walk the tree (the server walks its own
//! meanwhile), send the list, answer the server's hash and file requests, until `sync:done`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::client::{ClientError, Config, Report};
use crate::core::hash::HashAlgorithm;
use crate::core::identity::FileId;
use crate::core::manifest::{Changes, Entry, Kind, Manifest, Meta, RelPath};
use crate::events::Event;
use crate::store::Store;
use crate::store::cache::{HashCache, Learned};
use crate::store::root::Root;
use crate::store::scan;
use crate::store::state;
use crate::transfer::{self, Ticket};
use crate::wire::control::MAX_CHAIN;
use crate::wire::list_file::{self, EncodedList, ListId};
use crate::wire::{
    BATCH, Capabilities, Connection, ControlConnection, ControlMessage, Failure, NESTED_ROOTS,
    OTHER_CLIENT, ProtocolError, VERSION, WireMessage,
};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The mode bits a server keeps of an entry (see the wire's decoding of `Meta`).
const NEVER_MIRRORED: u32 = 0o1777;
/// A data connection the server does not drain for this long is given up.
const DATA_WRITE_TIMEOUT: Duration = Duration::from_secs(120);

/// What the server's `Welcome` settled.
#[derive(Clone, Copy, Debug)]
pub(super) struct Terms {
    peer: SocketAddr,
    data_port: u16,
    token: u64,
    pub algorithm: HashAlgorithm,
    /// The optional features both sides support.
    pub capabilities: Capabilities,
    /// With `DELTA`: the ID of the list the server holds from this client.
    pub held: Option<ListId>,
}

impl Terms {
    /// These terms, as if the server held no list of ours: the whole list goes.
    pub(super) fn without_held(self) -> Terms {
        Terms { held: None, ..self }
    }
}

/// Runs one complete sync.
pub async fn sync_once(cfg: &Config) -> Result<Report, ClientError> {
    let start = Instant::now();
    let (mut conn, terms) = begin(cfg, Capabilities::NONE).await?;
    // Scan only now that the session has started: the server walks its own tree meanwhile.
    let mut report = Report::default();
    let (listed, root) = scan_tree(cfg, &mut conn, terms.algorithm, &mut report).await?;
    let listed = Arc::new(Manifest::from_entries(listed).expect("a scan lists a tree"));
    let mut asked = Vec::new();
    let lists = (listed, root);
    let learned = exchange(cfg, &mut conn, terms, lists, &mut report, &mut asked).await?;
    remember(cfg, terms.algorithm, learned).await;
    report.elapsed = start.elapsed();
    cfg.events.emit(Event::SyncDone);
    Ok(report)
}

/// Checks the directory, connects and says hello offering `capabilities`: a session begun.
pub(super) async fn begin(
    cfg: &Config,
    capabilities: Capabilities,
) -> Result<(ControlConnection<TcpStream>, Terms), ClientError> {
    // Deltas need a place for the list the server acknowledges.
    let capabilities = match cfg.acked_file {
        Some(_) => Capabilities(capabilities.0 | Capabilities::DELTA.0),
        None => capabilities,
    };
    crate::store::check_dir(&cfg.root)?;
    let root_chain = root_chain(cfg)?;
    let (mut conn, peer) = connect(cfg).await?;
    let terms = handshake(cfg, &mut conn, peer, root_chain, capabilities).await?;
    Ok((conn, terms))
}

async fn connect(cfg: &Config) -> Result<(ControlConnection<TcpStream>, SocketAddr), ClientError> {
    let addr = format!("{}:{}", cfg.server, cfg.port);
    let unreachable = |source| ClientError::Unreachable {
        addr: addr.clone(),
        source,
    };
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&addr))
        .await
        .map_err(|_| unreachable(std::io::ErrorKind::TimedOut.into()))?
        .map_err(unreachable)?;
    let peer = stream.peer_addr().map_err(unreachable)?;
    crate::process::set_keepalive(&stream).map_err(unreachable)?;
    // Messages are flushed when due: Nagle's algorithm would hold a small one back until the
    // last is acknowledged, which the server may delay up to 40 ms.
    stream.set_nodelay(true).map_err(unreachable)?;
    Ok((Connection::new(stream), peer))
}

/// Device and inode of DIR and its ancestors, for a server on this machine to compare with its
/// own; nothing when this machine has no identifier, since no server could tell it is here.
fn root_chain(cfg: &Config) -> Result<Vec<FileId>, ClientError> {
    if cfg.machine_id.is_none() {
        return Ok(Vec::new());
    }
    let mut chain = crate::store::state::dir_chain(&cfg.root).map_err(|source| {
        crate::store::DirError::Unreadable {
            path: cfg.root.clone(),
            source,
        }
    })?;
    // Deeper than any path can be written: the directories nearest DIR matter most.
    chain.truncate(MAX_CHAIN);
    Ok(chain)
}

/// Says hello, offering the configured hashes and saying who and where this client is, and
/// waits for the server's welcome.
async fn handshake(
    cfg: &Config,
    conn: &mut ControlConnection<TcpStream>,
    peer: SocketAddr,
    root_chain: Vec<FileId>,
    capabilities: Capabilities,
) -> Result<Terms, ClientError> {
    let transfers = cfg.transfers.clamp(1, u16::MAX.into()) as u16;
    conn.send_now(&ControlMessage::Hello {
        version: VERSION,
        transfers,
        hashes: cfg.hashes.clone(),
        capabilities,
        machine: cfg.machine_id.clone().unwrap_or_default(),
        root_chain,
        client: cfg.client_id,
        take_over: cfg.take_over,
    })
    .await?;
    let wait = cfg.handshake_timeout.min(cfg.idle_timeout);
    let welcome = match next(conn, wait).await {
        Err(ClientError::Silent(wait)) => {
            let addr = format!("{}:{}", cfg.server, cfg.port);
            return Err(ClientError::NoAnswer { addr, wait });
        }
        welcome => welcome?,
    };
    match welcome {
        ControlMessage::Welcome {
            data_port,
            token,
            hash,
            capabilities: theirs,
            ..
        } if cfg.hashes.contains(&hash) => {
            let capabilities = theirs.common(capabilities);
            // With deltas, the server says next which of our lists it holds.
            let held = match capabilities.has(Capabilities::DELTA) {
                true => match next(conn, wait).await? {
                    ControlMessage::Held(id) => id,
                    m => return Err(m.unexpected("held").into()),
                },
                false => None,
            };
            Ok(Terms {
                peer,
                data_port,
                token,
                algorithm: hash,
                capabilities,
                held,
            })
        }
        ControlMessage::Welcome { hash, .. } => {
            Err(ProtocolError::Unrequested(format!("hash algorithm {hash}")).into())
        }
        ControlMessage::Error(e) if e.starts_with(NESTED_ROOTS) => Err(ClientError::Nested {
            dir: crate::store::state::real_path(&cfg.root),
            why: e,
        }),
        ControlMessage::Error(e) if e.starts_with(OTHER_CLIENT) => Err(ClientError::OtherClient(e)),
        ControlMessage::Error(e) => Err(ClientError::Refused(e)),
        m => Err(m.unexpected("welcome").into()),
    }
}

/// Walks the tree (pinging the server meanwhile); returns the entries to list and the root's
/// own metadata. What cannot be read goes into the report; sockets, FIFOs and devices are
/// left out.
pub(super) async fn scan_tree(
    cfg: &Config,
    conn: &mut ControlConnection<TcpStream>,
    algorithm: HashAlgorithm,
    report: &mut Report,
) -> Result<(Vec<Entry>, Meta), ClientError> {
    let (dir, cache_file) = (cfg.root.clone(), cfg.cache_file.clone());
    let opts = scan::Options {
        defer_above: Some(cfg.defer_above),
        ..scan::Options::new(algorithm)
    };
    let store = Root::new(&dir);
    let scanning = tokio::task::spawn_blocking(move || store.list(cache_file, opts));
    let mut scan = pinging(conn, cfg.keepalive, scanning)
        .await?
        .expect("scan does not panic")
        .map_err(|source| crate::store::DirError::Unreadable {
            path: cfg.root.clone(),
            source,
        })?;
    for w in &scan.warnings {
        tracing::warn!("{w}");
    }
    for (path, reason) in scan.unreadable() {
        report.unreadable.push(Failure::new(
            path.as_str(),
            format!("cannot read: {reason}"),
        ));
        cfg.events.emit(Event::NotReadable {
            path: path.clone(),
            action: "read",
            reason: reason.to_owned(),
        });
    }
    scan.entries.retain(|e| match &e.kind {
        Kind::Special { what } => {
            cfg.events.emit(Event::Skipped {
                path: e.path.clone(),
                reason: format!("a {what} is not synced"),
            });
            false
        }
        _ => true,
    });
    // As the server reads them (set-user/group-ID bits are never mirrored), so that the list
    // both sides keep is the same list.
    for e in &mut scan.entries {
        e.meta.mode &= NEVER_MIRRORED;
    }
    Ok((scan.entries, scan.root))
}

/// Sends the list (only what changed since the list the server holds, when this client holds
/// it too; the whole list otherwise, or when the server asks for it) and serves the server
/// until its `SyncDone`; then keeps the list as the one acknowledged. Returns the hashes
/// learnt on the way.
pub(super) async fn exchange(
    cfg: &Config,
    conn: &mut ControlConnection<TcpStream>,
    terms: Terms,
    (listed, root): (Arc<Manifest>, Meta),
    report: &mut Report,
    asked: &mut Vec<Vec<RelPath>>,
) -> Result<Vec<Learned>, ClientError> {
    let acked = cfg
        .acked_file
        .clone()
        .filter(|_| terms.capabilities.has(Capabilities::DELTA));
    let since = match (&acked, terms.held) {
        (Some(file), Some(base)) => delta(file.clone(), base, terms, listed.clone()).await,
        _ => None,
    };
    let whole = since.is_none();
    match &since {
        Some((changes, result)) => {
            let base = terms.held.expect("a delta has a base");
            announce(cfg, listed.entries());
            send_since(cfg, conn, (base, *result), changes, root).await?
        }
        None => send_list(cfg, conn, listed.entries(), root).await?,
    }
    let unchanged = since
        .as_ref()
        .is_some_and(|(_, result)| Some(*result) == terms.held);
    // Written while the server works, put in place only once it has acknowledged the list.
    let staging = acked.filter(|_| !unchanged).map(|file| {
        let (listed, alg) = (listed.clone(), terms.algorithm);
        tokio::task::spawn_blocking(move || state::stage_acked(&file, alg, 0, listed.entries()))
    });
    let learned = serve_to_the_end(cfg, conn, terms, (listed, root, whole), report, asked).await?;
    if let Some(staging) = staging {
        keep(staging).await;
    }
    Ok(learned)
}

/// Serves the server until its `SyncDone`, sending the whole list once if it asks for it
/// after changes it could not use (`whole`: the whole list went already).
async fn serve_to_the_end(
    cfg: &Config,
    conn: &mut ControlConnection<TcpStream>,
    terms: Terms,
    (listed, root, mut whole): (Arc<Manifest>, Meta, bool),
    report: &mut Report,
    asked: &mut Vec<Vec<RelPath>>,
) -> Result<Vec<Learned>, ClientError> {
    loop {
        match serve(cfg, conn, terms, listed.clone(), report, asked).await? {
            Served::Done(learned) => return Ok(learned),
            Served::WholeList if !whole => {
                whole = true;
                send_list(cfg, conn, listed.entries(), root).await?;
            }
            Served::WholeList => {
                return Err(ProtocolError::Unexpected {
                    got: "held",
                    expected: "filerequest, hashrequest or sync:done",
                }
                .into());
            }
        }
    }
}

/// Puts the list written meanwhile in place: the server has acknowledged it. One that cannot
/// be kept costs the next sync the whole list, nothing else: a warning.
async fn keep(staging: tokio::task::JoinHandle<Result<state::StagedList, state::StateError>>) {
    let kept = staging
        .await
        .expect("writing a list does not panic")
        .and_then(state::StagedList::persist);
    if let Err(e) = kept {
        tracing::warn!("{e}; the next sync sends the whole list");
    }
}

/// What changed since the list `base`, when this client kept it, and the ID of the list those
/// changes make. Compared as the wire encodes both lists, byte for byte: nothing is decoded,
/// and an unchanged list costs only its ID.
async fn delta(
    file: PathBuf,
    base: ListId,
    terms: Terms,
    listed: Arc<Manifest>,
) -> Option<(Changes, ListId)> {
    let comparing = tokio::task::spawn_blocking(move || {
        let start = Instant::now();
        let encoded = EncodedList::of(listed.entries());
        let result = encoded.id();
        // Nothing changed: the server holds this very list, whatever this side kept.
        if result == base {
            return Some((Changes::default(), result));
        }
        let (_, kept) =
            state::read_acked_bytes(&file, terms.algorithm, 0).filter(|(id, _)| *id == base)?;
        let (upserts, removed) = list_file::differences(&kept, listed.entries(), &encoded)
            .inspect_err(|e| tracing::warn!("{e}; sending the whole list"))
            .ok()?;
        let changes = Changes {
            upserts: upserts
                .into_iter()
                .map(|i| listed.entries()[i].clone())
                .collect(),
            removed: removed
                .into_iter()
                .map(RelPath::new)
                .collect::<Result<_, _>>()
                .ok()?,
        };
        tracing::debug!(
            "compared with the list acknowledged in {:?}",
            start.elapsed()
        );
        Some((changes, result))
    });
    comparing.await.expect("comparing lists does not panic")
}

/// Sends what changed since the list `base`, which makes the list `result`.
async fn send_since(
    cfg: &Config,
    conn: &mut ControlConnection<TcpStream>,
    (base, result): (ListId, ListId),
    changes: &Changes,
    root: Meta,
) -> Result<(), ClientError> {
    cfg.events.emit(Event::ChangesSent {
        upserts: changes.upserts.len(),
        removed: changes.removed.len(),
    });
    let opening = ControlMessage::Since { base, result };
    send_changes(conn, &opening, changes, root).await
}

/// Sends `changes` after `opening` (`Since` between sessions, `Changes` in a live one): the
/// entries added or changed, the paths removed, the root's metadata, the end of the list.
pub(super) async fn send_changes(
    conn: &mut ControlConnection<TcpStream>,
    opening: &ControlMessage,
    changes: &Changes,
    root: Meta,
) -> Result<(), ClientError> {
    conn.send(opening).await?;
    for batch in changes.upserts.chunks(BATCH) {
        conn.send_file_list(batch).await?;
    }
    for batch in changes.removed.chunks(BATCH) {
        conn.send(&ControlMessage::Removed(batch.to_vec())).await?;
    }
    conn.send(&ControlMessage::RootMeta(root)).await?;
    conn.send_now(&ControlMessage::FileListEnd).await?;
    Ok(())
}

/// What serving the server ended with.
pub(super) enum Served {
    /// Its `SyncDone`, with the hashes learnt on the way, for the cache.
    Done(Vec<Learned>),
    /// It cannot use the changes sent (`Held`): it wants the whole list.
    WholeList,
}

/// Says what the list holds: its entries, and the bytes of its files.
fn announce(cfg: &Config, listed: &[Entry]) {
    let bytes: u64 = listed
        .iter()
        .map(|e| match e.kind {
            Kind::File { size, .. } | Kind::Unhashed { size } => size,
            _ => 0,
        })
        .sum();
    cfg.events.emit(Event::ListSent {
        entries: listed.len(),
        bytes,
    });
}

pub(super) async fn send_list(
    cfg: &Config,
    conn: &mut ControlConnection<TcpStream>,
    listed: &[Entry],
    root: Meta,
) -> Result<(), ClientError> {
    announce(cfg, listed);
    for batch in listed.chunks(BATCH) {
        conn.send_file_list(batch).await?;
    }
    conn.send(&ControlMessage::RootMeta(root)).await?;
    conn.send_now(&ControlMessage::FileListEnd).await?;
    Ok(())
}

/// Answers the server until its `SyncDone`: hash requests here, file requests on data
/// connections of their own. Returns the hashes learnt on the way, for the cache (or that
/// the server wants the whole list, after changes it could not use). Paths the
/// server asks for again with `Dirty` meanwhile (a live session) go into `asked`, one list per
/// message (an empty one: everything).
pub(super) async fn serve(
    cfg: &Config,
    conn: &mut ControlConnection<TcpStream>,
    terms: Terms,
    listed: Arc<Manifest>,
    report: &mut Report,
    asked: &mut Vec<Vec<RelPath>>,
) -> Result<Served, ClientError> {
    let root = Root::new(&cfg.root);
    let mut learned: Vec<Learned> = Vec::new();
    // Data connections in flight, each on its own thread.
    let mut sending = JoinSet::<Result<Vec<Learned>, ProtocolError>>::new();
    let transfers = cfg.transfers.max(1);
    loop {
        match next(conn, cfg.idle_timeout).await? {
            ControlMessage::HashRequest(paths) => {
                let (root, listed) = (root.clone(), listed.clone());
                let alg = terms.algorithm;
                let hashing =
                    tokio::task::spawn_blocking(move || answer_hashes(&root, &listed, &paths, alg));
                let (entries, got) = pinging(conn, cfg.keepalive, hashing)
                    .await?
                    .expect("hashing does not panic");
                for e in &entries {
                    if let Kind::Unreadable { reason } = &e.kind {
                        report.unreadable.push(Failure::new(
                            e.path.as_str(),
                            format!("cannot hash: {reason}"),
                        ));
                        cfg.events.emit(Event::NotReadable {
                            path: e.path.clone(),
                            action: "hash",
                            reason: reason.clone(),
                        });
                    }
                }
                learned.extend(got);
                conn.send_now(&ControlMessage::HashAnswer(entries)).await?;
            }
            ControlMessage::FileRequest { id, paths } => {
                // The server keeps at most `transfers` requests open; bound it here anyway.
                while sending.len() >= transfers {
                    let sent = sending.join_next().await.expect("not empty");
                    learned.extend(sent.expect("send does not panic")?);
                }
                let data = open_data(terms).await?;
                let (root, listed, events) = (root.clone(), listed.clone(), cfg.events.clone());
                let ticket = Ticket {
                    token: terms.token,
                    request: id,
                };
                let alg = terms.algorithm;
                sending.spawn_blocking(move || {
                    let lists = (paths.as_slice(), listed.entries());
                    let sent = transfer::send(data, &root, ticket, lists, alg, &*events)?;
                    Ok(sent.learned)
                });
                // Surface a finished transfer's error without waiting for the rest.
                while let Some(sent) = sending.try_join_next() {
                    learned.extend(sent.expect("send does not panic")?);
                }
            }
            ControlMessage::SyncDone(summary) => {
                // The server has received everything it asked for: these are done.
                while let Some(sent) = sending.join_next().await {
                    learned.extend(sent.expect("send does not panic")?);
                }
                report.summary = summary;
                return Ok(Served::Done(learned));
            }
            // Only before anything was asked: nothing is in flight.
            ControlMessage::Held(None) if learned.is_empty() && sending.is_empty() => {
                return Ok(Served::WholeList);
            }
            ControlMessage::Dirty(paths) => asked.push(paths),
            ControlMessage::Error(e) => return Err(ClientError::Ended(e)),
            m => return Err(m.unexpected("filerequest, hashrequest or sync:done").into()),
        }
    }
}

/// A data connection to the server, as a blocking socket for a thread of its own.
async fn open_data(terms: Terms) -> Result<std::net::TcpStream, ProtocolError> {
    let connect = TcpStream::connect((terms.peer.ip(), terms.data_port));
    let data = tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))
        .and_then(|r| r)
        .and_then(|s| s.into_std())?;
    data.set_nonblocking(false)?;
    // A server that stops reading must not hold this thread forever.
    crate::process::set_keepalive(&data)?;
    data.set_nodelay(true)?;
    data.set_write_timeout(Some(DATA_WRITE_TIMEOUT))?;
    Ok(data)
}

/// Saves the hashes learnt during the sync into the cache.
pub(super) async fn remember(cfg: &Config, algorithm: HashAlgorithm, learned: Vec<Learned>) {
    let Some(file) = cfg.cache_file.clone().filter(|_| !learned.is_empty()) else {
        return;
    };
    let saved =
        tokio::task::spawn_blocking(move || HashCache::remember(&file, algorithm, learned)).await;
    if let Ok(Err(e)) = saved {
        tracing::warn!("failed to save the hash cache: {e}");
    }
}

/// Hashes the unhashed files the server asks about; the answer has one entry per path, in
/// order: the file with its hash, or `Unreadable` with the reason it could not be hashed.
fn answer_hashes(
    root: &Root,
    listed: &Manifest,
    paths: &[RelPath],
    algorithm: HashAlgorithm,
) -> (Vec<Entry>, Vec<Learned>) {
    let mut learned = Vec::new();
    let entries = paths
        .iter()
        .map(|path| {
            let unreadable = |reason: String| Entry {
                path: path.clone(),
                kind: Kind::Unreadable { reason },
                meta: Meta::default(),
            };
            let Some(e) = listed
                .get(path)
                .filter(|e| matches!(e.kind, Kind::Unhashed { .. }))
            else {
                return unreadable("not an unhashed file of this client".into());
            };
            let hashed = root
                .open_read(path)
                .and_then(|f| scan::hash_stable(f, algorithm));
            match hashed {
                Ok((size, hash, stamp)) => {
                    learned.extend(stamp.map(|stamp| Learned {
                        path: path.as_str().to_owned(),
                        stamp,
                        hash,
                    }));
                    Entry {
                        path: path.clone(),
                        kind: Kind::File { size, hash },
                        meta: e.meta,
                    }
                }
                Err(err) => unreadable(err.to_string()),
            }
        })
        .collect();
    (entries, learned)
}

/// Awaits `work`, pinging the server every `every` so that it knows we are still here.
async fn pinging<T>(
    conn: &mut ControlConnection<TcpStream>,
    every: Duration,
    work: impl std::future::Future<Output = T>,
) -> Result<T, ClientError> {
    tokio::pin!(work);
    loop {
        tokio::select! {
            done = &mut work => return Ok(done),
            _ = tokio::time::sleep(every) => {
                conn.send_now(&ControlMessage::Ping).await?;
            }
        }
    }
}

/// The server's next message, pings skipped. The server may work for a long time before it
/// answers, but pings every few seconds meanwhile, so `limit` without a byte means it is
/// stopped, hung, gone, or not a server-sync at all.
pub(super) async fn next(
    conn: &mut ControlConnection<TcpStream>,
    limit: Duration,
) -> Result<ControlMessage, ClientError> {
    loop {
        match tokio::time::timeout(limit, conn.recv()).await {
            Err(_) => return Err(ClientError::Silent(limit)),
            Ok(Ok(Some(ControlMessage::Ping))) => continue,
            Ok(Ok(Some(m))) => return Ok(m),
            Ok(Ok(None)) => return Err(ClientError::Closed),
            Ok(Err(e)) => return Err(e.into()),
        }
    }
}
