//! The client's end of a data connection: the requested files, streamed in bounded chunks,
//! holes sent as holes.

use std::io::{BufWriter, Write};

use bytes::BytesMut;

use crate::core::hash::{ContentHash, HashAlgorithm};
use crate::core::manifest::{Entry, Kind, RelPath};
use crate::events::{Event, EventSink};
use crate::store::Store;
use crate::store::cache::{Learned, Stamp, now_ns};
use crate::store::read::{Segment, SparseReader};
use crate::transfer::hasher::{Hasher, Piece, THREAD_ABOVE};
use crate::wire::{BlockingConnection, CHUNK_SIZE, DataMessage, Failure, ProtocolError};

/// What the client sent over one data connection.
#[derive(Debug, Default)]
pub struct Sent {
    pub files: u64,
    pub bytes: u64,
    pub failed: Vec<Failure>,
    /// Hashes of unhashed files, computed while sending them, with the stamp they had
    /// throughout (for the hash cache).
    pub learned: Vec<Learned>,
}

/// Which session and request a data connection answers.
#[derive(Clone, Copy, Debug)]
pub struct Ticket {
    pub token: u64,
    pub request: u32,
}

/// Sends the requested files over a data connection, then closes it. Only regular files of
/// `listed` (the entries this client announced, in component order) are sent: a server cannot
/// use a request to read anything else, such as a path through a client-side symlink.
/// Files announced unhashed are hashed in `algorithm` while they are sent.
pub fn send<W: Write, S: Store>(
    stream: W,
    store: &S,
    ticket: Ticket,
    (paths, listed): (&[RelPath], &[Entry]),
    algorithm: HashAlgorithm,
    events: &dyn EventSink,
) -> Result<Sent, ProtocolError> {
    let mut conn = BlockingConnection::new(BufWriter::with_capacity(64 << 10, stream));
    conn.send(&DataMessage::DataHello {
        token: ticket.token,
        request: ticket.request,
    })?;
    let mut out = Sent::default();
    let mut buf = vec![0u8; CHUNK_SIZE];
    // Requests come sorted, so directory by directory: each is reached once, and each path is
    // found in the list a step or two after the one before.
    let mut dirs = S::Dirs::default();
    let mut at = 0;
    for path in paths {
        conn.send(&DataMessage::FileBegin { path: path.clone() })?;
        events.emit(Event::FileSending { path: path.clone() });
        let res = match find_from(listed, &mut at, path) {
            Some(e) if e.is_file() => {
                let hash = matches!(e.kind, Kind::Unhashed { .. }).then_some(algorithm);
                send_one(&mut conn, (store, &mut dirs), path, &mut buf, hash)
            }
            _ => Err(SendError::File("not a file this client offered".into())),
        };
        match res {
            Err(SendError::Connection(e)) => return Err(e),
            Ok(done) => {
                let hash = done.hashed.map(|(hash, _)| hash);
                conn.send(&DataMessage::FileEnd { hash })?;
                if let Some((hash, Some(stamp))) = done.hashed {
                    out.learned.push(Learned {
                        path: path.as_str().to_owned(),
                        stamp,
                        hash,
                    });
                }
                out.files += 1;
                out.bytes += done.sent;
            }
            Err(SendError::File(reason)) => {
                conn.send(&DataMessage::FileAbort {
                    reason: reason.clone(),
                })?;
                out.failed.push(Failure::new(path.as_str(), reason.clone()));
                events.emit(Event::SendFailed {
                    path: path.clone(),
                    reason,
                });
            }
        }
    }
    conn.flush()?;
    Ok(out)
}

/// The entry for `path` in `listed` (in component order), looked for first just after where
/// the last one was found: requests come in list order, so in a tree of small files the next
/// requested entry is one or two further on, and a search is only the fallback.
fn find_from<'a>(listed: &'a [Entry], at: &mut usize, path: &RelPath) -> Option<&'a Entry> {
    let mut near = listed.get(*at..).unwrap_or_default().iter().take(4);
    let i = match near.position(|e| e.path == *path) {
        Some(k) => *at + k,
        None => listed.binary_search_by(|e| e.path.cmp(path)).ok()?,
    };
    *at = i + 1;
    Some(&listed[i])
}

/// One file sent: the bytes that crossed the network and, when it was hashed on the way, its
/// hash and (when it may be cached) its stamp.
struct SentFile {
    sent: u64,
    hashed: Option<(ContentHash, Option<Stamp>)>,
}

/// Why a file was not sent.
enum SendError {
    /// The connection failed: the rest of the request cannot be sent either.
    Connection(ProtocolError),
    /// This file could not be sent (the reason goes to the server in `FileAbort`); the
    /// connection goes on with the next.
    File(String),
}

impl From<ProtocolError> for SendError {
    fn from(e: ProtocolError) -> Self {
        SendError::Connection(e)
    }
}

/// Streams one file, hashing it too when `hash` names an algorithm. A file being hashed must
/// not change while it is read (its stamp is compared before and after): one written to
/// meanwhile is aborted, to be sent whole next cycle.
fn send_one<W: Write, S: Store>(
    conn: &mut BlockingConnection<W>,
    (store, dirs): (&S, &mut S::Dirs),
    path: &RelPath,
    buf: &mut [u8],
    hash: Option<HashAlgorithm>,
) -> Result<SentFile, SendError> {
    let failed = |what: &str, e: std::io::Error| SendError::File(format!("failed to {what}: {e}"));
    let (file, meta) = store.read(path, dirs).map_err(|e| failed("open", e))?;
    let opened = now_ns();
    let before = Stamp::of(&meta);
    let mut reader = SparseReader::with_size(file, before.size());
    let mut hasher = hash.map(|alg| Hasher::new(alg, before.size().max(THREAD_ABOVE)));
    let mut sent = 0u64;
    loop {
        // Hashed chunks are handed to the hashing thread: read those into a buffer of their
        // own. The others reuse one buffer.
        let mut owned = hasher.as_ref().map(|_| BytesMut::zeroed(CHUNK_SIZE));
        let chunk: &mut [u8] = owned.as_deref_mut().unwrap_or(&mut *buf);
        match reader.next(chunk) {
            Ok(Segment::End) => break,
            Ok(Segment::Data(n)) => {
                conn.send_chunk(&chunk[..n])?;
                if let (Some(h), Some(mut b)) = (hasher.as_mut(), owned) {
                    b.truncate(n);
                    h.update(Piece::Data(b.freeze()));
                }
                sent += n as u64;
            }
            Ok(Segment::Hole(n)) => {
                conn.send(&DataMessage::Hole { len: n })?;
                if let Some(h) = hasher.as_mut() {
                    h.update(Piece::Zeros(n));
                }
            }
            Err(e) => return Err(failed("read", e)),
        }
    }
    let Some(hasher) = hasher else {
        return Ok(SentFile { sent, hashed: None });
    };
    let after = Stamp::of(&reader.file().metadata().map_err(|e| failed("stat", e))?);
    if after != before {
        return Err(SendError::File("changed while being sent".into()));
    }
    let cacheable = before.settled_at(opened).then_some(before);
    Ok(SentFile {
        sent,
        hashed: Some((hasher.finish(), cacheable)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::manifest::Meta;

    #[test]
    fn paths_are_found_near_the_last_or_searched_for() {
        let entry = |path: &str, dir: bool| Entry {
            path: RelPath::new(path).unwrap(),
            kind: if dir {
                Kind::Dir
            } else {
                Kind::File {
                    size: 0,
                    hash: HashAlgorithm::Blake3.of(b""),
                }
            },
            meta: Meta::default(),
        };
        let listed = [
            entry("a", true),
            entry("a/1", false),
            entry("a/2", false),
            entry("b", true),
            entry("b/1", false),
            entry("c", false),
        ];
        let mut at = 0;
        let mut find = |p: &str| {
            find_from(&listed, &mut at, &RelPath::new(p).unwrap()).map(|e| e.path.to_string())
        };
        for p in ["a/1", "a/2", "b/1", "c"] {
            assert_eq!(find(p).as_deref(), Some(p));
        }
        // Out of order, or not listed at all.
        assert_eq!(find("a/1").as_deref(), Some("a/1"));
        assert_eq!(find("a/3"), None);
        assert_eq!(find("c").as_deref(), Some("c"));
        assert_eq!(find("d"), None);
    }
}
