//! File data over a data connection: the client streams requested files in bounded chunks; the
//! server writes each to a temporary file next to its target, hashing as it writes, and renames
//! it into place only when size and content hash match what the client announced.
//!
//! Both ends are blocking code run on a thread of their own per connection: per file this is a
//! handful of system calls, where async file I/O would add a thread-pool hop to each of them.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};

use tracing::{info, warn};

use crate::core::hash::{ContentHash, ContentHasher, HashAlgorithm};
use crate::core::manifest::{Entry, Kind, RelPath, find_sorted};
use crate::core::plan::Request;
use crate::core::text::Escaped;
use crate::store::cache::{Learned, Stamp};
use crate::store::root::{Root, TempFile};
use crate::wire::protocol::{self, CHUNK_SIZE, Message, ProtocolError};

/// What the server got from one data connection.
#[derive(Debug, Default)]
pub struct Received {
    pub files: u64,
    pub bytes: u64,
    pub failed: Vec<(String, String)>,
    /// Hashes of the files placed, with the stamp each has in place: the server's hash cache
    /// need not read them again.
    pub learned: Vec<Learned>,
}

/// A file being received: where it goes, and how far it got.
struct Incoming<'a> {
    want: &'a Request,
    /// `None` once the file is known to be bad: its remaining chunks are read and dropped.
    sink: Option<TempFile>,
    hasher: Hasher,
    bytes: u64,
    /// Bytes already handed to writeback.
    flushed: u64,
    error: Option<String>,
}

/// How much of a received file accumulates before its writeback is started.
const WRITEBACK_STEP: u64 = 8 << 20;

/// Files at least this large are hashed on a thread of their own, beside their I/O.
const HASH_THREAD_ABOVE: u64 = 8 << 20;

/// The hash of a stream of owned chunks: inline for small files; for large ones on a helper
/// thread, so that hashing overlaps reading and writing instead of adding to them. Chunks
/// come back for reuse; the channel bounds the memory in flight.
enum Hasher {
    Inline(ContentHasher),
    Threaded {
        to: std::sync::mpsc::SyncSender<Vec<u8>>,
        back: std::sync::mpsc::Receiver<Vec<u8>>,
        done: std::thread::JoinHandle<ContentHash>,
    },
}

impl Hasher {
    fn new(algorithm: HashAlgorithm, size: u64) -> Hasher {
        let mut h = algorithm.hasher();
        if size < HASH_THREAD_ABOVE {
            return Hasher::Inline(h);
        }
        let (to, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(4);
        // Bounded, and a full one drops the chunk: a caller that never takes spares must not
        // make them pile up.
        let (back_tx, back) = std::sync::mpsc::sync_channel(4);
        let done = std::thread::spawn(move || {
            for chunk in rx {
                h.update(&chunk);
                let _ = back_tx.try_send(chunk);
            }
            h.finish()
        });
        Hasher::Threaded { to, back, done }
    }

    fn update(&mut self, chunk: Vec<u8>) {
        match self {
            Hasher::Inline(h) => h.update(&chunk),
            Hasher::Threaded { to, .. } => {
                to.send(chunk)
                    .expect("the hashing thread outlives its sender");
            }
        }
    }

    /// A chunk the hashing thread is done with, to read the next one into.
    fn spare(&self) -> Option<Vec<u8>> {
        match self {
            Hasher::Inline(_) => None,
            Hasher::Threaded { back, .. } => back.try_recv().ok(),
        }
    }

    fn finish(self) -> ContentHash {
        match self {
            Hasher::Inline(h) => h.finish(),
            Hasher::Threaded { to, done, .. } => {
                drop(to);
                done.join().expect("hashing does not panic")
            }
        }
    }
}

/// Receives the files of one data connection, which may carry only files from `wanted`,
/// each at most once. Returns when the client closes the connection. A file that fails
/// (aborted by the client, changed while being sent, cannot be written) is recorded and the
/// connection goes on; a protocol violation ends it. Set a read timeout on the stream to
/// bound how long a silent client can hold it. `algorithm` is the session's: files announced
/// unhashed are hashed in it, and every hash the client sends must be in it.
pub fn receive<S: Read>(
    conn: &mut S,
    root: &Root,
    wanted: &[Request],
    algorithm: HashAlgorithm,
) -> Result<Received, ProtocolError> {
    let mut pending: HashMap<&RelPath, &Request> = wanted.iter().map(|r| (&r.path, r)).collect();
    let mut out = Received::default();
    let mut cur: Option<Incoming> = None;
    while let Some(msg) = protocol::read_blocking(conn)? {
        match (msg, cur.as_mut()) {
            (Message::FileBegin { path }, None) => {
                let want = pending
                    .remove(&path)
                    .ok_or_else(|| ProtocolError::Unrequested(path.to_string()))?;
                let (sink, error) = match root.temp_for(&path) {
                    Ok(t) => (Some(t), None),
                    Err(e) => (
                        None,
                        Some(format!("failed to create a temporary file: {e}")),
                    ),
                };
                cur = Some(Incoming {
                    want,
                    sink,
                    hasher: Hasher::new(algorithm, want.size),
                    bytes: 0,
                    flushed: 0,
                    error,
                });
            }
            (Message::Chunk(data), Some(inc)) => {
                inc.bytes += data.len() as u64;
                if inc.bytes > inc.want.size && inc.error.is_none() {
                    inc.error = Some(format!(
                        "file grew past the announced {} bytes while being sent",
                        inc.want.size
                    ));
                }
                if inc.error.is_some() {
                    inc.sink = None;
                    continue;
                }
                let written = match inc.sink.as_mut() {
                    None => Ok(()),
                    Some(t) => t.file().write_all(&data).and_then(|()| {
                        // Large files: have the kernel start writing back now, so the
                        // session's final flush does not wait for the whole file.
                        if inc.bytes - inc.flushed >= WRITEBACK_STEP {
                            t.start_writeback(inc.flushed, inc.bytes - inc.flushed)?;
                            inc.flushed = inc.bytes;
                        }
                        Ok(())
                    }),
                };
                inc.hasher.update(data);
                if let Err(e) = written {
                    inc.error = Some(format!("failed to write: {e}"));
                    inc.sink = None;
                }
            }
            (Message::FileEnd { hash }, Some(_)) => {
                let inc = cur.take().expect("matched Some");
                let path = inc.want.path.as_str().to_owned();
                match finish(root, inc, hash) {
                    Ok(placed) => {
                        let n = placed.bytes;
                        info!(
                            "Received file: {} ({n} bytes, {algorithm} ok)",
                            Escaped(&path)
                        );
                        out.files += 1;
                        out.bytes += n;
                        out.learned.extend(placed.stamp.map(|stamp| Learned {
                            path,
                            stamp,
                            hash: placed.hash,
                        }));
                    }
                    Err(why) => {
                        warn!(
                            "Rejected file: {}: {}; it will be requested again next cycle",
                            Escaped(&path),
                            Escaped(&why)
                        );
                        out.failed.push((path, why));
                    }
                }
            }
            (Message::FileAbort { reason }, Some(_)) => {
                let inc = cur.take().expect("matched Some");
                warn!(
                    "Client could not send {}: {}",
                    inc.want.path,
                    Escaped(&reason)
                );
                out.failed.push((inc.want.path.as_str().to_owned(), reason));
            }
            (m, None) => return Err(m.unexpected("file-begin")),
            (m, Some(_)) => return Err(m.unexpected("chunk, file-end or file-abort")),
        }
    }
    if let Some(inc) = cur {
        out.failed.push((
            inc.want.path.as_str().to_owned(),
            "connection closed in the middle of the file".into(),
        ));
    }
    for r in pending.into_values() {
        out.failed.push((
            r.path.as_str().to_owned(),
            "requested but not sent by the client".into(),
        ));
    }
    Ok(out)
}

/// A received file, verified and in place.
struct Placed {
    bytes: u64,
    hash: ContentHash,
    /// Its stamp in place, when the cache may trust it at once (see `Stamp::settled_own_write`).
    stamp: Option<Stamp>,
}

/// Verifies a completely received file and renames it into place. `end_hash` is what the
/// client sent with `FileEnd`: the only hash there is for a file announced unhashed; for the
/// others it must agree with the announced one.
fn finish(
    root: &Root,
    mut inc: Incoming<'_>,
    end_hash: Option<ContentHash>,
) -> Result<Placed, String> {
    if let Some(e) = inc.error {
        return Err(e);
    }
    let mut tmp = inc.sink.take().ok_or("no temporary file")?;
    let want = match (inc.want.hash, end_hash) {
        (Some(a), Some(b)) if a != b => {
            return Err(format!(
                "client ended the file with {} {b}, having announced {a}",
                b.algorithm()
            ));
        }
        (Some(h), _) | (None, Some(h)) => h,
        (None, None) => return Err("file announced unhashed was sent without its hash".into()),
    };
    let got = inc.hasher.finish();
    if inc.bytes != inc.want.size || got != want {
        return Err(format!(
            "content changed while being sent ({} bytes, {} {got}; announced {} bytes, {} {want})",
            inc.bytes,
            got.algorithm(),
            inc.want.size,
            want.algorithm()
        ));
    }
    tmp.set_meta(&inc.want.meta)
        .map_err(|e| format!("failed to set metadata: {e}"))?;
    // The descriptor outlives the rename, so the stamp read from it after the rename (which
    // moves ctime) is that of the very file verified here, whatever happens to the path.
    let fd = tmp.file().try_clone().ok();
    root.place(tmp, &inc.want.path).map_err(|e| e.to_string())?;
    let stamp = fd
        .and_then(|f| f.metadata().ok())
        .map(|m| Stamp::of(&m))
        .filter(|s| s.settled_own_write(crate::store::cache::now_ns()));
    Ok(Placed {
        bytes: inc.bytes,
        hash: got,
        stamp,
    })
}

/// What the client sent over one data connection.
#[derive(Debug, Default)]
pub struct Sent {
    pub files: u64,
    pub bytes: u64,
    pub failed: Vec<(String, String)>,
    /// Hashes of unhashed files, computed while sending them, with the stamp they had
    /// throughout (for the hash cache).
    pub learned: Vec<Learned>,
}

/// Sends the requested files over a data connection, then closes it. Only regular files of
/// `listed` (the entries this client announced, in component order) are sent: a server cannot
/// use a request to read anything else, such as a path through a client-side symlink.
pub fn send<S: Write>(
    conn: S,
    root: &Root,
    (token, request): (u64, u32),
    paths: &[RelPath],
    listed: &[Entry],
    algorithm: HashAlgorithm,
) -> Result<Sent, ProtocolError> {
    let mut w = BufWriter::with_capacity(64 << 10, conn);
    protocol::write_blocking(&mut w, &Message::DataHello { token, request })?;
    let mut out = Sent::default();
    let mut buf = vec![0u8; CHUNK_SIZE];
    for path in paths {
        protocol::write_blocking(&mut w, &Message::FileBegin { path: path.clone() })?;
        info!("Sending file: {path}");
        let res = match find_sorted(listed, path) {
            Some(e) if e.is_file() => {
                let hash = matches!(e.kind, Kind::Unhashed { .. }).then_some(algorithm);
                send_one(&mut w, root, path, &mut buf, hash)?
            }
            _ => Err("not a file this client offered".to_string()),
        };
        match res {
            Ok((n, hashed)) => {
                let hash = hashed.map(|(hash, _)| hash);
                protocol::write_blocking(&mut w, &Message::FileEnd { hash })?;
                if let Some((hash, Some(stamp))) = hashed {
                    out.learned.push(Learned {
                        path: path.as_str().to_owned(),
                        stamp,
                        hash,
                    });
                }
                out.files += 1;
                out.bytes += n;
            }
            Err(reason) => {
                warn!("failed to send {path}: {reason}");
                let abort = Message::FileAbort {
                    reason: reason.clone(),
                };
                protocol::write_blocking(&mut w, &abort)?;
                out.failed.push((path.as_str().to_owned(), reason));
            }
        }
    }
    w.flush()?;
    Ok(out)
}

/// What `send_one` learnt of a file it hashed: the hash, and the stamp when it may be cached.
type Hashed = Option<(ContentHash, Option<Stamp>)>;

/// Streams one file's chunks, hashing them too when `hash` names an algorithm. The outer error
/// is the connection's; the inner one the file's. Returns the bytes sent and, when hashed, the
/// hash and the file's stamp, which must not change while it is read: a file written to meanwhile
/// is aborted, to be sent whole next cycle.
fn send_one<W: Write>(
    w: &mut W,
    root: &Root,
    path: &RelPath,
    buf: &mut [u8],
    hash: Option<HashAlgorithm>,
) -> Result<Result<(u64, Hashed), String>, ProtocolError> {
    let mut f = match root.open_read(path) {
        Ok(f) => f,
        Err(e) => return Ok(Err(format!("failed to open: {e}"))),
    };
    let stamp = |f: &File| f.metadata().map(|m| Stamp::of(&m));
    let opened = crate::store::cache::now_ns();
    let before = if hash.is_some() {
        match stamp(&f) {
            Ok(s) => Some(s),
            Err(e) => return Ok(Err(format!("failed to stat: {e}"))),
        }
    } else {
        None
    };
    let mut hasher = hash.map(|alg| Hasher::new(alg, HASH_THREAD_ABOVE));
    let mut sent = 0u64;
    loop {
        // With a hashing thread, each chunk is handed over: read into a recycled one.
        let mut owned = hasher.as_ref().map(|h| {
            let mut v = h.spare().unwrap_or_default();
            v.resize(CHUNK_SIZE, 0);
            v
        });
        let chunk: &mut [u8] = owned.as_deref_mut().unwrap_or(&mut *buf);
        let n = match f.read(chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Ok(Err(format!("failed to read: {e}"))),
        };
        protocol::write_chunk(w, &chunk[..n])?;
        if let (Some(h), Some(mut v)) = (hasher.as_mut(), owned) {
            v.truncate(n);
            h.update(v);
        }
        sent += n as u64;
    }
    let Some(before) = before else {
        return Ok(Ok((sent, None)));
    };
    match stamp(&f) {
        Ok(after) if after == before => {
            let hash = hasher.expect("hashing when stamped").finish();
            Ok(Ok((
                sent,
                Some((hash, after.settled_at(opened).then_some(after))),
            )))
        }
        Ok(_) => Ok(Err("changed while being sent".into())),
        Err(e) => Ok(Err(format!("failed to stat: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::manifest::Meta;

    const B3: HashAlgorithm = HashAlgorithm::Blake3;

    /// Receives `content` for a file announced with `announced` and ended with `end_hash`;
    /// checks the outcome: `Ok(())` placed intact, or `Err(reason fragment)` rejected with
    /// nothing placed and no temp file left.
    fn check(
        announced: Option<&[u8]>,
        content: &[u8],
        end_hash: Option<&[u8]>,
        want: Result<(), &str>,
    ) {
        let d = tempfile::tempdir().unwrap();
        let root = Root::new(d.path());
        let path = RelPath::new("f").unwrap();
        let req = Request {
            path: path.clone(),
            size: content.len() as u64,
            hash: announced.map(|c| B3.of(c)),
            meta: Meta {
                mode: 0o640,
                ..Meta::default()
            },
        };
        let mut wire = Vec::new();
        for m in [
            Message::FileBegin { path },
            Message::Chunk(content.to_vec()),
            Message::FileEnd {
                hash: end_hash.map(|c| B3.of(c)),
            },
        ] {
            m.encode(&mut wire);
        }
        let got = receive(&mut &wire[..], &root, &[req], B3).unwrap();
        let names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        match want {
            Ok(()) => {
                assert_eq!((got.files, &got.failed), (1, &vec![]));
                assert_eq!(std::fs::read(d.path().join("f")).unwrap(), content);
            }
            Err(why) => {
                assert_eq!(got.files, 0);
                assert!(
                    got.failed[0].1.contains(why),
                    "{:?} lacks {why:?}",
                    got.failed
                );
                assert!(names.is_empty(), "left behind: {names:?}");
            }
        }
    }

    #[test]
    fn received_files_are_placed_only_when_verified() {
        // Announced with its hash, which the end may repeat but not contradict.
        check(Some(b"abc"), b"abc", None, Ok(()));
        check(Some(b"abc"), b"abc", Some(b"abc"), Ok(()));
        check(
            Some(b"abc"),
            b"abd",
            None,
            Err("content changed while being sent"),
        );
        check(
            Some(b"abc"),
            b"abc",
            Some(b"xyz"),
            Err("client ended the file with blake3"),
        );
        // Announced unhashed: the hash comes at the end and must match what arrived.
        check(None, b"abc", Some(b"abc"), Ok(()));
        check(
            None,
            b"abc",
            Some(b"abd"),
            Err("content changed while being sent"),
        );
        check(None, b"abc", None, Err("sent without its hash"));
    }
}
