//! The byte layout of the hash cache file: a magic, the algorithm, the records in walk order,
//! and a BLAKE3 of everything before it, so that a truncated or damaged file is detected.
//!
//! Record: path length (u32), path, size, mtime, ctime, inode, device (u64 each), digest.
//! Little-endian: the file never leaves the machine that wrote it.

use std::cmp::Ordering;

use crate::core::hash::{ContentHash, HashAlgorithm};
use crate::core::manifest::cmp_components;
use crate::core::stamp::Stamp;

/// Opens every cache file; the byte after it names the algorithm of the hashes it holds.
const MAGIC: &[u8; 8] = b"SSHCACH3";
/// The file ends with the BLAKE3 of everything before it.
const SUM_LEN: usize = 32;

/// One file's cached hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheRecord {
    pub path: String,
    pub stamp: Stamp,
    pub hash: ContentHash,
}

/// Builds a cache file record by record.
pub struct CacheFileWriter {
    body: Vec<u8>,
}

impl CacheFileWriter {
    pub fn new(algorithm: HashAlgorithm, records_hint: usize) -> CacheFileWriter {
        let mut body = Vec::with_capacity(16 + records_hint * 96);
        body.extend_from_slice(MAGIC);
        body.push(algorithm.id());
        CacheFileWriter { body }
    }

    /// Appends a record; records must come in walk (component) order.
    pub fn push(&mut self, path: &str, s: &Stamp, hash: &ContentHash) {
        let b = &mut self.body;
        b.extend_from_slice(&(path.len() as u32).to_le_bytes());
        b.extend_from_slice(path.as_bytes());
        for v in [s.size, s.mtime_ns as u64, s.ctime_ns as u64, s.ino, s.dev] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(hash.digest());
    }

    /// The whole file, checksum included.
    pub fn finish(mut self) -> Vec<u8> {
        let sum = blake3::hash(&self.body);
        self.body.extend_from_slice(sum.as_bytes());
        self.body
    }
}

fn take<'a>(r: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    let (head, tail) = r.split_at_checked(n)?;
    *r = tail;
    Some(head)
}

fn take_u64(r: &mut &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(take(r, 8)?.try_into().ok()?))
}

/// The records of a cache file of `algorithm`'s hashes; `None` when it is damaged, out of
/// order, or holds another algorithm's hashes.
pub fn decode(b: &[u8], algorithm: HashAlgorithm) -> Option<Vec<CacheRecord>> {
    let (body, sum) = b.split_at_checked(b.len().checked_sub(SUM_LEN)?)?;
    if blake3::hash(body).as_bytes() != sum
        || !body.starts_with(MAGIC)
        || body.get(MAGIC.len()) != Some(&algorithm.id())
    {
        return None;
    }
    let mut r = &body[MAGIC.len() + 1..];
    let mut out: Vec<CacheRecord> = Vec::new();
    while !r.is_empty() {
        let len = u32::from_le_bytes(take(&mut r, 4)?.try_into().ok()?) as usize;
        let path = String::from_utf8(take(&mut r, len)?.to_vec()).ok()?;
        let stamp = Stamp {
            size: take_u64(&mut r)?,
            mtime_ns: take_u64(&mut r)? as i64,
            ctime_ns: take_u64(&mut r)? as i64,
            ino: take_u64(&mut r)?,
            dev: take_u64(&mut r)?,
        };
        let hash = ContentHash::new(algorithm, take(&mut r, algorithm.digest_len())?)?;
        // Out of order means not ours, or damaged: start afresh.
        if out
            .last()
            .is_some_and(|p| cmp_components(&p.path, &path) != Ordering::Less)
        {
            return None;
        }
        out.push(CacheRecord { path, stamp, hash });
    }
    Some(out)
}
