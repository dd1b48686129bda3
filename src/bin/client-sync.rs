//! `client-sync DIR`: sends DIR to a `server-sync`, once, or watching it for changes.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgAction, Parser};
use server_sync::client;
use server_sync::core::hash::HashAlgorithm;
use server_sync::core::identity::ClientId;
use server_sync::core::text::Escaped;
use server_sync::store::cache::HashCache;
use server_sync::store::state;

/// Make a `server-sync` mirror DIR: send its file list, answer the server's file requests.
///
/// Without --once, syncs at start, then watches DIR (inotify) and sends each change as it
/// happens over one open session, with a full rescan every --interval seconds as a safety
/// net, until SIGINT, SIGTERM or SIGHUP; a server that cannot be reached or is busy is retried
/// with back-off. Where DIR cannot be watched (a network or FUSE file system, the inotify
/// watch limit reached), or with --no-watch, it syncs every --interval seconds instead.
///
/// A server folder mirrors one client: this client's ID, made on first use, is kept in
/// --state-dir, and a server whose folder mirrors another client refuses it unless told
/// --take-over. A server on this machine refuses a DIR that is its own directory, inside it,
/// or holds it.
///
/// Exit status with --once: 0 the server now mirrors DIR; 1 some entries failed (each is
/// named on stderr), or the server's folder mirrors another client (see --take-over); 2 usage
/// or local error (DIR missing or not a directory, a cache inside DIR, DIR and the server's
/// directory nested, no usable client ID); 3 the server could not be used (unreachable,
/// busy, refused or ended the sync, did not answer, or the connection was lost), so DIR is
/// not known to be mirrored.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Directory to mirror to the server
    dir: PathBuf,
    /// Server host name or address
    #[arg(long, default_value = "localhost")]
    server: String,
    /// Server control port (the data port is learned from the server)
    #[arg(long, default_value_t = 7101)]
    port: u16,
    /// Run one sync and exit with its status
    #[arg(long)]
    once: bool,
    /// Seconds between full rescans when not --once (between syncs with --no-watch)
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    interval: u64,
    /// Do not watch DIR: sync every --interval seconds only
    #[arg(long, conflicts_with = "once")]
    no_watch: bool,
    /// Data connections to run at once
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=8))]
    transfers: u64,
    /// Content hash: blake3, or md5 for the original tool's exact behaviour. MD5 is not
    /// collision-resistant: the server copies content it already holds under the same MD5
    /// instead of transferring it, so two different files with one MD5 (public collision
    /// pairs exist) can leave a wrong copy. [default: blake3]
    #[arg(long, value_name = "ALGORITHM")]
    hash: Option<HashAlgorithm>,
    /// Give up on a server silent for this many seconds (at most 10 before it welcomes us;
    /// a working server says it is alive every 5 s)
    #[arg(long, default_value_t = client::IDLE_TIMEOUT.as_secs(), value_parser = clap::value_parser!(u64).range(1..))]
    idle_timeout: u64,
    /// Keep the hash cache here [default: $XDG_CACHE_HOME/server-sync or ~/.cache/server-sync]
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Hash every file on every sync instead of trusting the hash cache
    #[arg(long, conflicts_with = "cache_dir")]
    no_cache: bool,
    /// Keep this client's ID and the file list the server last acknowledged (a re-sync sends
    /// only what changed since) here [default: $XDG_STATE_HOME/server-sync or
    /// ~/.local/state/server-sync]
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// With --once: make the server's folder mirror DIR even though it mirrors another
    /// client; its contents are replaced by DIR's, and the other client is refused from then on
    #[arg(long, requires = "once")]
    take_over: bool,
    /// More log output (-v debug, -vv trace)
    #[arg(short, long, action = ArgAction::Count, conflicts_with = "quiet")]
    verbose: u8,
    /// Less log output: warnings and errors only
    #[arg(short, long)]
    quiet: bool,
}

fn main() -> ExitCode {
    server_sync::process::limit_malloc_arenas();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("can start the async runtime")
        .block_on(run(Args::parse()))
}

async fn run(args: Args) -> ExitCode {
    server_sync::process::init_logging(if args.quiet { -1 } else { args.verbose as i8 });
    let cache_file = if args.no_cache {
        None
    } else {
        match HashCache::file_for_dir(args.cache_dir.as_deref(), &args.dir) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("client-sync: {e}");
                return ExitCode::from(2);
            }
        }
    };
    let Some(state_dir) = args.state_dir.clone().or_else(state::default_dir) else {
        eprintln!("client-sync: no directory for the client ID: set HOME or use --state-dir");
        return ExitCode::from(2);
    };
    let fresh = ClientId(
        u128::from(server_sync::process::random_u64()) << 64
            | u128::from(server_sync::process::random_u64()),
    );
    let client_id = match state::client_id(&state_dir, fresh) {
        Ok(id) => id,
        Err(e) => {
            eprintln!("client-sync: {e}");
            return ExitCode::from(2);
        }
    };
    let acked_file = match state::acked_file(&state_dir, &args.dir, state::Side::Client) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("client-sync: {e}");
            return ExitCode::from(2);
        }
    };
    let cfg = client::Config {
        cache_file,
        acked_file: Some(acked_file),
        client_id,
        take_over: args.take_over,
        transfers: args.transfers as usize,
        hashes: match args.hash {
            Some(h) => vec![h],
            None => HashAlgorithm::ALL.to_vec(),
        },
        idle_timeout: Duration::from_secs(args.idle_timeout),
        watch: !args.no_watch,
        ..client::Config::new(args.dir, args.server, args.port)
    };
    if !args.once {
        if let Err(e) = server_sync::store::check_dir(&cfg.root) {
            eprintln!("client-sync: {e}");
            return ExitCode::from(2);
        }
        client::run(
            &cfg,
            Duration::from_secs(args.interval),
            server_sync::process::shutdown_signal(),
        )
        .await;
        return ExitCode::SUCCESS;
    }
    match client::sync_once(&cfg).await {
        Ok(report) => {
            let mut named = 0;
            for f in report.failures() {
                eprintln!(
                    "client-sync: not synced: {}: {}",
                    Escaped(&f.path),
                    Escaped(&f.reason)
                );
                named += 1;
            }
            if report.failed_count() > named {
                eprintln!(
                    "client-sync: not synced: {} more (see the server's log)",
                    report.failed_count() - named
                );
            }
            tracing::info!("{}", report.summary_line());
            ExitCode::from(if report.is_clean() { 0 } else { 1 })
        }
        Err(e) => {
            eprintln!("client-sync: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}
