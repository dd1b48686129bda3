//! Content hashes with their algorithm: what identifies a file's content across both sides.
//!
//! A session uses one algorithm, chosen by the server among those the client offers. BLAKE3 is
//! the default: it runs at several GB/s per core and is collision-resistant, which the server's
//! local-copy shortcut relies on (two files with one hash are taken to be the same content).
//! MD5, the seed's hash, is kept for `--hash md5`; public MD5 collisions exist, so in that mode
//! a peer can make the shortcut copy the wrong content.

use std::fmt;
use std::str::FromStr;

/// A content-hash algorithm. The discriminant is its identifier on the wire and in the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum HashAlgorithm {
    Md5 = 1,
    Blake3 = 2,
}

impl HashAlgorithm {
    /// Every algorithm this build supports, in order of preference.
    pub const ALL: [HashAlgorithm; 2] = [HashAlgorithm::Blake3, HashAlgorithm::Md5];

    /// Digest length in bytes.
    pub const fn digest_len(self) -> usize {
        match self {
            HashAlgorithm::Md5 => 16,
            HashAlgorithm::Blake3 => 32,
        }
    }

    pub const fn id(self) -> u8 {
        self as u8
    }

    pub fn from_id(id: u8) -> Option<HashAlgorithm> {
        Self::ALL.into_iter().find(|a| a.id() == id)
    }

    pub const fn name(self) -> &'static str {
        match self {
            HashAlgorithm::Md5 => "md5",
            HashAlgorithm::Blake3 => "blake3",
        }
    }

    /// The first of `preferred` that `offered` contains: how the server picks a session's hash.
    pub fn negotiate(preferred: &[HashAlgorithm], offered: &[HashAlgorithm]) -> Option<Self> {
        preferred.iter().copied().find(|a| offered.contains(a))
    }

    pub fn hasher(self) -> ContentHasher {
        match self {
            HashAlgorithm::Md5 => ContentHasher::Md5(<md5::Md5 as md5::Digest>::new()),
            HashAlgorithm::Blake3 => ContentHasher::Blake3(Box::new(blake3::Hasher::new())),
        }
    }

    /// The hash of `data` in one call.
    pub fn of(self, data: &[u8]) -> ContentHash {
        let mut h = self.hasher();
        h.update(data);
        h.finish()
    }
}

impl fmt::Display for HashAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown hash algorithm {0:?} (known: blake3, md5)")]
pub struct UnknownAlgorithm(pub String);

impl FromStr for HashAlgorithm {
    type Err = UnknownAlgorithm;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|a| a.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| UnknownAlgorithm(s.to_owned()))
    }
}

/// A file's content hash. The bytes beyond the algorithm's length are zero, so equality and
/// ordering are those of (algorithm, digest).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContentHash {
    algorithm: HashAlgorithm,
    bytes: [u8; 32],
}

impl ContentHash {
    /// A hash from its digest; `None` when `digest` is not as long as the algorithm's.
    pub fn new(algorithm: HashAlgorithm, digest: &[u8]) -> Option<ContentHash> {
        if digest.len() != algorithm.digest_len() {
            return None;
        }
        let mut bytes = [0; 32];
        bytes[..digest.len()].copy_from_slice(digest);
        Some(ContentHash { algorithm, bytes })
    }

    pub fn algorithm(&self) -> HashAlgorithm {
        self.algorithm
    }

    /// The digest, `algorithm().digest_len()` bytes.
    pub fn digest(&self) -> &[u8] {
        &self.bytes[..self.algorithm.digest_len()]
    }
}

impl fmt::Display for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.digest() {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{self}", self.algorithm)
    }
}

/// A hash being computed over a stream of chunks.
pub enum ContentHasher {
    Md5(md5::Md5),
    // Boxed: BLAKE3's state is about 2 KiB, and hashers travel in enums and channels.
    Blake3(Box<blake3::Hasher>),
}

impl ContentHasher {
    pub fn update(&mut self, data: &[u8]) {
        match self {
            ContentHasher::Md5(h) => md5::Digest::update(h, data),
            ContentHasher::Blake3(h) => {
                h.update(data);
            }
        }
    }

    pub fn finish(self) -> ContentHash {
        match self {
            ContentHasher::Md5(h) => {
                let d: [u8; 16] = md5::Digest::finalize(h).into();
                ContentHash::new(HashAlgorithm::Md5, &d).expect("md5 digests are 16 bytes")
            }
            ContentHasher::Blake3(h) => {
                ContentHash::new(HashAlgorithm::Blake3, h.finalize().as_bytes())
                    .expect("blake3 digests are 32 bytes")
            }
        }
    }

    pub fn algorithm(&self) -> HashAlgorithm {
        match self {
            ContentHasher::Md5(_) => HashAlgorithm::Md5,
            ContentHasher::Blake3(_) => HashAlgorithm::Blake3,
        }
    }
}

/// The public 128-byte MD5 collision pair of Wang et al. (2004), as published: two inputs that
/// differ in six bytes and share the MD5 `79054025255fb1a26e4bc422aef54eb4`. For tests of the
/// local-copy shortcut under `--hash md5` and under the default hash.
pub fn md5_collision_pair() -> (Vec<u8>, Vec<u8>) {
    const A: &str = "d131dd02c5e6eec4693d9a0698aff95c2fcab58712467eab4004583eb8fb7f89\
                     55ad340609f4b30283e488832571415a085125e8f7cdc99fd91dbdf280373c5b\
                     d8823e3156348f5bae6dacd436c919c6dd53e2b487da03fd02396306d248cda0\
                     e99f33420f577ee8ce54b67080a80d1ec69821bcb6a8839396f9652b6ff72a70";
    let a: Vec<u8> = (0..A.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&A[i..i + 2], 16).expect("hex"))
        .collect();
    let mut b = a.clone();
    // The six bytes where the second block differs.
    for (i, v) in [
        (19, 0x07),
        (45, 0xf1),
        (59, 0x72),
        (83, 0x34),
        (109, 0x28),
        (123, 0xab),
    ] {
        b[i] = v;
    }
    (a, b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_digests() {
        assert_eq!(
            HashAlgorithm::Md5.of(b"hello").to_string(),
            "5d41402abc4b2a76b9719d911017c592"
        );
        assert_eq!(
            HashAlgorithm::Blake3.of(b"").to_string(),
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
    }

    #[test]
    fn streaming_equals_one_shot() {
        for a in HashAlgorithm::ALL {
            let mut h = a.hasher();
            h.update(b"hel");
            h.update(b"lo");
            assert_eq!(h.finish(), a.of(b"hello"));
        }
    }

    #[test]
    fn same_bytes_in_another_algorithm_differ() {
        let d = [7u8; 16];
        assert_ne!(
            ContentHash::new(HashAlgorithm::Md5, &d),
            ContentHash::new(HashAlgorithm::Blake3, &[7u8; 32])
        );
        assert!(ContentHash::new(HashAlgorithm::Blake3, &d).is_none());
    }

    #[test]
    fn names_and_ids_round_trip_and_negotiation_follows_preference() {
        for a in HashAlgorithm::ALL {
            assert_eq!(a.name().parse::<HashAlgorithm>(), Ok(a));
            assert_eq!(HashAlgorithm::from_id(a.id()), Some(a));
        }
        assert!("sha1".parse::<HashAlgorithm>().is_err());
        use HashAlgorithm::*;
        assert_eq!(
            HashAlgorithm::negotiate(&[Blake3, Md5], &[Md5, Blake3]),
            Some(Blake3)
        );
        assert_eq!(HashAlgorithm::negotiate(&[Blake3, Md5], &[Md5]), Some(Md5));
        assert_eq!(HashAlgorithm::negotiate(&[Blake3], &[Md5]), None);
    }

    /// The public 128-byte MD5 collision pair (Wang et al.): equal MD5, different BLAKE3.
    #[test]
    fn md5_collision_pair_differs_in_blake3() {
        let (a, b) = collision_pair();
        assert_ne!(a, b);
        assert_eq!(HashAlgorithm::Md5.of(&a), HashAlgorithm::Md5.of(&b));
        assert_ne!(HashAlgorithm::Blake3.of(&a), HashAlgorithm::Blake3.of(&b));
    }

    fn collision_pair() -> (Vec<u8>, Vec<u8>) {
        md5_collision_pair()
    }
}
