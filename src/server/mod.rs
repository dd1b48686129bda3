//! The server: accepts control and data connections and runs sync sessions against its
//! directory, one at a time.
//!
//! - [`accept`]: the listeners, the connection caps, turning clients away, shutdown;
//! - [`route`]: data connections to the session whose token they carry;
//! - [`session`]: one client's session, step by step (handshake, lists, plan, fetch, finish);
//! - [`fetch`]: file requests, each received on a data connection of its own;
//! - [`live`]: a live session after its first sync: batches of changes, and the server's own
//!   directory watched for changes made behind the mirror's back.

mod accept;
mod fetch;
mod live;
mod route;
mod session;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::TcpListener;

pub use accept::run;

use crate::events::{self, Events};
use crate::store::DirError;
use crate::store::root::Root;

/// Most entries accepted in one client file list: bounds a session's memory against a peer
/// that never stops listing.
pub const MAX_ENTRIES: usize = 10_000_000;
/// Most bytes of file list accepted in one session (paths, targets, reasons): with
/// `MAX_ENTRIES`, what bounds a session's memory whatever a client sends.
pub const MAX_LIST_BYTES: usize = 1 << 30;
/// Most data connections one session runs at once, whatever the client offers.
pub const MAX_TRANSFERS: usize = 8;
/// Prefix of the `Error` message a client turned away for lack of room receives.
pub const BUSY: &str = "server busy";

#[derive(Clone)]
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
    /// applies, receives or flushes) is sent a `Ping`: the client gives up on a server silent
    /// for its own idle limit (10 s before its `Welcome`, 60 s after, by default).
    pub keepalive: Duration,
    /// Where the hash cache of `root` is kept; `None` hashes every file on every session.
    pub cache_file: Option<PathBuf>,
    /// Where the record of the client `root` mirrors is kept ([`crate::store::state`]);
    /// `None` serves any client.
    pub owner_file: Option<PathBuf>,
    /// This machine's identifier: a client that sends the same one is on this machine, and is
    /// refused if its directory and `root` are nested. `None`: no such check.
    pub machine_id: Option<String>,
    /// Where the sessions' events go (by default, the log).
    pub events: Events,
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
            owner_file: None,
            machine_id: crate::store::state::machine_id(),
            events: events::log(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Dir(#[from] DirError),
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
}

/// Creates the directory if needed and removes temporary files left by an earlier crash.
pub fn prepare_root(dir: &Path) -> Result<Root, ServerError> {
    let (root, removed) = crate::store::prepare(dir)?;
    if removed > 0 {
        tracing::info!("removed {removed} stale temporary file(s) left by an earlier run");
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
