//! The watching daemon's session: one long-lived connection, the first sync as usual, then
//! each change the watcher reports is looked at again and sent as a batch of changes against
//! the list the server holds; every interval, the whole list again (the safety net).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::client::session::{Served, Terms, begin, exchange, scan_tree, send_changes, serve};
use crate::client::{ClientError, Config, Report, log_report};
use crate::core::manifest::{Changes, Entry, Kind, Manifest, Meta, RelPath, Scope, normalise};
use crate::events::Event;
use crate::store::Store;
use crate::store::root::Root;
use crate::store::scan;
use crate::store::watch::{Lost, Seen, WatchError, Watcher};
use crate::wire::{Capabilities, ControlConnection, ControlMessage, ProtocolError, WireMessage};

/// A batch goes once the tree has been quiet this long...
const QUIET: Duration = Duration::from_millis(2);
/// ...or this long after its first change, whichever comes first: a steady stream of changes
/// still goes out in batches.
const MAX_DELAY: Duration = Duration::from_millis(100);
/// A file modified but not yet closed waits until it has not changed for this long: a
/// writer may still be at it.
const WRITING: Duration = Duration::from_millis(50);

/// How a live session ended, when it did not fail.
pub enum Ended {
    /// Told to stop.
    Stopped,
    /// The server does not keep sessions open: poll instead.
    NotLive,
}

/// What the watcher task sends on.
pub type Watched = Result<Vec<Seen>, WatchError>;

/// Watches the client's directory on a task of its own, so that events are drained while
/// batches are served. Fails when the directory cannot be watched at all.
pub fn start_watching(cfg: &Config) -> Result<mpsc::UnboundedReceiver<Watched>, WatchError> {
    let mut watcher = Watcher::new(&cfg.root)?;
    info!(
        "watching {} ({} directories)",
        cfg.root.display(),
        watcher.watched()
    );
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let seen = watcher.next().await;
            let failed = seen.is_err();
            if tx.send(seen).is_err() || failed {
                return;
            }
        }
    });
    Ok(rx)
}

/// Runs one live session until `shutdown`, the server's refusal to keep it open, or an error.
pub async fn session(
    cfg: &Config,
    interval: Duration,
    watched: &mut mpsc::UnboundedReceiver<Watched>,
    shutdown: impl Future<Output = ()>,
) -> Result<Ended, ClientError> {
    tokio::pin!(shutdown);
    let mut dirty = Dirty::default();
    let first = async {
        let (mut conn, terms) = begin(cfg, Capabilities::LIVE).await?;
        // Whatever happened before the first scan is in it.
        drain(watched);
        let (listed, root) = full_round(cfg, &mut conn, terms, &mut dirty, false).await?;
        Ok::<_, ClientError>((conn, terms, listed, root))
    };
    let (mut conn, terms, acknowledged, root_meta) = tokio::select! {
        _ = &mut shutdown => return Ok(Ended::Stopped),
        first = first => first?,
    };
    if !terms.capabilities.has(Capabilities::LIVE) {
        return Ok(Ended::NotLive);
    }
    let mut live = Live {
        cfg,
        terms,
        acknowledged: Arc::new(acknowledged),
        root_meta,
        dirty,
    };
    let mut full_at = Instant::now() + interval;
    let mut ping = crate::process::ticks(cfg.keepalive);
    let mut heard = Instant::now();
    loop {
        let ready = live.dirty.ready_at();
        tokio::select! {
            _ = &mut shutdown => return Ok(Ended::Stopped),
            seen = watched.recv() => live.saw(seen)?,
            m = conn.recv() => {
                heard = Instant::now();
                live.heard(m?)?;
            }
            _ = sleep_until(ready), if ready.is_some() => live.send_changes(&mut conn).await?,
            _ = tokio::time::sleep_until(full_at) => {
                full_at = Instant::now() + interval;
                live.relist(&mut conn).await?;
            }
            _ = tokio::time::sleep_until(heard + cfg.idle_timeout) => {
                return Err(ClientError::Silent(cfg.idle_timeout));
            }
            _ = ping.tick() => conn.send_now(&ControlMessage::Ping).await?,
        }
        if std::mem::take(&mut live.dirty.everything) {
            full_at = Instant::now() + interval;
            live.relist(&mut conn).await?;
        }
    }
}

/// The session's first sync, or a full rescan: the whole list, sent as at the start (a
/// `Relist` first when `again`). Returns the list the server now holds, and the root's
/// metadata sent with it.
async fn full_round(
    cfg: &Config,
    conn: &mut ControlConnection<TcpStream>,
    terms: Terms,
    dirty: &mut Dirty,
    again: bool,
) -> Result<(Manifest, Meta), ClientError> {
    let start = std::time::Instant::now();
    let mut report = Report::default();
    if again {
        conn.send(&ControlMessage::Relist).await?;
    }
    // A full rescan goes whole: the list the server keeps between sessions is not the one it
    // holds in this one.
    let terms = match again {
        true => terms.without_held(),
        false => terms,
    };
    let (listed, root) = scan_tree(cfg, conn, terms.algorithm, &mut report).await?;
    let listed = Arc::new(Manifest::from_entries(listed).expect("a scan lists a tree"));
    let mut asked = Vec::new();
    let lists = (listed.clone(), root);
    let learned = exchange(cfg, conn, terms, lists, &mut report, &mut asked).await?;
    for paths in asked {
        dirty.ask(paths);
    }
    crate::client::session::remember(cfg, terms.algorithm, learned).await;
    report.elapsed = start.elapsed();
    cfg.events.emit(Event::SyncDone);
    log_report(&report);
    let listed = Arc::try_unwrap(listed).unwrap_or_else(|shared| (*shared).clone());
    // The scan's and the transfers' memory is free by now: the session may idle for days.
    crate::process::release_freed_memory();
    Ok((listed, root))
}

/// A live session between batches.
struct Live<'a> {
    cfg: &'a Config,
    terms: Terms,
    /// The list the server holds, as of the last batch it acknowledged.
    acknowledged: Arc<Manifest>,
    /// The root's metadata, as last sent.
    root_meta: Meta,
    dirty: Dirty,
}

impl Live<'_> {
    /// Notes what the watcher saw.
    fn saw(&mut self, seen: Option<Watched>) -> Result<(), ClientError> {
        match seen {
            Some(Ok(seen)) => {
                self.dirty.add(seen, &self.cfg.root);
                match self.dirty.root_gone {
                    true => Err(ClientError::Watch(WatchError::Io(std::io::Error::other(
                        format!("{} was deleted or moved away", self.cfg.root.display()),
                    )))),
                    false => Ok(()),
                }
            }
            Some(Err(e)) => Err(ClientError::Watch(e)),
            None => Err(ClientError::Watch(WatchError::Io(std::io::Error::other(
                "the watcher stopped",
            )))),
        }
    }

    /// A message from the server between batches.
    fn heard(&mut self, m: Option<ControlMessage>) -> Result<(), ClientError> {
        match m {
            None => Err(ClientError::Closed),
            Some(ControlMessage::Ping) => Ok(()),
            Some(ControlMessage::Dirty(paths)) => {
                self.dirty.ask(paths);
                Ok(())
            }
            Some(ControlMessage::Error(e)) => Err(ClientError::Ended(e)),
            Some(m) => Err(m.unexpected("ping or dirty").into()),
        }
    }

    /// The whole list again, in this session.
    async fn relist(&mut self, conn: &mut ControlConnection<TcpStream>) -> Result<(), ClientError> {
        // Anything seen from here on is after the scan began: kept for the next batch.
        self.dirty = Dirty::default();
        let (listed, root) = full_round(self.cfg, conn, self.terms, &mut self.dirty, true).await?;
        self.acknowledged = Arc::new(listed);
        self.root_meta = root;
        Ok(())
    }

    /// Looks again at the paths that changed, and sends what differs from the list the server
    /// holds as one batch; serves it until the server's `SyncDone`.
    async fn send_changes(
        &mut self,
        conn: &mut ControlConnection<TcpStream>,
    ) -> Result<(), ClientError> {
        let start = std::time::Instant::now();
        let Some((marks, _)) = self.dirty.take(Instant::now()) else {
            return Ok(());
        };
        let (changes, root) = self.look_again(marks).await?;
        if changes.is_empty() && root == self.root_meta {
            return Ok(());
        }
        self.root_meta = root;
        Arc::make_mut(&mut self.acknowledged)
            .apply(&changes)
            .expect("changes from a scan keep the list a tree");
        send_changes(conn, &ControlMessage::Changes, &changes, root).await?;
        let mut report = Report::default();
        let mut asked = Vec::new();
        let listed = self.acknowledged.clone();
        let cfg = self.cfg;
        if let Served::WholeList =
            serve(cfg, conn, self.terms, listed, &mut report, &mut asked).await?
        {
            return Err(ProtocolError::Unexpected {
                got: "held",
                expected: "filerequest, hashrequest or sync:done",
            }
            .into());
        }
        for paths in asked {
            self.dirty.ask(paths);
        }
        report.elapsed = start.elapsed();
        cfg.events.emit(Event::SyncDone);
        log_report(&report);
        Ok(())
    }

    /// Lists the marked paths again (each with its parent, whose mtime an entry coming or
    /// going changed) and compares them with the list the server holds.
    async fn look_again(
        &self,
        marks: Vec<(RelPath, Mark)>,
    ) -> Result<(Changes, Meta), ClientError> {
        let acknowledged = self.acknowledged.clone();
        let root = Root::new(&self.cfg.root);
        let alg = self.terms.algorithm;
        let looking = tokio::task::spawn_blocking(move || {
            let mut scopes = Vec::with_capacity(marks.len() * 2);
            for (path, mark) in &marks {
                let was_dir = acknowledged.get(path).is_some_and(|e| e.kind == Kind::Dir);
                scopes.push(Scope {
                    path: path.clone(),
                    deep: mark.deep || !was_dir,
                });
                scopes.extend(path.parent().map(|p| Scope {
                    path: p,
                    deep: false,
                }));
            }
            let scopes = normalise(&scopes);
            let found = root.list_part(&scopes, None, scan::Options::new(alg))?;
            let forced: Vec<RelPath> = marks
                .into_iter()
                .filter(|(_, m)| m.forced)
                .map(|(p, _)| p)
                .collect();
            let changes = compare(&acknowledged, &scopes, found.entries, &forced);
            Ok::<_, std::io::Error>((changes, found.root))
        });
        let (changes, root) = looking
            .await
            .expect("a scan does not panic")
            .map_err(|source| crate::store::DirError::Unreadable {
                path: self.cfg.root.clone(),
                source,
            })?;
        Ok((changes, root))
    }
}

/// What differs between the list the server holds and the entries found again in `scopes`:
/// entries new or changed (and those the server asked for again, whatever they hold) are
/// upserts; what the list holds in a scope that was not found again is removed.
fn compare(
    acknowledged: &Manifest,
    scopes: &[Scope],
    found: Vec<Entry>,
    forced: &[RelPath],
) -> Changes {
    let found = Manifest::from_entries(found.into_iter().filter(|e| {
        // Never synced: a client leaves them out of its list, as a full scan does.
        !matches!(e.kind, Kind::Special { .. })
    }))
    .unwrap_or_default();
    let is_forced = |p: &RelPath| forced.binary_search(p).is_ok();
    let mut changes = Changes::default();
    for s in scopes {
        let (was, now) = match s.deep {
            true => (acknowledged.subtree(&s.path), found.subtree(&s.path)),
            false => (
                acknowledged
                    .get(&s.path)
                    .map(std::slice::from_ref)
                    .unwrap_or_default(),
                found
                    .get(&s.path)
                    .map(std::slice::from_ref)
                    .unwrap_or_default(),
            ),
        };
        let between = Changes::between(was, now);
        changes.upserts.extend(between.upserts);
        changes.removed.extend(between.removed);
        // Sent again whatever they hold: the server asked.
        changes
            .upserts
            .extend(now.iter().filter(|e| is_forced(&e.path)).cloned());
        if now.is_empty() && was.is_empty() && is_forced(&s.path) {
            changes.removed.push(s.path.clone());
        }
    }
    changes.upserts.sort_by(|a, b| a.path.cmp(&b.path));
    changes.upserts.dedup_by(|a, b| a.path == b.path);
    changes.removed.sort();
    changes.removed.dedup();
    changes
}

/// Drops what the watcher has already sent, without waiting: a scan follows.
fn drain(watched: &mut mpsc::UnboundedReceiver<Watched>) {
    while let Ok(Ok(_)) = watched.try_recv() {}
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// How a path is to be looked at again.
#[derive(Clone, Copy, Debug, Default)]
struct Mark {
    /// With what lies below it (a directory that appeared).
    deep: bool,
    /// Its last event was a write not yet closed.
    writing: bool,
    /// The server asked for it: sent whatever it holds.
    forced: bool,
    /// When its last event came.
    at: Option<Instant>,
}

/// The paths that changed since the last batch, and when.
#[derive(Debug, Default)]
struct Dirty {
    marks: BTreeMap<RelPath, Mark>,
    /// When the first and the last of them were seen.
    first: Option<Instant>,
    last: Option<Instant>,
    /// Events were lost, or the server asked for everything: a full rescan is due.
    everything: bool,
    /// The root directory changed.
    root: bool,
    /// The root was deleted or moved away: its watches are gone with it.
    root_gone: bool,
}

impl Dirty {
    fn add(&mut self, seen: Vec<Seen>, root: &std::path::Path) {
        let now = Instant::now();
        for s in seen {
            match s {
                Seen::Path {
                    path,
                    subtree,
                    writing,
                } => {
                    let m = self.marks.entry(path).or_default();
                    m.deep |= subtree;
                    m.writing = writing;
                    m.at = Some(now);
                }
                // The root's metadata goes with every batch.
                Seen::Root => self.root = true,
                Seen::Rescan(lost) => {
                    match lost {
                        Lost::Overflow => warn!(
                            "events were lost (the inotify queue overflowed: raise \
                             fs.inotify.max_queued_events); rescanning {}",
                            root.display()
                        ),
                        Lost::RootGone => {
                            warn!("{} was deleted or moved away; rescanning", root.display())
                        }
                    }
                    self.everything = true;
                }
            }
        }
        if !self.marks.is_empty() || self.root {
            self.first.get_or_insert(now);
            self.last = Some(now);
        }
    }

    /// Paths the server asked for again; an empty list is everything.
    fn ask(&mut self, paths: Vec<RelPath>) {
        if paths.is_empty() {
            self.everything = true;
            return;
        }
        let now = Instant::now();
        for p in paths {
            let m = self.marks.entry(p).or_default();
            m.forced = true;
            m.at.get_or_insert(now);
        }
        self.first.get_or_insert(now);
        self.last = Some(now);
    }

    /// When the next batch is due, if anything is waiting.
    fn ready_at(&self) -> Option<Instant> {
        let (first, last) = (self.first?, self.last?);
        let due = (last + QUIET).min(first + MAX_DELAY);
        // Paths still being written wait until they have settled.
        let settled = self
            .marks
            .values()
            .filter(|m| m.writing)
            .filter_map(|m| m.at)
            .map(|at| at + WRITING)
            .max();
        let all_writing = !self.root && self.marks.values().all(|m| m.writing);
        Some(match (all_writing, settled) {
            (true, Some(s)) => due.max(s.min(first + MAX_DELAY * 10)),
            _ => due,
        })
    }

    /// The marks ready to go (all but files still being written), if any, and whether the
    /// root changed.
    fn take(&mut self, now: Instant) -> Option<(Vec<(RelPath, Mark)>, bool)> {
        let ready = |m: &Mark| !m.writing || m.at.is_none_or(|at| at + WRITING <= now);
        let (go, stay): (Vec<_>, Vec<_>) = std::mem::take(&mut self.marks)
            .into_iter()
            .partition(|(_, m)| ready(m));
        self.marks = stay.into_iter().collect();
        if self.marks.is_empty() {
            self.first = None;
            self.last = None;
        } else {
            self.first = Some(now);
        }
        let root = std::mem::take(&mut self.root);
        (!go.is_empty() || root).then_some((go, root))
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::core::manifest::tests::tree as entries;

    fn paths(spec: &str) -> Vec<RelPath> {
        spec.split(';')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|p| RelPath::new(p).unwrap())
            .collect()
    }

    /// (held, scopes as `PATH` or `PATH/**`, found, forced, expected `+PATH` / `-PATH`).
    #[test]
    fn what_is_sent_is_what_differs_from_the_list_held() {
        let cases: &[(&str, &str, &str, &str, &str)] = &[
            ("f a 1", "b", "f b 2", "", "+b"),
            ("f a 1", "a", "f a 2", "", "+a"),
            ("f a 1", "a", "f a 1", "", ""),
            ("f a 1; f b 2", "a", "", "", "-a"),
            (
                "",
                "n/**",
                "d n; f n/x 1; d n/s; f n/s/y 2",
                "",
                "+n +n/s +n/s/y +n/x",
            ),
            ("d o; f o/x 1; d o/s; f o/s/y 2", "o/**", "", "", "-o"),
            ("d d; f d/x 1", "d/**", "f d 9", "", "+d -d/x"),
            // Asked for again by the server: sent whatever it holds, or removed if absent.
            ("f a 1", "a", "f a 1", "a", "+a"),
            ("", "junk", "", "junk", "-junk"),
        ];
        for &(held, scopes, found, forced, want) in cases {
            let held = Manifest::from_entries(entries(held)).unwrap();
            let scopes: Vec<Scope> = scopes
                .split(';')
                .filter(|s| !s.is_empty())
                .map(|s| Scope {
                    path: RelPath::new(s.trim().trim_end_matches("/**")).unwrap(),
                    deep: s.ends_with("/**"),
                })
                .collect();
            let changes = compare(&held, &scopes, entries(found), &paths(forced));
            let mut got: Vec<String> = changes
                .upserts
                .iter()
                .map(|e| format!("+{}", e.path))
                .chain(changes.removed.iter().map(|p| format!("-{p}")))
                .collect();
            got.sort();
            assert_eq!(got.join(" "), want, "held {held:?}, scopes {scopes:?}");
        }
    }

    #[test]
    fn writes_not_yet_closed_wait_until_they_settle() {
        let mut d = Dirty::default();
        let p = |s| RelPath::new(s).unwrap();
        let seen = |path, writing| Seen::Path {
            path: p(path),
            subtree: false,
            writing,
        };
        d.add(
            vec![seen("closed", false), seen("open", true)],
            Path::new("/x"),
        );
        let now = Instant::now();
        let (ready, _) = d.take(now).unwrap();
        assert_eq!(ready.len(), 1, "{ready:?}");
        assert_eq!(ready[0].0, p("closed"));
        // Still being written: held back, and the next batch is due once it has settled.
        assert!(d.take(now).is_none());
        let due = d.ready_at().unwrap();
        assert!(due >= now + WRITING - Duration::from_millis(1), "{due:?}");
        let (ready, _) = d.take(now + WRITING * 2).unwrap();
        assert_eq!(ready[0].0, p("open"));
    }

    #[test]
    fn an_empty_dirty_from_the_server_is_everything() {
        let mut d = Dirty::default();
        d.ask(Vec::new());
        assert!(d.everything);
    }
}
