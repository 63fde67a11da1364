//! Where repository files live. Today a local directory; the trait leaves room for object
//! stores. Paths are relative, `/`-separated, e.g. `data/3f/3fa2…`.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use lru::LruCache;

use crate::error::{Error, IoContext, Result};

/// Storage for repository files. Writes are atomic: a reader sees the whole file or nothing.
pub trait Backend: Send + Sync + std::fmt::Debug {
    fn read(&self, path: &str) -> Result<Vec<u8>>;
    /// `len` bytes at `offset`; short files are an error naming the path.
    fn read_range(&self, path: &str, offset: u64, len: usize) -> Result<Vec<u8>> {
        let mut buf = Vec::new();
        self.read_range_into(path, offset, len, &mut buf)?;
        Ok(buf)
    }
    /// [`read_range`](Self::read_range) into a reusable buffer (replacing its contents).
    fn read_range_into(&self, path: &str, offset: u64, len: usize, buf: &mut Vec<u8>) -> Result<()>;
    fn size(&self, path: &str) -> Result<u64>;
    /// Create or replace `path` atomically and durably.
    fn write(&self, path: &str, data: &[u8]) -> Result<()>;
    /// Create `path` atomically and durably; fail if it exists.
    fn create_new(&self, path: &str, data: &[u8]) -> Result<()>;
    fn remove(&self, path: &str) -> Result<()>;
    /// File names directly in `dir` (not recursive), without temp files.
    fn list(&self, dir: &str) -> Result<Vec<String>>;
    fn exists(&self, path: &str) -> bool;
}

/// A repository in a local directory.
#[derive(Debug)]
pub struct LocalBackend {
    root: PathBuf,
    handles: Mutex<LruCache<String, Arc<File>>>,
}

const TMP_PREFIX: &str = ".tmp-";

impl LocalBackend {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        let cap = std::num::NonZeroUsize::new(64).expect("nonzero");
        Self { root: root.into(), handles: Mutex::new(LruCache::new(cap)) }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn full(&self, path: &str) -> PathBuf {
        self.root.join(path)
    }

    fn handle(&self, path: &str) -> Result<Arc<File>> {
        let mut cache = self.handles.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = cache.get(path) {
            return Ok(f.clone());
        }
        let f = Arc::new(File::open(self.full(path)).map_err(|e| not_found_or_io(path, e))?);
        cache.put(path.to_string(), f.clone());
        Ok(f)
    }

    fn write_tmp(&self, path: &str, data: &[u8]) -> Result<(PathBuf, PathBuf)> {
        let target = self.full(path);
        let dir = target.parent().unwrap_or(&self.root).to_path_buf();
        if !dir.exists() {
            fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
            // The new directory's entry must be durable before anything inside it counts.
            sync_dir(dir.parent().unwrap_or(&self.root))?;
        }
        let tmp_name: [u8; 8] = crate::crypto::random_array()?;
        let tmp = dir.join(format!("{TMP_PREFIX}{}", hex::encode(tmp_name)));
        let mut f = File::create(&tmp).ctx(|| format!("creating {}", tmp.display()))?;
        f.write_all(data).ctx(|| format!("writing {}", tmp.display()))?;
        f.sync_all().ctx(|| format!("syncing {}", tmp.display()))?;
        Ok((tmp, target))
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).ctx(|| format!("syncing directory {}", dir.display()))
}

fn not_found_or_io(path: &str, e: io::Error) -> Error {
    if e.kind() == io::ErrorKind::NotFound {
        Error::Missing { object: path.to_string(), referenced_by: None }
    } else {
        Error::io(format!("reading {path}"), e)
    }
}

impl Backend for LocalBackend {
    fn read(&self, path: &str) -> Result<Vec<u8>> {
        fs::read(self.full(path)).map_err(|e| not_found_or_io(path, e))
    }

    fn read_range_into(&self, path: &str, offset: u64, len: usize, buf: &mut Vec<u8>) -> Result<()> {
        let f = self.handle(path)?;
        buf.clear();
        buf.resize(len, 0);
        f.read_exact_at(buf, offset).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                Error::corrupt(path, format!("file ends before byte {}", offset + len as u64))
            } else {
                Error::io(format!("reading {path} at {offset}"), e)
            }
        })
    }

    fn size(&self, path: &str) -> Result<u64> {
        Ok(fs::metadata(self.full(path)).map_err(|e| not_found_or_io(path, e))?.len())
    }

    fn write(&self, path: &str, data: &[u8]) -> Result<()> {
        let (tmp, target) = self.write_tmp(path, data)?;
        fs::rename(&tmp, &target).ctx(|| format!("renaming into {}", target.display()))?;
        sync_dir(target.parent().unwrap_or(&self.root))
    }

    fn create_new(&self, path: &str, data: &[u8]) -> Result<()> {
        let (tmp, target) = self.write_tmp(path, data)?;
        // hard_link fails if the target exists: an atomic create-if-absent.
        let linked = fs::hard_link(&tmp, &target);
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => sync_dir(target.parent().unwrap_or(&self.root)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                Err(Error::Usage(format!("{} already exists", target.display())))
            }
            Err(e) => Err(Error::io(format!("creating {}", target.display()), e)),
        }
    }

    fn remove(&self, path: &str) -> Result<()> {
        self.handles.lock().unwrap_or_else(|e| e.into_inner()).pop(path);
        match fs::remove_file(self.full(path)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(format!("removing {path}"), e)),
        }
    }

    fn list(&self, dir: &str) -> Result<Vec<String>> {
        let full = self.full(dir);
        let rd = match fs::read_dir(&full) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(format!("listing {}", full.display()), e)),
        };
        let mut names = Vec::new();
        for entry in rd {
            let entry = entry.ctx(|| format!("listing {}", full.display()))?;
            if let Some(name) = entry.file_name().to_str() {
                if !name.starts_with(TMP_PREFIX) {
                    names.push(name.to_string());
                }
            }
        }
        names.sort();
        Ok(names)
    }

    fn exists(&self, path: &str) -> bool {
        self.full(path).exists()
    }
}
