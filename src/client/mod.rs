//! The client: lists its directory, sends the list to the server, answers its file requests,
//! and repeats on an interval.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpStream;
use tracing::{error, info, warn};

use crate::core::hash::HashAlgorithm;
use crate::core::manifest::{Entry, Kind, Meta, RelPath, find_sorted};
use crate::store::cache::{HashCache, Learned};
use crate::store::root::Root;
use crate::store::scan;
use crate::transfer;
use crate::wire::protocol::{self, BATCH, Capabilities, Message, ProtocolError, Summary, VERSION};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Large files the cache cannot vouch for are announced unhashed (see `scan::Options`).
const DEFER_ABOVE: u64 = 8 << 20;
/// A data connection the server does not drain for this long is given up.
const DATA_WRITE_TIMEOUT: Duration = Duration::from_secs(120);
/// How often an empty file-list batch is sent while a long scan runs; well under the server's
/// idle timeout.
const KEEPALIVE: Duration = Duration::from_secs(5);
/// The longest wait for the server's `Welcome` (or its keepalives while this client waits
/// for its turn): twice the server's keepalive interval.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest the server may stay silent in a session: it sends a keepalive every 5 s while
/// it works, so this much silence means it is stopped, hung or gone.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone, Debug)]
pub struct Config {
    pub root: PathBuf,
    pub server: String,
    pub port: u16,
    /// Where the hash cache of `root` is kept; `None` hashes every file on every sync.
    pub cache_file: Option<PathBuf>,
    /// Data connections run at once (the server may allow fewer).
    pub transfers: usize,
    /// Content hashes offered to the server, in order of preference; it picks one.
    pub hashes: Vec<HashAlgorithm>,
    /// Gives up on a server that has not welcomed this client within this long (or
    /// `idle_timeout`, if shorter): a peer that accepts and says nothing is not a server-sync.
    pub handshake_timeout: Duration,
    /// Gives up on a server silent for this long in the middle of a session.
    pub idle_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0} is not a directory")]
    NotADirectory(PathBuf),
    #[error("cannot read {path}: {source}")]
    ReadDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot reach server {addr}: {source}")]
    Unreachable {
        addr: String,
        source: std::io::Error,
    },
    #[error(
        "server {addr} did not answer within {} s (not a server-sync, or not responding)",
        .wait.as_secs_f64()
    )]
    NoAnswer { addr: String, wait: Duration },
    #[error("server refused the sync: {0}")]
    Refused(String),
    #[error("server ended the sync: {0}")]
    Ended(String),
    #[error("server went silent for {} s in the middle of the sync", .0.as_secs_f64())]
    Silent(Duration),
    #[error("server closed the connection in the middle of the sync")]
    Closed,
    #[error("connection to the server failed: {0}")]
    Protocol(#[from] ProtocolError),
}

impl ClientError {
    /// The documented exit status of `client-sync --once` for this error.
    /// 1 is kept for a sync that ran but left entries behind (see `Report::is_clean`).
    pub fn exit_code(&self) -> i32 {
        match self {
            ClientError::NotADirectory(_) | ClientError::ReadDir { .. } => 2,
            // The server could not be used: the sync did not complete, try again later.
            ClientError::Unreachable { .. }
            | ClientError::NoAnswer { .. }
            | ClientError::Refused(_)
            | ClientError::Ended(_)
            | ClientError::Silent(_)
            | ClientError::Closed
            | ClientError::Protocol(_) => 3,
        }
    }

    /// Whether the sync never started (no server, no answer, or turned away): worth retrying
    /// soon rather than at the next interval.
    fn before_session(&self) -> bool {
        matches!(
            self,
            ClientError::Unreachable { .. }
                | ClientError::NoAnswer { .. }
                | ClientError::Refused(_)
        )
    }
}

/// The result of one sync.
#[derive(Debug, Default)]
pub struct Report {
    /// What the server did and which entries it could not bring up to date.
    pub summary: Summary,
    /// Entries this side could not read (not sent, and not deleted on the server).
    pub unreadable: Vec<(String, String)>,
    pub elapsed: Duration,
}

impl Report {
    /// Entries that are not mirrored after this sync, with the reason (the server names
    /// only its first few: see `failed_count`).
    pub fn failures(&self) -> impl Iterator<Item = &(String, String)> {
        self.unreadable.iter().chain(&self.summary.failed)
    }

    /// How many entries are not mirrored after this sync.
    pub fn failed_count(&self) -> u64 {
        self.unreadable.len() as u64 + self.summary.failed_total
    }

    pub fn is_clean(&self) -> bool {
        self.failed_count() == 0
    }

    /// The one-line summary ending `client-sync --once`.
    pub fn summary_line(&self) -> String {
        let s = &self.summary;
        format!(
            "summary: requested={} copied={} renamed={} deleted={} failed={} bytes={} seconds={:.2}",
            s.requested,
            s.copied,
            s.renamed,
            s.deleted,
            self.failed_count(),
            s.bytes,
            self.elapsed.as_secs_f64()
        )
    }
}

/// Runs one complete sync.
pub async fn sync_once(cfg: &Config) -> Result<Report, ClientError> {
    let start = Instant::now();
    let dir = cfg.root.clone();
    match std::fs::metadata(&dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(ClientError::NotADirectory(dir)),
        Err(source) => return Err(ClientError::ReadDir { path: dir, source }),
    }
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
    let (rd, wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    let mut wr = BufWriter::new(wr);

    let transfers = cfg.transfers.clamp(1, u16::MAX.into()) as u16;
    protocol::write(
        &mut wr,
        &Message::Hello {
            version: VERSION,
            transfers,
            hashes: cfg.hashes.clone(),
            capabilities: Capabilities::NONE,
        },
    )
    .await?;
    wr.flush().await.map_err(ProtocolError::from)?;
    let wait = cfg.handshake_timeout.min(cfg.idle_timeout);
    let welcome = match next(&mut rd, wait).await {
        Err(ClientError::Silent(wait)) => return Err(ClientError::NoAnswer { addr, wait }),
        welcome => welcome?,
    };
    let (data_port, token, algorithm) = match welcome {
        Message::Welcome {
            data_port,
            token,
            hash,
            ..
        } if cfg.hashes.contains(&hash) => (data_port, token, hash),
        Message::Welcome { hash, .. } => {
            return Err(ProtocolError::Unrequested(format!("hash algorithm {hash}")).into());
        }
        Message::Error(e) => return Err(ClientError::Refused(e)),
        m => return Err(m.unexpected("welcome").into()),
    };

    // Scan only now that the session has started: the server walks its own tree meanwhile.
    let cache_file = cfg.cache_file.clone();
    let opts = scan::Options {
        defer_above: Some(DEFER_ABOVE),
        ..scan::Options::new(algorithm)
    };
    let mut scanning =
        tokio::task::spawn_blocking(move || scan::scan_cached(&dir, cache_file, opts));
    let scan = loop {
        tokio::select! {
            r = &mut scanning => break r.expect("scan does not panic"),
            _ = tokio::time::sleep(KEEPALIVE) => {
                // Tells the server we are still here during a long scan.
                protocol::write(&mut wr, &Message::Ping).await?;
                wr.flush().await.map_err(ProtocolError::from)?;
            }
        }
    }
    .map_err(|source| ClientError::ReadDir {
        path: cfg.root.clone(),
        source,
    })?;
    for w in &scan.warnings {
        warn!("{w}");
    }
    let mut report = Report::default();
    for (path, reason) in scan.unreadable() {
        warn!("cannot read {path}, not syncing it: {reason}");
        report
            .unreadable
            .push((path.as_str().to_owned(), format!("cannot read: {reason}")));
    }
    // Sockets, FIFOs and devices are not synced: leave them out of the list.
    let mut scan = scan;
    scan.entries.retain(|e| match &e.kind {
        Kind::Special { what } => {
            warn!("skipping {}: a {what} is not synced", e.path);
            false
        }
        _ => true,
    });
    let bytes: u64 = scan
        .entries
        .iter()
        .map(|e| match e.kind {
            Kind::File { size, .. } | Kind::Unhashed { size } => size,
            _ => 0,
        })
        .sum();

    info!(
        "Sending file list: {} entries, {bytes} bytes",
        scan.entries.len()
    );
    for batch in scan.entries.chunks(BATCH) {
        protocol::write_file_list(&mut wr, batch).await?;
    }
    protocol::write(&mut wr, &Message::FileListEnd).await?;
    wr.flush().await.map_err(ProtocolError::from)?;
    let listed = Arc::new(scan.entries);

    let root = Root::new(&cfg.root);
    // Hashes of unhashed files computed during the session, for the hash cache.
    let mut learned: Vec<Learned> = Vec::new();
    // Data connections in flight, each on its own thread.
    let mut sending = tokio::task::JoinSet::<Result<_, ProtocolError>>::new();
    loop {
        match next(&mut rd, cfg.idle_timeout).await? {
            Message::HashRequest(paths) => {
                let (root, listed) = (root.clone(), listed.clone());
                let mut hashing = tokio::task::spawn_blocking(move || {
                    answer_hashes(&root, &listed, &paths, algorithm)
                });
                let (entries, got) = loop {
                    tokio::select! {
                        r = &mut hashing => break r.expect("hashing does not panic"),
                        _ = tokio::time::sleep(KEEPALIVE) => {
                            protocol::write(&mut wr, &Message::Ping).await?;
                            wr.flush().await.map_err(ProtocolError::from)?;
                        }
                    }
                };
                for e in &entries {
                    if let Kind::Unreadable { reason } = &e.kind {
                        warn!("cannot hash {}, not syncing it: {reason}", e.path);
                        report
                            .unreadable
                            .push((e.path.as_str().to_owned(), format!("cannot hash: {reason}")));
                    }
                }
                learned.extend(got);
                protocol::write(&mut wr, &Message::HashAnswer(entries)).await?;
                wr.flush().await.map_err(ProtocolError::from)?;
            }
            Message::FileRequest { id, paths } => {
                // The server keeps at most `transfers` requests open; bound it here anyway.
                while sending.len() >= usize::from(transfers) {
                    let sent = sending.join_next().await.expect("not empty");
                    learned.extend(sent.expect("send does not panic")?);
                }
                let connect = TcpStream::connect((peer.ip(), data_port));
                let data = tokio::time::timeout(CONNECT_TIMEOUT, connect)
                    .await
                    .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))
                    .and_then(|r| r)
                    .and_then(|s| s.into_std())
                    .map_err(ProtocolError::from)?;
                data.set_nonblocking(false).map_err(ProtocolError::from)?;
                // A server that stops reading must not hold this thread forever.
                crate::process::set_keepalive(&data).map_err(ProtocolError::from)?;
                data.set_write_timeout(Some(DATA_WRITE_TIMEOUT))
                    .map_err(ProtocolError::from)?;
                let (root, listed) = (root.clone(), listed.clone());
                sending.spawn_blocking(move || {
                    let sent =
                        transfer::send(data, &root, (token, id), &paths, &listed, algorithm)?;
                    Ok(sent.learned)
                });
                // Surface a finished transfer's error without waiting for the rest.
                while let Some(sent) = sending.try_join_next() {
                    learned.extend(sent.expect("send does not panic")?);
                }
            }
            Message::SyncDone(summary) => {
                // The server has received everything it asked for: these are done.
                while let Some(sent) = sending.join_next().await {
                    learned.extend(sent.expect("send does not panic")?);
                }
                report.summary = summary;
                break;
            }
            Message::Error(e) => return Err(ClientError::Ended(e)),
            m => return Err(m.unexpected("filerequest, hashrequest or sync:done").into()),
        }
    }
    if let Some(file) = cfg.cache_file.clone().filter(|_| !learned.is_empty()) {
        let saved =
            tokio::task::spawn_blocking(move || HashCache::remember(&file, algorithm, learned))
                .await;
        if let Ok(Err(e)) = saved {
            warn!("failed to save the hash cache: {e}");
        }
    }
    report.elapsed = start.elapsed();
    info!("sync:done");
    Ok(report)
}

/// Hashes the unhashed files the server asks about; the answer has one entry per path, in
/// order: the file with its hash, or `Unreadable` with the reason it could not be hashed.
fn answer_hashes(
    root: &Root,
    listed: &[Entry],
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
            let Some(e) =
                find_sorted(listed, path).filter(|e| matches!(e.kind, Kind::Unhashed { .. }))
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

/// The server's next message, keepalives (empty `FileList`s) skipped. The server may work
/// for a long time before it answers, but sends a keepalive every few seconds meanwhile, so
/// `limit` without a byte means it is stopped, hung, gone, or not a server-sync at all.
async fn next<R: tokio::io::AsyncRead + Unpin>(
    rd: &mut R,
    limit: Duration,
) -> Result<Message, ClientError> {
    loop {
        match tokio::time::timeout(limit, protocol::read(rd)).await {
            Err(_) => return Err(ClientError::Silent(limit)),
            Ok(Ok(Some(Message::FileList(e)))) if e.is_empty() => continue,
            Ok(Ok(Some(m))) => return Ok(m),
            Ok(Ok(None)) => return Err(ClientError::Closed),
            Ok(Err(e)) => return Err(e.into()),
        }
    }
}

/// Syncs now and then every `interval` until `shutdown` resolves. A server that cannot be
/// reached, does not answer or turns the client away (busy, shutting down) is retried with
/// exponential back-off (1 s doubling, up to `interval`); nothing here exits.
pub async fn run(cfg: &Config, interval: Duration, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    let mut backoff = Duration::from_secs(1);
    loop {
        let wait = tokio::select! {
            _ = &mut shutdown => break,
            r = sync_once(cfg) => match r {
                Ok(report) => {
                    backoff = Duration::from_secs(1);
                    log_report(&report);
                    interval
                }
                Err(e) if e.before_session() => {
                    let wait = backoff;
                    backoff = (backoff * 2).min(interval);
                    warn!("{e}; retrying in {} s", wait.as_secs());
                    wait
                }
                Err(e) => {
                    error!("sync failed: {e}");
                    interval
                }
            },
        };
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tokio::time::sleep(wait) => {}
        }
    }
    info!("client stopped");
}

/// Logs each failed entry and the summary line.
pub fn log_report(report: &Report) {
    for (path, why) in report.failures() {
        warn!("not synced: {path}: {why}");
    }
    info!("{}", report.summary_line());
}
