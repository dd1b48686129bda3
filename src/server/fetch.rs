//! Fetching files from the client: requests in batches, each answered on a data connection
//! of its own and received on a thread of its own.

use std::collections::HashMap;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::core::hash::HashAlgorithm;
use crate::core::manifest::Wanted;
use crate::events::Event;
use crate::process::ticks;
use crate::server::session::{SessionError, Shared};
use crate::transfer;
use crate::wire::{BATCH, BlockingConnection, ControlConnection, ControlMessage, ProtocolError};

/// A request batch is closed once its files add up to this much.
const BATCH_BYTES: u64 = 64 << 20;

/// Splits requests into batches: at most `BATCH` files or `BATCH_BYTES` each, and, when
/// there are few, into as many batches as there are transfers, so that all connections work.
/// Batches are made as they are asked for, and the list gives its memory back as it empties:
/// the hashes learnt from the files received grow meanwhile, and need not come on top of it.
pub fn batches(mut requests: Vec<Wanted>, transfers: usize) -> impl Iterator<Item = Vec<Wanted>> {
    let per = requests.len().div_ceil(transfers).clamp(1, BATCH);
    // Taken from the end, in their order.
    requests.reverse();
    std::iter::from_fn(move || {
        let first = requests.pop()?;
        let mut bytes = first.size;
        let mut batch = vec![first];
        while batch.len() < per && bytes < BATCH_BYTES {
            let Some(r) = requests.pop() else { break };
            bytes = bytes.saturating_add(r.size);
            batch.push(r);
        }
        if requests.capacity() > 2 * requests.len() + BATCH {
            requests.shrink_to_fit();
        }
        Some(batch)
    })
}

/// Requests the batches, keeping up to `transfers` of them in flight, each received on its
/// own data connection and thread.
pub async fn fetch(
    shared: &Shared,
    conn: &mut ControlConnection<TcpStream>,
    data: &mut mpsc::Receiver<(u32, TcpStream)>,
    batches: impl Iterator<Item = Vec<Wanted>>,
    (transfers, algorithm): (usize, HashAlgorithm),
) -> Result<transfer::Received, SessionError> {
    let idle = shared.idle;
    let mut total = transfer::Received::default();
    let mut batches = batches.enumerate();
    // Requested, connection not there yet; and being received.
    let mut asked: HashMap<u32, Vec<Wanted>> = HashMap::new();
    let mut running = JoinSet::new();
    let mut registered: HashMap<u32, Receiving> = HashMap::new();
    // The control connection is quiet while files arrive on the data connections: pings tell
    // the client the server is still there. Waiting for a data connection is bounded from
    // the last time one arrived or finished, not from the last ping.
    let mut tick = ticks(shared.keepalive);
    let mut progress = tokio::time::Instant::now();
    loop {
        while asked.len() + running.len() < transfers {
            let Some((id, batch)) = batches.next() else {
                break;
            };
            for r in &batch {
                shared.events.emit(Event::FileRequested {
                    path: r.path.clone(),
                });
            }
            let id = id as u32;
            let paths = batch.iter().map(|r| r.asked().clone()).collect();
            conn.send(&ControlMessage::FileRequest { id, paths })
                .await?;
            asked.insert(id, batch);
        }
        conn.flush().await?;
        if asked.is_empty() && running.is_empty() {
            return Ok(total);
        }
        tokio::select! {
            stream = data.recv(), if !asked.is_empty() => {
                progress = tokio::time::Instant::now();
                let (id, stream) = stream.ok_or(SessionError::NoDataConnection)?;
                let batch = asked
                    .remove(&id)
                    .ok_or_else(|| ProtocolError::Unrequested(format!("data connection {id}")))?;
                let stream = blocking(stream, idle).map_err(ProtocolError::from)?;
                if let Some(r) = Receiving::register(shared, &stream) {
                    registered.insert(id, r);
                }
                let (root, events) = (shared.root.clone(), shared.events.clone());
                running.spawn_blocking(move || {
                    let stream = std::io::BufReader::with_capacity(256 << 10, stream);
                    let mut conn = BlockingConnection::new(stream);
                    (id, transfer::receive(&mut conn, &root, &batch, algorithm, &*events))
                });
            }
            Some(done) = running.join_next(), if !running.is_empty() => {
                progress = tokio::time::Instant::now();
                let (id, got) = done.expect("receive does not panic");
                registered.remove(&id);
                total.add(got?);
            }
            _ = tokio::time::sleep_until(progress + idle), if running.is_empty() => {
                return Err(SessionError::NoDataConnection);
            }
            _ = tick.tick() => conn.send_now(&ControlMessage::Ping).await?,
        }
    }
}

/// Turns a data connection into a blocking socket for its own thread; `idle` becomes the
/// read timeout.
fn blocking(stream: TcpStream, idle: Duration) -> std::io::Result<std::net::TcpStream> {
    let s = stream.into_std()?;
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(idle))?;
    Ok(s)
}

/// Lists a data connection in `Shared::receiving` while it is being received.
struct Receiving<'a> {
    shared: &'a Shared,
    id: u64,
}

impl<'a> Receiving<'a> {
    fn register(shared: &'a Shared, stream: &std::net::TcpStream) -> Option<Receiving<'a>> {
        let id = crate::process::random_u64();
        let clone = stream.try_clone().ok()?;
        shared.receiving.lock().unwrap().insert(id, clone);
        Some(Receiving { shared, id })
    }
}

impl Drop for Receiving<'_> {
    /// Also ends the transfer if it still runs: a session that stops early (an error on
    /// another connection) must not leave a thread receiving for nobody.
    fn drop(&mut self) {
        if let Some(s) = self.shared.receiving.lock().unwrap().remove(&self.id) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::manifest::{Meta, RelPath};

    /// Batch sizes for requests of the given file sizes over `transfers` connections.
    fn check(sizes: &[u64], transfers: usize, expected: &[usize]) {
        let requests = sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| Wanted {
                path: RelPath::new(format!("f{i}")).unwrap(),
                size,
                hash: Some(HashAlgorithm::Blake3.of(b"")),
                meta: Meta::default(),
                from: None,
            })
            .collect();
        let got: Vec<usize> = batches(requests, transfers).map(|b| b.len()).collect();
        assert_eq!(got, expected, "sizes {sizes:?}, {transfers} transfers");
    }

    #[test]
    fn requests_are_batched_by_count_bytes_and_transfers() {
        check(&[], 2, &[]);
        check(&[1], 2, &[1]);
        check(&[1; 5], 1, &[5]);
        check(&[1; 5], 2, &[3, 2]);
        check(&[1; 10], 4, &[3, 3, 3, 1]);
        check(&[1; 1200], 1, &[512, 512, 176]);
        check(&[1; 1200], 2, &[512, 512, 176]);
        // A batch closes once it holds 64 MiB.
        check(&[40 << 20, 40 << 20, 1, 1], 1, &[2, 2]);
        check(&[1 << 30, 1, 1 << 30], 1, &[1, 2]);
    }
}
