//! Messages of the control connection: the handshake, the file list, hash requests, file
//! requests and the end of the session. See the grammar in [`crate::wire`].

use crate::core::hash::HashAlgorithm;
use crate::core::manifest::{Entry, MAX_PATH_LEN, RelPath};
use crate::wire::codec::{MAX_TEXT, ProtocolError, Reader, Writer, truncate};
use crate::wire::tag;

/// Bumped on any incompatible change; the server refuses other versions with an `Error`.
pub const VERSION: u32 = 2;
/// Opens every `Hello` and `DataHello`, so a stray connection is recognised at its first bytes.
pub const MAGIC: [u8; 4] = *b"SSYN";
/// Entries per `FileList` frame and paths per `FileRequest` or `HashRequest` frame.
pub const BATCH: usize = 512;
/// Failures named in a `SyncDone`; the rest are only counted.
pub const MAX_FAILURES_NAMED: usize = 500;

/// Optional protocol features, as bits. None is defined yet: the field is there so that the
/// next features (watching, two-way, resume, compression) are negotiated, not versioned.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capabilities(pub u64);

impl Capabilities {
    pub const NONE: Capabilities = Capabilities(0);

    /// The features in both sets.
    pub fn common(self, other: Capabilities) -> Capabilities {
        Capabilities(self.0 & other.0)
    }
}

/// An entry the server could not bring up to date, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// The path as the tree holds it (raw: print it through `Escaped`).
    pub path: String,
    pub reason: String,
}

impl Failure {
    pub fn new(path: impl Into<String>, reason: impl Into<String>) -> Failure {
        Failure {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

/// What a session did, sent with `SyncDone` so the client can report it and pick its exit code.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub requested: u64,
    pub received: u64,
    pub copied: u64,
    pub renamed: u64,
    pub deleted: u64,
    pub bytes: u64,
    /// Entries the server could not bring up to date; retried next cycle. At most
    /// [`MAX_FAILURES_NAMED`] of them, so the message stays within a frame.
    pub failed: Vec<Failure>,
    /// How many entries failed in all, named or not.
    pub failed_total: u64,
}

impl Summary {
    /// Records the session's failures: all are counted, the first few named, with their
    /// reasons cut to [`MAX_TEXT`], so that `SyncDone` always fits in a frame.
    pub fn set_failures(&mut self, failed: Vec<Failure>) {
        self.failed_total = failed.len() as u64;
        self.failed = failed
            .into_iter()
            .take(MAX_FAILURES_NAMED)
            .map(|f| Failure {
                path: f.path,
                reason: truncate(f.reason, MAX_TEXT),
            })
            .collect();
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ControlMessage {
    /// Client → server, first. A peer of another `version` is answered with an `Error`
    /// naming both versions; only `version` is read from its `Hello`.
    Hello {
        version: u32,
        /// How many data connections the client will run at once.
        transfers: u16,
        /// Content hashes the client can use, in its order of preference.
        hashes: Vec<HashAlgorithm>,
        /// Optional features the client supports.
        capabilities: Capabilities,
    },
    /// Server → client: the session starts.
    Welcome {
        version: u32,
        data_port: u16,
        /// Names this session on its data connections.
        token: u64,
        /// The session's content hash, one of those the client offered.
        hash: HashAlgorithm,
        /// The optional features both sides support.
        capabilities: Capabilities,
    },
    /// Client → server: a batch of the file list.
    FileList(Vec<Entry>),
    FileListEnd,
    /// Server → client: hash these files you announced unhashed.
    HashRequest(Vec<RelPath>),
    /// Client → server: one entry per path asked, in order: the file with its hash, or
    /// `Unreadable`.
    HashAnswer(Vec<Entry>),
    /// Server → client: send these files over a data connection that names `id`.
    FileRequest {
        id: u32,
        paths: Vec<RelPath>,
    },
    /// Server → client: the session is over.
    SyncDone(Summary),
    /// Either way: the session cannot go on, and why.
    Error(String),
    /// Either way: still here (keeps the peer's idle timer from firing during long work).
    Ping,
}

impl ControlMessage {
    pub fn tag(&self) -> u8 {
        match self {
            ControlMessage::Hello { .. } => tag::HELLO,
            ControlMessage::Welcome { .. } => tag::WELCOME,
            ControlMessage::FileList(_) => tag::FILE_LIST,
            ControlMessage::FileListEnd => tag::FILE_LIST_END,
            ControlMessage::HashRequest(_) => tag::HASH_REQUEST,
            ControlMessage::HashAnswer(_) => tag::HASH_ANSWER,
            ControlMessage::FileRequest { .. } => tag::FILE_REQUEST,
            ControlMessage::SyncDone(_) => tag::SYNC_DONE,
            ControlMessage::Error(_) => tag::ERROR,
            ControlMessage::Ping => tag::PING,
        }
    }

    pub fn name(&self) -> &'static str {
        tag::name(self.tag())
    }

    /// An `Unexpected` error for this message in a place that wanted `expected`.
    pub fn unexpected(&self, expected: &'static str) -> ProtocolError {
        ProtocolError::Unexpected {
            got: self.name(),
            expected,
        }
    }

    /// Appends the whole frame (length prefix included) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let (mut w, start) = Writer::begin_frame(out, self.tag());
        match self {
            ControlMessage::Hello {
                version,
                transfers,
                hashes,
                capabilities,
            } => {
                w.raw(&MAGIC);
                w.u32(*version);
                w.u16(*transfers);
                w.u8(hashes.len() as u8);
                for h in hashes {
                    w.u8(h.id());
                }
                w.u64(capabilities.0);
            }
            ControlMessage::Welcome {
                version,
                data_port,
                token,
                hash,
                capabilities,
            } => {
                w.u32(*version);
                w.u16(*data_port);
                w.u64(*token);
                w.u8(hash.id());
                w.u64(capabilities.0);
            }
            ControlMessage::FileList(entries) | ControlMessage::HashAnswer(entries) => {
                w.entries(entries)
            }
            ControlMessage::FileListEnd | ControlMessage::Ping => {}
            ControlMessage::HashRequest(paths) => w.paths(paths),
            ControlMessage::FileRequest { id, paths } => {
                w.u32(*id);
                w.paths(paths);
            }
            ControlMessage::SyncDone(s) => {
                for n in [
                    s.requested,
                    s.received,
                    s.copied,
                    s.renamed,
                    s.deleted,
                    s.bytes,
                    s.failed_total,
                ] {
                    w.u64(n);
                }
                w.u32(s.failed.len() as u32);
                for f in &s.failed {
                    w.str(&f.path);
                    w.str(&f.reason);
                }
            }
            ControlMessage::Error(msg) => w.str(msg),
        }
        w.end_frame(start);
    }

    /// Decodes one frame's body (tag first).
    pub fn decode(body: &[u8]) -> Result<ControlMessage, ProtocolError> {
        let (&t, rest) = body.split_first().ok_or(ProtocolError::Empty)?;
        let mut r = Reader { buf: rest };
        let msg = match t {
            tag::HELLO => {
                r.magic(&MAGIC)?;
                let version = r.u32()?;
                if version != VERSION {
                    // Another version's layout: only its number matters, to say why not.
                    return Ok(ControlMessage::Hello {
                        version,
                        transfers: 0,
                        hashes: Vec::new(),
                        capabilities: Capabilities::NONE,
                    });
                }
                let transfers = r.u16()?;
                let n = r.u8()?;
                let mut hashes = Vec::with_capacity(n.into());
                for _ in 0..n {
                    // Unknown algorithms (from a newer peer) are simply not offered to us.
                    hashes.extend(HashAlgorithm::from_id(r.u8()?));
                }
                ControlMessage::Hello {
                    version,
                    transfers,
                    hashes,
                    capabilities: Capabilities(r.u64()?),
                }
            }
            tag::WELCOME => {
                let version = r.u32()?;
                if version != VERSION {
                    return Err(ProtocolError::Version(version));
                }
                ControlMessage::Welcome {
                    version,
                    data_port: r.u16()?,
                    token: r.u64()?,
                    hash: HashAlgorithm::from_id(r.u8()?)
                        .ok_or(ProtocolError::Malformed("welcome hash"))?,
                    capabilities: Capabilities(r.u64()?),
                }
            }
            tag::FILE_LIST => ControlMessage::FileList(r.entries()?),
            tag::FILE_LIST_END => ControlMessage::FileListEnd,
            tag::HASH_REQUEST => ControlMessage::HashRequest(r.paths()?),
            tag::HASH_ANSWER => ControlMessage::HashAnswer(r.entries()?),
            tag::FILE_REQUEST => ControlMessage::FileRequest {
                id: r.u32()?,
                paths: r.paths()?,
            },
            tag::SYNC_DONE => {
                let mut s = Summary {
                    requested: r.u64()?,
                    received: r.u64()?,
                    copied: r.u64()?,
                    renamed: r.u64()?,
                    deleted: r.u64()?,
                    bytes: r.u64()?,
                    failed_total: r.u64()?,
                    failed: Vec::new(),
                };
                let n = r.count(8)?;
                for _ in 0..n {
                    let path = r.str_max("failure", MAX_PATH_LEN)?;
                    s.failed.push(Failure {
                        path,
                        reason: r.str_max("failure", MAX_TEXT)?,
                    });
                }
                ControlMessage::SyncDone(s)
            }
            tag::ERROR => ControlMessage::Error(r.str_max("error", MAX_TEXT)?),
            tag::PING => ControlMessage::Ping,
            t if tag::is_data(t) => return Err(ProtocolError::WrongConnection(tag::name(t))),
            t => return Err(ProtocolError::UnknownTag(t)),
        };
        r.finish(msg.name())?;
        Ok(msg)
    }
}
