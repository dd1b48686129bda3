//! The byte layout of the hash cache file: a magic, the algorithm, the records in walk order,
//! and a BLAKE3 of everything before it, so that a truncated or damaged file is detected.
//!
//! Record: path length (u32), path, size, mtime, ctime, inode, device (u64 each), digest.
//! Little-endian: the file never leaves the machine that wrote it.
//!
//! Both directions stream: a cache of a million files is never held whole in memory, neither
//! as bytes nor as records. [`check`] reads a file once to verify it (every record well formed
//! and in order, the trailing checksum right); [`CacheFileReader`] then hands its records out
//! one at a time; [`CacheFileWriter`] encodes records as they come, hashing them on the way.

use std::cmp::Ordering;
use std::io::{self, BufRead, BufReader, Read, Take, Write};

use crate::core::hash::{ContentHash, HashAlgorithm};
use crate::core::manifest::{MAX_PATH_LEN, cmp_components};
use crate::core::stamp::Stamp;

/// Opens every cache file; the byte after it names the algorithm of the hashes it holds.
const MAGIC: &[u8; 8] = b"SSHCACH3";
/// The file ends with the BLAKE3 of everything before it.
const SUM_LEN: usize = 32;
/// Bytes read or written at a time.
const BUF_SIZE: usize = 64 << 10;

/// The trailing checksum of a cache file: equal sums mean equal files.
pub type Sum = [u8; SUM_LEN];

/// One file's cached hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheRecord {
    pub path: String,
    pub stamp: Stamp,
    pub hash: ContentHash,
}

/// Builds a cache file record by record into `W`, computing its checksum on the way.
pub struct CacheFileWriter<W: Write> {
    out: W,
    buf: Vec<u8>,
    sum: blake3::Hasher,
}

impl<W: Write> CacheFileWriter<W> {
    pub fn new(out: W, algorithm: HashAlgorithm) -> CacheFileWriter<W> {
        let mut buf = Vec::with_capacity(BUF_SIZE + 256);
        buf.extend_from_slice(MAGIC);
        buf.push(algorithm.id());
        CacheFileWriter {
            out,
            buf,
            sum: blake3::Hasher::new(),
        }
    }

    /// Appends a record; records must come in walk (component) order.
    pub fn push(&mut self, path: &str, s: &Stamp, hash: &ContentHash) -> io::Result<()> {
        let b = &mut self.buf;
        b.extend_from_slice(&(path.len() as u32).to_le_bytes());
        b.extend_from_slice(path.as_bytes());
        for v in [s.size, s.mtime_ns as u64, s.ctime_ns as u64, s.ino, s.dev] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(hash.digest());
        if self.buf.len() >= BUF_SIZE {
            self.drain()?;
        }
        Ok(())
    }

    fn drain(&mut self) -> io::Result<()> {
        self.sum.update(&self.buf);
        self.out.write_all(&self.buf)?;
        self.buf.clear();
        Ok(())
    }

    /// Writes what is left and the checksum; returns the output and the checksum.
    pub fn finish(mut self) -> io::Result<(W, Sum)> {
        self.drain()?;
        let sum = *self.sum.finalize().as_bytes();
        self.out.write_all(&sum)?;
        self.out.flush()?;
        Ok((self.out, sum))
    }
}

fn damaged(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("hash cache: {what}"))
}

/// Reads the records of a cache file one at a time, checking that they are well formed and in
/// walk order. It does not check the trailing checksum: [`check`] does, in a pass of its own,
/// before any record is trusted.
#[derive(Debug)]
pub struct CacheFileReader<R> {
    r: BufReader<Take<R>>,
    algorithm: HashAlgorithm,
    /// The path of the last record read, for the order check.
    last: Option<String>,
}

impl<R: Read> CacheFileReader<R> {
    /// Starts reading a cache file of `len` bytes in `r`; `None` when it is too short or not
    /// a cache of `algorithm`'s hashes.
    pub fn open(r: R, len: u64, algorithm: HashAlgorithm) -> io::Result<Option<Self>> {
        let Some(body) = len.checked_sub(SUM_LEN as u64) else {
            return Ok(None);
        };
        let mut r = BufReader::with_capacity(BUF_SIZE, r.take(body));
        let mut head = [0u8; MAGIC.len() + 1];
        match r.read_exact(&mut head) {
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            r => r?,
        }
        if head[..MAGIC.len()] != MAGIC[..] || head[MAGIC.len()] != algorithm.id() {
            return Ok(None);
        }
        Ok(Some(CacheFileReader {
            r,
            algorithm,
            last: None,
        }))
    }

    /// Reads the next record into `rec` (its path's buffer reused): `Ok(false)` after the last
    /// one; an error of kind `InvalidData` when the file is damaged or out of order.
    pub fn next_into(&mut self, rec: &mut CacheRecord) -> io::Result<bool> {
        if self.r.fill_buf()?.is_empty() {
            return Ok(false);
        }
        let eof = |e: io::Error| match e.kind() {
            io::ErrorKind::UnexpectedEof => damaged("truncated record"),
            _ => e,
        };
        let mut len = [0u8; 4];
        self.r.read_exact(&mut len).map_err(eof)?;
        let len = u32::from_le_bytes(len) as usize;
        // Scans list no longer paths: a larger length is damage, not a reason to allocate.
        if len > MAX_PATH_LEN {
            return Err(damaged("path too long"));
        }
        let mut path = std::mem::take(&mut rec.path).into_bytes();
        path.resize(len, 0);
        self.r.read_exact(&mut path).map_err(eof)?;
        rec.path = String::from_utf8(path).map_err(|_| damaged("path is not UTF-8"))?;
        let mut fixed = [0u8; 5 * 8 + 32];
        let fixed = &mut fixed[..5 * 8 + self.algorithm.digest_len()];
        self.r.read_exact(fixed).map_err(eof)?;
        let u = |i: usize| u64::from_le_bytes(fixed[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        rec.stamp = Stamp {
            size: u(0),
            mtime_ns: u(1) as i64,
            ctime_ns: u(2) as i64,
            ino: u(3),
            dev: u(4),
        };
        rec.hash = ContentHash::new(self.algorithm, &fixed[5 * 8..]).expect("digest length");
        // Out of order means not ours, or damaged: start afresh.
        match &mut self.last {
            Some(last) if cmp_components(last, &rec.path) != Ordering::Less => {
                return Err(damaged("records out of order"));
            }
            Some(last) => last.clone_from(&rec.path),
            None => self.last = Some(rec.path.clone()),
        }
        Ok(true)
    }

    /// The reader, past the records.
    fn into_inner(self) -> R {
        self.r.into_inner().into_inner()
    }
}

impl CacheRecord {
    /// A record to read into.
    pub fn empty(algorithm: HashAlgorithm) -> CacheRecord {
        CacheRecord {
            path: String::new(),
            stamp: Stamp {
                size: 0,
                mtime_ns: 0,
                ctime_ns: 0,
                ino: 0,
                dev: 0,
            },
            hash: ContentHash::new(algorithm, &[0; 32][..algorithm.digest_len()])
                .expect("digest length"),
        }
    }
}

/// Hashes what is read through it.
struct Summing<R> {
    r: R,
    sum: blake3::Hasher,
}

impl<R: Read> Read for Summing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.r.read(buf)?;
        self.sum.update(&buf[..n]);
        Ok(n)
    }
}

/// Reads a whole cache file of `len` bytes from `r` and checks it: a cache of `algorithm`'s
/// hashes, every record well formed and in order, the trailing checksum right. Its checksum
/// and number of records when it is sound; `None` when it is damaged, out of order, another
/// algorithm's or unreadable.
pub fn check<R: Read>(r: R, len: u64, algorithm: HashAlgorithm) -> Option<(Sum, u64)> {
    let summing = Summing {
        r,
        sum: blake3::Hasher::new(),
    };
    let mut records = CacheFileReader::open(summing, len, algorithm).ok()??;
    let mut rec = CacheRecord::empty(algorithm);
    let mut count = 0;
    while records.next_into(&mut rec).ok()? {
        count += 1;
    }
    let Summing { mut r, sum } = records.into_inner();
    let mut stored = [0u8; SUM_LEN];
    r.read_exact(&mut stored).ok()?;
    (*sum.finalize().as_bytes() == stored).then_some((stored, count))
}

#[cfg(test)]
mod tests {
    use super::*;

    const B3: HashAlgorithm = HashAlgorithm::Blake3;

    fn stamp(n: u64) -> Stamp {
        Stamp {
            size: n,
            mtime_ns: -(n as i64),
            ctime_ns: 2,
            ino: n * 7,
            dev: u64::MAX,
        }
    }

    fn encode(alg: HashAlgorithm, paths: &[&str]) -> (Vec<u8>, Sum) {
        let mut w = CacheFileWriter::new(Vec::new(), alg);
        for (i, p) in paths.iter().enumerate() {
            w.push(p, &stamp(i as u64), &alg.of(p.as_bytes())).unwrap();
        }
        w.finish().unwrap()
    }

    fn decode(b: &[u8], alg: HashAlgorithm) -> Option<Vec<CacheRecord>> {
        check(b, b.len() as u64, alg)?;
        let mut r = CacheFileReader::open(b, b.len() as u64, alg).ok()??;
        let mut out = Vec::new();
        let mut rec = CacheRecord::empty(alg);
        while r.next_into(&mut rec).ok()? {
            out.push(rec.clone());
        }
        Some(out)
    }

    /// Many records (several buffers' worth) come back as written, in either algorithm; the
    /// checksum returned is the one at the end of the file.
    #[test]
    fn records_round_trip_through_the_stream() {
        let names: Vec<String> = (0..5000)
            .map(|i| format!("d{}/f{i:05}", i / 1000))
            .collect();
        let paths: Vec<&str> = names.iter().map(String::as_str).collect();
        for alg in HashAlgorithm::ALL {
            let (bytes, sum) = encode(alg, &paths);
            assert!(bytes.len() > 2 * BUF_SIZE);
            assert_eq!(bytes[bytes.len() - SUM_LEN..], sum);
            let count = paths.len() as u64;
            assert_eq!(
                check(&bytes[..], bytes.len() as u64, alg),
                Some((sum, count))
            );
            let got = decode(&bytes, alg).unwrap();
            assert_eq!(got.len(), paths.len());
            for (i, (r, p)) in got.iter().zip(&paths).enumerate() {
                assert_eq!((r.path.as_str(), r.stamp), (*p, stamp(i as u64)));
                assert_eq!(r.hash, alg.of(p.as_bytes()));
            }
        }
        let (empty, _) = encode(B3, &[]);
        assert_eq!(decode(&empty, B3), Some(Vec::new()));
    }

    /// Every flipped byte, every truncation, another algorithm, records out of order and a
    /// forged path length are refused.
    #[test]
    fn damage_is_refused() {
        let (bytes, _) = encode(B3, &["a", "a/b", "a b"]);
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x10;
            assert_eq!(decode(&b, B3), None, "byte {i} flipped");
        }
        for n in 0..bytes.len() {
            assert_eq!(decode(&bytes[..n], B3), None, "cut to {n}");
        }
        assert_eq!(decode(&bytes, HashAlgorithm::Md5), None);
        let (unordered, _) = encode(B3, &["a", "a b", "a/b"]);
        assert_eq!(decode(&unordered, B3), None, "out of order");
        let (dup, _) = encode(B3, &["a", "a"]);
        assert_eq!(decode(&dup, B3), None, "duplicate");
        // A length beyond any path, with a checksum that matches: refused before allocating.
        let mut forged = MAGIC.to_vec();
        forged.push(B3.id());
        forged.extend_from_slice(&u32::MAX.to_le_bytes());
        forged.extend_from_slice(&[0; 100]);
        let sum = *blake3::hash(&forged).as_bytes();
        forged.extend_from_slice(&sum);
        assert_eq!(decode(&forged, B3), None);
    }
}
