//! The server's end of a data connection: each requested file into a temporary file beside its
//! target, hashed as it is written, renamed into place only when size and hash match.

use std::collections::HashMap;
use std::io::Read;

use crate::core::hash::{ContentHash, HashAlgorithm};
use crate::core::manifest::RelPath;
use crate::core::manifest::Wanted;
use crate::core::stamp::Stamp;
use crate::events::{Event, EventSink};
use crate::store::cache::Learned;
use crate::store::{Staged, Store};
use crate::transfer::hasher::{Hasher, Piece};
use crate::wire::{BlockingConnection, DataMessage, Failure, ProtocolError, WireMessage};

/// What the server got from one data connection.
#[derive(Debug, Default)]
pub struct Received {
    pub files: u64,
    /// Bytes that crossed the network (holes excluded).
    pub bytes: u64,
    pub failed: Vec<Failure>,
    /// Hashes of the files placed, with the stamp each has in place: the server's hash cache
    /// need not read them again.
    pub learned: Vec<Learned>,
}

impl Received {
    pub fn add(&mut self, other: Received) {
        self.files += other.files;
        self.bytes += other.bytes;
        self.failed.extend(other.failed);
        self.learned.extend(other.learned);
    }
}

/// How much of a received file accumulates before its writeback is started.
const WRITEBACK_STEP: u64 = 8 << 20;

/// A file being received: where it goes, and how far it got.
struct Incoming<'a, T> {
    want: &'a Wanted,
    /// `None` once the file is known to be bad: its remaining data is read and dropped.
    sink: Option<T>,
    hasher: Hasher,
    /// Bytes of the file so far, holes included.
    len: u64,
    /// Bytes that crossed the network.
    sent: u64,
    /// Bytes already handed to writeback.
    flushed: u64,
    /// Whether the file ends in a hole so far (skipped, so not yet part of its length).
    hole_at_end: bool,
    error: Option<String>,
}

impl<T: Staged> Incoming<'_, T> {
    /// Takes `n` more bytes of the file; false (and the file marked bad) past its size.
    fn grow(&mut self, n: u64) -> bool {
        self.len += n;
        if self.len > self.want.size && self.error.is_none() {
            self.error = Some(format!(
                "file grew past the announced {} bytes while being sent",
                self.want.size
            ));
        }
        if self.error.is_some() {
            self.sink = None;
        }
        self.error.is_none()
    }

    fn write(&mut self, data: &[u8]) {
        let Some(t) = self.sink.as_mut() else { return };
        self.hole_at_end = false;
        let written = t.write_all(data).and_then(|()| {
            // Large files: have the kernel start writing back now, so the session's final
            // flush does not wait for the whole file.
            if self.len - self.flushed >= WRITEBACK_STEP {
                t.start_writeback(self.flushed, self.len - self.flushed)?;
                self.flushed = self.len;
            }
            Ok(())
        });
        if let Err(e) = written {
            self.error = Some(format!("failed to write: {e}"));
            self.sink = None;
        }
    }

    /// A hole: left unwritten, so the file stays sparse on this side too.
    fn skip(&mut self, n: u64) {
        let Some(t) = self.sink.as_mut() else { return };
        self.hole_at_end |= n > 0;
        if let Err(e) = t.skip(n) {
            self.error = Some(format!("failed to seek: {e}"));
            self.sink = None;
        }
    }
}

/// Receives the files of one data connection, which may carry only files from `wanted`,
/// each at most once. Returns when the client closes the connection. A file that fails
/// (aborted by the client, changed while being sent, cannot be written) is recorded and the
/// connection goes on; a protocol violation ends it. Set a read timeout on the stream to
/// bound how long a silent client can hold it. `algorithm` is the session's: files announced
/// unhashed are hashed in it, and every hash the client sends must be in it.
pub fn receive<R: Read, S: Store>(
    conn: &mut BlockingConnection<R>,
    store: &S,
    wanted: &[Wanted],
    algorithm: HashAlgorithm,
    events: &dyn EventSink,
) -> Result<Received, ProtocolError> {
    let mut pending: HashMap<&RelPath, &Wanted> = wanted.iter().map(|r| (r.asked(), r)).collect();
    let mut out = Received::default();
    let mut cur: Option<Incoming<S::Staged>> = None;
    // Files of a request come sorted, so directory by directory: each is reached once.
    let mut dirs = S::Dirs::default();
    while let Some(msg) = conn.recv()? {
        match (msg, cur.as_mut()) {
            (DataMessage::FileBegin { path }, None) => {
                let want = pending
                    .remove(&path)
                    .ok_or_else(|| ProtocolError::Unrequested(path.as_str().to_owned()))?;
                cur = Some(begin(store, &mut dirs, want, algorithm));
            }
            (DataMessage::Chunk(data), Some(inc)) => {
                let n = data.len() as u64;
                if inc.grow(n) {
                    inc.sent += n;
                    inc.write(&data);
                    inc.hasher.update(Piece::Data(data));
                }
            }
            (DataMessage::Hole { len }, Some(inc)) => {
                if inc.grow(len) {
                    inc.skip(len);
                    inc.hasher.update(Piece::Zeros(len));
                }
            }
            (DataMessage::FileEnd { hash }, Some(_)) => {
                let inc = cur.take().expect("matched Some");
                let path = inc.want.path.clone();
                let sent = inc.sent;
                match finish(store, inc, hash) {
                    Ok(placed) => {
                        events.emit(Event::FileReceived {
                            path: path.clone(),
                            bytes: placed.len,
                            hash: algorithm,
                        });
                        out.files += 1;
                        out.bytes += sent;
                        out.learned.extend(placed.stamp.map(|stamp| Learned {
                            path: path.as_str().to_owned(),
                            stamp,
                            hash: placed.hash,
                        }));
                    }
                    Err(why) => {
                        out.failed.push(Failure::new(path.as_str(), why.clone()));
                        events.emit(Event::FileRejected { path, reason: why });
                    }
                }
            }
            (DataMessage::FileAbort { reason }, Some(_)) => {
                let inc = cur.take().expect("matched Some");
                let path = inc.want.path.clone();
                out.failed.push(Failure::new(path.as_str(), reason.clone()));
                events.emit(Event::FileNotSent { path, reason });
            }
            (m, None) => return Err(m.unexpected("file-begin")),
            (m, Some(_)) => return Err(m.unexpected("chunk, hole, file-end or file-abort")),
        }
    }
    if let Some(inc) = cur {
        out.failed.push(Failure::new(
            inc.want.path.as_str(),
            "connection closed in the middle of the file",
        ));
    }
    for r in pending.into_values() {
        out.failed.push(Failure::new(
            r.path.as_str(),
            "requested but not sent by the client",
        ));
    }
    Ok(out)
}

fn begin<'a, S: Store>(
    store: &S,
    dirs: &mut S::Dirs,
    want: &'a Wanted,
    algorithm: HashAlgorithm,
) -> Incoming<'a, S::Staged> {
    let (sink, error) = match store.stage(&want.path, dirs) {
        Ok(t) => (Some(t), None),
        Err(e) => (
            None,
            Some(format!("failed to create a temporary file: {e}")),
        ),
    };
    Incoming {
        want,
        sink,
        hasher: Hasher::new(algorithm, want.size),
        len: 0,
        sent: 0,
        flushed: 0,
        hole_at_end: false,
        error,
    }
}

/// A received file, verified and in place.
struct Placed {
    len: u64,
    hash: ContentHash,
    /// Its stamp in place, when the cache may trust it at once (see `Stamp::settled_own_write`).
    stamp: Option<Stamp>,
}

/// Verifies a completely received file and renames it into place. `end_hash` is what the
/// client sent with `FileEnd`: the only hash there is for a file announced unhashed; for the
/// others it must agree with the announced one.
fn finish<S: Store>(
    store: &S,
    mut inc: Incoming<'_, S::Staged>,
    end_hash: Option<ContentHash>,
) -> Result<Placed, String> {
    if let Some(e) = inc.error {
        return Err(e);
    }
    let mut tmp = inc.sink.take().ok_or("no temporary file")?;
    let want = match (inc.want.hash, end_hash) {
        (Some(a), Some(b)) if a != b => {
            return Err(format!(
                "client ended the file with {} {b}, having announced {a}",
                b.algorithm()
            ));
        }
        (Some(h), _) | (None, Some(h)) => h,
        (None, None) => return Err("file announced unhashed was sent without its hash".into()),
    };
    let got = inc.hasher.finish();
    if inc.len != inc.want.size || got != want {
        return Err(format!(
            "content changed while being sent ({} bytes, {} {got}; announced {} bytes, {} {want})",
            inc.len,
            got.algorithm(),
            inc.want.size,
            want.algorithm()
        ));
    }
    // A trailing hole was skipped, not written: the length makes it part of the file. (A
    // staged file starts empty, so one that ends in data has its length already.)
    if inc.hole_at_end {
        tmp.set_len(inc.len)
            .map_err(|e| format!("failed to set the length: {e}"))?;
    }
    tmp.set_meta(&inc.want.meta)
        .map_err(|e| format!("failed to set metadata: {e}"))?;
    let stamp = store
        .commit(tmp, &inc.want.path)
        .map_err(|e| e.to_string())?;
    Ok(Placed {
        len: inc.len,
        hash: got,
        stamp,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::manifest::Meta;
    use crate::events::Recorder;
    use crate::store::root::Root;
    use bytes::Bytes;

    const B3: HashAlgorithm = HashAlgorithm::Blake3;

    /// Receives `content` for a file announced with `announced` and ended with `end_hash`;
    /// checks the outcome: `Ok(())` placed intact, or `Err(reason fragment)` rejected with
    /// nothing placed and no temp file left.
    fn check(
        announced: Option<&[u8]>,
        content: &[u8],
        end_hash: Option<&[u8]>,
        want: Result<(), &str>,
    ) {
        let d = tempfile::tempdir().unwrap();
        let root = Root::new(d.path());
        let path = RelPath::new("f").unwrap();
        let req = Wanted {
            path: path.clone(),
            size: content.len() as u64,
            hash: announced.map(|c| B3.of(c)),
            meta: Meta {
                mode: 0o640,
                ..Meta::default()
            },
            from: None,
        };
        let mut wire = Vec::new();
        for m in [
            DataMessage::FileBegin { path },
            DataMessage::Chunk(Bytes::copy_from_slice(content)),
            DataMessage::FileEnd {
                hash: end_hash.map(|c| B3.of(c)),
            },
        ] {
            m.encode(&mut wire);
        }
        let events = Recorder::new();
        let mut conn = BlockingConnection::new(&wire[..]);
        let got = receive(&mut conn, &root, &[req], B3, &*events).unwrap();
        let names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        match want {
            Ok(()) => {
                assert_eq!((got.files, &got.failed), (1, &vec![]));
                assert_eq!(std::fs::read(d.path().join("f")).unwrap(), content);
                assert!(matches!(events.events()[0], Event::FileReceived { .. }));
            }
            Err(why) => {
                assert_eq!(got.files, 0);
                assert!(
                    got.failed[0].reason.contains(why),
                    "{:?} lacks {why:?}",
                    got.failed
                );
                assert!(names.is_empty(), "left behind: {names:?}");
                assert!(matches!(events.events()[0], Event::FileRejected { .. }));
            }
        }
    }

    #[test]
    fn received_files_are_placed_only_when_verified() {
        // Announced with its hash, which the end may repeat but not contradict.
        check(Some(b"abc"), b"abc", None, Ok(()));
        check(Some(b"abc"), b"abc", Some(b"abc"), Ok(()));
        check(
            Some(b"abc"),
            b"abd",
            None,
            Err("content changed while being sent"),
        );
        check(
            Some(b"abc"),
            b"abc",
            Some(b"xyz"),
            Err("client ended the file with blake3"),
        );
        // Announced unhashed: the hash comes at the end and must match what arrived.
        check(None, b"abc", Some(b"abc"), Ok(()));
        check(
            None,
            b"abc",
            Some(b"abd"),
            Err("content changed while being sent"),
        );
        check(None, b"abc", None, Err("sent without its hash"));
    }

    #[test]
    fn holes_arrive_as_holes() {
        let d = tempfile::tempdir().unwrap();
        let root = Root::new(d.path());
        let path = RelPath::new("sparse").unwrap();
        let size: u64 = 64 << 20;
        let mut whole = vec![0u8; size as usize];
        whole[1 << 20..(1 << 20) + 3].copy_from_slice(b"abc");
        let req = Wanted {
            path: path.clone(),
            size,
            hash: Some(B3.of(&whole)),
            meta: Meta {
                mode: 0o644,
                ..Meta::default()
            },
            from: None,
        };
        let mut wire = Vec::new();
        for m in [
            DataMessage::FileBegin { path },
            DataMessage::Hole { len: 1 << 20 },
            DataMessage::Chunk(Bytes::from_static(b"abc")),
            DataMessage::Hole {
                len: size - (1 << 20) - 3,
            },
            DataMessage::FileEnd { hash: None },
        ] {
            m.encode(&mut wire);
        }
        let events = Recorder::new();
        let got = receive(
            &mut BlockingConnection::new(&wire[..]),
            &root,
            &[req],
            B3,
            &*events,
        )
        .unwrap();
        assert_eq!((got.files, got.bytes, &got.failed), (1, 3, &vec![]));
        let placed = d.path().join("sparse");
        assert_eq!(std::fs::read(&placed).unwrap(), whole);
        use std::os::unix::fs::MetadataExt;
        let allocated = std::fs::metadata(&placed).unwrap().blocks() * 512;
        assert!(
            allocated < 1 << 20,
            "{allocated} bytes allocated for 64 MiB"
        );
    }

    /// A store that is not a directory: what the receiver commits is all it holds. The
    /// receiver is written against `Store`, so it works with any.
    #[derive(Clone, Default)]
    struct Memory(std::sync::Arc<std::sync::Mutex<HashMap<String, Vec<u8>>>>);

    struct MemoryFile {
        data: Vec<u8>,
        pos: usize,
    }

    impl Staged for MemoryFile {
        fn write_all(&mut self, data: &[u8]) -> std::io::Result<()> {
            let end = self.pos + data.len();
            if self.data.len() < end {
                self.data.resize(end, 0);
            }
            self.data[self.pos..end].copy_from_slice(data);
            self.pos = end;
            Ok(())
        }
        fn skip(&mut self, len: u64) -> std::io::Result<()> {
            self.pos += len as usize;
            Ok(())
        }
        fn set_len(&mut self, len: u64) -> std::io::Result<()> {
            self.data.resize(len as usize, 0);
            Ok(())
        }
        fn start_writeback(&mut self, _: u64, _: u64) -> std::io::Result<()> {
            Ok(())
        }
        fn set_meta(&self, _: &Meta) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Store for Memory {
        type Staged = MemoryFile;
        type Dirs = ();
        fn list(
            &self,
            _: Option<std::path::PathBuf>,
            _: crate::store::scan::Options,
        ) -> std::io::Result<crate::store::scan::Scan> {
            Err(std::io::ErrorKind::Unsupported.into())
        }
        fn list_part(
            &self,
            _: &[crate::store::scan::Scope],
            _: Option<std::path::PathBuf>,
            _: crate::store::scan::Options,
        ) -> std::io::Result<crate::store::scan::Scan> {
            Err(std::io::ErrorKind::Unsupported.into())
        }
        fn read(
            &self,
            _: &RelPath,
            _: &mut (),
        ) -> std::io::Result<(std::fs::File, std::fs::Metadata)> {
            Err(std::io::ErrorKind::Unsupported.into())
        }
        fn stage(
            &self,
            _: &RelPath,
            _: &mut (),
        ) -> Result<MemoryFile, crate::store::root::RootError> {
            Ok(MemoryFile {
                data: Vec::new(),
                pos: 0,
            })
        }
        fn commit(
            &self,
            f: MemoryFile,
            rel: &RelPath,
        ) -> Result<Option<Stamp>, crate::store::root::RootError> {
            self.0
                .lock()
                .unwrap()
                .insert(rel.as_str().to_owned(), f.data);
            Ok(None)
        }
        fn apply(
            &self,
            _: &crate::core::plan::Plan,
            _: Option<&crate::core::manifest::Manifest>,
            _: &dyn EventSink,
        ) -> crate::store::apply::Outcome {
            crate::store::apply::Outcome::default()
        }
        fn finish(
            &self,
            _: &crate::core::plan::Plan,
            _: &mut crate::store::apply::Outcome,
            _: &dyn EventSink,
        ) {
        }
        fn set_root_mtime(&self, _: &Meta) -> std::io::Result<()> {
            Ok(())
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn any_store_receives_only_verified_files_under_the_names_wanted() {
        let store = Memory::default();
        let want = |path: &str, content: &[u8]| Wanted {
            path: RelPath::new(path).unwrap(),
            size: content.len() as u64,
            hash: Some(B3.of(content)),
            meta: Meta::default(),
            from: None,
        };
        // A conflict copy: asked for by the name the sender has it under.
        let copy = Wanted {
            from: Some(RelPath::new("d/mine.txt").unwrap()),
            ..want("d/mine.sync-conflict-19700101-000000-C.txt", b"theirs")
        };
        let wanted = [
            want("good", b"hole then data"),
            want("bad", b"promised"),
            copy,
        ];
        let mut wire = Vec::new();
        for m in [
            DataMessage::FileBegin {
                path: RelPath::new("d/mine.txt").unwrap(),
            },
            DataMessage::Chunk(Bytes::from_static(b"theirs")),
            DataMessage::FileEnd { hash: None },
            DataMessage::FileBegin {
                path: RelPath::new("good").unwrap(),
            },
            DataMessage::Hole { len: 0 },
            DataMessage::Chunk(Bytes::from_static(b"hole then data")),
            DataMessage::FileEnd { hash: None },
            DataMessage::FileBegin {
                path: RelPath::new("bad").unwrap(),
            },
            DataMessage::Chunk(Bytes::from_static(b"delivers")),
            DataMessage::FileEnd { hash: None },
        ] {
            m.encode(&mut wire);
        }
        let events = Recorder::new();
        let got = receive(
            &mut BlockingConnection::new(&wire[..]),
            &store,
            &wanted,
            B3,
            &*events,
        )
        .unwrap();
        assert_eq!((got.files, got.failed.len()), (2, 1));
        let held = store.0.lock().unwrap();
        assert_eq!(
            held.get("d/mine.sync-conflict-19700101-000000-C.txt")
                .map(Vec::as_slice),
            Some(&b"theirs"[..]),
            "placed under its own name"
        );
        assert!(
            !held.contains_key("d/mine.txt"),
            "not under the name asked for"
        );
        assert_eq!(
            held.get("good").map(Vec::as_slice),
            Some(&b"hole then data"[..])
        );
        assert!(
            !held.contains_key("bad"),
            "an unverified file was committed"
        );
    }
}
