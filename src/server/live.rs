//! A live session after its first sync: the client's batches of changes, each planned over
//! the paths it names, and the server's own directory watched for changes made behind the
//! mirror's back (in mirror mode the client is the source of truth: such a path is asked for
//! again with `Dirty`, and the client's answer puts it back).

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::core::hash::ContentHash;
use crate::core::manifest::{Changes, Entry, Kind, Manifest, Meta, RelPath, Scope, find_sorted};
use crate::server::MAX_ENTRIES;
use crate::server::session::{
    Acked, SessionError, Shared, Terms, admit, check_algorithm, done, keep_later, keepalive, lists,
    read_changes, round, wait_turn,
};
use crate::store::Store;
use crate::store::scan;
use crate::store::watch::{Seen, Watcher};

use crate::wire::{BATCH, Capabilities, ControlConnection, ControlMessage, WireMessage};

/// How long the server's own directory must be quiet before the paths that changed in it are
/// looked at: its own writes come in bursts, and each is checked once.
const SETTLE: Duration = Duration::from_millis(20);

/// Serves a live session until the client closes it (or it fails). A session without
/// `LIVE` just waits for the client to close.
pub async fn serve(
    shared: &Shared,
    conn: &mut ControlConnection<TcpStream>,
    data: &mut mpsc::Receiver<(u32, TcpStream)>,
    terms: Terms,
    (held, watched): (Manifest, Option<Watched>),
) -> Result<(), SessionError> {
    let live = terms.capabilities.has(Capabilities::LIVE);
    let mut session = Live {
        shared,
        terms,
        held,
        root_meta: None,
        watcher: watched,
        changed: BTreeSet::new(),
        everything: false,
        quiet_at: None,
    };
    let mut tick = crate::process::ticks(shared.keepalive);
    let mut stop = shared.stop.subscribe();
    loop {
        let settle = session.quiet_at;
        if *stop.borrow_and_update() {
            return Err(SessionError::ShuttingDown);
        }
        tokio::select! {
            _ = stop.changed() => {}
            m = conn.recv() => match m? {
                None => return Ok(()),
                Some(ControlMessage::Ping) => {}
                Some(ControlMessage::Changes) if live => session.changes(conn, data).await?,
                Some(ControlMessage::Relist) if live => session.relist(conn, data).await?,
                Some(m) => return Err(m.unexpected("the end of the session").into()),
            },
            seen = next_seen(&mut session.watcher) => session.saw(seen),
            _ = sleep_until(settle), if settle.is_some() => session.ask_again(conn).await?,
            _ = tick.tick(), if live => conn.send_now(&ControlMessage::Ping).await?,
        }
    }
}

/// What the server's watcher saw, batch by batch, from a task of its own.
pub type Watched = mpsc::UnboundedReceiver<Vec<Seen>>;

/// Watches the server's directory from now on, on a task of its own (so that nothing is lost
/// while a batch is served), or says why not: the session goes on without (changes made here
/// behind the mirror's back then wait for the client's next full rescan). Started before the
/// session's first scan, so that no change made after it goes unseen.
pub fn start_watching(shared: &Shared) -> Option<Watched> {
    let mut watcher = match Watcher::new(shared.root.path()) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(
                "not watching {} for changes made behind the mirror's back: {e}",
                shared.root.path().display()
            );
            return None;
        }
    };
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match watcher.next().await {
                Ok(seen) => {
                    if tx.send(seen).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!("stopped watching the server directory: {e}");
                    return;
                }
            }
        }
    });
    Some(rx)
}

/// The watcher's next batch, or never when there is none.
async fn next_seen(watched: &mut Option<Watched>) -> Option<Vec<Seen>> {
    match watched {
        Some(rx) => {
            let seen = rx.recv().await;
            if seen.is_none() {
                *watched = None;
            }
            seen
        }
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// What a live session holds between batches.
struct Live<'a> {
    shared: &'a Shared,
    terms: Terms,
    /// The client's list, as of its last batch: what the mirror must hold.
    held: Manifest,
    /// The client's root metadata, as of its last batch.
    root_meta: Option<Meta>,
    watcher: Option<Watched>,
    /// Paths the server's watcher named since they were last looked at.
    changed: BTreeSet<RelPath>,
    /// Events were lost on the server's side: everything must be looked at.
    everything: bool,
    /// When the changed paths are looked at: once the directory has been quiet a moment.
    quiet_at: Option<Instant>,
}

impl Live<'_> {
    /// One batch of changes: read, applied to the list held, planned over the paths it names.
    async fn changes(
        &mut self,
        conn: &mut ControlConnection<TcpStream>,
        data: &mut mpsc::Receiver<(u32, TcpStream)>,
    ) -> Result<(), SessionError> {
        let (changes, root_meta) = read_changes(conn, self.shared.idle).await?;
        check_algorithm(&changes.upserts, self.terms.algorithm)?;
        // In component order, as a client sends them, so that each is found by a search.
        let mut changes = changes;
        if !changes.upserts.is_sorted_by(|a, b| a.path < b.path) {
            changes.upserts.sort_by(|a, b| a.path.cmp(&b.path));
        }
        let _turn = turn(self.shared, conn, self.terms).await?;
        // A directory that stays one is looked at alone; anything else with what lies below.
        let scopes: Vec<Scope> = changes
            .paths()
            .into_iter()
            .map(|path| {
                let stays_dir = self.held.get(&path).is_some_and(|e| e.kind == Kind::Dir)
                    && find_sorted(&changes.upserts, &path).is_some_and(|u| u.kind == Kind::Dir);
                Scope {
                    path,
                    deep: !stays_dir,
                }
            })
            .collect();
        // Files the mirror holds with content the batch needs are looked at too, wherever they
        // are: the plan copies from them instead of fetching (the seed's local copy).
        let mut scopes = scopes;
        scopes.extend(content_sources(&self.held, &changes));
        // A directory gone from the client's side is scanned whole here, where its files may
        // be moved rather than fetched: the hash cache spares reading them. (Loading the cache
        // costs more than hashing the few files of an ordinary batch.)
        let dir_gone = changes
            .removed
            .iter()
            .any(|r| self.held.get(r).is_some_and(|e| e.kind == Kind::Dir));
        self.held.apply(&changes)?;
        if self.held.len() > MAX_ENTRIES {
            return Err(SessionError::TooManyEntries);
        }
        self.root_meta = root_meta.or(self.root_meta);
        let server = self.list_part(conn, scopes.clone(), dir_gone).await?;
        // A directory of the client's that is not one here must be made whole.
        let scopes: Vec<Scope> = scopes
            .into_iter()
            .map(|s| Scope {
                deep: s.deep || !server.get(&s.path).is_some_and(|e| e.kind == Kind::Dir),
                path: s.path,
            })
            .collect();
        let client = self.held.part(&scopes);
        let lists = (client, server, self.root_meta);
        let (summary, _) = round(self.shared, conn, data, self.terms, lists).await?;
        done(self.shared, conn, self.terms, summary).await
    }

    /// The client's whole list again (its periodic full rescan): a full sync, as at the start.
    async fn relist(
        &mut self,
        conn: &mut ControlConnection<TcpStream>,
        data: &mut mpsc::Receiver<(u32, TcpStream)>,
    ) -> Result<(), SessionError> {
        let _turn = turn(self.shared, conn, self.terms).await?;
        // The whole list, kept again for the client's next session.
        let acked = Acked::whole(self.shared, self.terms);
        let lists = lists(self.shared, conn, self.terms, acked).await?;
        self.root_meta = lists.root;
        let keep_after = lists.keep_after.clone();
        let (summary, held) = round(self.shared, conn, data, self.terms, lists.planned()).await?;
        // Everything was just looked at.
        self.changed.clear();
        self.everything = false;
        done(self.shared, conn, self.terms, summary).await?;
        self.held = keep_later(self.shared, conn, self.terms, keep_after, held).await;
        crate::process::release_freed_memory();
        Ok(())
    }

    /// Lists the scopes on the server's side (through the hash cache with `use_cache`),
    /// pinging the client meanwhile.
    async fn list_part(
        &self,
        conn: &mut ControlConnection<TcpStream>,
        scopes: Vec<Scope>,
        use_cache: bool,
    ) -> Result<Manifest, SessionError> {
        let root = self.shared.root.clone();
        let opts = scan::Options {
            read_own: true,
            ..scan::Options::new(self.terms.algorithm)
        };
        let cache_file = self.shared.cache_file.clone().filter(|_| use_cache);
        let scanning =
            tokio::task::spawn_blocking(move || root.list_part(&scopes, cache_file, opts));
        let scan = keepalive(self.shared.keepalive, conn, scanning)
            .await
            .expect("scan does not panic")
            .map_err(SessionError::Scan)?;
        Ok(Manifest::from_entries(scan.entries)?)
    }

    /// Notes what the server's watcher saw; it is looked at once the directory is quiet.
    fn saw(&mut self, seen: Option<Vec<Seen>>) {
        for s in seen.into_iter().flatten() {
            match s {
                Seen::Path { path, .. } => {
                    self.changed.insert(path);
                }
                Seen::Root => {}
                Seen::Rescan(lost) => {
                    tracing::warn!(
                        "events of the server directory were lost ({lost:?}): asking the client for its whole list"
                    );
                    self.everything = true;
                }
            }
        }
        if !self.changed.is_empty() || self.everything {
            self.quiet_at = Some(Instant::now() + SETTLE);
        }
    }

    /// Looks at the paths the watcher named: those that no longer hold what the client
    /// listed are asked for again (the server's own writes, which do, are not).
    async fn ask_again(
        &mut self,
        conn: &mut ControlConnection<TcpStream>,
    ) -> Result<(), SessionError> {
        self.quiet_at = None;
        if std::mem::take(&mut self.everything) {
            self.changed.clear();
            // An empty `Dirty`: everything.
            return Ok(conn.send_now(&ControlMessage::Dirty(Vec::new())).await?);
        }
        let paths: Vec<RelPath> = std::mem::take(&mut self.changed).into_iter().collect();
        let scopes: Vec<Scope> = paths
            .iter()
            .map(|p| Scope {
                path: p.clone(),
                deep: false,
            })
            .collect();
        let root = self.shared.root.clone();
        // Sizes and times are enough to tell: nothing is read.
        let opts = scan::Options {
            read_own: true,
            defer_above: Some(0),
            ..scan::Options::new(self.terms.algorithm)
        };
        let scan = tokio::task::spawn_blocking(move || root.list_part(&scopes, None, opts))
            .await
            .expect("scan does not panic")
            .map_err(SessionError::Scan)?;
        let here = Manifest::from_entries(scan.entries)?;
        let differ: Vec<RelPath> = paths
            .into_iter()
            .filter(|p| !same_shape(self.held.get(p), here.get(p)))
            .collect();
        for batch in differ.chunks(BATCH) {
            conn.send(&ControlMessage::Dirty(batch.to_vec())).await?;
        }
        Ok(conn.flush().await?)
    }
}

/// Paths of the list `held` (what the mirror holds) with the content of a file that `changes`
/// add or change, one per content: a part of the tree planned alone would not see them.
fn content_sources(held: &Manifest, changes: &Changes) -> Vec<Scope> {
    let mut wanted: HashSet<ContentHash> = changes.upserts.iter().filter_map(Entry::hash).collect();
    if wanted.is_empty() {
        return Vec::new();
    }
    let mut sources = Vec::new();
    for e in held.iter() {
        if let Some(h) = e.hash()
            && wanted.remove(&h)
        {
            sources.push(Scope {
                path: e.path.clone(),
                deep: false,
            });
            if wanted.is_empty() {
                break;
            }
        }
    }
    sources
}

/// Waits for this session's turn for one batch, and checks that the folder still mirrors
/// this client (another may have taken it over meanwhile).
async fn turn<'s>(
    shared: &'s Shared,
    conn: &mut ControlConnection<TcpStream>,
    terms: Terms,
) -> Result<tokio::sync::MutexGuard<'s, ()>, SessionError> {
    let turn = wait_turn(shared, conn, terms.addr).await?;
    admit(
        shared,
        Terms {
            take_over: false,
            ..terms
        },
    )?;
    Ok(turn)
}

/// Whether what the server has at a path (listed without hashes) matches what the client
/// listed there, by kind, size, target and metadata.
fn same_shape(client: Option<&Entry>, server: Option<&Entry>) -> bool {
    let (c, s) = match (client, server) {
        (None, None) => return true,
        (Some(c), Some(s)) => (c, s),
        _ => return false,
    };
    let size = |k: &Kind| match *k {
        Kind::File { size, .. } | Kind::Unhashed { size } => Some(size),
        _ => None,
    };
    match (&c.kind, &s.kind) {
        (Kind::Dir, Kind::Dir) => c.meta == s.meta,
        (Kind::Symlink { target: a }, Kind::Symlink { target: b }) => {
            a == b
                && (c.meta.mtime_secs, c.meta.mtime_nanos)
                    == (s.meta.mtime_secs, s.meta.mtime_nanos)
        }
        // What the client could not read is left as it is here.
        (Kind::Unreadable { .. }, _) => true,
        (a, b) => size(a).is_some() && size(a) == size(b) && c.meta == s.meta,
    }
}
