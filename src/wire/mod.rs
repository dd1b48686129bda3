//! The wire layer: the only code that knows byte layouts (frames, the control and data
//! messages, the hash cache file), and the [`Connection`] that carries messages over any
//! stream.
//!
//! # The session grammar
//!
//! A session is one control connection (port 7101 by default) and one data connection (port
//! 7100 by default) per file request. `C:` is the client, `S:` the server. Each arrow below is
//! a row of [`ARROWS`], which [`Grammar`] checks a conversation against, in the order the
//! server's end saw it (the server reads one message at a time, so its view has no races);
//! the test `tests/grammar.rs` runs real sessions and fails unless every arrow was taken.
//!
//! A session ends when the client closes it after `SyncDone` (in `idle`). With the `LIVE`
//! capability it may instead go on: batches of changes, each answered with a `SyncDone`.
//!
//! ```text
//! control:
//!   start     C: Hello        -> greeted     (version, transfers, hashes, capabilities,
//!                                             machine, root chain, client ID, take-over)
//!   greeted   S: Welcome      -> listing     S: Error -> end   (version, no common hash,
//!                                                                busy, shutting down,
//!                                                                nested roots, another
//!                                                                client's folder)
//!             S: Ping         -> greeted     (while the client waits for its turn)
//!   listing   S: Held         -> listing     (DELTA: the ID of the list the server holds
//!                                             from this client, if any; right after Welcome)
//!             C: Since        -> changing    (DELTA: changes against the list held follow)
//!             C: FileList     -> listing     C: Ping  -> listing
//!             C: RootMeta     -> listing     (the synced directory's own mtime)
//!             C: FileListEnd  -> planning    S: Error -> end   (invalid or oversized list)
//!   planning  S: HashRequest  -> hashing     (large files sent unhashed, size known here)
//!             S: FileRequest  -> fetching    S: SyncDone -> idle  S: Error -> end
//!             S: Ping         -> planning    (while the server scans, plans, applies)
//!             S: Held         -> listing     (changes that do not fit the list held, or
//!                                             do not give the list announced: the whole
//!                                             list, please)
//!   hashing   C: Ping         -> hashing     C: HashAnswer -> planning
//!   fetching  S: FileRequest  -> fetching    S: SyncDone -> idle  S: Error -> end
//!             S: Ping         -> fetching    (while files arrive, while it flushes)
//!   idle      (close: the session is over; the rest is for LIVE sessions only)
//!             C: Changes      -> changing    C: Relist -> listing  (the periodic full rescan)
//!             C: Ping         -> idle        S: Ping   -> idle
//!             S: Dirty        -> idle        (paths changed on the server's side)
//!             S: Error        -> end         (a Changes or Relist without LIVE, a take-over)
//!   changing  C: FileList     -> changing    (entries added or changed, after Changes or Since)
//!             C: Removed      -> changing    (paths gone, with what lies below them)
//!             C: RootMeta     -> changing    C: FileListEnd -> planning
//!             S: Error        -> end         (changes that do not fit the list held)
//!
//! data (one connection per FileRequest, client to server only):
//!   start     C: DataHello    -> between
//!   between   C: FileBegin    -> in-file     (close: the request is answered)
//!   in-file   C: Chunk        -> in-file     C: Hole -> in-file
//!             C: FileEnd      -> between     C: FileAbort -> between
//! ```

pub mod cache_file;
pub mod codec;
#[cfg(test)]
mod codec_tests;
pub mod connection;
pub mod control;
pub mod data;
pub mod list_file;

pub use codec::{MAX_FRAME, MAX_TEXT, ProtocolError};
pub use connection::{BlockingConnection, Connection, ControlConnection, WireMessage};
pub use control::{
    BATCH, Capabilities, ControlMessage, Failure, MAGIC, MAX_FAILURES_NAMED, NESTED_ROOTS,
    OTHER_CLIENT, Summary, VERSION,
};
pub use data::{CHUNK_SIZE, DataMessage};

// (The grammar types below are public for `tests/grammar.rs`.)

/// Every message tag, named once. Control and data tags never overlap, so a message sent on
/// the wrong connection is recognised as such.
pub mod tag {
    pub const HELLO: u8 = 1;
    pub const WELCOME: u8 = 2;
    pub const FILE_LIST: u8 = 3;
    pub const FILE_LIST_END: u8 = 4;
    pub const FILE_REQUEST: u8 = 5;
    pub const SYNC_DONE: u8 = 6;
    pub const ERROR: u8 = 7;
    pub const DATA_HELLO: u8 = 8;
    pub const FILE_BEGIN: u8 = 9;
    pub const CHUNK: u8 = 10;
    pub const FILE_END: u8 = 11;
    pub const FILE_ABORT: u8 = 12;
    pub const HASH_REQUEST: u8 = 13;
    pub const HASH_ANSWER: u8 = 14;
    pub const PING: u8 = 15;
    pub const HOLE: u8 = 16;
    pub const ROOT_META: u8 = 17;
    pub const CHANGES: u8 = 18;
    pub const RELIST: u8 = 19;
    pub const REMOVED: u8 = 20;
    pub const DIRTY: u8 = 21;
    pub const HELD: u8 = 22;
    pub const SINCE: u8 = 23;

    /// (tag, name, carried on the data connection)
    const TABLE: &[(u8, &str, bool)] = &[
        (HELLO, "hello", false),
        (WELCOME, "welcome", false),
        (FILE_LIST, "filelist", false),
        (FILE_LIST_END, "filelist-end", false),
        (FILE_REQUEST, "filerequest", false),
        (SYNC_DONE, "sync:done", false),
        (ERROR, "error", false),
        (DATA_HELLO, "data-hello", true),
        (FILE_BEGIN, "file-begin", true),
        (CHUNK, "chunk", true),
        (FILE_END, "file-end", true),
        (FILE_ABORT, "file-abort", true),
        (HASH_REQUEST, "hashrequest", false),
        (HASH_ANSWER, "hash-answer", false),
        (PING, "ping", false),
        (HOLE, "hole", true),
        (ROOT_META, "root-meta", false),
        (CHANGES, "changes", false),
        (RELIST, "relist", false),
        (REMOVED, "removed", false),
        (DIRTY, "dirty", false),
        (HELD, "held", false),
        (SINCE, "since", false),
    ];

    pub fn name(tag: u8) -> &'static str {
        TABLE
            .iter()
            .find(|(t, ..)| *t == tag)
            .map_or("unknown", |(_, n, _)| n)
    }

    pub fn is_control(tag: u8) -> bool {
        TABLE.iter().any(|&(t, _, data)| t == tag && !data)
    }

    pub fn is_data(tag: u8) -> bool {
        TABLE.iter().any(|&(t, _, data)| t == tag && data)
    }

    /// Every tag, in order.
    pub fn all() -> impl Iterator<Item = u8> {
        TABLE.iter().map(|(t, ..)| *t)
    }
}

/// Who sent a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    Client,
    Server,
}

/// Where a conversation stands, for [`Grammar`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum State {
    Start,
    Greeted,
    Listing,
    Planning,
    Hashing,
    Fetching,
    Idle,
    Changing,
    DataStart,
    Between,
    InFile,
    End,
}

/// One arrow of the grammar: in `from`, `side` may send `tag`, which leads to `to`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Arrow {
    pub from: State,
    pub side: Side,
    pub tag: u8,
    pub to: State,
}

const fn arrow(from: State, side: Side, tag: u8, to: State) -> Arrow {
    Arrow {
        from,
        side,
        tag,
        to,
    }
}

/// The session grammar of the module documentation, as data.
pub const ARROWS: &[Arrow] = {
    use Side::{Client as C, Server as S};
    use State::*;
    &[
        arrow(Start, C, tag::HELLO, Greeted),
        arrow(Greeted, S, tag::WELCOME, Listing),
        arrow(Greeted, S, tag::ERROR, End),
        arrow(Greeted, S, tag::PING, Greeted),
        arrow(Listing, S, tag::HELD, Listing),
        arrow(Listing, C, tag::SINCE, Changing),
        arrow(Listing, C, tag::FILE_LIST, Listing),
        arrow(Listing, C, tag::PING, Listing),
        arrow(Listing, C, tag::ROOT_META, Listing),
        arrow(Listing, C, tag::FILE_LIST_END, Planning),
        arrow(Listing, S, tag::ERROR, End),
        arrow(Planning, S, tag::HASH_REQUEST, Hashing),
        arrow(Planning, S, tag::FILE_REQUEST, Fetching),
        arrow(Planning, S, tag::SYNC_DONE, Idle),
        arrow(Planning, S, tag::ERROR, End),
        arrow(Planning, S, tag::PING, Planning),
        arrow(Planning, S, tag::HELD, Listing),
        arrow(Hashing, C, tag::PING, Hashing),
        arrow(Hashing, C, tag::HASH_ANSWER, Planning),
        arrow(Fetching, S, tag::FILE_REQUEST, Fetching),
        arrow(Fetching, S, tag::SYNC_DONE, Idle),
        arrow(Fetching, S, tag::ERROR, End),
        arrow(Fetching, S, tag::PING, Fetching),
        arrow(Idle, C, tag::CHANGES, Changing),
        arrow(Idle, C, tag::RELIST, Listing),
        arrow(Idle, C, tag::PING, Idle),
        arrow(Idle, S, tag::PING, Idle),
        arrow(Idle, S, tag::DIRTY, Idle),
        arrow(Idle, S, tag::ERROR, End),
        arrow(Changing, C, tag::FILE_LIST, Changing),
        arrow(Changing, C, tag::REMOVED, Changing),
        arrow(Changing, C, tag::ROOT_META, Changing),
        arrow(Changing, C, tag::FILE_LIST_END, Planning),
        arrow(Changing, S, tag::ERROR, End),
        arrow(DataStart, C, tag::DATA_HELLO, Between),
        arrow(Between, C, tag::FILE_BEGIN, InFile),
        arrow(InFile, C, tag::CHUNK, InFile),
        arrow(InFile, C, tag::HOLE, InFile),
        arrow(InFile, C, tag::FILE_END, Between),
        arrow(InFile, C, tag::FILE_ABORT, Between),
    ]
};

/// Follows one connection's conversation through [`ARROWS`].
#[derive(Clone, Debug)]
pub struct Grammar {
    state: State,
}

impl Grammar {
    pub fn control() -> Grammar {
        Grammar {
            state: State::Start,
        }
    }

    pub fn data() -> Grammar {
        Grammar {
            state: State::DataStart,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// Takes the arrow for `side` sending `tag`, or says why there is none.
    pub fn step(&mut self, side: Side, tag: u8) -> Result<Arrow, String> {
        let a = ARROWS
            .iter()
            .find(|a| a.from == self.state && a.side == side && a.tag == tag)
            .ok_or_else(|| {
                format!(
                    "{side:?} may not send {} in state {:?}",
                    tag::name(tag),
                    self.state
                )
            })?;
        self.state = a.to;
        Ok(*a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_unique_and_named_once() {
        let tags: Vec<u8> = tag::all().collect();
        let mut sorted = tags.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), tags.len());
        for t in tags {
            assert_ne!(tag::name(t), "unknown");
            assert!(tag::is_control(t) != tag::is_data(t), "{t}");
        }
    }

    #[test]
    fn grammar_follows_a_session_and_refuses_strays() {
        let mut g = Grammar::control();
        for (side, t) in [
            (Side::Client, tag::HELLO),
            (Side::Server, tag::WELCOME),
            (Side::Client, tag::FILE_LIST),
            (Side::Client, tag::FILE_LIST_END),
            (Side::Server, tag::FILE_REQUEST),
            (Side::Server, tag::SYNC_DONE),
        ] {
            g.step(side, t).unwrap();
        }
        assert_eq!(g.state(), State::Idle);
        let mut g = Grammar::control();
        assert!(g.step(Side::Client, tag::FILE_LIST).is_err());
        let mut g = Grammar::data();
        assert!(g.step(Side::Client, tag::CHUNK).is_err());
    }
}
