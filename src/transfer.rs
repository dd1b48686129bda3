//! File data over a data connection: the client streams requested files in bounded chunks; the
//! server writes each to a temporary file next to its target, hashing as it writes, and renames
//! it into place only when size and MD5 match what the client announced.
//!
//! Both ends are blocking code run on a thread of their own per connection: per file this is a
//! handful of system calls, where async file I/O would add a thread-pool hop to each of them.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::OpenOptionsExt;

use md5::Digest;
use tracing::{info, warn};

use crate::manifest::{Entry, Kind, Md5, RelPath, find_sorted};
use crate::plan::Request;
use crate::protocol::{self, CHUNK_SIZE, Message, ProtocolError};
use crate::root::{Root, TempFile};

/// What the server got from one data connection.
#[derive(Debug, Default)]
pub struct Received {
    pub files: u64,
    pub bytes: u64,
    pub failed: Vec<(String, String)>,
}

/// A file being received: where it goes, and how far it got.
struct Incoming<'a> {
    want: &'a Request,
    /// `None` once the file is known to be bad: its remaining chunks are read and dropped.
    sink: Option<TempFile>,
    hasher: md5::Md5,
    bytes: u64,
    error: Option<String>,
}

/// Receives the files of one data connection, which may carry only files from `wanted`,
/// each at most once. Returns when the client closes the connection. A file that fails
/// (aborted by the client, changed while being sent, cannot be written) is recorded and the
/// connection goes on; a protocol violation ends it. Set a read timeout on the stream to
/// bound how long a silent client can hold it.
pub fn receive<S: Read>(
    conn: &mut S,
    root: &Root,
    wanted: &[Request],
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
                    hasher: md5::Md5::new(),
                    bytes: 0,
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
                inc.hasher.update(&data);
                if let Some(t) = inc.sink.as_mut()
                    && let Err(e) = t.file().write_all(&data)
                {
                    inc.error = Some(format!("failed to write: {e}"));
                    inc.sink = None;
                }
            }
            (Message::FileEnd, Some(_)) => {
                let inc = cur.take().expect("matched Some");
                let path = inc.want.path.to_string();
                match finish(root, inc) {
                    Ok(n) => {
                        info!("Received file: {path} ({n} bytes, md5 ok)");
                        out.files += 1;
                        out.bytes += n;
                    }
                    Err(why) => {
                        warn!(
                            "Rejected file: {path}: {why}; it will be requested again next cycle"
                        );
                        out.failed.push((path, why));
                    }
                }
            }
            (Message::FileAbort { reason }, Some(_)) => {
                let inc = cur.take().expect("matched Some");
                warn!("Client could not send {}: {reason}", inc.want.path);
                out.failed.push((inc.want.path.to_string(), reason));
            }
            (m, None) => return Err(m.unexpected("file-begin")),
            (m, Some(_)) => return Err(m.unexpected("chunk, file-end or file-abort")),
        }
    }
    if let Some(inc) = cur {
        out.failed.push((
            inc.want.path.to_string(),
            "connection closed in the middle of the file".into(),
        ));
    }
    for r in pending.into_values() {
        out.failed.push((
            r.path.to_string(),
            "requested but not sent by the client".into(),
        ));
    }
    Ok(out)
}

/// Verifies a completely received file and renames it into place. Returns its size.
fn finish(root: &Root, inc: Incoming<'_>) -> Result<u64, String> {
    if let Some(e) = inc.error {
        return Err(e);
    }
    let tmp = inc.sink.ok_or("no temporary file")?;
    let got = Md5(inc.hasher.finalize().into());
    if inc.bytes != inc.want.size || got != inc.want.md5 {
        return Err(format!(
            "content changed while being sent ({} bytes, md5 {got}; announced {} bytes, md5 {})",
            inc.bytes, inc.want.size, inc.want.md5
        ));
    }
    tmp.set_meta(&inc.want.meta)
        .map_err(|e| format!("failed to set metadata: {e}"))?;
    root.place(tmp, &inc.want.path).map_err(|e| e.to_string())?;
    Ok(inc.bytes)
}

/// What the client sent over one data connection.
#[derive(Debug, Default)]
pub struct Sent {
    pub files: u64,
    pub bytes: u64,
    pub failed: Vec<(String, String)>,
}

/// Sends the requested files over a data connection, then closes it. Only regular files of
/// `listed` (the entries this client announced, in component order) are sent: a server cannot
/// use a request to read anything else, such as a path through a client-side symlink.
pub fn send<S: Write>(
    conn: S,
    root: &Root,
    token: u64,
    paths: &[RelPath],
    listed: &[Entry],
) -> Result<Sent, ProtocolError> {
    let mut w = BufWriter::with_capacity(64 << 10, conn);
    protocol::write_blocking(&mut w, &Message::DataHello { token })?;
    let mut out = Sent::default();
    let mut buf = vec![0u8; CHUNK_SIZE];
    for path in paths {
        protocol::write_blocking(&mut w, &Message::FileBegin { path: path.clone() })?;
        info!("Sending file: {path}");
        let offered =
            find_sorted(listed, path).is_some_and(|e| matches!(e.kind, Kind::File { .. }));
        let res = if offered {
            send_one(&mut w, root, path, &mut buf)?
        } else {
            Err("not a file this client offered".to_string())
        };
        match res {
            Ok(n) => {
                protocol::write_blocking(&mut w, &Message::FileEnd)?;
                out.files += 1;
                out.bytes += n;
            }
            Err(reason) => {
                warn!("failed to send {path}: {reason}");
                let abort = Message::FileAbort {
                    reason: reason.clone(),
                };
                protocol::write_blocking(&mut w, &abort)?;
                out.failed.push((path.to_string(), reason));
            }
        }
    }
    w.flush()?;
    Ok(out)
}

/// Streams one file's chunks. The outer error is the connection's; the inner one the file's.
fn send_one<W: Write>(
    w: &mut W,
    root: &Root,
    path: &RelPath,
    buf: &mut [u8],
) -> Result<Result<u64, String>, ProtocolError> {
    let open = || {
        let p = root.resolve(path).map_err(io::Error::other)?;
        File::options()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(p)
    };
    let mut f = match open() {
        Ok(f) => f,
        Err(e) => return Ok(Err(format!("failed to open: {e}"))),
    };
    let mut sent = 0u64;
    loop {
        let n = match f.read(buf) {
            Ok(0) => return Ok(Ok(sent)),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Ok(Err(format!("failed to read: {e}"))),
        };
        protocol::write_chunk(w, &buf[..n])?;
        sent += n as u64;
    }
}
