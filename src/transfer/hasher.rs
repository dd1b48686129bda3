//! Hashing a stream of chunks beside the I/O that moves them.

use bytes::Bytes;

use crate::core::hash::{ContentHash, ContentHasher, HashAlgorithm};

/// Files at least this large are hashed on a thread of their own, beside their I/O.
pub const THREAD_ABOVE: u64 = 8 << 20;

/// Zeros fed to the hasher for a hole, a piece at a time.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// The hash of a stream of chunks: inline for small files; for large ones on a helper thread,
/// so that hashing overlaps reading and writing instead of adding to them. Chunks are
/// reference-counted slices of the frames they came in: handing one over copies nothing. The
/// channel bounds the memory in flight.
pub enum Hasher {
    Inline(ContentHasher),
    Threaded {
        to: std::sync::mpsc::SyncSender<Piece>,
        done: std::thread::JoinHandle<ContentHash>,
    },
}

/// What the hashing thread is handed.
pub enum Piece {
    Data(Bytes),
    Zeros(u64),
}

fn feed(h: &mut ContentHasher, piece: &Piece) {
    match piece {
        Piece::Data(b) => h.update(b),
        Piece::Zeros(n) => {
            let mut n = *n;
            while n > 0 {
                let k = n.min(ZEROS.len() as u64) as usize;
                h.update(&ZEROS[..k]);
                n -= k as u64;
            }
        }
    }
}

impl Hasher {
    /// A hasher for a file of `size` bytes.
    pub fn new(algorithm: HashAlgorithm, size: u64) -> Hasher {
        let mut h = algorithm.hasher();
        if size < THREAD_ABOVE {
            return Hasher::Inline(h);
        }
        let (to, rx) = std::sync::mpsc::sync_channel::<Piece>(4);
        let done = std::thread::spawn(move || {
            for piece in rx {
                feed(&mut h, &piece);
            }
            h.finish()
        });
        Hasher::Threaded { to, done }
    }

    pub fn update(&mut self, piece: Piece) {
        match self {
            Hasher::Inline(h) => feed(h, &piece),
            Hasher::Threaded { to, .. } => {
                to.send(piece)
                    .expect("the hashing thread outlives its sender");
            }
        }
    }

    pub fn finish(self) -> ContentHash {
        match self {
            Hasher::Inline(h) => h.finish(),
            Hasher::Threaded { to, done } => {
                drop(to);
                done.join().expect("hashing does not panic")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threaded_inline_and_zeros_agree() {
        let data = vec![5u8; 300_000];
        let mut whole = data.clone();
        whole.resize(data.len() + 200_000, 0);
        let want = HashAlgorithm::Blake3.of(&whole);
        for size in [0, THREAD_ABOVE] {
            let mut h = Hasher::new(HashAlgorithm::Blake3, size);
            h.update(Piece::Data(Bytes::from(data.clone())));
            h.update(Piece::Zeros(200_000));
            assert_eq!(h.finish(), want);
        }
    }
}
