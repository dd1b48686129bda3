//! The accept loop: admits connections within the caps, turns the rest away with a reason,
//! and shuts down cleanly.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::server::session::{Shared, session};
use crate::server::{BUSY, Config, MAX_TRANSFERS, ServerError, route};
use crate::store::root::Root;
use crate::wire::{Connection, ControlConnection, ControlMessage};

/// How long in-flight sessions may go on after a shutdown signal before they are abandoned.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// The most a connection turned away as busy is kept to deliver the reason.
const REFUSAL_LINGER: Duration = Duration::from_secs(2);

/// One connection counted in `Shared::per_address`, for as long as it is held.
struct AddressSlot {
    shared: Arc<Shared>,
    key: (IpAddr, bool),
}

impl AddressSlot {
    /// Counts a connection from `ip`, unless `max` are already open from there.
    fn take(shared: &Arc<Shared>, ip: IpAddr, is_data: bool, max: usize) -> Option<AddressSlot> {
        let key = (ip, is_data);
        let mut open = shared.per_address.lock().unwrap();
        let n = open.entry(key).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(AddressSlot {
            shared: shared.clone(),
            key,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut open = self.shared.per_address.lock().unwrap();
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// Serves until `shutdown` resolves, then stops accepting, lets in-flight sessions finish
/// (abandoning them after a grace period) and removes any temporary file left.
pub async fn run(
    config: Config,
    control: TcpListener,
    data: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let shared = Arc::new(Shared {
        root: Root::new(&config.root),
        idle: config.idle_timeout,
        handshake: config.handshake_timeout.min(config.idle_timeout),
        keepalive: config.keepalive,
        data_port: data.local_addr().map(|a| a.port()).unwrap_or(0),
        cache_file: config.cache_file.clone(),
        owner_file: config.owner_file.clone(),
        // Beside the record of the client: a list is that client's.
        acked_file: config
            .owner_file
            .as_ref()
            .map(|f| f.with_extension("acked")),
        machine_id: config.machine_id.clone(),
        events: config.events.clone(),
        session: tokio::sync::Mutex::new(()),
        waiting: Mutex::new(HashMap::new()),
        receiving: Mutex::new(HashMap::new()),
        stopping: std::sync::atomic::AtomicBool::new(false),
        stop: tokio::sync::watch::Sender::new(false),
        per_address: Mutex::new(HashMap::new()),
    });
    let control_limit = Arc::new(Semaphore::new(config.max_connections));
    let data_limit = Arc::new(Semaphore::new(config.max_connections * MAX_TRANSFERS));
    // Connections being told they are turned away: bounded too, past it they are just closed.
    let refusing = Arc::new(Semaphore::new(config.max_connections));
    let mut tasks = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, addr, is_data) = tokio::select! {
            _ = &mut shutdown => break,
            r = control.accept() => match r {
                Ok((s, a)) => (s, a, false),
                Err(e) => { accept_failed(e).await; continue; }
            },
            r = data.accept() => match r {
                Ok((s, a)) => (s, a, true),
                Err(e) => { accept_failed(e).await; continue; }
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
        };
        // Every message is flushed when it is due: Nagle's algorithm would hold a small one
        // back until the last is acknowledged, which the peer delays up to 40 ms.
        let _ = stream.set_nodelay(true);
        let limit = if is_data { &data_limit } else { &control_limit };
        let (what, n, per_address) = match is_data {
            true => (
                "data connections",
                config.max_connections * MAX_TRANSFERS,
                config.max_per_address * MAX_TRANSFERS,
            ),
            false => (
                "connections",
                config.max_connections,
                config.max_per_address,
            ),
        };
        let admitted = match limit.clone().try_acquire_owned() {
            Err(_) => Err(format!("already serving {n} {what}")),
            Ok(permit) => AddressSlot::take(&shared, addr.ip(), is_data, per_address)
                .map(|slot| (permit, slot))
                .ok_or_else(|| format!("already {per_address} {what} from {}", addr.ip())),
        };
        let (permit, slot) = match admitted {
            Ok(admitted) => admitted,
            Err(why) => {
                warn!("refusing connection from {addr}: {why}");
                // A client is told why; a data connection has no one reading it.
                if let (false, Ok(permit)) = (is_data, refusing.clone().try_acquire_owned()) {
                    tokio::spawn(async move {
                        turn_away(stream, format!("{BUSY}: {why}, try again later")).await;
                        drop(permit);
                    });
                }
                continue;
            }
        };
        let shared = shared.clone();
        tasks.spawn(async move {
            let _held = (permit, slot);
            if is_data {
                route::route_data(&shared, stream, addr).await;
            } else {
                if let Err(e) = session(&shared, stream, addr).await {
                    warn!("session with {addr} ended: {e}");
                }
                // What the session held (its lists, plan and hashes) is free by now.
                crate::process::release_freed_memory();
            }
        });
    }
    drop((control, data));
    shared.stopping.store(true, Ordering::SeqCst);
    // Live sessions waiting for their client's next batch end now.
    shared.stop.send_replace(true);
    if !tasks.is_empty() {
        info!("shutting down: waiting for {} connection(s)", tasks.len());
        let drain = async { while tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(SHUTDOWN_GRACE, drain).await.is_err() {
            warn!("shutting down: abandoning sessions still in flight");
            for s in shared.receiving.lock().unwrap().values() {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
            tasks.shutdown().await;
        }
    }
    let root = shared.root.clone();
    let cleaned = tokio::task::spawn_blocking(move || root.remove_stale_temps()).await;
    if let Ok(Err(e)) = cleaned {
        warn!("failed to remove temporary files at shutdown: {e}");
    }
    info!("server stopped");
    Ok(())
}

/// Sends a connection turned away the reason, as an `Error` message, then closes it.
async fn turn_away(stream: TcpStream, why: String) {
    let mut conn: ControlConnection<TcpStream> = Connection::new(stream);
    let _ = tokio::time::timeout(REFUSAL_LINGER, async {
        conn.send_now(&ControlMessage::Error(why)).await?;
        conn.shutdown().await?;
        // Read what the client sent (its hello) until it closes: closing with unread data
        // resets the connection, and the reset can destroy the message before it is read.
        let mut stream = conn.into_inner();
        let mut sink = [0u8; 1024];
        while stream.read(&mut sink).await? > 0 {}
        stream.shutdown().await?;
        Ok::<_, crate::wire::ProtocolError>(())
    })
    .await;
}

async fn accept_failed(e: std::io::Error) {
    // Typically out of file descriptors: back off instead of spinning.
    warn!("failed to accept a connection: {e}");
    tokio::time::sleep(Duration::from_millis(100)).await;
}
