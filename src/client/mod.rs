//! The client: lists its directory, sends the list to the server, answers its requests
//! ([`session`]), and repeats on an interval ([`daemon`]).

mod daemon;
mod live;
mod session;

use std::path::PathBuf;
use std::time::Duration;

pub use daemon::{log_report, run};
pub use session::sync_once;

use crate::core::hash::HashAlgorithm;
use crate::core::identity::ClientId;
use crate::core::text::Escaped;
use crate::events::{self, Events};
use crate::store::DirError;
use crate::wire::{Failure, ProtocolError, Summary};

/// The longest wait for the server's `Welcome` (or its pings while this client waits for its
/// turn): twice the server's ping interval.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest the server may stay silent in a session: it pings every 5 s while it works,
/// so this much silence means it is stopped, hung or gone.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone)]
pub struct Config {
    pub root: PathBuf,
    pub server: String,
    pub port: u16,
    /// Where the hash cache of `root` is kept; `None` hashes every file on every sync.
    pub cache_file: Option<PathBuf>,
    /// Where the list the server last acknowledged is kept, so that the next sync sends only
    /// what changed since; `None` sends the whole list every time.
    pub acked_file: Option<PathBuf>,
    /// Data connections run at once (the server may allow fewer).
    pub transfers: usize,
    /// Content hashes offered to the server, in order of preference; it picks one.
    pub hashes: Vec<HashAlgorithm>,
    /// Gives up on a server that has not welcomed this client within this long (or
    /// `idle_timeout`, if shorter): a peer that accepts and says nothing is not a server-sync.
    pub handshake_timeout: Duration,
    /// Gives up on a server silent for this long in the middle of a session.
    pub idle_timeout: Duration,
    /// How often the server is pinged while this side scans or hashes; well under the
    /// server's idle timeout.
    pub keepalive: Duration,
    /// Files at least this large that the hash cache cannot vouch for are announced unhashed
    /// and hashed while they are sent (or when the server asks): read once, not twice.
    pub defer_above: u64,
    /// Who this client is: a server folder mirrors one client (see `store::state`).
    pub client_id: ClientId,
    /// Replace the server folder's contents even if it mirrors another client.
    pub take_over: bool,
    /// This machine's identifier, so that a server on the same machine can refuse nested
    /// directories; `None` when the machine has none.
    pub machine_id: Option<String>,
    /// Where the sync's events go (by default, the log).
    pub events: Events,
    /// The daemon watches the directory and sends each change as it happens (the interval
    /// is then only a full rescan); without, it syncs every interval.
    pub watch: bool,
}

impl Config {
    /// Today's defaults for syncing `root` to `server:port`.
    pub fn new(root: impl Into<PathBuf>, server: impl Into<String>, port: u16) -> Config {
        Config {
            root: root.into(),
            server: server.into(),
            port,
            cache_file: None,
            acked_file: None,
            transfers: 2,
            hashes: HashAlgorithm::ALL.to_vec(),
            handshake_timeout: HANDSHAKE_TIMEOUT,
            idle_timeout: IDLE_TIMEOUT,
            keepalive: Duration::from_secs(5),
            defer_above: 8 << 20,
            // A new client each time, unless the caller loads the one kept in a state
            // directory (as `client-sync` does).
            client_id: ClientId(
                u128::from(crate::process::random_u64()) << 64
                    | u128::from(crate::process::random_u64()),
            ),
            take_over: false,
            machine_id: crate::store::state::machine_id(),
            events: events::log(),
            watch: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Dir(#[from] DirError),
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
    #[error("server refused the sync: {}", Escaped(.0))]
    Refused(String),
    /// The server is on this machine and its directory and `dir` are nested.
    #[error("cannot sync {}: {}", .dir.display(), Escaped(.why))]
    Nested { dir: PathBuf, why: String },
    /// The server's folder mirrors another client (see `--take-over`).
    #[error("server refused the sync: {}", Escaped(.0))]
    OtherClient(String),
    #[error("server ended the sync: {}", Escaped(.0))]
    Ended(String),
    #[error("server went silent for {} s in the middle of the sync", .0.as_secs_f64())]
    Silent(Duration),
    #[error("server closed the connection in the middle of the sync")]
    Closed,
    #[error("connection to the server failed: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("failed to watch the directory: {0}")]
    Watch(#[from] crate::store::watch::WatchError),
}

impl ClientError {
    /// The documented exit status of `client-sync --once` for this error.
    /// 1 is kept for a sync that ran but left entries behind (see `Report::is_clean`).
    pub fn exit_code(&self) -> i32 {
        match self {
            ClientError::Dir(_) | ClientError::Nested { .. } => 2,
            // Nothing was synced, but the server is fine: it belongs to another client.
            ClientError::OtherClient(_) => 1,
            // The server could not be used: the sync did not complete, try again later.
            ClientError::Unreachable { .. }
            | ClientError::NoAnswer { .. }
            | ClientError::Refused(_)
            | ClientError::Ended(_)
            | ClientError::Silent(_)
            | ClientError::Closed
            | ClientError::Protocol(_) => 3,
            ClientError::Watch(_) => 2,
        }
    }

    /// Whether the sync never started (no server, no answer, or turned away): worth retrying
    /// soon rather than at the next interval.
    pub(crate) fn before_session(&self) -> bool {
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
    pub unreadable: Vec<Failure>,
    pub elapsed: Duration,
}

impl Report {
    /// Entries that are not mirrored after this sync, with the reason (the server names
    /// only its first few: see `failed_count`). Raw text: print it through `Escaped`.
    pub fn failures(&self) -> impl Iterator<Item = &Failure> {
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
