//! Frames and the primitive encodings inside them: the one byte layout both connections share.
//!
//! Every message travels in one frame: a big-endian `u32` length, then that many bytes, the
//! first of which is the message tag ([`crate::wire::tag`]). Integers are big-endian; strings
//! and byte strings are a `u32` length followed by the bytes; lists are a `u32` count followed
//! by the items; a content hash is its algorithm's identifier followed by its digest.

use std::io::Read;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::core::hash::{ContentHash, HashAlgorithm};
use crate::core::manifest::{Entry, Kind, MAX_PATH_LEN, Meta, PathError, RelPath};

/// Largest frame accepted. File lists and requests are sent in batches well below it, and
/// file data in chunks of [`crate::wire::CHUNK_SIZE`].
pub const MAX_FRAME: usize = 1 << 20;
/// Longest reason, error or special-file description accepted or sent, in bytes.
pub const MAX_TEXT: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("connection closed in the middle of a frame")]
    Truncated,
    #[error("connection closed by the peer")]
    Closed,
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    Oversized(usize),
    #[error("empty frame")]
    Empty,
    #[error("unknown message tag {0}")]
    UnknownTag(u8),
    #[error("{0} message on the wrong connection")]
    WrongConnection(&'static str),
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
    #[error("server speaks protocol version {0}, this client speaks {ours}", ours = crate::wire::VERSION)]
    Version(u32),
    #[error("{0}")]
    Io(#[from] std::io::Error),
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

// Smallest encoding of an entry: path length, kind tag, mode, mtime; bounds a peer-announced
// count by the bytes actually present, so a forged count cannot make us allocate.
const MIN_ENTRY_LEN: usize = 4 + 1 + 4 + 8 + 4;

/// Appends encodings to a frame under construction.
pub(crate) struct Writer<'a>(pub(crate) &'a mut Vec<u8>);

impl Writer<'_> {
    /// Starts a frame with `tag`; [`Writer::end_frame`] fills in its length.
    pub(crate) fn begin_frame(out: &mut Vec<u8>, tag: u8) -> (Writer<'_>, usize) {
        let start = out.len();
        out.extend_from_slice(&[0; 4]);
        out.push(tag);
        (Writer(out), start)
    }
    pub(crate) fn end_frame(self, start: usize) {
        let len = (self.0.len() - start - 4) as u32;
        self.0[start..start + 4].copy_from_slice(&len.to_be_bytes());
    }
    pub(crate) fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    pub(crate) fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    pub(crate) fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    pub(crate) fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    pub(crate) fn u128(&mut self, v: u128) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    pub(crate) fn raw(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }
    pub(crate) fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
    pub(crate) fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }
    pub(crate) fn paths(&mut self, paths: &[RelPath]) {
        self.u32(paths.len() as u32);
        for p in paths {
            self.str(p.as_str());
        }
    }
    pub(crate) fn hash(&mut self, h: &ContentHash) {
        self.u8(h.algorithm().id());
        self.raw(h.digest());
    }
    pub(crate) fn entries(&mut self, entries: &[Entry]) {
        self.u32(entries.len() as u32);
        for e in entries {
            self.entry(e);
        }
    }
    pub(crate) fn entry(&mut self, e: &Entry) {
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
        self.meta(&e.meta);
    }
    pub(crate) fn meta(&mut self, m: &Meta) {
        self.u32(m.mode);
        self.u64(m.mtime_secs as u64);
        self.u32(m.mtime_nanos);
    }
}

/// Reads encodings out of one frame's body.
pub(crate) struct Reader<'a> {
    pub(crate) buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.buf.len() < n {
            return Err(ProtocolError::Malformed("short"));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    pub(crate) fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.take(1)?[0])
    }
    pub(crate) fn u16(&mut self) -> Result<u16, ProtocolError> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().unwrap()))
    }
    pub(crate) fn u32(&mut self) -> Result<u32, ProtocolError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().unwrap()))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, ProtocolError> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().unwrap()))
    }
    pub(crate) fn u128(&mut self) -> Result<u128, ProtocolError> {
        Ok(u128::from_be_bytes(self.take(16)?.try_into().unwrap()))
    }
    pub(crate) fn magic(&mut self, magic: &[u8; 4]) -> Result<(), ProtocolError> {
        if self.take(4).map_err(|_| ProtocolError::BadMagic)? != magic {
            return Err(ProtocolError::BadMagic);
        }
        Ok(())
    }
    /// A list count, checked against the bytes left so that it cannot force a huge allocation.
    pub(crate) fn count(&mut self, min_item: usize) -> Result<usize, ProtocolError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min_item) > self.buf.len() {
            return Err(ProtocolError::Malformed("list count"));
        }
        Ok(n)
    }
    pub(crate) fn bytes(&mut self) -> Result<&'a [u8], ProtocolError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    pub(crate) fn str(&mut self, what: &'static str) -> Result<&'a str, ProtocolError> {
        std::str::from_utf8(self.bytes()?).map_err(|_| ProtocolError::Utf8(what))
    }
    /// A string of at most `max` bytes, so that a peer cannot make one entry cost megabytes.
    pub(crate) fn str_max(
        &mut self,
        what: &'static str,
        max: usize,
    ) -> Result<String, ProtocolError> {
        let s = self.str(what)?;
        if s.len() > max {
            return Err(ProtocolError::Malformed(what));
        }
        Ok(s.to_owned())
    }
    pub(crate) fn path(&mut self) -> Result<RelPath, ProtocolError> {
        Ok(RelPath::new(self.str("path")?)?)
    }
    pub(crate) fn paths(&mut self) -> Result<Vec<RelPath>, ProtocolError> {
        let n = self.count(4)?;
        let mut paths = Vec::with_capacity(n);
        for _ in 0..n {
            paths.push(self.path()?);
        }
        Ok(paths)
    }
    pub(crate) fn hash(&mut self) -> Result<ContentHash, ProtocolError> {
        let algorithm =
            HashAlgorithm::from_id(self.u8()?).ok_or(ProtocolError::Malformed("hash algorithm"))?;
        let digest = self.take(algorithm.digest_len())?;
        Ok(ContentHash::new(algorithm, digest).expect("length checked by take"))
    }
    /// A file size; beyond `i64::MAX` no file system holds it, and sums of sizes stay exact.
    pub(crate) fn size(&mut self) -> Result<u64, ProtocolError> {
        let n = self.u64()?;
        if n > i64::MAX as u64 {
            return Err(ProtocolError::Malformed("file size"));
        }
        Ok(n)
    }
    pub(crate) fn entries(&mut self) -> Result<Vec<Entry>, ProtocolError> {
        let n = self.count(MIN_ENTRY_LEN)?;
        let mut entries = Vec::with_capacity(n);
        for _ in 0..n {
            entries.push(self.entry()?);
        }
        Ok(entries)
    }
    pub(crate) fn entry(&mut self) -> Result<Entry, ProtocolError> {
        let path = self.path()?;
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
        let meta = self.meta()?;
        Ok(Entry { path, kind, meta })
    }
    /// The next entry's path and its whole encoding, without decoding the rest of it.
    pub(crate) fn entry_span(&mut self) -> Result<(&'a str, &'a [u8]), ProtocolError> {
        let start = self.buf;
        let path = self.str("path")?;
        match self.u8()? {
            1 => {
                self.u64()?;
                let alg = HashAlgorithm::from_id(self.u8()?)
                    .ok_or(ProtocolError::Malformed("hash algorithm"))?;
                self.take(alg.digest_len())?;
            }
            2 => {}
            3..=5 => {
                self.bytes()?;
            }
            6 => {
                self.u64()?;
            }
            _ => return Err(ProtocolError::Malformed("entry kind")),
        }
        self.take(4 + 8 + 4)?;
        let len = start.len() - self.buf.len();
        Ok((path, &start[..len]))
    }
    pub(crate) fn meta(&mut self) -> Result<Meta, ProtocolError> {
        let meta = Meta {
            // Permission bits and the sticky bit, never set-user/group-ID: a peer must not be
            // able to plant setuid files.
            mode: self.u32()? & 0o1777,
            mtime_secs: self.u64()? as i64,
            mtime_nanos: self.u32()?,
        };
        if meta.mtime_nanos >= 1_000_000_000 {
            return Err(ProtocolError::Malformed("entry mtime"));
        }
        Ok(meta)
    }
    /// Fails unless the whole body was used.
    pub(crate) fn finish(&self, what: &'static str) -> Result<(), ProtocolError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(ProtocolError::Malformed(what))
        }
    }
}

pub(crate) fn frame_len(len: [u8; 4]) -> Result<usize, ProtocolError> {
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(ProtocolError::Oversized(len));
    }
    if len == 0 {
        return Err(ProtocolError::Empty);
    }
    Ok(len)
}

pub(crate) fn truncated_or_io(e: std::io::Error) -> ProtocolError {
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof => ProtocolError::Truncated,
        _ => ProtocolError::Io(e),
    }
}

/// Reads one frame's body (tag first); `Ok(None)` on a clean end of stream between frames.
/// The body is one allocation, handed on as [`Bytes`] so that file data is never copied.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Bytes>, ProtocolError> {
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
    let mut body = BytesMut::zeroed(frame_len(len)?);
    r.read_exact(&mut body).await.map_err(truncated_or_io)?;
    Ok(Some(body.freeze()))
}

/// [`read_frame`] for blocking streams (the data connections run on their own threads). A
/// read timeout set on the socket surfaces as [`ProtocolError::Idle`].
pub fn read_frame_blocking<R: Read>(r: &mut R) -> Result<Option<Bytes>, ProtocolError> {
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
    let mut body = BytesMut::zeroed(frame_len(len)?);
    r.read_exact(&mut body).map_err(idle)?;
    Ok(Some(body.freeze()))
}
