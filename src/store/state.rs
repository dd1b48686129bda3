//! What a client or server keeps between runs that is not a cache: the client's identity, the
//! client each served folder mirrors, and the file list both sides last agreed on (the
//! acknowledged list, so that a re-sync sends only what changed since). Also the facts about directories that tell whether
//! two roots are nested: the machine's identifier and a directory's chain of (device, inode).
//!
//! The state directory is `--state-dir`, by default `$XDG_STATE_HOME/server-sync` or
//! `~/.local/state/server-sync`, created private (0700); its files are private (0600) and
//! replaced atomically.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::core::hash::HashAlgorithm;
use crate::core::identity::{ClientId, FileId};
use crate::core::manifest::Entry;
use crate::store::cache::{check_outside, dir_key};
use crate::store::root::TempFile;
use crate::wire::list_file::{self, ListId};

/// The client's identity file, in its state directory.
pub const CLIENT_ID_FILE: &str = "client-id";
/// Where the machine's identifier is looked for, in order.
pub const MACHINE_ID_FILES: [&str; 2] = ["/etc/machine-id", "/var/lib/dbus/machine-id"];

/// Why a state file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("cannot write {what} {path}: {source}")]
    Write {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("cannot use {what} {path}: {why}; remove it to start afresh")]
    Corrupt {
        what: &'static str,
        path: PathBuf,
        why: &'static str,
    },
}

/// The default state directory: `$XDG_STATE_HOME/server-sync` or
/// `~/.local/state/server-sync`; `None` without either variable.
pub fn default_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_STATE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))?;
    Some(base.join("server-sync"))
}

/// This machine's identifier for server-sync, derived from `/etc/machine-id` (else
/// `/var/lib/dbus/machine-id`); `None` when neither holds one.
pub fn machine_id() -> Option<String> {
    machine_id_from(&MACHINE_ID_FILES.map(Path::new))
}

/// The identifier derived from the first non-empty file among `files`. A hash of it, not the
/// machine ID itself, goes over the network: systemd asks that the latter not be exposed, and
/// equality is all the server needs.
pub fn machine_id_from(files: &[&Path]) -> Option<String> {
    files.iter().find_map(|f| {
        let text = fs::read_to_string(f).ok()?;
        let id = text.trim();
        let derived = HashAlgorithm::Blake3.of(format!("server-sync machine {id}").as_bytes());
        (!id.is_empty()).then(|| derived.to_string())
    })
}

/// Where `dir` really is (absolute, symlinks resolved), to name it in a message; as given when
/// that cannot be found.
pub fn real_path(dir: &Path) -> PathBuf {
    fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned())
}

/// Device and inode of `dir` (symlinks resolved), then of each of its ancestors up to `/`.
pub fn dir_chain(dir: &Path) -> io::Result<Vec<FileId>> {
    let real = fs::canonicalize(dir)?;
    real.ancestors()
        .map(|d| {
            let m = fs::metadata(d)?;
            Ok(FileId {
                dev: m.dev(),
                ino: m.ino(),
            })
        })
        .collect()
}

/// The client's identity kept in `state_dir`; on first use, `fresh` is stored and returned.
/// Two clients starting for the first time at once end up with the same one.
pub fn client_id(state_dir: &Path, fresh: ClientId) -> Result<ClientId, StateError> {
    const WHAT: &str = "the client ID";
    let path = state_dir.join(CLIENT_ID_FILE);
    if let Some(id) = read_id(&path, WHAT)? {
        return Ok(id);
    }
    let write = |source| StateError::Write {
        what: WHAT,
        path: path.clone(),
        source,
    };
    make_dir(state_dir).map_err(write)?;
    // Written whole under another name, then linked into place, which fails if another
    // client got there first: the file never exists half-written, and is never replaced.
    let tmp = state_dir.join(format!(".{CLIENT_ID_FILE}.{fresh}"));
    let written = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(format!("{fresh}\n").as_bytes())?;
            f.sync_all()
        });
    let linked = written.and_then(|()| match fs::hard_link(&tmp, &path) {
        // A file system without hard links: rename, which could replace a file made
        // meanwhile, but only on a first run racing another.
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => fs::rename(&tmp, &path),
        linked => linked,
    });
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(fresh),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            read_id(&path, WHAT)?.ok_or_else(|| write(io::ErrorKind::NotFound.into()))
        }
        Err(e) => Err(write(e)),
    }
}

/// The file, in the server's `state_dir`, naming the client that `dir` mirrors: named after
/// `dir` like its hash cache. Refuses a state directory inside `dir`, whose sync would delete
/// the record.
pub fn owner_file(state_dir: &Path, dir: &Path) -> Result<PathBuf, String> {
    check_outside("state", state_dir, dir)?;
    Ok(state_dir.join(format!("{}.client", dir_key(dir))))
}

/// The client the folder whose record is `file` mirrors; `None` when it mirrors none yet.
pub fn read_owner(file: &Path) -> Result<Option<ClientId>, StateError> {
    read_id(file, "the record of the client this folder mirrors")
}

/// Records, atomically, that the folder whose record is `file` mirrors `client`.
pub fn write_owner(file: &Path, client: ClientId) -> Result<(), StateError> {
    let write = |source| StateError::Write {
        what: "the record of the client this folder mirrors",
        path: file.to_owned(),
        source,
    };
    let mut tmp = temp_beside(file).map_err(write)?;
    tmp.file()
        .write_all(format!("{client}\n").as_bytes())
        .and_then(|()| tmp.file().sync_all())
        .map_err(write)?;
    tmp.persist_to(file).map_err(write)?;
    // The rename too: a record lost in a crash would let another client in.
    fs::File::open(file.parent().unwrap_or(Path::new(".")))
        .and_then(|d| d.sync_all())
        .map_err(write)
}

/// Which side keeps an acknowledged list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The last list a server took from the client its `dir` mirrors.
    Server,
    /// The last list of `dir` a server acknowledged. One per directory, whatever the server:
    /// a client that syncs one directory to two servers in turn sends each the whole list
    /// (the lists' IDs tell), which costs time, never correctness.
    Client,
}

/// The file holding the list acknowledged for `dir` on `side`, named after `dir` like its
/// hash cache.
pub fn acked_file(state_dir: &Path, dir: &Path, side: Side) -> Result<PathBuf, String> {
    check_outside("state", state_dir, dir)?;
    let ext = match side {
        Side::Server => "acked",
        Side::Client => "sent",
    };
    Ok(state_dir.join(format!("{}.{ext}", dir_key(dir))))
}

/// The ID of the list in `file` when it is `algorithm`'s and `owner`'s, read from its ends
/// only (the whole file is checked when it is used); `None` when there is none or it is
/// not usable.
pub fn acked_id(file: &Path, algorithm: HashAlgorithm, owner: u128) -> Option<ListId> {
    use std::os::unix::fs::FileExt;
    let f = fs::File::open(file).ok()?;
    let len = f.metadata().ok()?.len();
    let mut head = [0u8; list_file::HEAD_LEN];
    f.read_exact_at(&mut head, 0).ok()?;
    let head = list_file::ListHead::parse(&head)?;
    let mut id = [0u8; list_file::ID_LEN];
    let at = len.checked_sub(list_file::ID_LEN as u64)?;
    f.read_exact_at(&mut id, at).ok()?;
    (head.algorithm == algorithm && head.owner == owner && at >= list_file::HEAD_LEN as u64)
        .then_some(ListId(id))
}

/// An acknowledged list, as read back.
#[derive(Debug, PartialEq, Eq)]
pub struct AckedList {
    pub id: ListId,
    pub entries: Vec<Entry>,
}

/// The list in `file` with its ID, checked whole: `None` when there is none, or it is another
/// algorithm's or owner's, or damaged (then a warning says so: the sync sends the whole list).
pub fn read_acked(file: &Path, algorithm: HashAlgorithm, owner: u128) -> Option<AckedList> {
    let read = fs::File::open(file).and_then(|f| list_file::read_list(f, algorithm, owner));
    usable(file, read).map(|(id, entries)| AckedList { id, entries })
}

/// The list in `file` as its entries' bytes (see `list_file::read_list_bytes`), checked
/// against its ID: for comparing with a new list without decoding either. `None` as for
/// [`read_acked`].
pub fn read_acked_bytes(
    file: &Path,
    algorithm: HashAlgorithm,
    owner: u128,
) -> Option<(ListId, Vec<u8>)> {
    let read = fs::File::open(file).and_then(|f| list_file::read_list_bytes(f, algorithm, owner));
    usable(file, read)
}

/// What was read of the list in `file`, if it can be used: a missing file is no list; any
/// other failure is one too, with a warning.
fn usable<T>(file: &Path, read: io::Result<Option<T>>) -> Option<T> {
    match read {
        Ok(found) => found,
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => {
            tracing::warn!(
                "not using the acknowledged list {}: {e}; sending the whole list",
                file.display()
            );
            None
        }
    }
}

/// Replaces the list in `file` by `entries` (of `algorithm`'s hashes, from `owner`),
/// atomically; returns its ID. Not flushed to disk: a list lost in a crash, or damaged, costs
/// the next sync the whole list, nothing else.
pub fn write_acked(
    file: &Path,
    algorithm: HashAlgorithm,
    owner: u128,
    entries: &[Entry],
) -> Result<ListId, StateError> {
    let staged = stage_acked(file, algorithm, owner, entries)?;
    let id = staged.id;
    staged.persist()?;
    Ok(id)
}

/// A list written beside the file it is to replace, not yet in place (see [`stage_acked`]).
pub struct StagedList {
    pub id: ListId,
    tmp: TempFile,
    file: PathBuf,
}

impl StagedList {
    /// Puts the list in place, atomically.
    pub fn persist(self) -> Result<(), StateError> {
        let file = self.file;
        self.tmp
            .persist_to(&file)
            .map_err(|source| StateError::Write {
                what: "the acknowledged list",
                path: file.clone(),
                source,
            })
    }
}

/// Writes `entries` as [`write_acked`] does, but leaves them beside `file` until
/// [`StagedList::persist`]: so a list can be written while its sync runs, and kept only if it
/// ends well (dropped, it leaves nothing behind).
pub fn stage_acked(
    file: &Path,
    algorithm: HashAlgorithm,
    owner: u128,
    entries: &[Entry],
) -> Result<StagedList, StateError> {
    let write = |source| StateError::Write {
        what: "the acknowledged list",
        path: file.to_owned(),
        source,
    };
    let mut tmp = temp_beside(file).map_err(write)?;
    let out = io::BufWriter::with_capacity(256 << 10, tmp.file());
    let id = list_file::write_list(out, algorithm, owner, entries).map_err(write)?;
    Ok(StagedList {
        id,
        tmp,
        file: file.to_owned(),
    })
}

/// Forgets the list in `file`: the next sync sends the whole list.
pub fn forget_acked(file: &Path) {
    if let Err(e) = fs::remove_file(file)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!("failed to remove {}: {e}", file.display());
    }
}

/// A private temporary file in the directory of the state file `file` (made if missing), to
/// be renamed over it once written.
fn temp_beside(file: &Path) -> io::Result<TempFile> {
    let dir = file.parent().unwrap_or(Path::new("."));
    make_dir(dir)?;
    TempFile::new_in(dir)
}

/// A state directory, private, with its missing parents.
fn make_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// The identity in `path`; `None` when there is no such file.
fn read_id(path: &Path, what: &'static str) -> Result<Option<ClientId>, StateError> {
    match fs::read_to_string(path) {
        Ok(text) => text
            .trim_end_matches('\n')
            .parse()
            .map(Some)
            .map_err(|why| StateError::Corrupt {
                what,
                path: path.to_owned(),
                why,
            }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StateError::Read {
            what,
            path: path.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn the_client_id_is_made_once_private_and_kept() {
        let d = tempfile::tempdir().unwrap();
        let state = d.path().join("a/state");
        let first = client_id(&state, ClientId(1)).unwrap();
        assert_eq!(first, ClientId(1));
        assert_eq!(client_id(&state, ClientId(2)).unwrap(), ClientId(1), "kept");
        assert_eq!(mode(&state), 0o700);
        assert_eq!(mode(&d.path().join("a")), 0o700);
        assert_eq!(mode(&state.join(CLIENT_ID_FILE)), 0o600);
        let names: Vec<_> = fs::read_dir(&state)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [CLIENT_ID_FILE], "no temporary file left");

        fs::write(state.join(CLIENT_ID_FILE), "not an id\n").unwrap();
        let err = client_id(&state, ClientId(3)).unwrap_err().to_string();
        assert!(err.contains("not a client ID"), "{err}");
        assert!(err.contains(CLIENT_ID_FILE), "{err}");
    }

    #[test]
    fn the_owner_record_round_trips_and_is_replaced_atomically() {
        let d = tempfile::tempdir().unwrap();
        let served = d.path().join("served");
        let file = owner_file(&d.path().join("state"), &served).unwrap();
        assert!(file.to_string_lossy().ends_with(".client"));
        assert_eq!(read_owner(&file).unwrap(), None);
        write_owner(&file, ClientId(7)).unwrap();
        assert_eq!(read_owner(&file).unwrap(), Some(ClientId(7)));
        write_owner(&file, ClientId(8)).unwrap();
        assert_eq!(read_owner(&file).unwrap(), Some(ClientId(8)));
        assert_eq!(mode(&file), 0o600);
        assert_eq!(fs::read_dir(file.parent().unwrap()).unwrap().count(), 1);
        // Another served directory has its own record; a state directory inside it is refused.
        let other = d.path().join("other");
        assert_ne!(owner_file(&d.path().join("state"), &other).unwrap(), file);
        assert!(owner_file(&served.join("state"), &served).is_err());
    }

    #[test]
    fn the_acknowledged_list_round_trips_and_damage_is_not_used() {
        let d = tempfile::tempdir().unwrap();
        let served = d.path().join("served");
        let state = d.path().join("state");
        let file = acked_file(&state, &served, Side::Server).unwrap();
        let theirs = acked_file(&state, &served, Side::Client).unwrap();
        assert_ne!(file, theirs);
        assert_eq!(
            file,
            owner_file(&state, &served).unwrap().with_extension("acked")
        );
        assert!(acked_file(&served.join("s"), &served, Side::Server).is_err());
        let b3 = HashAlgorithm::Blake3;
        assert_eq!(acked_id(&file, b3, 1), None);
        assert_eq!(read_acked(&file, b3, 1), None);
        let entries = crate::core::manifest::tests::tree("d a; f a/x 1; f b 2");
        let id = write_acked(&file, b3, 1, &entries).unwrap();
        assert_eq!(acked_id(&file, b3, 1), Some(id));
        assert_eq!(
            read_acked(&file, b3, 1),
            Some(AckedList {
                id,
                entries: entries.clone()
            })
        );
        assert_eq!(acked_id(&file, b3, 2), None, "another owner's");
        assert_eq!(
            acked_id(&file, HashAlgorithm::Md5, 1),
            None,
            "another hash's"
        );
        assert_eq!(mode(&file), 0o600);
        // Damaged: its ID still reads, but the list is not used.
        let mut bytes = fs::read(&file).unwrap();
        bytes[list_file::HEAD_LEN + 6] ^= 1;
        fs::write(&file, &bytes).unwrap();
        assert_eq!(acked_id(&file, b3, 1), Some(id));
        assert_eq!(read_acked(&file, b3, 1), None);
        forget_acked(&file);
        assert_eq!(acked_id(&file, b3, 1), None);
    }

    #[test]
    fn the_chain_runs_from_the_directory_to_the_root_through_symlinks() {
        let d = tempfile::tempdir().unwrap();
        let inner = d.path().join("x/y");
        fs::create_dir_all(&inner).unwrap();
        std::os::unix::fs::symlink(&inner, d.path().join("link")).unwrap();
        let chain = dir_chain(&inner).unwrap();
        assert_eq!(dir_chain(&d.path().join("link")).unwrap(), chain);
        assert_eq!(dir_chain(&d.path().join("x")).unwrap(), chain[1..]);
        let root = fs::metadata("/").unwrap();
        let last = chain.last().unwrap();
        assert_eq!((last.dev, last.ino), (root.dev(), root.ino()));
    }

    #[test]
    fn the_machine_id_is_the_first_non_empty_file() {
        let d = tempfile::tempdir().unwrap();
        let (empty, full) = (d.path().join("empty"), d.path().join("full"));
        fs::write(&empty, "\n").unwrap();
        fs::write(&full, "abc123\n").unwrap();
        let missing = d.path().join("missing");
        let id = machine_id_from(&[&missing, &empty, &full]).unwrap();
        assert_eq!(machine_id_from(&[&full]).unwrap(), id, "the same each time");
        assert!(
            !id.contains("abc123"),
            "derived, not the machine ID itself: {id}"
        );
        fs::write(&empty, "abc124\n").unwrap();
        assert_ne!(machine_id_from(&[&empty]).unwrap(), id);
        assert_eq!(machine_id_from(&[&missing]), None);
    }
}
