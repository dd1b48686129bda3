//! The server: accepts control and data connections and runs sync sessions against its
//! directory, one at a time.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::core::hash::HashAlgorithm;
use crate::core::manifest::{Entry, Kind, Manifest, ManifestError, RelPath};
use crate::core::plan::{self, Request};
use crate::store::apply;
use crate::store::cache::HashCache;
use crate::store::root::Root;
use crate::transfer;
use crate::wire::protocol::{self, BATCH, Capabilities, Message, ProtocolError, Summary, VERSION};

/// Most entries accepted in one client file list: bounds a session's memory against a peer
/// that never stops listing.
pub const MAX_ENTRIES: usize = 10_000_000;
/// Most bytes of file list accepted in one session (paths, targets, reasons): with
/// `MAX_ENTRIES`, what bounds a session's memory whatever a client sends.
pub const MAX_LIST_BYTES: usize = 1 << 30;
/// Most data connections one session runs at once, whatever the client offers.
pub const MAX_TRANSFERS: usize = 8;
/// A request batch is closed once its files add up to this much.
const BATCH_BYTES: u64 = 64 << 20;
/// How long in-flight sessions may go on after a shutdown signal before they are abandoned.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// The most a connection turned away as busy is kept to deliver the reason.
const REFUSAL_LINGER: Duration = Duration::from_secs(2);
/// Prefix of the `Error` message a client turned away for lack of room receives.
pub const BUSY: &str = "server busy";

#[derive(Clone, Debug)]
pub struct Config {
    pub root: PathBuf,
    /// A peer that sends nothing for this long loses its connection.
    pub idle_timeout: Duration,
    /// A connection that has not sent its `Hello` (or a data connection its `DataHello`)
    /// within this long, or `idle_timeout` if shorter, is dropped: a connection that says
    /// nothing holds one of `max_connections` for this long only.
    pub handshake_timeout: Duration,
    /// Sessions (control connections) served at once; more are refused. Data connections
    /// not yet routed to a session have their own cap, `MAX_TRANSFERS` times this: once
    /// routed, they count within their session's transfers.
    pub max_connections: usize,
    /// Control connections from one IP address at once (data connections not yet routed:
    /// `MAX_TRANSFERS` times this), so that one host cannot take every slot.
    pub max_per_address: usize,
    /// How often a client waiting on the server (for its turn, or while the server scans,
    /// applies, receives or flushes) is told the server is still at work, with an empty
    /// `FileList`: the client gives up on a server silent for its own idle limit (10 s before
    /// its `Welcome`, 60 s after, by default).
    pub keepalive: Duration,
    /// Where the hash cache of `root` is kept; `None` hashes every file on every session.
    pub cache_file: Option<PathBuf>,
}

impl Config {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Config {
            root: root.into(),
            idle_timeout: Duration::from_secs(60),
            handshake_timeout: Duration::from_secs(5),
            max_connections: 64,
            max_per_address: 8,
            keepalive: Duration::from_secs(5),
            cache_file: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{0} exists and is not a directory")]
    NotADirectory(PathBuf),
    #[error("cannot create directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot resolve bind address {host}: {source}")]
    Resolve {
        host: String,
        source: std::io::Error,
    },
    #[error("cannot listen on {what} port {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot clean stale temporary files in {path}: {source}")]
    Clean {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Why a session ended early. Logged by the server; the other sessions go on.
#[derive(Debug, thiserror::Error)]
enum SessionError {
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
}

/// Refuses entries hashed in another algorithm than the session's: they could never match
/// anything, and would be requested and rejected forever.
fn check_algorithm(entries: &[Entry], session: HashAlgorithm) -> Result<(), SessionError> {
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

/// Creates the directory if needed and removes temporary files left by an earlier crash.
pub fn prepare_root(dir: &Path) -> Result<Root, ServerError> {
    match std::fs::metadata(dir) {
        Ok(m) if !m.is_dir() => return Err(ServerError::NotADirectory(dir.into())),
        Ok(_) => {}
        Err(_) => std::fs::create_dir_all(dir).map_err(|source| ServerError::CreateDir {
            path: dir.into(),
            source,
        })?,
    }
    let root = Root::new(dir);
    let n = root
        .remove_stale_temps()
        .map_err(|source| ServerError::Clean {
            path: dir.into(),
            source,
        })?;
    if n > 0 {
        info!("removed {n} stale temporary file(s) left by an earlier run");
    }
    Ok(root)
}

/// Binds the control and data listeners on `host` (the first address it resolves to).
pub async fn bind(
    host: &str,
    port: u16,
    data_port: u16,
) -> Result<(TcpListener, TcpListener), ServerError> {
    let resolve = |source| ServerError::Resolve {
        host: host.into(),
        source,
    };
    let mut addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, 0))
        .await
        .map_err(resolve)?
        .collect();
    // `localhost` may resolve to ::1 first; prefer IPv4 so the default client finds us.
    addrs.sort_by_key(|a| !a.is_ipv4());
    let ip = addrs
        .first()
        .ok_or_else(|| resolve(std::io::Error::other("no address")))?
        .ip();
    let listen = |what, port| async move {
        let addr = SocketAddr::new(ip, port);
        TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Bind { what, addr, source })
    };
    Ok((
        listen("control", port).await?,
        listen("data", data_port).await?,
    ))
}

struct Shared {
    root: Root,
    idle: Duration,
    /// How long a new connection may take to say hello.
    handshake: Duration,
    keepalive: Duration,
    data_port: u16,
    cache_file: Option<PathBuf>,
    /// Held for a whole session: two clients never interleave their changes.
    session: tokio::sync::Mutex<()>,
    /// Sessions waiting for data connections, by token.
    waiting: Mutex<HashMap<u64, mpsc::Sender<(u32, TcpStream)>>>,
    /// Set when a shutdown begins: a session that gets its turn after that does not start.
    stopping: std::sync::atomic::AtomicBool,
    /// Data connections being received on blocking threads, which no task abort can stop:
    /// shutting their sockets down is how an abandoned transfer is ended.
    receiving: Mutex<HashMap<u64, std::net::TcpStream>>,
    /// Connections open per source address, control and data apart (`true`: data).
    per_address: Mutex<HashMap<(IpAddr, bool), usize>>,
}

/// One connection counted in `Shared::per_address`, for as long as it is held.
struct AddressSlot {
    shared: Arc<Shared>,
    key: (IpAddr, bool),
}

impl AddressSlot {
    /// Counts a connection from `ip`, unless `max` are already open from there.
    fn take(shared: &Arc<Shared>, ip: IpAddr, is_data: bool, max: usize) -> Option<AddressSlot> {
        let key = (ip, is_data);
        let mut open = shared.per_address.lock().unwrap();
        let n = open.entry(key).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(AddressSlot {
            shared: shared.clone(),
            key,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut open = self.shared.per_address.lock().unwrap();
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// Serves until `shutdown` resolves, then stops accepting, lets in-flight sessions finish
/// (abandoning them after a grace period) and removes any temporary file left.
pub async fn run(
    config: Config,
    control: TcpListener,
    data: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let shared = Arc::new(Shared {
        root: Root::new(&config.root),
        idle: config.idle_timeout,
        handshake: config.handshake_timeout.min(config.idle_timeout),
        keepalive: config.keepalive,
        data_port: data.local_addr().map(|a| a.port()).unwrap_or(0),
        cache_file: config.cache_file.clone(),
        session: tokio::sync::Mutex::new(()),
        waiting: Mutex::new(HashMap::new()),
        receiving: Mutex::new(HashMap::new()),
        stopping: std::sync::atomic::AtomicBool::new(false),
        per_address: Mutex::new(HashMap::new()),
    });
    let control_limit = Arc::new(Semaphore::new(config.max_connections));
    let data_limit = Arc::new(Semaphore::new(config.max_connections * MAX_TRANSFERS));
    // Connections being told they are turned away: bounded too, past it they are just closed.
    let refusing = Arc::new(Semaphore::new(config.max_connections));
    let mut tasks = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, addr, is_data) = tokio::select! {
            _ = &mut shutdown => break,
            r = control.accept() => match r {
                Ok((s, a)) => (s, a, false),
                Err(e) => { accept_failed(e).await; continue; }
            },
            r = data.accept() => match r {
                Ok((s, a)) => (s, a, true),
                Err(e) => { accept_failed(e).await; continue; }
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
        };
        let limit = if is_data { &data_limit } else { &control_limit };
        let (what, n, per_address) = match is_data {
            true => (
                "data connections",
                config.max_connections * MAX_TRANSFERS,
                config.max_per_address * MAX_TRANSFERS,
            ),
            false => (
                "connections",
                config.max_connections,
                config.max_per_address,
            ),
        };
        let admitted = match limit.clone().try_acquire_owned() {
            Err(_) => Err(format!("already serving {n} {what}")),
            Ok(permit) => AddressSlot::take(&shared, addr.ip(), is_data, per_address)
                .map(|slot| (permit, slot))
                .ok_or_else(|| format!("already {per_address} {what} from {}", addr.ip())),
        };
        let (permit, slot) = match admitted {
            Ok(admitted) => admitted,
            Err(why) => {
                warn!("refusing connection from {addr}: {why}");
                // A client is told why; a data connection has no one reading it.
                if let (false, Ok(permit)) = (is_data, refusing.clone().try_acquire_owned()) {
                    tokio::spawn(async move {
                        turn_away(stream, format!("{BUSY}: {why}, try again later")).await;
                        drop(permit);
                    });
                }
                continue;
            }
        };
        let shared = shared.clone();
        tasks.spawn(async move {
            let _held = (permit, slot);
            if is_data {
                route_data(&shared, stream, addr).await;
            } else if let Err(e) = session(&shared, stream, addr).await {
                warn!("session with {addr} ended: {e}");
            }
        });
    }
    drop((control, data));
    shared
        .stopping
        .store(true, std::sync::atomic::Ordering::SeqCst);
    if !tasks.is_empty() {
        info!("shutting down: waiting for {} connection(s)", tasks.len());
        let drain = async { while tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(SHUTDOWN_GRACE, drain).await.is_err() {
            warn!("shutting down: abandoning sessions still in flight");
            for s in shared.receiving.lock().unwrap().values() {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
            tasks.shutdown().await;
        }
    }
    let root = shared.root.clone();
    let cleaned = tokio::task::spawn_blocking(move || root.remove_stale_temps()).await;
    if let Ok(Err(e)) = cleaned {
        warn!("failed to remove temporary files at shutdown: {e}");
    }
    info!("server stopped");
    Ok(())
}

/// Sends a connection turned away the reason, as an `Error` message, then closes it.
async fn turn_away(mut stream: TcpStream, why: String) {
    let _ = tokio::time::timeout(REFUSAL_LINGER, async {
        protocol::write(&mut stream, &Message::Error(why)).await?;
        stream.shutdown().await?;
        // Read what the client sent (its hello) until it closes: closing with unread data
        // resets the connection, and the reset can destroy the message before it is read.
        let mut sink = [0u8; 1024];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<_, ProtocolError>(())
    })
    .await;
}

async fn accept_failed(e: std::io::Error) {
    // Typically out of file descriptors: back off instead of spinning.
    warn!("failed to accept a connection: {e}");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// Reads a data connection's `DataHello` and hands the stream to the session it names.
async fn route_data(shared: &Shared, mut stream: TcpStream, addr: SocketAddr) {
    let (token, request) = match protocol::read_within(&mut stream, shared.handshake).await {
        Ok(Message::DataHello { token, request }) => (token, request),
        Ok(m) => {
            return warn!(
                "data connection from {addr} closed: {}",
                m.unexpected("data-hello")
            );
        }
        Err(ProtocolError::Idle) => {
            let e = SessionError::NoHello(shared.handshake);
            return warn!("data connection from {addr} closed: {e}");
        }
        Err(e) => return warn!("data connection from {addr} closed: {e}"),
    };
    let tx = shared.waiting.lock().unwrap().get(&token).cloned();
    match tx {
        Some(tx) => {
            let _ = tx.send((request, stream)).await;
        }
        None => warn!("data connection from {addr} closed: unknown session token"),
    }
}

/// Reads the client's file list up to `FileListEnd`, within the session's limits.
async fn read_list(
    rd: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
    idle: Duration,
) -> Result<Vec<Entry>, SessionError> {
    let mut entries = Vec::new();
    let mut bytes = 0usize;
    loop {
        match protocol::read_within(rd, idle).await? {
            Message::Ping => {}
            Message::FileList(batch) => {
                bytes += batch.iter().map(entry_bytes).sum::<usize>();
                if entries.len() + batch.len() > MAX_ENTRIES || bytes > MAX_LIST_BYTES {
                    return Err(SessionError::TooManyEntries);
                }
                entries.extend(batch);
            }
            Message::FileListEnd => return Ok(entries),
            m => return Err(m.unexpected("filelist").into()),
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

/// Splits requests into batches: at most `BATCH` files or `BATCH_BYTES` each, and, when
/// there are few, into as many batches as there are transfers, so that all connections work.
fn batches(requests: Vec<Request>, transfers: usize) -> Vec<Vec<Request>> {
    let per = requests.len().div_ceil(transfers).clamp(1, BATCH);
    let mut out: Vec<Vec<Request>> = Vec::new();
    let mut bytes = 0;
    for r in requests {
        match out.last_mut() {
            Some(b) if b.len() < per && bytes < BATCH_BYTES => {
                bytes = bytes.saturating_add(r.size);
                b.push(r);
            }
            _ => {
                bytes = r.size;
                out.push(vec![r]);
            }
        }
    }
    out
}

/// Awaits `work`, telling the client every `every` that the server is still at it. A client
/// that is gone does not cut the work short (a session always waits for its own work): the
/// keepalives just stop, and the next real message fails.
async fn keepalive<T>(
    every: Duration,
    wr: &mut BufWriter<tokio::net::tcp::OwnedWriteHalf>,
    work: impl Future<Output = T>,
) -> T {
    tokio::pin!(work);
    let mut tick = ticks(every);
    let mut alive = true;
    loop {
        tokio::select! {
            done = &mut work => return done,
            _ = tick.tick(), if alive => alive = send_keepalive(wr).await.is_ok(),
        }
    }
}

/// Ticks every `every`, the first one `every` from now.
fn ticks(every: Duration) -> tokio::time::Interval {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick
}

/// An empty `FileList`: the client skips it, and knows the server is alive.
async fn send_keepalive(
    wr: &mut BufWriter<tokio::net::tcp::OwnedWriteHalf>,
) -> Result<(), ProtocolError> {
    protocol::write(wr, &Message::FileList(Vec::new())).await?;
    Ok(wr.flush().await?)
}

/// Requests the batches, keeping up to `transfers` of them in flight, each received on its
/// own data connection and thread.
async fn fetch(
    shared: &Shared,
    wr: &mut BufWriter<tokio::net::tcp::OwnedWriteHalf>,
    data: &mut mpsc::Receiver<(u32, TcpStream)>,
    batches: Vec<Vec<Request>>,
    (transfers, algorithm): (usize, HashAlgorithm),
) -> Result<transfer::Received, SessionError> {
    let idle = shared.idle;
    let mut total = transfer::Received::default();
    let mut batches = batches.into_iter().enumerate();
    // Requested, connection not there yet; and being received.
    let mut asked: HashMap<u32, Vec<Request>> = HashMap::new();
    let mut running = JoinSet::new();
    let mut registered: HashMap<u32, Receiving> = HashMap::new();
    // The control connection is quiet while files arrive on the data connections: keepalives
    // tell the client the server is still there. Waiting for a data connection is bounded
    // from the last time one arrived or finished, not from the last keepalive.
    let mut tick = ticks(shared.keepalive);
    let mut progress = tokio::time::Instant::now();
    loop {
        while asked.len() + running.len() < transfers {
            let Some((id, batch)) = batches.next() else {
                break;
            };
            for r in &batch {
                info!("Requesting file: {}", r.path);
            }
            let id = id as u32;
            let paths = batch.iter().map(|r| r.path.clone()).collect();
            protocol::write(wr, &Message::FileRequest { id, paths }).await?;
            asked.insert(id, batch);
        }
        wr.flush().await.map_err(ProtocolError::from)?;
        if asked.is_empty() && running.is_empty() {
            return Ok(total);
        }
        tokio::select! {
            conn = data.recv(), if !asked.is_empty() => {
                progress = tokio::time::Instant::now();
                let (id, stream) = conn.ok_or(SessionError::NoDataConnection)?;
                let batch = asked
                    .remove(&id)
                    .ok_or_else(|| ProtocolError::Unrequested(format!("data connection {id}")))?;
                let stream = blocking(stream, idle).map_err(ProtocolError::from)?;
                if let Some(r) = Receiving::register(shared, &stream) {
                    registered.insert(id, r);
                }
                let root = shared.root.clone();
                running.spawn_blocking(move || {
                    let mut stream = std::io::BufReader::with_capacity(256 << 10, stream);
                    (id, transfer::receive(&mut stream, &root, &batch, algorithm))
                });
            }
            Some(done) = running.join_next(), if !running.is_empty() => {
                progress = tokio::time::Instant::now();
                let (id, got) = done.expect("receive does not panic");
                registered.remove(&id);
                let got = got?;
                total.files += got.files;
                total.bytes += got.bytes;
                total.failed.extend(got.failed);
                total.learned.extend(got.learned);
            }
            _ = tokio::time::sleep_until(progress + idle), if running.is_empty() => {
                return Err(SessionError::NoDataConnection);
            }
            _ = tick.tick() => send_keepalive(wr).await?,
        }
    }
}

/// Asks the client for the MD5 of the files it announced unhashed that the server might
/// already hold, at this path or another: those whose size equals a file of the server's.
/// Knowing the MD5, the plan can leave them alone, copy or move them locally; the others are
/// simply requested, their MD5 following their content.
async fn hash_where_it_matters(
    rd: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
    wr: &mut BufWriter<tokio::net::tcp::OwnedWriteHalf>,
    client: Manifest,
    server: &Manifest,
    (idle, algorithm): (Duration, HashAlgorithm),
) -> Result<Manifest, SessionError> {
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
    info!(
        "Asking the client for the {} of {} large file(s) that may already be here",
        algorithm,
        wanted.len()
    );
    let mut answers: HashMap<RelPath, Entry> = HashMap::with_capacity(wanted.len());
    for batch in wanted.chunks(BATCH) {
        protocol::write(wr, &Message::HashRequest(batch.to_vec())).await?;
        wr.flush().await.map_err(ProtocolError::from)?;
        let entries = loop {
            match protocol::read_within(rd, idle).await? {
                Message::Ping => continue, // while the client hashes
                Message::HashAnswer(e) => break e,
                m => return Err(m.unexpected("hash-answer").into()),
            }
        };
        let fits = |(want, e): (&RelPath, &Entry)| {
            *want == e.path && matches!(e.kind, Kind::File { .. } | Kind::Unreadable { .. })
        };
        if entries.len() != batch.len() || !batch.iter().zip(&entries).all(fits) {
            return Err(ProtocolError::Malformed("hash answer").into());
        }
        check_algorithm(&entries, algorithm)?;
        answers.extend(entries.into_iter().map(|e| (e.path.clone(), e)));
    }
    let entries = client
        .into_entries()
        .into_iter()
        .map(|e| answers.remove(&e.path).unwrap_or(e));
    Ok(Manifest::from_entries(entries)?)
}

/// Turns a data connection into a blocking socket for its own thread; `idle` becomes the
/// read timeout.
fn blocking(stream: TcpStream, idle: Duration) -> std::io::Result<std::net::TcpStream> {
    let s = stream.into_std()?;
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(idle))?;
    Ok(s)
}

/// Lists a data connection in `Shared::receiving` while it is being received.
struct Receiving<'a> {
    shared: &'a Shared,
    id: u64,
}

impl<'a> Receiving<'a> {
    fn register(shared: &'a Shared, stream: &std::net::TcpStream) -> Option<Receiving<'a>> {
        let id = crate::process::random_u64();
        let clone = stream.try_clone().ok()?;
        shared.receiving.lock().unwrap().insert(id, clone);
        Some(Receiving { shared, id })
    }
}

impl Drop for Receiving<'_> {
    /// Also ends the transfer if it still runs: a session that stops early (an error on
    /// another connection) must not leave a thread receiving for nobody.
    fn drop(&mut self) {
        if let Some(s) = self.shared.receiving.lock().unwrap().remove(&self.id) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// Removes a session's token when the session ends, however it ends.
struct Registration<'a> {
    shared: &'a Shared,
    token: u64,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.shared.waiting.lock().unwrap().remove(&self.token);
    }
}

async fn session(shared: &Shared, stream: TcpStream, addr: SocketAddr) -> Result<(), SessionError> {
    let (rd, wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    let mut wr = BufWriter::new(wr);

    let hello = match protocol::read_within(&mut rd, shared.handshake).await {
        Err(ProtocolError::Idle) => return Err(SessionError::NoHello(shared.handshake)),
        hello => hello?,
    };
    let (transfers, algorithm) = match hello {
        Message::Hello {
            version,
            transfers,
            hashes,
            ..
        } if version == VERSION => {
            let Some(algorithm) = HashAlgorithm::negotiate(&HashAlgorithm::ALL, &hashes) else {
                let err = SessionError::NoCommonHash(hashes);
                protocol::write(&mut wr, &Message::Error(err.to_string())).await?;
                wr.flush().await.map_err(ProtocolError::from)?;
                return Err(err);
            };
            (usize::from(transfers).clamp(1, MAX_TRANSFERS), algorithm)
        }
        Message::Hello { version, .. } => {
            let err = SessionError::Version(version);
            protocol::write(&mut wr, &Message::Error(err.to_string())).await?;
            wr.flush().await.map_err(ProtocolError::from)?;
            return Err(err);
        }
        m => return Err(m.unexpected("hello").into()),
    };

    let _turn = match shared.session.try_lock() {
        Ok(g) => g,
        Err(_) => {
            info!("client {addr} waits for another session to finish");
            keepalive(shared.keepalive, &mut wr, shared.session.lock()).await
        }
    };
    if shared.stopping.load(std::sync::atomic::Ordering::SeqCst) {
        let err = SessionError::ShuttingDown;
        protocol::write(&mut wr, &Message::Error(err.to_string())).await?;
        wr.flush().await.map_err(ProtocolError::from)?;
        return Err(err);
    }
    info!("client {addr} connected ({algorithm})");
    let token = crate::process::random_u64();
    let (tx, mut rx) = mpsc::channel(MAX_TRANSFERS);
    shared.waiting.lock().unwrap().insert(token, tx);
    let _registration = Registration { shared, token };
    protocol::write(
        &mut wr,
        &Message::Welcome {
            version: VERSION,
            data_port: shared.data_port,
            token,
            hash: algorithm,
            capabilities: Capabilities::NONE,
        },
    )
    .await?;
    wr.flush().await.map_err(ProtocolError::from)?;

    let result = sync(
        shared,
        &mut rd,
        &mut wr,
        &mut rx,
        (transfers, algorithm),
        addr,
    )
    .await;
    if let Err(e) = &result {
        // Tell the client why, if it still listens; the error itself is what we report.
        let _ = protocol::write(&mut wr, &Message::Error(e.to_string())).await;
        let _ = wr.flush().await;
    }
    result
}

async fn sync(
    shared: &Shared,
    rd: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
    wr: &mut BufWriter<tokio::net::tcp::OwnedWriteHalf>,
    data: &mut mpsc::Receiver<(u32, TcpStream)>,
    (transfers, algorithm): (usize, HashAlgorithm),
    addr: SocketAddr,
) -> Result<(), SessionError> {
    let idle = shared.idle;
    // Walk our own tree while the client walks its own and sends the list.
    let (root, cache_file) = (shared.root.clone(), shared.cache_file.clone());
    let scanning = tokio::task::spawn_blocking(move || {
        let scan = crate::store::scan::scan_cached(
            root.path(),
            cache_file,
            crate::store::scan::Options {
                read_own: true,
                ..crate::store::scan::Options::new(algorithm)
            },
        )
        .map_err(SessionError::Scan)?;
        for w in &scan.warnings {
            warn!("{w}");
        }
        Ok::<_, SessionError>(Manifest::from_entries(scan.entries)?)
    });
    // Whatever the client does, the scan is this session's work: it is waited for before the
    // session ends, so that sessions never overlap, even in their leftovers.
    let listed = read_list(rd, idle).await;
    let server = keepalive(shared.keepalive, wr, scanning)
        .await
        .expect("scan does not panic");
    let entries = listed?;
    let server = server?;
    check_algorithm(&entries, algorithm)?;
    let client = Manifest::from_entries(entries)?;
    info!(
        "Received file list from {addr}: {} entries, {} bytes",
        client.len(),
        client.file_bytes()
    );
    let client = hash_where_it_matters(rd, wr, client, &server, (idle, algorithm)).await?;

    let root = shared.root.clone();
    let planning = tokio::task::spawn_blocking(move || {
        let plan = plan::plan(&client, &server);
        (apply::apply_local(&root, &plan), plan)
    });
    let (mut outcome, plan) = keepalive(shared.keepalive, wr, planning)
        .await
        .expect("plan and apply do not panic");

    let mut summary = Summary {
        copied: outcome.copied,
        renamed: outcome.renamed,
        deleted: outcome.deleted,
        ..Summary::default()
    };
    let mut requests = plan.requests.clone();
    let refetched = outcome.refetch.len();
    requests.append(&mut outcome.refetch);
    summary.requested = requests.len() as u64;
    let batches = batches(requests, transfers);
    let got = fetch(shared, wr, data, batches, (transfers, algorithm)).await?;
    summary.received = got.files;
    summary.bytes = got.bytes;
    outcome.failed.extend(got.failed);
    let (cache_file, learned) = (shared.cache_file.clone(), got.learned);

    let root = shared.root.clone();
    let finishing = tokio::task::spawn_blocking(move || {
        apply::apply_meta(&root, &plan, &mut outcome);
        // What was just received and verified need not be read again next session.
        if let Some(file) = cache_file.filter(|_| !learned.is_empty())
            && let Err(e) = HashCache::remember(&file, algorithm, learned)
        {
            warn!("failed to save the hash cache: {e}");
        }
        // An unchanged tree costs no flush: nothing of ours is dirty.
        if plan.is_empty() && refetched == 0 {
            return outcome;
        }
        if let Err(e) = root.sync_filesystem() {
            warn!("failed to flush the file system: {e}");
            outcome
                .failed
                .push((String::new(), format!("failed to flush to disk: {e}")));
        }
        outcome
    });
    let outcome = keepalive(shared.keepalive, wr, finishing)
        .await
        .expect("apply does not panic");
    summary.set_failures(outcome.failed);

    protocol::write(wr, &Message::SyncDone(summary.clone())).await?;
    wr.flush().await.map_err(ProtocolError::from)?;
    info!(
        "sync:done with {addr}: requested={} received={} copied={} renamed={} deleted={} failed={} bytes={}",
        summary.requested,
        summary.received,
        summary.copied,
        summary.renamed,
        summary.deleted,
        summary.failed_total,
        summary.bytes
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::manifest::Meta;

    /// Batch sizes for requests of the given file sizes over `transfers` connections.
    fn check(sizes: &[u64], transfers: usize, expected: &[usize]) {
        let requests = sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| Request {
                path: RelPath::new(format!("f{i}")).unwrap(),
                size,
                hash: Some(HashAlgorithm::Blake3.of(b"")),
                meta: Meta::default(),
            })
            .collect();
        let got: Vec<usize> = batches(requests, transfers).iter().map(Vec::len).collect();
        assert_eq!(got, expected, "sizes {sizes:?}, {transfers} transfers");
    }

    #[test]
    fn requests_are_batched_by_count_bytes_and_transfers() {
        check(&[], 2, &[]);
        check(&[1], 2, &[1]);
        check(&[1; 5], 1, &[5]);
        check(&[1; 5], 2, &[3, 2]);
        check(&[1; 10], 4, &[3, 3, 3, 1]);
        check(&[1; 1200], 1, &[512, 512, 176]);
        check(&[1; 1200], 2, &[512, 512, 176]);
        // A batch closes once it holds 64 MiB.
        check(&[40 << 20, 40 << 20, 1, 1], 1, &[2, 2]);
        check(&[1 << 30, 1, 1 << 30], 1, &[1, 2]);
    }
}
