//! The local-disk store: [`Store`] and [`Staged`] implemented by [`Root`] and [`TempFile`].

use std::fs::{File, Metadata};
use std::io;
use std::path::PathBuf;

use crate::core::manifest::{Manifest, Meta, RelPath};
use crate::core::plan::Plan;
use crate::core::stamp::Stamp;
use crate::events::EventSink;
use crate::store::apply::{self, Outcome};
use crate::store::cache::now_ns;
use crate::store::root::{Dirs, Root, RootError, TempFile};
use crate::store::scan::{self, Scan};
use crate::store::{Staged, Store};

impl Store for Root {
    type Staged = TempFile;
    type Dirs = Dirs;

    fn list(&self, cache_file: Option<PathBuf>, opts: scan::Options) -> io::Result<Scan> {
        scan::scan_cached(self.path(), cache_file, opts)
    }

    fn list_part(
        &self,
        scopes: &[scan::Scope],
        cache_file: Option<PathBuf>,
        opts: scan::Options,
    ) -> io::Result<Scan> {
        scan::scan_paths(self.path(), scopes, cache_file, opts)
    }

    fn read(&self, rel: &RelPath, dirs: &mut Dirs) -> io::Result<(File, Metadata)> {
        self.open_read_in(rel, dirs)
    }

    fn stage(&self, rel: &RelPath, dirs: &mut Dirs) -> Result<TempFile, RootError> {
        self.temp_in(rel, dirs)
    }

    fn commit(&self, staged: TempFile, rel: &RelPath) -> Result<Option<Stamp>, RootError> {
        // The descriptor outlives the rename, so the stamp read from it after the rename
        // (which moves ctime) is that of the very file committed, whatever happens to the path.
        let file = self.place_keeping(staged, rel)?;
        Ok(file
            .and_then(|f| f.metadata().ok())
            .map(|m| Stamp::of(&m))
            .filter(|s| s.settled_own_write(now_ns())))
    }

    fn apply(&self, plan: &Plan, scanned: Option<&Manifest>, events: &dyn EventSink) -> Outcome {
        apply::apply_local(self, plan, scanned, events)
    }

    fn finish(&self, plan: &Plan, out: &mut Outcome, events: &dyn EventSink) {
        apply::apply_meta(self, plan, out, events)
    }

    fn set_root_mtime(&self, meta: &Meta) -> io::Result<()> {
        Root::set_root_mtime(self, meta.mtime_secs, meta.mtime_nanos)
    }

    fn flush_paths(&self, files: &[RelPath], dirs: &[Option<RelPath>]) -> io::Result<()> {
        self.sync_paths(files, dirs)
    }

    fn flush(&self) -> io::Result<()> {
        self.sync_filesystem()
    }
}

impl Staged for TempFile {
    fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        io::Write::write_all(self.file(), data)
    }

    fn skip(&mut self, len: u64) -> io::Result<()> {
        io::Seek::seek(self.file(), io::SeekFrom::Current(len as i64)).map(drop)
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.file().set_len(len)
    }

    fn start_writeback(&mut self, offset: u64, len: u64) -> io::Result<()> {
        TempFile::start_writeback(self, offset, len)
    }

    fn set_meta(&self, meta: &Meta) -> io::Result<()> {
        TempFile::set_meta(self, meta)
    }
}
