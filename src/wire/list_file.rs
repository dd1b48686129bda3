//! The byte layout of an acknowledged list: the file list a server last took from a client,
//! kept by both sides (each in its own state directory) so that the next sync sends only what
//! changed since ([`ListId`] names it on the wire).
//!
//! Layout: a magic, the algorithm of the hashes, the owner (the client the list is from, on
//! the server's side; 0 on the client's), the number of entries, then blocks of at most
//! [`BATCH`] entries (a length, then the entries as a `FileList` carries them), then the
//! list's ID. The ID is the BLAKE3 of the entries' encodings, one after the other, whatever
//! the blocks: two sides holding lists with equal IDs hold equal lists, and a damaged file is
//! one whose entries no longer hash to the ID at its end.

use std::fmt;
use std::io::{self, Read, Write};

use crate::core::hash::HashAlgorithm;
use crate::core::manifest::Entry;
use crate::wire::BATCH;
use crate::wire::codec::{Reader, Writer};

const MAGIC: &[u8; 8] = b"SSACKED1";
/// Magic, algorithm, owner, count.
pub const HEAD_LEN: usize = 8 + 1 + 16 + 8;
pub const ID_LEN: usize = 32;
/// A block larger than this is damage (512 entries of at most a few KiB each).
const MAX_BLOCK: usize = 8 << 20;

/// What names a file list: the BLAKE3 of its entries' encodings, in order.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ListId(pub [u8; ID_LEN]);

impl fmt::Display for ListId {
    /// The first 8 bytes in hex: enough to tell lists apart in a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ListId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ListId({self})")
    }
}

/// Computes a [`ListId`] entry by entry.
pub struct ListIdHasher {
    sum: blake3::Hasher,
    buf: Vec<u8>,
}

impl Default for ListIdHasher {
    fn default() -> Self {
        ListIdHasher {
            sum: blake3::Hasher::new(),
            buf: Vec::with_capacity(64 << 10),
        }
    }
}

impl ListIdHasher {
    pub fn push(&mut self, e: &Entry) {
        Writer(&mut self.buf).entry(e);
        if self.buf.len() >= 60 << 10 {
            self.sum.update(&self.buf);
            self.buf.clear();
        }
    }

    pub fn finish(mut self) -> ListId {
        self.sum.update(&self.buf);
        ListId(*self.sum.finalize().as_bytes())
    }
}

/// The ID of `entries`, in the order given.
pub fn list_id<'a>(entries: impl IntoIterator<Item = &'a Entry>) -> ListId {
    let mut h = ListIdHasher::default();
    for e in entries {
        h.push(e);
    }
    h.finish()
}

/// What the head of a list file says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListHead {
    pub algorithm: HashAlgorithm,
    pub owner: u128,
    pub count: u64,
}

impl ListHead {
    /// Reads a file's first [`HEAD_LEN`] bytes; `None` when they are not a list file's.
    pub fn parse(head: &[u8; HEAD_LEN]) -> Option<ListHead> {
        let mut r = Reader { buf: &head[..] };
        if r.take(MAGIC.len()).ok()? != MAGIC {
            return None;
        }
        Some(ListHead {
            algorithm: HashAlgorithm::from_id(r.u8().ok()?)?,
            owner: r.u128().ok()?,
            count: r.u64().ok()?,
        })
    }
}

/// Writes `entries` as a list file of `algorithm`'s hashes from `owner`; returns its ID.
pub fn write_list<W: Write>(
    mut out: W,
    algorithm: HashAlgorithm,
    owner: u128,
    entries: &[Entry],
) -> io::Result<ListId> {
    let mut buf = Vec::with_capacity(HEAD_LEN);
    buf.extend_from_slice(MAGIC);
    let mut w = Writer(&mut buf);
    w.u8(algorithm.id());
    w.u128(owner);
    w.u64(entries.len() as u64);
    out.write_all(&buf)?;
    let mut sum = blake3::Hasher::new();
    for block in entries.chunks(BATCH) {
        buf.clear();
        let mut w = Writer(&mut buf);
        w.u32(0);
        for e in block {
            w.entry(e);
        }
        sum.update(&buf[4..]);
        let len = (buf.len() - 4) as u32;
        buf[..4].copy_from_slice(&len.to_be_bytes());
        out.write_all(&buf)?;
    }
    let id = ListId(*sum.finalize().as_bytes());
    out.write_all(&id.0)?;
    out.flush()?;
    Ok(id)
}

fn damaged(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("acknowledged list: {what}"),
    )
}

/// Reads a whole list file and checks it: of `algorithm`'s hashes, from `owner`, every entry
/// well formed, the ID at its end the one its entries hash to. `Ok(None)` when it is another
/// algorithm's or owner's; an error of kind `InvalidData` when it is damaged.
pub fn read_list<R: Read>(
    mut r: R,
    algorithm: HashAlgorithm,
    owner: u128,
) -> io::Result<Option<(ListId, Vec<Entry>)>> {
    let mut head = [0u8; HEAD_LEN];
    r.read_exact(&mut head)?;
    let head = ListHead::parse(&head).ok_or_else(|| damaged("not a list file"))?;
    if head.algorithm != algorithm || head.owner != owner {
        return Ok(None);
    }
    let mut sum = blake3::Hasher::new();
    let mut entries = Vec::with_capacity(head.count.min(10_000_000) as usize);
    let mut block = Vec::new();
    while (entries.len() as u64) < head.count {
        let mut len = [0u8; 4];
        r.read_exact(&mut len)?;
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_BLOCK {
            return Err(damaged("block too long"));
        }
        block.resize(len, 0);
        r.read_exact(&mut block)?;
        sum.update(&block);
        let mut reader = Reader { buf: &block };
        for _ in 0..BATCH {
            if reader.buf.is_empty() {
                break;
            }
            entries.push(reader.entry().map_err(|e| damaged(&e.to_string()))?);
        }
        if !reader.buf.is_empty() || block.is_empty() {
            return Err(damaged("a block of too many entries, or none"));
        }
    }
    if entries.len() as u64 != head.count {
        return Err(damaged("more entries than counted"));
    }
    let mut id = [0u8; ID_LEN];
    r.read_exact(&mut id)?;
    if *sum.finalize().as_bytes() != id {
        return Err(damaged("its entries do not match its ID"));
    }
    let mut rest = [0u8; 1];
    if r.read(&mut rest)? != 0 {
        return Err(damaged("bytes after the ID"));
    }
    Ok(Some((ListId(id), entries)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::manifest::tests::tree;

    const B3: HashAlgorithm = HashAlgorithm::Blake3;

    fn big(n: usize) -> Vec<Entry> {
        let mut spec = String::from("d d");
        for i in 0..n {
            spec.push_str(&format!("; f d/f{i:05} x{i}"));
        }
        tree(&spec)
    }

    #[test]
    fn a_list_round_trips_with_its_id() {
        for entries in [Vec::new(), tree("d a; f a/b 1; f c"), big(BATCH * 2 + 3)] {
            let mut file = Vec::new();
            let id = write_list(&mut file, B3, 7, &entries).unwrap();
            assert_eq!(id, list_id(&entries), "the ID does not depend on blocks");
            let (read_id, read) = read_list(&file[..], B3, 7).unwrap().unwrap();
            assert_eq!((read_id, &read), (id, &entries));
            assert!(read_list(&file[..], B3, 8).unwrap().is_none(), "owner");
            let head = ListHead::parse(file[..HEAD_LEN].try_into().unwrap()).unwrap();
            assert_eq!(head.count, entries.len() as u64);
            assert_eq!(file[file.len() - ID_LEN..], id.0);
        }
        assert_ne!(list_id(&tree("f a 1")), list_id(&tree("f a 2")));
        assert_ne!(list_id(&tree("f a 1; f b 1")), list_id(&tree("f a 1")));
    }

    #[test]
    fn every_damage_is_refused() {
        let entries = big(40);
        let mut file = Vec::new();
        write_list(&mut file, B3, 7, &entries).unwrap();
        for len in 0..file.len() {
            assert!(read_list(&file[..len], B3, 7).is_err(), "cut to {len}");
        }
        for at in HEAD_LEN..file.len() {
            let mut bad = file.clone();
            bad[at] ^= 0x40;
            assert!(
                !matches!(read_list(&bad[..], B3, 7), Ok(Some(_))),
                "byte {at} flipped"
            );
        }
        let mut longer = file.clone();
        longer.push(0);
        assert!(read_list(&longer[..], B3, 7).is_err());
    }
}
