//! Walks a directory and lists it as entries: files with their MD5, directories, symlinks
//! (never followed) and what could not be read. Special files and non-UTF-8 names are skipped.

use std::fs::{self, File, Metadata};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use md5::Digest;

use crate::manifest::{Entry, Kind, Md5, Meta, RelPath, TEMP_PREFIX};

/// What a walk found: entries in component order (parents first), and warnings about what it
/// skipped.
#[derive(Debug, Default)]
pub struct Scan {
    pub entries: Vec<Entry>,
    pub warnings: Vec<String>,
}

impl Scan {
    /// Entries that exist but could not be read, with the reason.
    pub fn unreadable(&self) -> impl Iterator<Item = (&RelPath, &str)> {
        self.entries.iter().filter_map(|e| match &e.kind {
            Kind::Unreadable { reason } => Some((&e.path, reason.as_str())),
            _ => None,
        })
    }
}

pub fn meta_of(m: &Metadata) -> Meta {
    Meta {
        mode: m.mode() & 0o7777,
        mtime_secs: m.mtime(),
        mtime_nanos: m.mtime_nsec() as u32,
    }
}

/// Lists the tree below `root` (the root itself is not an entry). Fails only when the root
/// cannot be read at all; anything below that cannot be read becomes an `Unreadable` entry.
pub fn scan(root: &Path) -> io::Result<Scan> {
    let mut scan = Scan::default();
    let top = read_dir_sorted(root)?;
    walk(root, None, top, &mut scan);
    Ok(scan)
}

fn read_dir_sorted(dir: &Path) -> io::Result<Vec<fs::DirEntry>> {
    let mut v: Vec<fs::DirEntry> = fs::read_dir(dir)?.collect::<io::Result<_>>()?;
    v.sort_by_key(|e| e.file_name());
    Ok(v)
}

fn walk(root: &Path, parent: Option<&RelPath>, children: Vec<fs::DirEntry>, scan: &mut Scan) {
    for ent in children {
        let name = ent.file_name();
        let Some(name) = name.to_str() else {
            scan.warnings.push(format!(
                "skipping {}: name is not valid UTF-8",
                ent.path().display()
            ));
            continue;
        };
        if name.starts_with(TEMP_PREFIX) {
            continue;
        }
        let rel = match parent {
            None => RelPath::new(name),
            Some(p) => p.join(name),
        };
        let rel = match rel {
            Ok(r) => r,
            Err(e) => {
                scan.warnings.push(format!("skipping {name:?}: {e}"));
                continue;
            }
        };
        let path = ent.path();
        let unreadable = |e: io::Error| Entry {
            path: rel.clone(),
            kind: Kind::Unreadable {
                reason: e.to_string(),
            },
            meta: Meta::default(),
        };
        let md = match fs::symlink_metadata(&path) {
            Ok(m) => m,
            // Vanished since read_dir: it is simply not there any more.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                scan.entries.push(unreadable(e));
                continue;
            }
        };
        let meta = meta_of(&md);
        let ft = md.file_type();
        if ft.is_dir() {
            match read_dir_sorted(&path) {
                Ok(kids) => {
                    scan.entries.push(Entry {
                        path: rel.clone(),
                        kind: Kind::Dir,
                        meta,
                    });
                    walk(root, Some(&rel), kids, scan);
                }
                Err(e) => scan.entries.push(unreadable(e)),
            }
        } else if ft.is_file() {
            match hash_file(&path) {
                Ok((size, md5)) => scan.entries.push(Entry {
                    path: rel,
                    kind: Kind::File { size, md5 },
                    meta,
                }),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => scan.entries.push(unreadable(e)),
            }
        } else if ft.is_symlink() {
            match fs::read_link(&path) {
                Ok(t) => match t.into_os_string().into_string() {
                    Ok(target) => scan.entries.push(Entry {
                        path: rel,
                        kind: Kind::Symlink { target },
                        meta,
                    }),
                    Err(_) => scan
                        .warnings
                        .push(format!("skipping symlink {rel}: target is not valid UTF-8")),
                },
                Err(e) => scan.entries.push(unreadable(e)),
            }
        } else {
            let what = if ft.is_fifo() {
                "FIFO"
            } else if ft.is_socket() {
                "socket"
            } else {
                "device"
            };
            scan.warnings
                .push(format!("skipping {rel}: a {what} is not synced"));
        }
    }
}

/// Size and MD5 of a file, read in bounded chunks.
pub fn hash_file(path: &Path) -> io::Result<(u64, Md5)> {
    let mut f = File::open(path)?;
    let mut h = md5::Md5::new();
    let mut buf = vec![0u8; crate::protocol::CHUNK_SIZE];
    let mut size = 0u64;
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        h.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, Md5(h.finalize().into())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn listing(scan: &Scan) -> Vec<String> {
        scan.entries
            .iter()
            .map(|e| match &e.kind {
                Kind::File { size, md5 } => format!("{} file {size} {md5}", e.path),
                Kind::Symlink { target } => format!("{} -> {target}", e.path),
                k => format!("{} {}", e.path, k.name()),
            })
            .collect()
    }

    #[test]
    fn lists_tree_in_component_order_without_following_links() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        fs::create_dir_all(r.join("a/b")).unwrap();
        fs::write(r.join("a/b/f"), "hello").unwrap();
        fs::write(r.join("a b"), "").unwrap();
        fs::create_dir(r.join("empty")).unwrap();
        symlink("/etc", r.join("link")).unwrap();
        fs::write(r.join(".server-sync-tmp.123"), "partial").unwrap();
        let s = scan(r).unwrap();
        assert_eq!(
            listing(&s),
            [
                "a dir",
                "a/b dir",
                "a/b/f file 5 5d41402abc4b2a76b9719d911017c592",
                "a b file 0 d41d8cd98f00b204e9800998ecf8427e",
                "empty dir",
                "link -> /etc",
            ]
        );
        assert!(s.warnings.is_empty(), "{:?}", s.warnings);
    }

    #[test]
    fn special_files_are_skipped_with_a_warning() {
        let d = tempfile::tempdir().unwrap();
        let _sock = std::os::unix::net::UnixListener::bind(d.path().join("sock")).unwrap();
        let s = scan(d.path()).unwrap();
        assert!(s.entries.is_empty());
        assert_eq!(s.warnings, ["skipping sock: a socket is not synced"]);
    }
}
