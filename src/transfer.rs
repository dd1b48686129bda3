//! File data over a data connection: the client streams requested files in bounded chunks; the
//! server writes each to a temporary file next to its target, hashing as it writes, and renames
//! it into place only when size and MD5 match what the client announced.

use std::collections::{HashMap, HashSet};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::time::Duration;

use md5::Digest;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tracing::{info, warn};

use crate::manifest::{Md5, RelPath};
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
    sink: Option<(TempFile, tokio::fs::File)>,
    hasher: md5::Md5,
    bytes: u64,
    error: Option<String>,
}

/// Receives the files of one data connection, which may carry only files from `wanted`,
/// each at most once. Returns when the client closes the connection. A file that fails
/// (aborted by the client, changed while being sent, cannot be written) is recorded and the
/// connection goes on; a protocol violation ends it.
pub async fn receive<S: AsyncRead + Unpin>(
    conn: &mut S,
    root: &Root,
    wanted: &[Request],
    idle: Duration,
) -> Result<Received, ProtocolError> {
    let mut pending: HashMap<&RelPath, &Request> = wanted.iter().map(|r| (&r.path, r)).collect();
    let mut out = Received::default();
    let mut cur: Option<Incoming> = None;
    loop {
        let msg = match tokio::time::timeout(idle, protocol::read(conn)).await {
            Err(_) => return Err(ProtocolError::Idle(idle.as_secs())),
            Ok(r) => r?,
        };
        let Some(msg) = msg else {
            if let Some(inc) = cur {
                out.failed.push((
                    inc.want.path.to_string(),
                    "connection closed in the middle of the file".into(),
                ));
            }
            break;
        };
        match (msg, cur.as_mut()) {
            (Message::FileBegin { path }, None) => {
                let want = pending
                    .remove(&path)
                    .ok_or_else(|| ProtocolError::Unrequested(path.to_string()))?;
                let mut inc = Incoming {
                    want,
                    sink: None,
                    hasher: md5::Md5::new(),
                    bytes: 0,
                    error: None,
                };
                match open_sink(root, &path) {
                    Ok(s) => inc.sink = Some(s),
                    Err(e) => inc.error = Some(format!("failed to create a temporary file: {e}")),
                }
                cur = Some(inc);
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
                if let Some((_, f)) = inc.sink.as_mut() {
                    if let Err(e) = f.write_all(&data).await {
                        inc.error = Some(format!("failed to write: {e}"));
                        inc.sink = None;
                    }
                }
            }
            (Message::FileEnd, Some(_)) => {
                let inc = cur.take().expect("matched Some");
                let path = inc.want.path.to_string();
                match finish(root, inc).await {
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
    for r in pending.into_values() {
        out.failed.push((
            r.path.to_string(),
            "requested but not sent by the client".into(),
        ));
    }
    Ok(out)
}

fn open_sink(root: &Root, path: &RelPath) -> Result<(TempFile, tokio::fs::File), String> {
    let mut tmp = root.temp_for(path).map_err(|e| e.to_string())?;
    let f = tmp.file().try_clone().map_err(|e| e.to_string())?;
    Ok((tmp, tokio::fs::File::from_std(f)))
}

/// Verifies a completely received file and renames it into place. Returns its size.
async fn finish(root: &Root, inc: Incoming<'_>) -> Result<u64, String> {
    if let Some(e) = inc.error {
        return Err(e);
    }
    let (tmp, mut f) = inc.sink.ok_or("no temporary file")?;
    let got = Md5(inc.hasher.finalize().into());
    if inc.bytes != inc.want.size || got != inc.want.md5 {
        return Err(format!(
            "content changed while being sent ({} bytes, md5 {got}; announced {} bytes, md5 {})",
            inc.bytes, inc.want.size, inc.want.md5
        ));
    }
    // tokio's File completes writes in the background: wait for the last one.
    f.flush()
        .await
        .map_err(|e| format!("failed to write: {e}"))?;
    drop(f);
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

/// Sends the requested files over a data connection, then closes it. Only files in `offered`
/// (the regular files of the list this client announced) are sent: a server cannot use a
/// request to read anything else, such as a path through a client-side symlink.
pub async fn send<S: AsyncWrite + Unpin>(
    conn: S,
    root: &Root,
    token: u64,
    paths: &[RelPath],
    offered: &HashSet<RelPath>,
) -> Result<Sent, ProtocolError> {
    let mut w = BufWriter::with_capacity(64 << 10, conn);
    protocol::write(&mut w, &Message::DataHello { token }).await?;
    let mut out = Sent::default();
    let mut buf = vec![0u8; CHUNK_SIZE];
    for path in paths {
        protocol::write(&mut w, &Message::FileBegin { path: path.clone() }).await?;
        info!("Sending file: {path}");
        let res = if offered.contains(path) {
            send_one(&mut w, root, path, &mut buf).await?
        } else {
            Err("not a file this client offered".to_string())
        };
        match res {
            Ok(n) => {
                protocol::write(&mut w, &Message::FileEnd).await?;
                out.files += 1;
                out.bytes += n;
            }
            Err(reason) => {
                warn!("failed to send {path}: {reason}");
                protocol::write(
                    &mut w,
                    &Message::FileAbort {
                        reason: reason.clone(),
                    },
                )
                .await?;
                out.failed.push((path.to_string(), reason));
            }
        }
    }
    w.flush().await?;
    w.into_inner().shutdown().await?;
    Ok(out)
}

/// Streams one file's chunks. The outer error is the connection's; the inner one the file's.
async fn send_one<W: AsyncWrite + Unpin>(
    w: &mut W,
    root: &Root,
    path: &RelPath,
    buf: &mut [u8],
) -> Result<Result<u64, String>, ProtocolError> {
    let open = async {
        let p = root.resolve(path).map_err(io::Error::other)?;
        let f = std::fs::File::options()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(p)?;
        io::Result::Ok(tokio::fs::File::from_std(f))
    };
    let mut f = match open.await {
        Ok(f) => f,
        Err(e) => return Ok(Err(format!("failed to open: {e}"))),
    };
    let mut sent = 0u64;
    loop {
        let n = match f.read(buf).await {
            Ok(0) => return Ok(Ok(sent)),
            Ok(n) => n,
            Err(e) => return Ok(Err(format!("failed to read: {e}"))),
        };
        protocol::write_chunk(w, &buf[..n]).await?;
        sent += n as u64;
    }
}
