//! server-sync: keeps a server directory an exact, verified mirror of a client directory.
//!
//! The binaries are thin: `server-sync` calls [`server::run`], `client-sync` calls
//! [`client::sync_once`] or [`client::run`]. See ARCHITECTURE.md for the map.

// Layers, arrows pointing down: binaries → server, client → transfer → store, wire → core.
pub mod client;
pub mod core;
pub mod server;
pub mod store;
pub mod transfer;
pub mod wire;

/// Sets up logging to stdout, one line per event: time, level, message. `verbosity` is the
/// number of `-v` minus the number of `-q`; `RUST_LOG`, when set, wins.
pub fn init_logging(verbosity: i8) {
    let level = match verbosity {
        i8::MIN..=-1 => "warn",
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stdout)
        .init();
}

/// Caps glibc's malloc arenas. By default each thread that allocates may get its own arena
/// (up to 8 per core), and memory freed in one is not reused by another: with the runtime's
/// workers, the blocking pool and the hashing threads, that alone can double peak RSS.
pub fn limit_malloc_arenas() {
    // SAFETY: mallopt only sets an allocator parameter; called before other threads start.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Turns on TCP keepalive (first probe after 30 s idle, then every 10 s, 3 tries): a server
/// host that vanished is noticed within about a minute, even by a data connection blocked in
/// a write, which no read timeout covers.
pub fn set_keepalive(sock: &impl std::os::fd::AsRawFd) -> std::io::Result<()> {
    let fd = sock.as_raw_fd();
    for (level, opt, value) in [
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
        (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 30),
        (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 10),
        (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3),
    ] {
        let v: libc::c_int = value;
        // SAFETY: `fd` is an open socket for the call; `v` is a c_int as these options take.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                level,
                opt,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Resolves on the first SIGINT, SIGTERM or SIGHUP. SIGHUP (the terminal or the session
/// going away) is a request to stop like the others: left to its default action it would kill
/// the process mid-transfer and leave a temporary file in DIR until the next start.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("can install a SIGTERM handler");
    let mut hup = signal(SignalKind::hangup()).expect("can install a SIGHUP handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
        _ = hup.recv() => {}
    }
}

/// A number no other session or temporary file in this process uses, and that another
/// process is unlikely to guess. Not a secret: authentication is not this layer's job.
pub(crate) fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish()
}
