//! The state database: what two-way sync must remember between runs, in SQLite, one file per
//! side in the state directory (`server.db`, `client.db`): the side's own short ID (it names
//! the conflict copies this side loses), the folders with their mode, the peers each folder
//! has synced with, and per folder and peer the base, one row per path.
//!
//! Every change is one transaction, so a crash leaves the base as it was before the round or
//! as it is after it, never half of it. A round whose base update is lost (the database runs
//! in WAL mode with `synchronous=NORMAL`: a power cut can drop the last commits, never corrupt
//! it) is harmless: where both sides already hold the same thing the merge needs no base, and
//! elsewhere the older base only makes it see changes it will settle again.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, Transaction, params};

use crate::core::hash::{ContentHash, HashAlgorithm};
use crate::core::manifest::{Entry, Kind, Meta, RelPath};
use crate::core::merge::{BaseChange, Side};

/// The schema this build writes (`PRAGMA user_version`).
const SCHEMA: i64 = 1;

const CREATE: &str = "
    CREATE TABLE side (
        only INTEGER PRIMARY KEY CHECK (only = 0),
        side_id TEXT NOT NULL
    );
    CREATE TABLE folders (
        id INTEGER PRIMARY KEY,
        key TEXT NOT NULL UNIQUE,
        mode TEXT NOT NULL
    );
    CREATE TABLE peers (
        folder INTEGER NOT NULL REFERENCES folders(id),
        peer TEXT NOT NULL,
        algorithm INTEGER NOT NULL,
        last_sync INTEGER NOT NULL,
        PRIMARY KEY (folder, peer)
    );
    CREATE TABLE base (
        folder INTEGER NOT NULL,
        peer TEXT NOT NULL,
        path TEXT NOT NULL,
        kind INTEGER NOT NULL,
        size INTEGER,
        hash BLOB,
        target TEXT,
        mode INTEGER NOT NULL,
        mtime_s INTEGER NOT NULL,
        mtime_ns INTEGER NOT NULL,
        PRIMARY KEY (folder, peer, path)
    ) WITHOUT ROWID;
";

/// Row kinds of `base.kind`.
const FILE: i64 = 0;
const DIR: i64 = 1;
const LINK: i64 = 2;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("open the state database {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("use the state database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error(
        "use the state database {path}: it has schema {found}, newer than this build's {SCHEMA}"
    )]
    Newer { path: PathBuf, found: i64 },
    #[error("read the base of {peer}: row for {path:?} is damaged ({what})")]
    Damaged {
        peer: String,
        path: String,
        what: &'static str,
    },
}

/// A folder's row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FolderId(i64);

/// The database file of one side in the state directory.
pub fn db_file(state_dir: &Path, side: Side) -> PathBuf {
    state_dir.join(match side {
        Side::Server => "server.db",
        Side::Client => "client.db",
    })
}

pub struct StateDb {
    conn: Connection,
}

impl StateDb {
    /// Opens (creating it, private, if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<StateDb, DbError> {
        let open = |source| DbError::Open {
            path: path.into(),
            source,
        };
        let created = !path.exists();
        let conn = Connection::open(path).map_err(open)?;
        if created {
            restrict(path);
        }
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(open)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(open)?;
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(open)?;
        match version {
            0 => {
                conn.execute_batch(&format!(
                    "BEGIN; {CREATE} PRAGMA user_version = {SCHEMA}; COMMIT;"
                ))
                .map_err(open)?;
            }
            SCHEMA => {}
            found => {
                return Err(DbError::Newer {
                    path: path.into(),
                    found,
                });
            }
        }
        Ok(StateDb { conn })
    }

    /// This side's short ID, made (seven random base-32 characters) the first time.
    pub fn side_id(&mut self) -> Result<String, DbError> {
        let tx = self.conn.transaction()?;
        let found: Option<String> = tx
            .query_row("SELECT side_id FROM side", [], |r| r.get(0))
            .optional()?;
        let id = match found {
            Some(id) => id,
            None => {
                let id = short_id(crate::process::random_u64());
                tx.execute("INSERT INTO side (only, side_id) VALUES (0, ?1)", [&id])?;
                id
            }
        };
        tx.commit()?;
        Ok(id)
    }

    /// The folder named by `key` (see `cache::dir_key`), recorded with `mode` if new. Returns
    /// its row and the mode it had.
    pub fn folder(&mut self, key: &str, mode: &str) -> Result<(FolderId, String), DbError> {
        self.conn.execute(
            "INSERT INTO folders (key, mode) VALUES (?1, ?2) ON CONFLICT (key) DO NOTHING",
            params![key, mode],
        )?;
        let (id, mode) =
            self.conn
                .query_row("SELECT id, mode FROM folders WHERE key = ?1", [key], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })?;
        Ok((FolderId(id), mode))
    }

    /// Records the folder's mode.
    pub fn set_mode(&mut self, folder: FolderId, mode: &str) -> Result<(), DbError> {
        self.conn.execute(
            "UPDATE folders SET mode = ?2 WHERE id = ?1",
            params![folder.0, mode],
        )?;
        Ok(())
    }

    /// The base `folder` shares with `peer`, in component order: `None` if they never
    /// finished a round, or did with another hash algorithm (its hashes compare with nothing).
    pub fn base(
        &self,
        folder: FolderId,
        peer: &str,
        algorithm: HashAlgorithm,
    ) -> Result<Option<Vec<Entry>>, DbError> {
        let held: Option<i64> = self
            .conn
            .query_row(
                "SELECT algorithm FROM peers WHERE folder = ?1 AND peer = ?2",
                params![folder.0, peer],
                |r| r.get(0),
            )
            .optional()?;
        if held != Some(i64::from(algorithm.id())) {
            return Ok(None);
        }
        let mut stmt = self.conn.prepare(
            "SELECT path, kind, size, hash, target, mode, mtime_s, mtime_ns
             FROM base WHERE folder = ?1 AND peer = ?2",
        )?;
        let mut rows = stmt.query(params![folder.0, peer])?;
        let mut entries = Vec::new();
        while let Some(row) = rows.next()? {
            entries.push(decode(row, peer)?);
        }
        // SQLite orders text by bytes; a list is in component order.
        entries.sort_by(|a: &Entry, b| a.path.cmp(&b.path));
        Ok(Some(entries))
    }

    /// Makes `changes` to the base of `folder` and `peer` in one transaction and records the
    /// round (`now`, seconds since the epoch). `fresh`: the base starts empty (there was none,
    /// or it was of another algorithm or damaged).
    pub fn settle(
        &mut self,
        folder: FolderId,
        peer: &str,
        algorithm: HashAlgorithm,
        (changes, fresh): (&[BaseChange], bool),
        now: i64,
    ) -> Result<(), DbError> {
        let tx = self.conn.transaction()?;
        if fresh {
            tx.execute(
                "DELETE FROM base WHERE folder = ?1 AND peer = ?2",
                params![folder.0, peer],
            )?;
        }
        write_changes(&tx, folder, peer, changes)?;
        tx.execute(
            "INSERT INTO peers (folder, peer, algorithm, last_sync) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (folder, peer) DO UPDATE SET algorithm = ?3, last_sync = ?4",
            params![folder.0, peer, i64::from(algorithm.id()), now],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Forgets everything `folder` shared with `peer`.
    pub fn forget(&mut self, folder: FolderId, peer: &str) -> Result<(), DbError> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "DELETE FROM base WHERE folder = ?1 AND peer = ?2",
            params![folder.0, peer],
        )?;
        tx.execute(
            "DELETE FROM peers WHERE folder = ?1 AND peer = ?2",
            params![folder.0, peer],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// The peers `folder` finished a round with, and when (seconds since the epoch).
    pub fn peers(&self, folder: FolderId) -> Result<Vec<(String, i64)>, DbError> {
        let mut stmt = self
            .conn
            .prepare("SELECT peer, last_sync FROM peers WHERE folder = ?1 ORDER BY peer")?;
        let rows = stmt.query_map([folder.0], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

fn write_changes(
    tx: &Transaction<'_>,
    folder: FolderId,
    peer: &str,
    changes: &[BaseChange],
) -> Result<(), DbError> {
    let mut set = tx.prepare(
        "INSERT OR REPLACE INTO base
         (folder, peer, path, kind, size, hash, target, mode, mtime_s, mtime_ns)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )?;
    let mut remove =
        tx.prepare("DELETE FROM base WHERE folder = ?1 AND peer = ?2 AND path = ?3")?;
    for c in changes {
        match c {
            BaseChange::Set(e) => {
                let (kind, size, hash, target) = match &e.kind {
                    Kind::File { size, hash } => {
                        let mut blob = vec![hash.algorithm().id()];
                        blob.extend_from_slice(hash.digest());
                        (FILE, Some(*size as i64), Some(blob), None)
                    }
                    Kind::Dir => (DIR, None, None, None),
                    Kind::Symlink { target } => (LINK, None, None, Some(target.as_str())),
                    // `settle` never agrees on these.
                    _ => continue,
                };
                set.execute(params![
                    folder.0,
                    peer,
                    e.path.as_str(),
                    kind,
                    size,
                    hash,
                    target,
                    e.meta.mode,
                    e.meta.mtime_secs,
                    e.meta.mtime_nanos
                ])?;
            }
            BaseChange::Remove(p) => {
                remove.execute(params![folder.0, peer, p.as_str()])?;
            }
        }
    }
    Ok(())
}

/// One base row as an entry; a row that does not make one is damage, not a missing base.
fn decode(row: &rusqlite::Row<'_>, peer: &str) -> Result<Entry, DbError> {
    let path: String = row.get(0)?;
    let damaged = |what| DbError::Damaged {
        peer: peer.into(),
        path: path.clone(),
        what,
    };
    let kind = match row.get::<_, i64>(1)? {
        FILE => {
            let size: Option<i64> = row.get(2)?;
            let blob: Option<Vec<u8>> = row.get(3)?;
            let hash = blob.as_deref().and_then(|b| {
                let (&alg, digest) = b.split_first()?;
                ContentHash::new(HashAlgorithm::from_id(alg)?, digest)
            });
            match (size.and_then(|s| u64::try_from(s).ok()), hash) {
                (Some(size), Some(hash)) => Kind::File { size, hash },
                _ => return Err(damaged("file without a size or hash")),
            }
        }
        DIR => Kind::Dir,
        LINK => Kind::Symlink {
            target: row
                .get::<_, Option<String>>(4)?
                .ok_or(damaged("link without a target"))?,
        },
        _ => return Err(damaged("unknown kind")),
    };
    let meta = Meta {
        mode: row.get(5)?,
        mtime_secs: row.get(6)?,
        mtime_nanos: row.get(7)?,
    };
    let path = RelPath::new(path.clone()).map_err(|_| damaged("invalid path"))?;
    Ok(Entry { path, kind, meta })
}

/// Seven characters of base 32 (RFC 4648 alphabet): short enough to read in a file name.
fn short_id(n: u64) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    (0..7)
        .map(|i| ALPHABET[((n >> (5 * i)) & 31) as usize] as char)
        .collect()
}

/// Makes a new database file private: it names the peers and every synced path.
fn restrict(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::merge::settle;
    use crate::core::plan::tests::tree;

    fn db() -> (tempfile::TempDir, StateDb) {
        let dir = tempfile::tempdir().unwrap();
        let db = StateDb::open(&db_file(dir.path(), Side::Server)).unwrap();
        (dir, db)
    }

    #[test]
    fn a_base_is_kept_per_folder_and_peer_and_changed_per_path() {
        let (dir, mut db) = db();
        let (f, mode) = db.folder("k1", "two-way").unwrap();
        assert_eq!(mode, "two-way");
        let (g, _) = db.folder("k2", "two-way").unwrap();
        let alg = HashAlgorithm::Blake3;
        assert_eq!(db.base(f, "peer", alg).unwrap(), None, "no round yet");

        // Component order, not SQLite's byte order: `a/b` before `a.b`.
        let first = tree("d a; f a/b x m=600 t=7; f a.b y; l l target");
        let changes = settle(&[], &first, &[]);
        db.settle(f, "peer", alg, (&changes, true), 100).unwrap();
        assert_eq!(db.base(f, "peer", alg).unwrap().unwrap(), first.entries());
        assert_eq!(db.base(g, "peer", alg).unwrap(), None, "another folder's");
        assert_eq!(db.base(f, "other", alg).unwrap(), None, "another peer's");
        assert_eq!(db.base(f, "peer", HashAlgorithm::Md5).unwrap(), None);

        let second = tree("d a; f a/b x2; f c z");
        let changes = settle(first.entries(), &second, &[]);
        assert_eq!(changes.len(), 4, "{changes:?}");
        db.settle(f, "peer", alg, (&changes, false), 200).unwrap();
        drop(db);
        // Reopened: still there.
        let mut db = StateDb::open(&db_file(dir.path(), Side::Server)).unwrap();
        assert_eq!(db.base(f, "peer", alg).unwrap().unwrap(), second.entries());
        assert_eq!(db.peers(f).unwrap(), vec![("peer".to_string(), 200)]);
        db.forget(f, "peer").unwrap();
        assert_eq!(db.base(f, "peer", alg).unwrap(), None);
    }

    #[test]
    fn the_side_id_is_made_once() {
        let (dir, mut db) = db();
        let id = db.side_id().unwrap();
        assert_eq!(id.len(), 7);
        assert_eq!(db.side_id().unwrap(), id);
        drop(db);
        let mut db = StateDb::open(&db_file(dir.path(), Side::Server)).unwrap();
        assert_eq!(db.side_id().unwrap(), id);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(db_file(dir.path(), Side::Server))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_damaged_row_is_reported_not_taken_for_an_empty_base() {
        let (_dir, mut db) = db();
        let (f, _) = db.folder("k", "two-way").unwrap();
        let alg = HashAlgorithm::Blake3;
        let changes = settle(&[], &tree("f a x"), &[]);
        db.settle(f, "peer", alg, (&changes, true), 1).unwrap();
        db.conn.execute("UPDATE base SET hash = x'00'", []).unwrap();
        let err = db.base(f, "peer", alg).unwrap_err();
        assert!(matches!(err, DbError::Damaged { .. }), "{err}");
        assert!(
            err.to_string().contains("file without a size or hash"),
            "{err}"
        );
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = db_file(dir.path(), Side::Client);
        drop(StateDb::open(&path).unwrap());
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", 99)
            .unwrap();
        let err = StateDb::open(&path).err().unwrap();
        assert!(err.to_string().contains("schema 99"), "{err}");
    }
}

#[cfg(test)]
mod timing {
    use super::*;
    use crate::core::merge::settle;

    /// Not a check: prints what a 100,000-path base costs (`cargo test --release -- --ignored
    /// base_of_100k --nocapture`).
    #[test]
    #[ignore]
    fn base_of_100k() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = StateDb::open(&db_file(dir.path(), Side::Server)).unwrap();
        let (f, _) = db.folder("k", "two-way").unwrap();
        let alg = HashAlgorithm::Blake3;
        let mut entries = Vec::new();
        for d in 0..100u64 {
            let dir = RelPath::new(format!("d{d:03}")).unwrap();
            entries.push(Entry {
                path: dir.clone(),
                kind: Kind::Dir,
                meta: Meta::default(),
            });
            for i in 0..1000 {
                entries.push(Entry {
                    path: dir.join(&format!("file-{i:05}.txt")).unwrap(),
                    kind: Kind::File {
                        size: 1024,
                        hash: alg.of(format!("{d} {i}").as_bytes()),
                    },
                    meta: Meta {
                        mode: 0o644,
                        mtime_secs: 1_700_000_000,
                        mtime_nanos: 5,
                    },
                });
            }
        }
        let m = crate::core::manifest::Manifest::from_entries(entries).unwrap();
        let t = std::time::Instant::now();
        let changes = settle(&[], &m, &[]);
        db.settle(f, "peer", alg, (&changes, true), 1).unwrap();
        eprintln!("initial settle of {} paths: {:?}", m.len(), t.elapsed());
        let t = std::time::Instant::now();
        let base = db.base(f, "peer", alg).unwrap().unwrap();
        eprintln!("base read: {:?} ({} entries)", t.elapsed(), base.len());
        let t = std::time::Instant::now();
        let changes = settle(&base, &m, &[]);
        eprintln!(
            "settle unchanged: {:?} ({} changes)",
            t.elapsed(),
            changes.len()
        );
        let size = std::fs::metadata(db_file(dir.path(), Side::Server))
            .unwrap()
            .len();
        eprintln!("database: {} MiB", size >> 20);
    }
}
