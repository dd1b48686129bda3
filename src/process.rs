//! Process plumbing both binaries share: logging, the allocator, signals, socket options and
//! random numbers. No sync logic here.

use std::time::Duration;

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

/// Tunes glibc's malloc for this program. Arenas are capped at 2: by default each thread that
/// allocates may get its own (up to 8 per core), and memory freed in one is not reused by
/// another; with the runtime's workers, the blocking pool and the hashing threads, that alone
/// can double peak RSS. Blocks up to 2 MiB come from the heap, not from `mmap`, and the heap is
/// trimmed only past 32 MiB free: every 256 KiB frame of file data would otherwise be mapped,
/// zero-faulted and unmapped again (measured on a 1 GiB transfer: 13% of the server's CPU and
/// 7% of the wall time). [`release_freed_memory`] gives memory back between sessions.
pub fn limit_malloc_arenas() {
    // SAFETY: mallopt only sets allocator parameters; called before other threads start.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 2 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 32 << 20);
    }
}

/// Hands memory freed since the last call back to the operating system. glibc returns the
/// top of a heap by itself, but not free pages between chunks still in use: after a session
/// that held a large tree, those would stay resident until the next one reuses them.
pub fn release_freed_memory() {
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Turns on TCP keepalive (first probe after 30 s idle, then every 10 s, 3 tries): a peer
/// host that vanished is noticed within about a minute, even by a data connection blocked in
/// a write, which no read timeout covers.
pub fn set_keepalive(sock: impl std::os::fd::AsFd) -> std::io::Result<()> {
    let params = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(30))
        .with_interval(Duration::from_secs(10))
        .with_retries(3);
    socket2::SockRef::from(&sock).set_tcp_keepalive(&params)
}

/// Ticks every `every` (at least 1 ms), the first one `every` from now; a tick missed while
/// the owner was busy is not made up in a burst.
pub fn ticks(every: Duration) -> tokio::time::Interval {
    let every = every.max(Duration::from_millis(1));
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick
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

/// A random number from the operating system: session tokens and temporary names, which
/// another process must not guess. (Not yet a secret: authentication is not this layer's job.)
pub fn random_u64() -> u64 {
    getrandom::u64().expect("the operating system provides random numbers")
}

#[cfg(test)]
mod tests {
    #[test]
    fn keepalive_is_set_on_a_socket() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let s = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        super::set_keepalive(&s).unwrap();
        assert!(socket2::SockRef::from(&s).keepalive().unwrap());
        assert_ne!(super::random_u64(), super::random_u64());
    }
}
