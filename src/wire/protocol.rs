//! Wire format: the messages of the control and data connections and their byte layout.
//!
//! Every message travels in one frame: a big-endian `u32` length, then that many bytes, the
//! first of which is the message tag. Integers are big-endian; strings and byte strings are a
//! `u32` length followed by the bytes; lists are a `u32` count followed by the items. This is
//! the only module that knows that layout.
//!
//! Control connection (port 7101 by default), client → server unless noted:
//! `Hello` · server: `Welcome` (or `Error`) · `FileList`* · `FileListEnd` ·
//! server: (`FileRequest`)* `SyncDone`. For every `FileRequest` the client opens a data
//! connection (port 7100 by default) and sends `DataHello` then, per requested file,
//! `FileBegin`, `Chunk`*, then `FileEnd` or `FileAbort`; then it closes the data connection.

use std::io::{Read, Write};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::core::hash::{ContentHash, HashAlgorithm};
use crate::core::manifest::{Entry, Kind, MAX_PATH_LEN, Meta, PathError, RelPath};

/// Bumped on any incompatible change; the server refuses other versions in its `Welcome`.
pub const VERSION: u32 = 2;
/// Opens every `Hello` and `DataHello`, so a stray connection is recognised at its first bytes.
pub const MAGIC: [u8; 4] = *b"SSYN";
/// Largest frame accepted. File lists and requests are sent in batches well below it, and
/// file data in chunks of [`CHUNK_SIZE`].
pub const MAX_FRAME: usize = 1 << 20;
/// File data per `Chunk` frame: memory per transfer stays bounded whatever the file size.
pub const CHUNK_SIZE: usize = 256 << 10;
/// Entries per `FileList` frame and paths per `FileRequest` frame.
pub const BATCH: usize = 512;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Client → server, first. A peer of another `version` is answered with an `Error`
    /// naming both versions; only `version` is read from its `Hello`.
    Hello {
        version: u32,
        /// How many data connections the client will run at once.
        transfers: u16,
        /// Content hashes the client can use, in its order of preference.
        hashes: Vec<HashAlgorithm>,
        /// Optional features the client supports ([`Capabilities`]): later features extend
        /// the protocol through these bits, without a version bump.
        capabilities: Capabilities,
    },
    Welcome {
        version: u32,
        data_port: u16,
        token: u64,
        /// The session's content hash, one of those the client offered.
        hash: HashAlgorithm,
        /// The optional features both sides support: the client's, less the server's lacks.
        capabilities: Capabilities,
    },
    FileList(Vec<Entry>),
    FileListEnd,
    /// Server → client: send these files over a data connection that names `id`.
    FileRequest {
        id: u32,
        paths: Vec<RelPath>,
    },
    /// Server → client: send the MD5 of these unhashed files (as a `FileList` batch with the
    /// same paths, in order) so a local copy can be looked for.
    HashRequest(Vec<RelPath>),
    SyncDone(Summary),
    Error(String),
    DataHello {
        token: u64,
        /// The `FileRequest` this connection answers.
        request: u32,
    },
    FileBegin {
        path: RelPath,
    },
    Chunk(Vec<u8>),
    /// The end of a file's data; `hash` is the hash of what was sent when the file was
    /// announced unhashed, else `None` (the server checks against the announced hash).
    FileEnd {
        hash: Option<ContentHash>,
    },
    FileAbort {
        reason: String,
    },
    /// Client → server: the answer to a `HashRequest`, one entry per path asked, in order:
    /// the file with its hash, or `Unreadable`.
    HashAnswer(Vec<Entry>),
    /// Either way: nothing to say yet, still here (keeps the peer's idle timer from firing
    /// during a long scan or hash).
    Ping,
}

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

/// What a session did, sent with `SyncDone` so the client can report it and pick its exit code.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub requested: u64,
    pub received: u64,
    pub copied: u64,
    pub renamed: u64,
    pub deleted: u64,
    pub bytes: u64,
    /// Entries the server could not bring up to date, with the reason; retried next cycle.
    /// At most [`MAX_FAILURES_NAMED`] of them, so the message stays within a frame.
    pub failed: Vec<(String, String)>,
    /// How many entries failed in all, named or not.
    pub failed_total: u64,
}

/// Failures named in a `SyncDone`; the rest are only counted.
pub const MAX_FAILURES_NAMED: usize = 500;
/// Longest reason, error or special-file description accepted or sent, in bytes.
pub const MAX_TEXT: usize = 512;

impl Summary {
    /// Records the session's failures: all are counted, the first few named, with their
    /// reasons cut to [`MAX_TEXT`], so that `SyncDone` always fits in a frame.
    pub fn set_failures(&mut self, failed: Vec<(String, String)>) {
        self.failed_total = failed.len() as u64;
        self.failed = failed
            .into_iter()
            .take(MAX_FAILURES_NAMED)
            .map(|(path, why)| (path, truncate(why, MAX_TEXT)))
            .collect();
    }
}

/// `s` cut to at most `max` bytes, on a character boundary.
pub fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("connection closed in the middle of a frame")]
    Truncated,
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    Oversized(usize),
    #[error("empty frame")]
    Empty,
    #[error("unknown message tag {0}")]
    UnknownTag(u8),
    #[error("malformed {0} message")]
    Malformed(&'static str),
    #[error("not a server-sync peer (bad magic)")]
    BadMagic,
    #[error("invalid path in message: {0}")]
    Path(#[from] PathError),
    #[error("invalid UTF-8 in {0}")]
    Utf8(&'static str),
    #[error("peer went silent for longer than the idle timeout")]
    Idle,
    #[error("unexpected {got} message, expected {expected}")]
    Unexpected {
        got: &'static str,
        expected: &'static str,
    },
    #[error("peer sent {0}, which was not requested")]
    Unrequested(String),
    #[error("server speaks protocol version {0}, this client speaks {VERSION}")]
    Version(u32),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl Message {
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "hello",
            Message::Welcome { .. } => "welcome",
            Message::FileList(_) => "filelist",
            Message::FileListEnd => "filelist-end",
            Message::FileRequest { .. } => "filerequest",
            Message::SyncDone(_) => "sync:done",
            Message::Error(_) => "error",
            Message::DataHello { .. } => "data-hello",
            Message::FileBegin { .. } => "file-begin",
            Message::Chunk(_) => "chunk",
            Message::FileEnd { .. } => "file-end",
            Message::HashRequest(_) => "hashrequest",
            Message::FileAbort { .. } => "file-abort",
            Message::HashAnswer(_) => "hash-answer",
            Message::Ping => "ping",
        }
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
        let start = out.len();
        out.extend_from_slice(&[0; 4]);
        let mut w = Writer(out);
        match self {
            Message::Hello {
                version,
                transfers,
                hashes,
                capabilities,
            } => {
                w.u8(1);
                w.bytes_raw(&MAGIC);
                w.u32(*version);
                w.u16(*transfers);
                w.u8(hashes.len() as u8);
                for h in hashes {
                    w.u8(h.id());
                }
                w.u64(capabilities.0);
            }
            Message::Welcome {
                version,
                data_port,
                token,
                hash,
                capabilities,
            } => {
                w.u8(2);
                w.u32(*version);
                w.u16(*data_port);
                w.u64(*token);
                w.u8(hash.id());
                w.u64(capabilities.0);
            }
            Message::FileList(entries) => w.file_list(entries),
            Message::FileListEnd => w.u8(4),
            Message::FileRequest { id, paths } => {
                w.u8(5);
                w.u32(*id);
                w.u32(paths.len() as u32);
                for p in paths {
                    w.str(p.as_str());
                }
            }
            Message::SyncDone(s) => {
                w.u8(6);
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
                for (path, why) in &s.failed {
                    w.str(path);
                    w.str(why);
                }
            }
            Message::Error(msg) => {
                w.u8(7);
                w.str(msg);
            }
            Message::DataHello { token, request } => {
                w.u8(8);
                w.bytes_raw(&MAGIC);
                w.u64(*token);
                w.u32(*request);
            }
            Message::FileBegin { path } => {
                w.u8(9);
                w.str(path.as_str());
            }
            Message::Chunk(data) => {
                w.u8(10);
                w.bytes(data);
            }
            Message::FileEnd { hash } => {
                w.u8(11);
                if let Some(h) = hash {
                    w.hash(h);
                }
            }
            Message::HashRequest(paths) => {
                w.u8(13);
                w.u32(paths.len() as u32);
                for p in paths {
                    w.str(p.as_str());
                }
            }
            Message::FileAbort { reason } => {
                w.u8(12);
                w.str(reason);
            }
            Message::HashAnswer(entries) => {
                w.u8(14);
                w.entries(entries);
            }
            Message::Ping => w.u8(15),
        }
        let len = (out.len() - start - 4) as u32;
        out[start..start + 4].copy_from_slice(&len.to_be_bytes());
    }

    /// Decodes one frame's body (without the length prefix).
    pub fn decode(body: &[u8]) -> Result<Message, ProtocolError> {
        let (&tag, rest) = body.split_first().ok_or(ProtocolError::Empty)?;
        let mut r = Reader { buf: rest };
        let msg = match tag {
            1 => {
                r.magic()?;
                let version = r.u32()?;
                if version != VERSION {
                    // Another version's layout: only its number matters, to say why not.
                    return Ok(Message::Hello {
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
                Message::Hello {
                    version,
                    transfers,
                    hashes,
                    capabilities: Capabilities(r.u64()?),
                }
            }
            2 => {
                let version = r.u32()?;
                if version != VERSION {
                    return Err(ProtocolError::Version(version));
                }
                Message::Welcome {
                    version,
                    data_port: r.u16()?,
                    token: r.u64()?,
                    hash: HashAlgorithm::from_id(r.u8()?)
                        .ok_or(ProtocolError::Malformed("welcome hash"))?,
                    capabilities: Capabilities(r.u64()?),
                }
            }
            3 => Message::FileList(r.entries()?),
            4 => Message::FileListEnd,
            5 => {
                let id = r.u32()?;
                let n = r.count(4)?;
                let mut paths = Vec::with_capacity(n);
                for _ in 0..n {
                    paths.push(RelPath::new(r.str("path")?)?);
                }
                Message::FileRequest { id, paths }
            }
            6 => {
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
                    s.failed.push((path, r.str_max("failure", MAX_TEXT)?));
                }
                Message::SyncDone(s)
            }
            7 => Message::Error(r.str_max("error", MAX_TEXT)?),
            8 => {
                r.magic()?;
                Message::DataHello {
                    token: r.u64()?,
                    request: r.u32()?,
                }
            }
            9 => Message::FileBegin {
                path: RelPath::new(r.str("path")?)?,
            },
            10 => Message::Chunk(r.bytes()?.to_vec()),
            11 => Message::FileEnd {
                hash: match r.buf.len() {
                    0 => None,
                    _ => Some(r.hash()?),
                },
            },
            13 => {
                let n = r.count(4)?;
                let mut paths = Vec::with_capacity(n);
                for _ in 0..n {
                    paths.push(RelPath::new(r.str("path")?)?);
                }
                Message::HashRequest(paths)
            }
            12 => Message::FileAbort {
                reason: r.str_max("abort reason", MAX_TEXT)?,
            },
            14 => Message::HashAnswer(r.entries()?),
            15 => Message::Ping,
            t => return Err(ProtocolError::UnknownTag(t)),
        };
        if !r.buf.is_empty() {
            return Err(ProtocolError::Malformed(msg.name()));
        }
        Ok(msg)
    }
}

// Smallest encoding of an entry: path length, kind tag, mode, mtime; bounds a peer-announced
// count by the bytes actually present, so a forged count cannot make us allocate.
const MIN_ENTRY_LEN: usize = 4 + 1 + 4 + 8 + 4;

struct Writer<'a>(&'a mut Vec<u8>);

impl Writer<'_> {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn bytes_raw(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
    fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }
    /// A content hash: its algorithm's identifier, then the digest (whose length the
    /// algorithm fixes).
    fn hash(&mut self, h: &ContentHash) {
        self.u8(h.algorithm().id());
        self.bytes_raw(h.digest());
    }
    fn file_list(&mut self, entries: &[Entry]) {
        self.u8(3);
        self.entries(entries);
    }
    fn entries(&mut self, entries: &[Entry]) {
        self.u32(entries.len() as u32);
        for e in entries {
            self.entry(e);
        }
    }

    fn entry(&mut self, e: &Entry) {
        self.str(e.path.as_str());
        match &e.kind {
            Kind::File { size, hash } => {
                self.u8(1);
                self.u64(*size);
                self.hash(hash);
            }
            Kind::Dir => self.u8(2),
            Kind::Symlink { target } => {
                self.u8(3);
                self.str(target);
            }
            Kind::Unreadable { reason } => {
                self.u8(4);
                self.str(reason);
            }
            Kind::Special { what } => {
                self.u8(5);
                self.str(what);
            }
            Kind::Unhashed { size } => {
                self.u8(6);
                self.u64(*size);
            }
        }
        self.u32(e.meta.mode);
        self.u64(e.meta.mtime_secs as u64);
        self.u32(e.meta.mtime_nanos);
    }
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.buf.len() < n {
            return Err(ProtocolError::Malformed("short"));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, ProtocolError> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32, ProtocolError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, ProtocolError> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn magic(&mut self) -> Result<(), ProtocolError> {
        if self.take(4).map_err(|_| ProtocolError::BadMagic)? != MAGIC {
            return Err(ProtocolError::BadMagic);
        }
        Ok(())
    }
    /// A list count, checked against the bytes left so that it cannot force a huge allocation.
    fn count(&mut self, min_item: usize) -> Result<usize, ProtocolError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min_item) > self.buf.len() {
            return Err(ProtocolError::Malformed("list count"));
        }
        Ok(n)
    }
    fn bytes(&mut self) -> Result<&'a [u8], ProtocolError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn str(&mut self, what: &'static str) -> Result<String, ProtocolError> {
        self.str_max(what, MAX_PATH_LEN)
    }
    /// A string of at most `max` bytes: a peer cannot make one entry cost megabytes.
    fn str_max(&mut self, what: &'static str, max: usize) -> Result<String, ProtocolError> {
        let b = self.bytes()?;
        if b.len() > max {
            return Err(ProtocolError::Malformed(what));
        }
        String::from_utf8(b.to_vec()).map_err(|_| ProtocolError::Utf8(what))
    }
    fn hash(&mut self) -> Result<ContentHash, ProtocolError> {
        let algorithm =
            HashAlgorithm::from_id(self.u8()?).ok_or(ProtocolError::Malformed("hash algorithm"))?;
        let digest = self.take(algorithm.digest_len())?;
        Ok(ContentHash::new(algorithm, digest).expect("length checked by take"))
    }
    /// A file size; beyond `i64::MAX` no file system holds it, and sums of sizes stay exact.
    fn size(&mut self) -> Result<u64, ProtocolError> {
        let n = self.u64()?;
        if n > i64::MAX as u64 {
            return Err(ProtocolError::Malformed("file size"));
        }
        Ok(n)
    }
    fn entries(&mut self) -> Result<Vec<Entry>, ProtocolError> {
        let n = self.count(MIN_ENTRY_LEN)?;
        let mut entries = Vec::with_capacity(n);
        for _ in 0..n {
            entries.push(self.entry()?);
        }
        Ok(entries)
    }
    fn entry(&mut self) -> Result<Entry, ProtocolError> {
        let path = RelPath::new(self.str("path")?)?;
        let kind = match self.u8()? {
            1 => Kind::File {
                size: self.size()?,
                hash: self.hash()?,
            },
            2 => Kind::Dir,
            3 => Kind::Symlink {
                target: self.str_max("symlink target", MAX_PATH_LEN)?,
            },
            4 => Kind::Unreadable {
                reason: self.str_max("reason", MAX_TEXT)?,
            },
            5 => Kind::Special {
                what: self.str_max("special kind", MAX_TEXT)?,
            },
            6 => Kind::Unhashed { size: self.size()? },
            _ => return Err(ProtocolError::Malformed("entry kind")),
        };
        let meta = Meta {
            // Permission bits and the sticky bit, never set-user/group-ID: there is no
            // authentication yet, and a peer must not be able to plant setuid files.
            mode: self.u32()? & 0o1777,
            mtime_secs: self.u64()? as i64,
            mtime_nanos: self.u32()?,
        };
        if meta.mtime_nanos >= 1_000_000_000 {
            return Err(ProtocolError::Malformed("entry mtime"));
        }
        Ok(Entry { path, kind, meta })
    }
}

fn frame_len(len: [u8; 4]) -> Result<usize, ProtocolError> {
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(ProtocolError::Oversized(len));
    }
    Ok(len)
}

fn truncated_or_io(e: std::io::Error) -> ProtocolError {
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof => ProtocolError::Truncated,
        _ => ProtocolError::Io(e),
    }
}

/// Reads one message; `Ok(None)` on a clean end of stream between frames.
pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Message>, ProtocolError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = r.read(&mut len[got..]).await?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(ProtocolError::Truncated)
            };
        }
        got += n;
    }
    let mut body = vec![0; frame_len(len)?];
    r.read_exact(&mut body).await.map_err(truncated_or_io)?;
    Message::decode(&body).map(Some)
}

/// [`read`] for blocking streams (the data connections run on their own threads). A read
/// timeout set on the socket surfaces as [`ProtocolError::Idle`].
pub fn read_blocking<R: Read>(r: &mut R) -> Result<Option<Message>, ProtocolError> {
    let idle = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => ProtocolError::Idle,
        _ => truncated_or_io(e),
    };
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(ProtocolError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(idle(e)),
        }
    }
    let mut body = vec![0; frame_len(len)?];
    r.read_exact(&mut body).map_err(idle)?;
    Message::decode(&body).map(Some)
}

/// [`write`] for blocking streams.
pub fn write_blocking<W: Write>(w: &mut W, msg: &Message) -> Result<(), ProtocolError> {
    let mut buf = Vec::new();
    msg.encode(&mut buf);
    w.write_all(&buf)?;
    Ok(())
}

/// Writes a `FileList` frame from borrowed entries, sparing the clone of a whole batch that
/// building a `Message::FileList` would need.
pub async fn write_file_list<W: AsyncWrite + Unpin>(
    w: &mut W,
    entries: &[Entry],
) -> Result<(), ProtocolError> {
    let mut buf = vec![0; 4];
    Writer(&mut buf).file_list(entries);
    let len = (buf.len() - 4) as u32;
    buf[..4].copy_from_slice(&len.to_be_bytes());
    w.write_all(&buf).await?;
    Ok(())
}

/// Like [`read`], but gives up when the peer sends nothing for `idle`, and treats the end of
/// the stream as an error: callers use it where a message is due.
pub async fn read_within<R: AsyncRead + Unpin>(
    r: &mut R,
    idle: std::time::Duration,
) -> Result<Message, ProtocolError> {
    match tokio::time::timeout(idle, read(r)).await {
        Err(_) => Err(ProtocolError::Idle),
        Ok(Ok(None)) => Err(ProtocolError::Truncated),
        Ok(Ok(Some(m))) => Ok(m),
        Ok(Err(e)) => Err(e),
    }
}

pub async fn write<W: AsyncWrite + Unpin>(w: &mut W, msg: &Message) -> Result<(), ProtocolError> {
    let mut buf = Vec::new();
    msg.encode(&mut buf);
    w.write_all(&buf).await?;
    Ok(())
}

/// Writes a `Chunk` frame straight from `data`, sparing the copy that building a
/// `Message::Chunk` would make on the hot path. Blocking: file data moves on its own threads.
pub fn write_chunk<W: Write>(w: &mut W, data: &[u8]) -> Result<(), ProtocolError> {
    debug_assert!(data.len() <= CHUNK_SIZE);
    let mut head = [0u8; 9];
    head[..4].copy_from_slice(&(data.len() as u32 + 5).to_be_bytes());
    head[4] = 10;
    head[5..].copy_from_slice(&(data.len() as u32).to_be_bytes());
    w.write_all(&head)?;
    w.write_all(data)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath::new(s).unwrap()
    }

    fn round_trip(m: Message) {
        let mut buf = Vec::new();
        m.encode(&mut buf);
        assert_eq!(
            u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize,
            buf.len() - 4
        );
        assert_eq!(Message::decode(&buf[4..]).unwrap(), m);
    }

    #[test]
    fn every_message_round_trips() {
        let meta = Meta {
            mode: 0o754,
            mtime_secs: -5,
            mtime_nanos: 999_999_999,
        };
        let entries = vec![
            Entry {
                path: p("d"),
                kind: Kind::Dir,
                meta,
            },
            Entry {
                path: p("d/ü x.txt"),
                kind: Kind::File {
                    size: 12,
                    hash: HashAlgorithm::Blake3.of(b"hello world\n"),
                },
                meta,
            },
            Entry {
                path: p("l"),
                kind: Kind::Symlink {
                    target: "../x".into(),
                },
                meta,
            },
            Entry {
                path: p("u"),
                kind: Kind::Unreadable {
                    reason: "permission denied".into(),
                },
                meta,
            },
            Entry {
                path: p("w"),
                kind: Kind::Unhashed { size: 1 << 40 },
                meta,
            },
            Entry {
                path: p("v"),
                kind: Kind::Special {
                    what: "FIFO".into(),
                },
                meta,
            },
        ];
        for m in [
            Message::Hello {
                version: VERSION,
                transfers: 2,
                hashes: vec![HashAlgorithm::Blake3, HashAlgorithm::Md5],
                capabilities: Capabilities(5),
            },
            Message::Welcome {
                version: VERSION,
                data_port: 7100,
                token: u64::MAX,
                hash: HashAlgorithm::Md5,
                capabilities: Capabilities::NONE,
            },
            Message::FileList(entries),
            Message::FileList(vec![]),
            Message::FileListEnd,
            Message::FileRequest {
                id: 3,
                paths: vec![p("a"), p("b/c")],
            },
            Message::SyncDone(Summary {
                requested: 1,
                received: 2,
                copied: 3,
                renamed: 4,
                deleted: 5,
                bytes: 6,
                failed: vec![("a".into(), "blake3 mismatch".into())],
                failed_total: 7,
            }),
            Message::Error("nope".into()),
            Message::DataHello {
                token: 42,
                request: 3,
            },
            Message::FileBegin { path: p("x") },
            Message::Chunk(vec![1, 2, 3]),
            Message::FileEnd { hash: None },
            Message::FileEnd {
                hash: Some(HashAlgorithm::Md5.of(b"x")),
            },
            Message::HashRequest(vec![p("big"), p("d/big")]),
            Message::HashAnswer(vec![Entry {
                path: p("big"),
                kind: Kind::File {
                    size: 3,
                    hash: HashAlgorithm::Md5.of(b"abc"),
                },
                meta,
            }]),
            Message::Ping,
            Message::FileAbort {
                reason: "gone".into(),
            },
        ] {
            round_trip(m);
        }
    }

    fn decode_err(body: &[u8]) -> String {
        Message::decode(body).unwrap_err().to_string()
    }

    #[test]
    fn hostile_bodies_are_refused() {
        let path_frame = |tag: u8, s: &[u8]| {
            let mut b = vec![tag];
            b.extend_from_slice(&(s.len() as u32).to_be_bytes());
            b.extend_from_slice(s);
            b
        };
        for (body, want) in [
            (vec![], "empty frame"),
            (vec![99], "unknown message tag 99"),
            (
                vec![1, b'X', b'X', b'X', b'X', 0, 0, 0, 1, 0, 1],
                "bad magic",
            ),
            (path_frame(9, b"../etc/passwd"), "'..' component"),
            (path_frame(9, b"/etc/passwd"), "absolute path"),
            (path_frame(9, b"a\0b"), "NUL"),
            (path_frame(9, b""), "empty path"),
            (path_frame(9, &[0xff, 0xfe]), "invalid UTF-8"),
            (vec![9, 0, 0, 0, 9, b'a'], "malformed"),
            // A forged count must not be believed: 4 billion entries in 5 bytes.
            (vec![3, 0xff, 0xff, 0xff, 0xff, 0], "list count"),
            (vec![4, 0], "malformed filelist-end"),
            (vec![11, 1, 2], "short"),
        ] {
            let err = decode_err(&body);
            assert!(err.contains(want), "{body:?}: {err:?} lacks {want:?}");
        }
    }

    #[test]
    fn peer_input_is_bounded_and_setuid_is_dropped() {
        let entry = |kind| {
            let mut buf = Vec::new();
            Message::FileList(vec![Entry {
                path: p("x"),
                kind,
                meta: Meta {
                    mode: 0o7777,
                    ..Meta::default()
                },
            }])
            .encode(&mut buf);
            Message::decode(&buf[4..])
        };
        let Ok(Message::FileList(e)) = entry(Kind::Dir) else {
            panic!()
        };
        assert_eq!(e[0].meta.mode, 0o1777);
        let long = "t".repeat(MAX_PATH_LEN + 1);
        for kind in [
            Kind::Symlink { target: long },
            Kind::Unreadable {
                reason: "r".repeat(MAX_TEXT + 1),
            },
            Kind::Unhashed { size: u64::MAX },
            Kind::File {
                size: 1 << 63,
                hash: HashAlgorithm::Blake3.of(b""),
            },
        ] {
            assert!(entry(kind).is_err());
        }
    }

    #[test]
    fn summary_names_a_bounded_number_of_failures() {
        let mut s = Summary::default();
        let failed = (0..2000)
            .map(|i| (format!("f{i}"), "é".repeat(400)))
            .collect();
        s.set_failures(failed);
        assert_eq!((s.failed.len(), s.failed_total), (MAX_FAILURES_NAMED, 2000));
        assert!(s.failed.iter().all(|(_, why)| why.len() <= MAX_TEXT));
        let mut buf = Vec::new();
        Message::SyncDone(s).encode(&mut buf);
        assert!(buf.len() < MAX_FRAME);
    }

    #[test]
    fn request_with_escaping_path_is_refused() {
        let mut body = vec![5, 0, 0, 0, 0, 0, 0, 0, 2];
        for s in ["ok", "a/../../x"] {
            body.extend_from_slice(&(s.len() as u32).to_be_bytes());
            body.extend_from_slice(s.as_bytes());
        }
        assert!(decode_err(&body).contains("'..' component"));
    }

    #[tokio::test]
    async fn framing_handles_truncation_and_size_limit() {
        let mut buf = Vec::new();
        Message::FileEnd { hash: None }.encode(&mut buf);
        Message::Chunk(vec![7; 10]).encode(&mut buf);
        let mut r = &buf[..];
        assert_eq!(
            read(&mut r).await.unwrap(),
            Some(Message::FileEnd { hash: None })
        );
        assert_eq!(
            read(&mut r).await.unwrap(),
            Some(Message::Chunk(vec![7; 10]))
        );
        assert_eq!(read(&mut r).await.unwrap(), None);

        let entries = vec![Entry {
            path: p("x"),
            kind: Kind::Dir,
            meta: Meta::default(),
        }];
        let mut fast = Vec::new();
        write_file_list(&mut fast, &entries).await.unwrap();
        let mut slow = Vec::new();
        Message::FileList(entries).encode(&mut slow);
        assert_eq!(fast, slow);

        let mut fast = Vec::new();
        write_chunk(&mut fast, &[7; 10]).unwrap();
        let mut slow = Vec::new();
        Message::Chunk(vec![7; 10]).encode(&mut slow);
        assert_eq!(fast, slow);

        let cut = &buf[..buf.len() - 1];
        let mut r = &cut[5..];
        assert!(matches!(read(&mut r).await, Err(ProtocolError::Truncated)));
        let mut r = &buf[..2];
        assert!(matches!(read(&mut r).await, Err(ProtocolError::Truncated)));

        let big = ((MAX_FRAME + 1) as u32).to_be_bytes();
        let mut r = &big[..];
        assert!(matches!(
            read(&mut r).await,
            Err(ProtocolError::Oversized(n)) if n == MAX_FRAME + 1
        ));
    }

    #[test]
    fn blocking_framing_matches_async() {
        let mut buf = Vec::new();
        write_blocking(&mut buf, &Message::FileEnd { hash: None }).unwrap();
        write_chunk(&mut buf, b"abc").unwrap();
        let mut r = &buf[..];
        assert_eq!(
            read_blocking(&mut r).unwrap(),
            Some(Message::FileEnd { hash: None })
        );
        assert_eq!(
            read_blocking(&mut r).unwrap(),
            Some(Message::Chunk(b"abc".to_vec()))
        );
        assert_eq!(read_blocking(&mut r).unwrap(), None);
        let mut r = &buf[..3];
        assert!(matches!(
            read_blocking(&mut r),
            Err(ProtocolError::Truncated)
        ));
        let big = ((MAX_FRAME + 1) as u32).to_be_bytes();
        assert!(matches!(
            read_blocking(&mut &big[..]),
            Err(ProtocolError::Oversized(_))
        ));
    }

    #[tokio::test]
    async fn silent_peer_times_out() {
        let (mut a, _b) = tokio::io::duplex(64);
        let err = read_within(&mut a, std::time::Duration::from_millis(20))
            .await
            .unwrap_err();
        assert!(matches!(err, ProtocolError::Idle));
    }
}
