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
use crate::core::manifest::{Entry, cmp_components};
use crate::wire::BATCH;
use crate::wire::codec::{ProtocolError, Reader, Writer};

const MAGIC: &[u8; 8] = b"SSACKED1";
/// Magic, algorithm, owner, count.
pub const HEAD_LEN: usize = 8 + 1 + 16 + 8;
pub const ID_LEN: usize = 32;

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

/// A list's entries as the wire encodes them, one after the other, with where each ends:
/// compared with a kept list byte for byte, and hashed into its ID, without decoding either.
pub struct EncodedList {
    bytes: Vec<u8>,
    ends: Vec<u32>,
}

impl EncodedList {
    /// `entries`, encoded.
    pub fn of(entries: &[Entry]) -> EncodedList {
        let mut bytes = Vec::with_capacity(entries.len() * 80);
        let mut ends = Vec::with_capacity(entries.len());
        for e in entries {
            Writer(&mut bytes).entry(e);
            ends.push(bytes.len() as u32);
        }
        EncodedList { bytes, ends }
    }

    pub fn id(&self) -> ListId {
        ListId(*blake3::hash(&self.bytes).as_bytes())
    }

    /// The encoding of entry `i`.
    fn entry(&self, i: usize) -> &[u8] {
        let start = match i {
            0 => 0,
            i => self.ends[i - 1] as usize,
        };
        &self.bytes[start..self.ends[i] as usize]
    }
}

/// What differs between a kept list (`kept`, a list file's entry bytes: see
/// [`read_list_bytes`]) and the list `now` (encoded as `encoded`), in one pass over both: the
/// indices in `now` of the entries `kept` lacks or holds otherwise, and the paths of `kept`
/// that `now` lacks (one for a whole subtree). The same as `Changes::between` on the decoded
/// lists, without decoding them.
pub fn differences(
    kept: &[u8],
    now: &[Entry],
    encoded: &EncodedList,
) -> io::Result<(Vec<usize>, Vec<String>)> {
    use std::cmp::Ordering;
    let bad = |e: ProtocolError| damaged(&e.to_string());
    let mut reader = Reader { buf: kept };
    let mut next_kept = move || -> io::Result<Option<(&str, &[u8])>> {
        match reader.buf.is_empty() {
            true => Ok(None),
            false => reader.entry_span().map(Some).map_err(bad),
        }
    };
    let (mut upserts, mut removed) = (Vec::new(), Vec::<String>::new());
    let mut old = next_kept()?;
    let mut i = 0;
    loop {
        let order = match (old, now.get(i)) {
            (None, None) => return Ok((upserts, removed)),
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some((path, _)), Some(n)) => cmp_components(path, n.path.as_str()),
        };
        match order {
            Ordering::Less => {
                let (path, _) = old.expect("compared");
                let covered = removed.last().is_some_and(|r| {
                    path.len() > r.len()
                        && path.starts_with(r.as_str())
                        && path.as_bytes()[r.len()] == b'/'
                });
                if !covered {
                    removed.push(path.to_owned());
                }
                old = next_kept()?;
            }
            Ordering::Greater => {
                upserts.push(i);
                i += 1;
            }
            Ordering::Equal => {
                let (_, bytes) = old.expect("compared");
                if bytes != encoded.entry(i) {
                    upserts.push(i);
                }
                old = next_kept()?;
                i += 1;
            }
        }
    }
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

/// Reads a list file's entries as bytes, checked: of `algorithm`'s hashes, from `owner`, the
/// ID at its end the one they hash to (each entry's layout is checked as it is compared).
/// `Ok(None)` when it is another algorithm's or owner's.
pub fn read_list_bytes<R: Read>(
    mut r: R,
    algorithm: HashAlgorithm,
    owner: u128,
) -> io::Result<Option<(ListId, Vec<u8>)>> {
    let mut head = [0u8; HEAD_LEN];
    r.read_exact(&mut head)?;
    let head = ListHead::parse(&head).ok_or_else(|| damaged("not a list file"))?;
    if head.algorithm != algorithm || head.owner != owner {
        return Ok(None);
    }
    // Sized by the count (about 80 bytes an entry), so that the read rarely reallocates; but
    // a count is not trusted with more than 16 MiB before the bytes are there.
    let mut rest =
        Vec::with_capacity((head.count as usize).saturating_mul(80).min(16 << 20) + 4096);
    r.read_to_end(&mut rest)?;
    let Some(body_len) = rest.len().checked_sub(ID_LEN) else {
        return Err(damaged("truncated"));
    };
    let id: [u8; ID_LEN] = rest[body_len..].try_into().expect("ID_LEN bytes");
    rest.truncate(body_len);
    // Blocks: a length, then entries; kept as the entries alone.
    let mut entries = Vec::with_capacity(rest.len());
    let mut at = 0;
    while at < rest.len() {
        let len = rest
            .get(at..at + 4)
            .map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")) as usize)
            .ok_or_else(|| damaged("truncated block"))?;
        let block = rest
            .get(at + 4..at + 4 + len)
            .ok_or_else(|| damaged("truncated block"))?;
        entries.extend_from_slice(block);
        at += 4 + len;
    }
    if *blake3::hash(&entries).as_bytes() != id {
        return Err(damaged("its entries do not match its ID"));
    }
    Ok(Some((ListId(id), entries)))
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
    r: R,
    algorithm: HashAlgorithm,
    owner: u128,
) -> io::Result<Option<(ListId, Vec<Entry>)>> {
    let Some((id, bytes)) = read_list_bytes(r, algorithm, owner)? else {
        return Ok(None);
    };
    let mut reader = Reader { buf: &bytes };
    let mut entries = Vec::with_capacity(bytes.len() / 64);
    while !reader.buf.is_empty() {
        entries.push(reader.entry().map_err(|e| damaged(&e.to_string()))?);
    }
    Ok(Some((id, entries)))
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

    /// The byte comparison finds what `Changes::between` finds.
    #[test]
    fn differences_by_bytes_are_the_changes_between_the_lists() {
        use crate::core::manifest::Changes;
        let lists = [
            "",
            "f a 1",
            "f a 2",
            "f a 1; f b 2",
            "d x; f x/y 1",
            "d a; f a/x 1; f a/y 2; f b 3",
            "d a; f a/x 1; f b 3",
            "f a 9; f b 3",
            "d a; f a/n 2",
            "d a; d a/b; f a/b/c 1; f a.b 2",
            "d a; f a.b 2",
            "d c; f c/x 1",
        ];
        for old in lists {
            for new in lists {
                let (old_list, new_list) = (tree(old), tree(new));
                let mut file = Vec::new();
                write_list(&mut file, B3, 0, &old_list).unwrap();
                let (_, kept) = read_list_bytes(&file[..], B3, 0).unwrap().unwrap();
                let encoded = EncodedList::of(&new_list);
                assert_eq!(encoded.id(), list_id(&new_list));
                let (upserts, removed) = differences(&kept, &new_list, &encoded).unwrap();
                let want = Changes::between(&old_list, &new_list);
                let got: Vec<Entry> = upserts.iter().map(|&i| new_list[i].clone()).collect();
                assert_eq!(got, want.upserts, "{old} -> {new}");
                let want: Vec<&str> = want.removed.iter().map(|p| p.as_str()).collect();
                assert_eq!(removed, want, "{old} -> {new}");
            }
        }
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
        for at in HEAD_LEN..file.len() {
            let mut bad = file.clone();
            bad[at] ^= 0x40;
            assert!(
                !matches!(read_list_bytes(&bad[..], B3, 7), Ok(Some(_))),
                "byte {at} flipped, read as bytes"
            );
        }
    }
}
