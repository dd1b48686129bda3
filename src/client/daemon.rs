//! The client's loop: sync now, then every interval, until told to stop.

use std::future::Future;
use std::time::Duration;

use tracing::{error, info, warn};

use crate::client::live::{self, Ended};
use crate::client::{ClientError, Config, Report, sync_once};
use crate::core::text::Escaped;

/// Mirrors the directory until `shutdown` resolves: watching it (`cfg.watch`), each change
/// sent as it happens and the whole list every `interval`; or, when it cannot be watched,
/// syncing now and then every `interval`. A server that cannot be reached, does not answer or
/// turns the client away (busy, shutting down) is retried with exponential back-off (1 s
/// doubling, up to `interval`); nothing here exits.
pub async fn run(cfg: &Config, interval: Duration, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    if cfg.watch {
        match live::start_watching(cfg) {
            Ok(mut watched) => {
                let watching = watch(cfg, interval, &mut watched, shutdown.as_mut());
                if let Some(why) = watching.await {
                    warn!("{why}; syncing every {} s instead", interval.as_secs());
                } else {
                    info!("client stopped");
                    return;
                }
            }
            Err(e) => warn!(
                "not watching {}: {e}; syncing every {} s instead",
                cfg.root.display(),
                interval.as_secs()
            ),
        }
    }
    poll(cfg, interval, shutdown).await;
}

/// Live sessions, one after another, until `shutdown`; or the reason to poll instead.
async fn watch(
    cfg: &Config,
    interval: Duration,
    watched: &mut tokio::sync::mpsc::UnboundedReceiver<live::Watched>,
    mut shutdown: std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Option<String> {
    let mut backoff = Backoff::new(interval);
    loop {
        let wait = match live::session(cfg, interval, watched, shutdown.as_mut()).await {
            Ok(Ended::Stopped) => return None,
            Ok(Ended::NotLive) => return Some("the server does not keep sessions open".into()),
            Err(ClientError::Watch(e)) => return Some(format!("stopped watching: {e}")),
            Err(e) => {
                let wait = backoff.failed(&e, FIRST_RETRY);
                // A session that had started: the server was there, so it starts over.
                if !e.before_session() {
                    backoff.reset();
                }
                wait
            }
        };
        crate::process::release_freed_memory();
        tokio::select! {
            _ = shutdown.as_mut() => return None,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Syncs now and then every `interval` until `shutdown` resolves.
async fn poll(
    cfg: &Config,
    interval: Duration,
    shutdown: std::pin::Pin<&mut impl Future<Output = ()>>,
) {
    let mut shutdown = shutdown;
    let mut backoff = Backoff::new(interval);
    loop {
        let wait = tokio::select! {
            _ = shutdown.as_mut() => break,
            r = sync_once(cfg) => match r {
                Ok(report) => {
                    backoff.reset();
                    log_report(&report);
                    interval
                }
                Err(e) => backoff.failed(&e, interval),
            },
        };
        // The sync's lists are free by now: do not keep them resident until the next one.
        crate::process::release_freed_memory();
        tokio::select! {
            _ = shutdown.as_mut() => break,
            _ = tokio::time::sleep(wait) => {}
        }
    }
    info!("client stopped");
}

/// The first wait before retrying a server that could not be used.
const FIRST_RETRY: Duration = Duration::from_secs(1);

/// How long to wait after a failed sync: a server that could not be reached, did not answer
/// or turned the client away is retried after 1 s, doubling up to `max`; a failure once the
/// session had started waits `otherwise`.
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    fn new(max: Duration) -> Backoff {
        Backoff {
            next: FIRST_RETRY,
            max,
        }
    }

    fn reset(&mut self) {
        self.next = FIRST_RETRY;
    }

    /// Logs the failure and says how long to wait.
    fn failed(&mut self, e: &ClientError, otherwise: Duration) -> Duration {
        if !e.before_session() {
            error!("sync failed: {e}");
            return otherwise;
        }
        let wait = self.next;
        self.next = (self.next * 2).min(self.max);
        warn!("{e}; retrying in {} s", wait.as_secs());
        wait
    }
}

/// Logs each failed entry and the summary line.
pub fn log_report(report: &Report) {
    for f in report.failures() {
        warn!("not synced: {}: {}", Escaped(&f.path), Escaped(&f.reason));
    }
    info!("{}", report.summary_line());
}
