//! Reading files of the tree to send them: opened beneath the root without following links,
//! and walked as data and holes, so that a sparse file is sent as what it stores.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// What comes next in a file being read.
#[derive(Debug, PartialEq, Eq)]
pub enum Segment {
    /// This many bytes were read into the buffer.
    Data(usize),
    /// This many bytes are a hole: zeros the file system does not store.
    Hole(u64),
    End,
}

/// Files smaller than this are read straight through: looking for holes costs two system
/// calls, and small files rarely have any.
const SPARSE_ABOVE: u64 = 1 << 20;

/// Reads a file front to back as [`Segment`]s. Holes are found with `SEEK_DATA`/`SEEK_HOLE`
/// (rsync's `-S` without the guessing); where the file system cannot tell, it is all data.
pub struct SparseReader {
    file: File,
    pos: u64,
    /// The size when opened: holes are looked for up to here.
    size: u64,
    /// The end of the data region `pos` is in, once known.
    data_end: Option<u64>,
    look_for_holes: bool,
    /// A read came back short at or past the size: the end, without reading again to see it.
    ended: bool,
}

impl SparseReader {
    pub fn new(file: File) -> io::Result<SparseReader> {
        let size = file.metadata()?.len();
        Ok(SparseReader::with_size(file, size))
    }

    /// A reader for `file`, whose size (as `fstat` told when it was opened) is `size`.
    pub fn with_size(file: File, size: u64) -> SparseReader {
        SparseReader {
            file,
            pos: 0,
            size,
            data_end: None,
            look_for_holes: size >= SPARSE_ABOVE,
            ended: false,
        }
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// The next segment; a `Data` segment's bytes are in `buf[..n]`.
    pub fn next(&mut self, buf: &mut [u8]) -> io::Result<Segment> {
        if self.ended {
            return Ok(Segment::End);
        }
        if self.look_for_holes
            && self.pos < self.size
            && self.data_end.is_none_or(|e| e <= self.pos)
        {
            match self.find_data()? {
                Some(hole) if hole > 0 => {
                    self.pos += hole;
                    return Ok(Segment::Hole(hole));
                }
                _ => {}
            }
        }
        let limit = match self.data_end {
            Some(end) if self.look_for_holes && end > self.pos => {
                buf.len().min((end - self.pos) as usize)
            }
            _ => buf.len(),
        };
        loop {
            match self.file.read_at(&mut buf[..limit], self.pos) {
                Ok(0) => return Ok(Segment::End),
                Ok(n) => {
                    self.pos += n as u64;
                    // A regular file reads short only at its end. Only past the size it had
                    // is that trusted, so a file system that reads short anywhere (some FUSE
                    // ones) is read on; a small file costs one read, not two.
                    self.ended = n < limit && self.pos >= self.size;
                    return Ok(Segment::Data(n));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Where the data at or after `pos` begins and ends; returns the length of the hole before
    /// it, or `None` when the file system cannot tell (then everything is data).
    fn find_data(&mut self) -> io::Result<Option<u64>> {
        use rustix::fs::{SeekFrom, seek};
        let data = match seek(&self.file, SeekFrom::Data(self.pos)) {
            Ok(d) => d,
            // No data after `pos`: the rest, up to the size, is a hole.
            Err(rustix::io::Errno::NXIO) => {
                self.data_end = Some(self.size);
                return Ok(Some(self.size - self.pos));
            }
            Err(_) => {
                self.look_for_holes = false;
                return Ok(None);
            }
        };
        let hole = seek(&self.file, SeekFrom::Hole(data)).map_err(io::Error::from)?;
        self.data_end = Some(hole);
        Ok(Some(data.saturating_sub(self.pos)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, Write};

    /// Reads a whole file through the reader: (bytes as read, with holes as zeros; hole bytes).
    fn read_all(file: File) -> (Vec<u8>, u64) {
        let mut r = SparseReader::new(file).unwrap();
        let mut buf = vec![0u8; 64 << 10];
        let (mut out, mut holes) = (Vec::new(), 0);
        loop {
            match r.next(&mut buf).unwrap() {
                Segment::Data(n) => out.extend_from_slice(&buf[..n]),
                Segment::Hole(n) => {
                    holes += n;
                    out.resize(out.len() + n as usize, 0);
                }
                Segment::End => return (out, holes),
            }
        }
    }

    #[test]
    fn holes_are_found_and_data_is_intact() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("sparse");
        let mut f = File::create(&path).unwrap();
        // 4 MiB hole, 1 MiB of data, 3 MiB hole at the end.
        f.seek(io::SeekFrom::Start(4 << 20)).unwrap();
        f.write_all(&vec![7u8; 1 << 20]).unwrap();
        f.set_len(8 << 20).unwrap();
        drop(f);
        let (content, holes) = read_all(File::open(&path).unwrap());
        assert_eq!(content.len(), 8 << 20);
        assert!(content[..4 << 20].iter().all(|&b| b == 0));
        assert!(content[4 << 20..5 << 20].iter().all(|&b| b == 7));
        assert!(content[5 << 20..].iter().all(|&b| b == 0));
        // tmpfs and ext4 report holes; a file system that cannot would report none.
        assert!(holes == 0 || holes >= 6 << 20, "holes {holes}");

        let dense = d.path().join("dense");
        std::fs::write(&dense, vec![1u8; 3 << 20]).unwrap();
        let (content, holes) = read_all(File::open(&dense).unwrap());
        assert_eq!((content.len(), holes), (3 << 20, 0));

        // A small file: one short read, which is the end.
        let small = d.path().join("small");
        std::fs::write(&small, b"small").unwrap();
        let mut r = SparseReader::with_size(File::open(&small).unwrap(), 5);
        let mut buf = [0u8; 64];
        assert_eq!(r.next(&mut buf).unwrap(), Segment::Data(5));
        assert_eq!(r.next(&mut buf).unwrap(), Segment::End);
        // Grown since it was measured: read on to its end.
        let mut r = SparseReader::with_size(File::open(&small).unwrap(), 2);
        let (mut got, mut small_buf) = (Vec::new(), [0u8; 3]);
        while let Segment::Data(n) = r.next(&mut small_buf).unwrap() {
            got.extend_from_slice(&small_buf[..n]);
        }
        assert_eq!(got, b"small");
    }
}
