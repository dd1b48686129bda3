//! `server-sync DIR`: keeps DIR an exact mirror of what `client-sync` sends.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgAction, Parser};
use server_sync::server;
use server_sync::store::cache::HashCache;
use server_sync::store::state;

/// Keep DIR an exact, verified mirror of the directory a `client-sync` sends.
///
/// Files the client does not have are deleted; files whose content hash (BLAKE3, or MD5 for a
/// client that asks for it) is already somewhere in DIR are copied locally instead of
/// transferred. Prints `listening control=HOST:PORT
/// data=HOST:PORT` once ready. Exit status: 0 after SIGINT, SIGTERM or SIGHUP, 2 on a bad
/// DIR, a cache or state directory inside it, or a port that cannot be bound.
///
/// DIR mirrors one client: the first to sync it, recorded in --state-dir. Another client is
/// refused unless it runs `client-sync --take-over`. A client on this machine whose directory
/// is DIR, inside it, or holds it is refused.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Directory to keep in sync (created when missing)
    dir: PathBuf,
    /// Address to listen on
    #[arg(long, default_value = "localhost")]
    bind: String,
    /// Control port (0: any free port)
    #[arg(long, default_value_t = 7101)]
    port: u16,
    /// Data port for file contents (0: any free port)
    #[arg(long, default_value_t = 7100)]
    data_port: u16,
    /// Drop a peer that sends nothing for this many seconds
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    idle_timeout: u64,
    /// Most client sessions served at once; more are told the server is busy (each may also
    /// run up to 8 data connections)
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4096))]
    max_connections: u64,
    /// Most connections from one IP address at once; more are told the server is busy
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=4096))]
    max_per_address: u64,
    /// Keep the hash cache here [default: $XDG_CACHE_HOME/server-sync or ~/.cache/server-sync]
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Hash every file on every sync instead of trusting the hash cache
    #[arg(long, conflicts_with = "cache_dir")]
    no_cache: bool,
    /// Keep the record of the client DIR mirrors, and the file list last taken from it (its
    /// re-syncs send only what changed since), here [default: $XDG_STATE_HOME/server-sync
    /// or ~/.local/state/server-sync]
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// More log output (-v debug, -vv trace)
    #[arg(short, long, action = ArgAction::Count, conflicts_with = "quiet")]
    verbose: u8,
    /// Less log output: warnings and errors only
    #[arg(short, long)]
    quiet: bool,
}

fn main() -> ExitCode {
    server_sync::process::limit_malloc_arenas();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("can start the async runtime");
    let code = rt.block_on(run(Args::parse()));
    // The server has already ended and cleaned up its sessions; do not wait on a blocking
    // thread that is still unwinding.
    rt.shutdown_timeout(Duration::from_secs(1));
    code
}

async fn run(args: Args) -> ExitCode {
    server_sync::process::init_logging(if args.quiet { -1 } else { args.verbose as i8 });
    match serve(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Not `{e:#}`: our errors already end with their cause, which the chain would
            // print a second time.
            eprintln!("server-sync: {e}");
            ExitCode::from(2)
        }
    }
}

async fn serve(args: Args) -> anyhow::Result<()> {
    // Checked before DIR is created: a refused setup leaves nothing behind.
    let cache_file = if args.no_cache {
        None
    } else {
        HashCache::file_for_dir(args.cache_dir.as_deref(), &args.dir).map_err(anyhow::Error::msg)?
    };
    let owner_file = match args.state_dir.clone().or_else(state::default_dir) {
        Some(d) => {
            let file = state::owner_file(&d, &args.dir).map_err(anyhow::Error::msg)?;
            // An unreadable record is a setup error, found now rather than at each session.
            if let Some(client) = state::read_owner(&file)? {
                tracing::info!("this folder mirrors client {client}");
            }
            Some(file)
        }
        None => {
            tracing::warn!(
                "no state directory (HOME is not set; see --state-dir): any client is served"
            );
            None
        }
    };
    let root = server::prepare_root(&args.dir)?;
    let (control, data) = server::bind(&args.bind, args.port, args.data_port).await?;
    println!(
        "listening control={} data={}",
        control.local_addr()?,
        data.local_addr()?
    );
    std::io::stdout().flush()?;
    let config = server::Config {
        idle_timeout: Duration::from_secs(args.idle_timeout),
        max_connections: args.max_connections as usize,
        max_per_address: args.max_per_address as usize,
        cache_file,
        owner_file,
        ..server::Config::new(root.path())
    };
    server::run(
        config,
        control,
        data,
        server_sync::process::shutdown_signal(),
    )
    .await?;
    Ok(())
}
