//! The client's loop: sync now, then every interval, until told to stop.

use std::future::Future;
use std::time::Duration;

use tracing::{error, info, warn};

use crate::client::{Config, Report, sync_once};
use crate::core::text::Escaped;

/// Syncs now and then every `interval` until `shutdown` resolves. A server that cannot be
/// reached, does not answer or turns the client away (busy, shutting down) is retried with
/// exponential back-off (1 s doubling, up to `interval`); nothing here exits.
pub async fn run(cfg: &Config, interval: Duration, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    let mut backoff = Duration::from_secs(1);
    loop {
        let wait = tokio::select! {
            _ = &mut shutdown => break,
            r = sync_once(cfg) => match r {
                Ok(report) => {
                    backoff = Duration::from_secs(1);
                    log_report(&report);
                    interval
                }
                Err(e) if e.before_session() => {
                    let wait = backoff;
                    backoff = (backoff * 2).min(interval);
                    warn!("{e}; retrying in {} s", wait.as_secs());
                    wait
                }
                Err(e) => {
                    error!("sync failed: {e}");
                    interval
                }
            },
        };
        // The sync's lists are free by now: do not keep them resident until the next one.
        crate::process::release_freed_memory();
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tokio::time::sleep(wait) => {}
        }
    }
    info!("client stopped");
}

/// Logs each failed entry and the summary line.
pub fn log_report(report: &Report) {
    for f in report.failures() {
        warn!("not synced: {}: {}", Escaped(&f.path), Escaped(&f.reason));
    }
    info!("{}", report.summary_line());
}
