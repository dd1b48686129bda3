//! Messages of the control connection: the handshake, the file list, hash requests, file
//! requests and the end of the session. See the grammar in [`crate::wire`].

use crate::core::hash::HashAlgorithm;
use crate::core::identity::{ClientId, FileId};
use crate::core::manifest::{Entry, MAX_PATH_LEN, Meta, RelPath};
use crate::wire::WireMessage;
use crate::wire::codec::{MAX_TEXT, ProtocolError, Reader, Writer, truncate};
use crate::wire::list_file::{ID_LEN, ListId};
use crate::wire::tag;

/// Bumped on any incompatible change; the server refuses other versions with an `Error`.
/// 3: `Hello` carries the client's machine, root and identity.
pub const VERSION: u32 = 3;
/// Opens every `Hello` and `DataHello`, so a stray connection is recognised at its first bytes.
pub const MAGIC: [u8; 4] = *b"SSYN";
/// Entries per `FileList` frame and paths per `FileRequest` or `HashRequest` frame.
pub const BATCH: usize = 512;
/// Failures named in a `SyncDone`; the rest are only counted.
pub const MAX_FAILURES_NAMED: usize = 500;
/// Longest machine identifier accepted in a `Hello` (systemd's are 32 hex digits).
pub const MAX_MACHINE_ID: usize = 128;
/// Most directories in a `Hello`'s root chain: a path of at most 4096 bytes has at most
/// 2048 components, and `/` itself.
pub const MAX_CHAIN: usize = 2049;

/// How the server's `Error` begins when it refuses a client whose directory and its own are
/// nested (the same, or one inside the other, on one machine). The client reads it as a local
/// setup error.
pub const NESTED_ROOTS: &str = "nested roots";
/// How the server's `Error` begins when its folder mirrors another client.
pub const OTHER_CLIENT: &str = "this folder mirrors another client";

/// Optional protocol features, as bits, so that features are negotiated, not versioned: a
/// side offers what it supports, the other keeps what both do.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capabilities(pub u64);

impl Capabilities {
    pub const NONE: Capabilities = Capabilities(0);
    /// A live session: after its first `SyncDone` the session stays open, the client sends
    /// what changed (`Changes`) or its whole list again (`Relist`), and the server asks for
    /// paths it saw change on its side (`Dirty`).
    pub const LIVE: Capabilities = Capabilities(1);
    /// Lists acknowledged between sessions: the server says which list it holds from this
    /// client (`Held`), and the client may send only what changed since (`Since`).
    pub const DELTA: Capabilities = Capabilities(2);

    /// Whether every feature of `other` is in this set.
    pub fn has(self, other: Capabilities) -> bool {
        self.0 & other.0 == other.0
    }

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
        /// The client machine's identifier (`/etc/machine-id`), empty when it has none: a
        /// server with the same one is on the same machine and compares `root_chain`.
        machine: String,
        /// Device and inode of the client's directory, then of each ancestor up to `/`.
        root_chain: Vec<FileId>,
        /// Who the client is: a server folder mirrors one client.
        client: ClientId,
        /// Replace the folder's contents even though it mirrors another client.
        take_over: bool,
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
    /// Client → server, before `FileListEnd`: the metadata of the synced directory itself,
    /// which no entry of the list names (the server mirrors its mtime).
    RootMeta(Meta),
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
    /// Server → client: the list (or the changes) sent last is mirrored, but for the failures
    /// counted. A session without `LIVE` is over.
    SyncDone(Summary),
    /// Client → server, live sessions, between batches: what changed since the list the server
    /// holds follows (`FileList` for entries added or changed, `Removed`, `RootMeta`), up to
    /// `FileListEnd`.
    Changes,
    /// Client → server, live sessions, between batches: the whole list follows again, as at
    /// the start (the periodic full rescan).
    Relist,
    /// Client → server, in `Changes`: these paths are gone, with everything below them.
    Removed(Vec<RelPath>),
    /// Server → client, live sessions, between batches: these paths changed on the server's
    /// side; send what the client has there (in mirror mode, the server puts it back).
    Dirty(Vec<RelPath>),
    /// Server → client, with `DELTA`, right after `Welcome`: the ID of the list this server
    /// holds from this client (and folder), the last it took; `None` when it holds none. Again
    /// after a `Since` whose changes do not fit it: send the whole list.
    Held(Option<ListId>),
    /// Client → server, with `DELTA`, instead of the whole list: what changed since the list
    /// `base` follows (`FileList`, `Removed`, `RootMeta`, up to `FileListEnd`), which makes
    /// the list `result`.
    Since {
        base: ListId,
        result: ListId,
    },
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
            ControlMessage::RootMeta(_) => tag::ROOT_META,
            ControlMessage::HashRequest(_) => tag::HASH_REQUEST,
            ControlMessage::HashAnswer(_) => tag::HASH_ANSWER,
            ControlMessage::FileRequest { .. } => tag::FILE_REQUEST,
            ControlMessage::SyncDone(_) => tag::SYNC_DONE,
            ControlMessage::Changes => tag::CHANGES,
            ControlMessage::Relist => tag::RELIST,
            ControlMessage::Removed(_) => tag::REMOVED,
            ControlMessage::Dirty(_) => tag::DIRTY,
            ControlMessage::Held(_) => tag::HELD,
            ControlMessage::Since { .. } => tag::SINCE,
            ControlMessage::Error(_) => tag::ERROR,
            ControlMessage::Ping => tag::PING,
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
                machine,
                root_chain,
                client,
                take_over,
            } => {
                w.raw(&MAGIC);
                w.u32(*version);
                w.u16(*transfers);
                w.u8(hashes.len() as u8);
                for h in hashes {
                    w.u8(h.id());
                }
                w.u64(capabilities.0);
                w.str(machine);
                w.u16(root_chain.len() as u16);
                for d in root_chain {
                    w.u64(d.dev);
                    w.u64(d.ino);
                }
                w.u128(client.0);
                w.u8(u8::from(*take_over));
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
            ControlMessage::FileListEnd
            | ControlMessage::Ping
            | ControlMessage::Changes
            | ControlMessage::Relist => {}
            ControlMessage::Removed(paths) | ControlMessage::Dirty(paths) => w.paths(paths),
            ControlMessage::RootMeta(meta) => w.meta(meta),
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
            ControlMessage::Held(id) => match id {
                None => w.u8(0),
                Some(id) => {
                    w.u8(1);
                    w.raw(&id.0);
                }
            },
            ControlMessage::Since { base, result } => {
                w.raw(&base.0);
                w.raw(&result.0);
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
                        machine: String::new(),
                        root_chain: Vec::new(),
                        client: ClientId(0),
                        take_over: false,
                    });
                }
                let transfers = r.u16()?;
                let n = r.u8()?;
                let mut hashes = Vec::with_capacity(n.into());
                for _ in 0..n {
                    // Unknown algorithms (from a newer peer) are simply not offered to us.
                    hashes.extend(HashAlgorithm::from_id(r.u8()?));
                }
                let capabilities = Capabilities(r.u64()?);
                let machine = r.str_max("hello", MAX_MACHINE_ID)?;
                let n = usize::from(r.u16()?);
                if n > MAX_CHAIN {
                    return Err(ProtocolError::Malformed("hello"));
                }
                let mut root_chain = Vec::with_capacity(n);
                for _ in 0..n {
                    root_chain.push(FileId {
                        dev: r.u64()?,
                        ino: r.u64()?,
                    });
                }
                ControlMessage::Hello {
                    version,
                    transfers,
                    hashes,
                    capabilities,
                    machine,
                    root_chain,
                    client: ClientId(r.u128()?),
                    take_over: match r.u8()? {
                        0 => false,
                        1 => true,
                        _ => return Err(ProtocolError::Malformed("hello")),
                    },
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
            tag::CHANGES => ControlMessage::Changes,
            tag::RELIST => ControlMessage::Relist,
            tag::REMOVED => ControlMessage::Removed(r.paths()?),
            tag::DIRTY => ControlMessage::Dirty(r.paths()?),
            tag::ROOT_META => ControlMessage::RootMeta(r.meta()?),
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
            tag::HELD => ControlMessage::Held(match r.u8()? {
                0 => None,
                1 => Some(list_id(&mut r)?),
                _ => return Err(ProtocolError::Malformed("held")),
            }),
            tag::SINCE => ControlMessage::Since {
                base: list_id(&mut r)?,
                result: list_id(&mut r)?,
            },
            tag::ERROR => ControlMessage::Error(r.str_max("error", MAX_TEXT)?),
            tag::PING => ControlMessage::Ping,
            t if tag::is_data(t) => return Err(ProtocolError::WrongConnection(tag::name(t))),
            t => return Err(ProtocolError::UnknownTag(t)),
        };
        r.finish(msg.name())?;
        Ok(msg)
    }
}

fn list_id(r: &mut Reader) -> Result<ListId, ProtocolError> {
    Ok(ListId(r.take(ID_LEN)?.try_into().expect("length taken")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT: ClientId = ClientId(0x0123_4567_89ab_cdef_fedc_ba98_7654_3210);

    fn hello(
        machine: &str,
        root_chain: Vec<FileId>,
        client: ClientId,
        take_over: bool,
    ) -> ControlMessage {
        ControlMessage::Hello {
            version: VERSION,
            transfers: 2,
            hashes: vec![HashAlgorithm::Blake3, HashAlgorithm::Md5],
            capabilities: Capabilities(5),
            machine: machine.into(),
            root_chain,
            client,
            take_over,
        }
    }

    fn frame(m: &ControlMessage) -> Vec<u8> {
        let mut out = Vec::new();
        m.encode(&mut out);
        out
    }

    /// The body of a frame (tag first), as `decode` takes it.
    fn body(m: &ControlMessage) -> Vec<u8> {
        frame(m)[4..].to_vec()
    }

    #[test]
    fn hello_round_trips_with_its_machine_root_chain_and_identity() {
        let chain = |n: u64| {
            (0..n)
                .map(|i| FileId {
                    dev: u64::MAX - i,
                    ino: i,
                })
                .collect::<Vec<_>>()
        };
        for m in [
            hello("0123456789abcdef0123456789abcdef", chain(4), CLIENT, false),
            hello("", Vec::new(), CLIENT, true),
            hello(
                &"m".repeat(MAX_MACHINE_ID),
                chain(MAX_CHAIN as u64),
                CLIENT,
                true,
            ),
            hello("x", chain(1), ClientId(u128::MAX), false),
            hello("y", chain(2), ClientId(0), true),
        ] {
            assert_eq!(ControlMessage::decode(&body(&m)).unwrap(), m);
        }
    }

    #[test]
    fn a_truncated_or_overlong_hello_is_refused() {
        let m = hello("machine", vec![FileId { dev: 1, ino: 2 }], CLIENT, true);
        let full = body(&m);
        // Every cut is refused, the one just after the fields a version-2 hello ended with too:
        // the new fields are not optional.
        for len in 1..full.len() {
            assert!(
                ControlMessage::decode(&full[..len]).is_err(),
                "a hello cut to {len} of {} bytes was accepted",
                full.len()
            );
        }
        let mut longer = full.clone();
        longer.push(0);
        assert!(ControlMessage::decode(&longer).is_err(), "trailing byte");
        let mut bad_flag = full;
        *bad_flag.last_mut().unwrap() = 2;
        assert!(
            ControlMessage::decode(&bad_flag).is_err(),
            "take-over flag 2"
        );
        let too_long = hello(&"m".repeat(MAX_MACHINE_ID + 1), Vec::new(), CLIENT, false);
        assert!(ControlMessage::decode(&body(&too_long)).is_err());
        let chain = vec![FileId { dev: 0, ino: 0 }; MAX_CHAIN + 1];
        assert!(ControlMessage::decode(&body(&hello("m", chain, CLIENT, false))).is_err());
    }

    #[test]
    fn another_versions_hello_is_read_for_its_version_only() {
        let mut b = body(&hello("m", Vec::new(), CLIENT, false));
        // Tag, magic, then the version.
        b[5..9].copy_from_slice(&[0, 0, 0, 2]);
        b.truncate(9);
        match ControlMessage::decode(&b).unwrap() {
            ControlMessage::Hello { version: 2, .. } => {}
            other => panic!("{other:?}"),
        }
    }
}
