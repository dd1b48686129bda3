//! Structured events: what a sync did, as data. Log lines are rendered from them in the
//! original tool's wording; metrics, progress and tests hang on the same events.
//!
//! The server and client send every event to an [`EventSink`]. [`Log`] renders each as one log
//! line (the default); [`Recorder`] keeps them for a test to assert on; [`Tee`] does both.

use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use crate::core::hash::HashAlgorithm;
use crate::core::identity::ClientId;
use crate::core::manifest::RelPath;
use crate::core::text::Escaped;

/// One thing a sync did or met.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    // The server's session.
    /// A client's session began, with the content hash it uses.
    SessionStarted {
        peer: SocketAddr,
        hash: HashAlgorithm,
    },
    /// A client waits for another client's session to end.
    SessionWaiting {
        peer: SocketAddr,
    },
    /// A client replaces, on purpose (`--take-over`), the folder another client had mirrored.
    TakingOver {
        peer: SocketAddr,
        client: ClientId,
        from: ClientId,
    },
    /// The folder is now recorded as the mirror of `client` (after its first session, or a
    /// take-over).
    MirrorOf {
        client: ClientId,
    },
    /// The client's whole file list arrived.
    ListReceived {
        peer: SocketAddr,
        entries: usize,
        bytes: u64,
    },
    /// The client sent what changed since the list the server held (the list received is
    /// that list with the changes applied).
    ChangesReceived {
        peer: SocketAddr,
        upserts: usize,
        removed: usize,
    },
    /// The server asks the client to hash large files it may already hold.
    HashesRequested {
        count: usize,
        hash: HashAlgorithm,
    },
    FileRequested {
        path: RelPath,
    },
    /// A file arrived, was verified and is in place.
    FileReceived {
        path: RelPath,
        bytes: u64,
        hash: HashAlgorithm,
    },
    /// A file arrived but was not placed: the old content stays.
    FileRejected {
        path: RelPath,
        reason: String,
    },
    /// The client said it could not send a file.
    FileNotSent {
        path: RelPath,
        reason: String,
    },
    /// Content found locally was copied to a new path.
    Copied {
        src: RelPath,
        dst: RelPath,
    },
    /// Content found locally was moved to a new path (its old path is gone on the client).
    /// A directory moved whole: what the client renamed.
    DirMoved {
        src: RelPath,
        dst: RelPath,
    },
    Moved {
        src: RelPath,
        dst: RelPath,
    },
    Deleted {
        path: RelPath,
        dir: bool,
    },
    DirCreated {
        path: RelPath,
    },
    SymlinkCreated {
        path: RelPath,
        target: String,
    },
    MetaUpdated {
        path: RelPath,
    },
    /// An entry could not be brought up to date; the sync goes on.
    Failed {
        path: RelPath,
        action: &'static str,
        error: String,
    },
    /// The server's session ended; the counts it reports to the client.
    SessionDone {
        peer: SocketAddr,
        counts: Counts,
    },

    // The client's sync.
    ListSent {
        entries: usize,
        bytes: u64,
    },
    /// Of the list just announced, only what changed since the list the server acknowledged
    /// last is sent.
    ChangesSent {
        upserts: usize,
        removed: usize,
    },
    FileSending {
        path: RelPath,
    },
    SendFailed {
        path: RelPath,
        reason: String,
    },
    /// An entry of the client's tree that could not be read (`action`: read or hash): not
    /// synced, and the server keeps its copy.
    NotReadable {
        path: RelPath,
        action: &'static str,
        reason: String,
    },
    /// An entry of the client's tree that is never synced (a socket, FIFO or device).
    Skipped {
        path: RelPath,
        reason: String,
    },
    /// The client's sync ended: the server has said `sync:done`.
    SyncDone,
}

/// What a session did, in numbers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub requested: u64,
    pub received: u64,
    pub copied: u64,
    pub renamed: u64,
    pub deleted: u64,
    pub failed: u64,
    pub bytes: u64,
}

/// How loud an event is in the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Debug,
    Info,
    Warn,
}

impl Event {
    pub fn level(&self) -> Level {
        match self {
            Event::MetaUpdated { .. } => Level::Debug,
            Event::FileRejected { .. }
            | Event::FileNotSent { .. }
            | Event::Failed { .. }
            | Event::SendFailed { .. }
            | Event::NotReadable { .. }
            | Event::Skipped { .. }
            | Event::TakingOver { .. } => Level::Warn,
            _ => Level::Info,
        }
    }
}

/// The log line of an event: the seed's vocabulary, paths and peer text escaped.
impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::SessionStarted { peer, hash } => write!(f, "client {peer} connected ({hash})"),
            Event::SessionWaiting { peer } => {
                write!(f, "client {peer} waits for another session to finish")
            }
            Event::TakingOver { peer, client, from } => write!(
                f,
                "client {peer} (ID {client}) takes over this folder, which mirrored client {from}"
            ),
            Event::MirrorOf { client } => write!(f, "this folder now mirrors client {client}"),
            Event::ListReceived {
                peer,
                entries,
                bytes,
            } => write!(
                f,
                "Received file list from {peer}: {entries} entries, {bytes} bytes"
            ),
            Event::HashesRequested { count, hash } => write!(
                f,
                "Asking the client for the {hash} of {count} large file(s) that may already be here"
            ),
            Event::FileRequested { path } => write!(f, "Requesting file: {path}"),
            Event::FileReceived { path, bytes, hash } => {
                write!(f, "Received file: {path} ({bytes} bytes, {hash} ok)")
            }
            Event::FileRejected { path, reason } => write!(
                f,
                "Rejected file: {path}: {}; it will be requested again next cycle",
                Escaped(reason)
            ),
            Event::FileNotSent { path, reason } => {
                write!(f, "Client could not send {path}: {}", Escaped(reason))
            }
            // The seed's words for content found locally: copied, then renamed into place.
            Event::Copied { src, dst } => write!(f, "Copying file: {src} and renaming to {dst}"),
            Event::Moved { src, dst } => {
                write!(f, "Copying file: {src} and renaming to {dst} (moved)")
            }
            Event::DirMoved { src, dst } => write!(f, "Moving directory: {src} to {dst}"),
            Event::Deleted { path, dir } => {
                let what = if *dir { "directory" } else { "file" };
                write!(f, "Deleting {what}: {path}")
            }
            Event::DirCreated { path } => write!(f, "Creating directory: {path}"),
            Event::SymlinkCreated { path, target } => {
                write!(f, "Creating symlink: {path} -> {}", Escaped(target))
            }
            Event::MetaUpdated { path } => write!(f, "Updating metadata: {path}"),
            Event::Failed {
                path,
                action,
                error,
            } => write!(f, "failed to {action} {path}: {}", Escaped(error)),
            Event::SessionDone { peer, counts: c } => write!(
                f,
                "sync:done with {peer}: requested={} received={} copied={} renamed={} deleted={} failed={} bytes={}",
                c.requested, c.received, c.copied, c.renamed, c.deleted, c.failed, c.bytes
            ),
            Event::ChangesReceived {
                peer,
                upserts,
                removed,
            } => write!(
                f,
                "Received changes from {peer} since the last sync: {upserts} entries added or changed, {removed} removed"
            ),
            Event::ChangesSent { upserts, removed } => write!(
                f,
                "Sending only the changes since the last sync: {upserts} entries added or changed, {removed} removed"
            ),
            Event::ListSent { entries, bytes } => {
                write!(f, "Sending file list: {entries} entries, {bytes} bytes")
            }
            Event::FileSending { path } => write!(f, "Sending file: {path}"),
            Event::SendFailed { path, reason } => {
                write!(f, "failed to send {path}: {}", Escaped(reason))
            }
            Event::NotReadable {
                path,
                action,
                reason,
            } => write!(
                f,
                "cannot {action} {path}, not syncing it: {}",
                Escaped(reason)
            ),
            Event::Skipped { path, reason } => write!(f, "skipping {path}: {}", Escaped(reason)),
            Event::SyncDone => f.write_str("sync:done"),
        }
    }
}

/// Where events go.
pub trait EventSink: Send + Sync {
    fn emit(&self, event: Event);
}

/// A shared sink, as configurations hold it.
pub type Events = Arc<dyn EventSink>;

/// Renders every event as a log line through `tracing`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Log;

impl EventSink for Log {
    fn emit(&self, event: Event) {
        match event.level() {
            Level::Debug => tracing::debug!("{event}"),
            Level::Info => tracing::info!("{event}"),
            Level::Warn => tracing::warn!("{event}"),
        }
    }
}

/// The default sink: log lines.
pub fn log() -> Events {
    Arc::new(Log)
}

/// Keeps every event, for tests to assert on.
#[derive(Debug, Default)]
pub struct Recorder {
    events: Mutex<Vec<Event>>,
}

impl Recorder {
    pub fn new() -> Arc<Recorder> {
        Arc::new(Recorder::default())
    }

    /// The events so far, in order.
    pub fn events(&self) -> Vec<Event> {
        self.events.lock().unwrap().clone()
    }
}

impl EventSink for Recorder {
    fn emit(&self, event: Event) {
        self.events.lock().unwrap().push(event);
    }
}

/// Sends every event to two sinks (e.g. the log and a recorder).
pub struct Tee(pub Events, pub Events);

impl EventSink for Tee {
    fn emit(&self, event: Event) {
        self.0.emit(event.clone());
        self.1.emit(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    #[test]
    fn log_lines_keep_the_seeds_words() {
        let peer: SocketAddr = "127.0.0.1:7".parse().unwrap();
        for (event, line) in [
            (
                Event::Moved {
                    src: p("test003a.txt"),
                    dst: p("test003b.txt"),
                },
                "Copying file: test003a.txt and renaming to test003b.txt (moved)",
            ),
            (
                Event::Copied {
                    src: p("a"),
                    dst: p("b"),
                },
                "Copying file: a and renaming to b",
            ),
            (
                Event::FileReceived {
                    path: p("x"),
                    bytes: 3,
                    hash: HashAlgorithm::Md5,
                },
                "Received file: x (3 bytes, md5 ok)",
            ),
            (
                Event::Deleted {
                    path: p("d"),
                    dir: true,
                },
                "Deleting directory: d",
            ),
            (Event::FileRequested { path: p("f") }, "Requesting file: f"),
            (
                Event::SymlinkCreated {
                    path: p("l"),
                    target: "t\nWARN forged".into(),
                },
                "Creating symlink: l -> t\\nWARN forged",
            ),
            (
                Event::SessionDone {
                    peer,
                    counts: Counts::default(),
                },
                "sync:done with 127.0.0.1:7: requested=0 received=0 copied=0 renamed=0 deleted=0 failed=0 bytes=0",
            ),
            (Event::SyncDone, "sync:done"),
        ] {
            assert_eq!(event.to_string(), line);
        }
    }

    #[test]
    fn recorder_and_tee_keep_order() {
        let a = Recorder::new();
        let b = Recorder::new();
        let tee = Tee(a.clone(), b.clone());
        tee.emit(Event::SyncDone);
        tee.emit(Event::FileRequested { path: p("x") });
        assert_eq!(a.events(), b.events());
        assert_eq!(a.events().len(), 2);
    }
}
