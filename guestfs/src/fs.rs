//! What every guest filesystem reader offers, so the CLI, the FUSE view and file restore
//! walk ext4, FAT and NTFS the same way: nodes named by a 64-bit inode number that is
//! stable for the life of the opened filesystem (the filesystem's own inode or record
//! number where it has one, so hard links share it), their metadata, directory listings,
//! symlink targets, and file contents as a [`BlockDev`].

use std::sync::Arc;

use blockdev::BlockDev;

use crate::error::{Error, Result};
use crate::probe::Content;

/// A timestamp: seconds since the Unix epoch and nanoseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Time {
    pub secs: i64,
    pub nanos: u32,
}

/// The type of a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    CharDevice,
    BlockDevice,
    Fifo,
    Socket,
}

impl Kind {
    /// From the file type bits of a Unix `st_mode`.
    pub fn from_mode(mode: u32) -> Option<Kind> {
        Some(match mode & 0o170000 {
            0o100000 => Kind::File,
            0o040000 => Kind::Dir,
            0o120000 => Kind::Symlink,
            0o020000 => Kind::CharDevice,
            0o060000 => Kind::BlockDevice,
            0o010000 => Kind::Fifo,
            0o140000 => Kind::Socket,
            _ => return None,
        })
    }

    /// The file type bits of a Unix `st_mode`.
    pub fn mode_bits(self) -> u32 {
        match self {
            Kind::File => 0o100000,
            Kind::Dir => 0o040000,
            Kind::Symlink => 0o120000,
            Kind::CharDevice => 0o020000,
            Kind::BlockDevice => 0o060000,
            Kind::Fifo => 0o010000,
            Kind::Socket => 0o140000,
        }
    }
}

/// The metadata of a node, as `stat` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stat {
    pub ino: u64,
    pub kind: Kind,
    /// Permission bits, including setuid/setgid/sticky (`0o7777`).
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    /// Bytes of content (the target length for symlinks).
    pub size: u64,
    pub nlink: u32,
    pub atime: Time,
    pub mtime: Time,
    pub ctime: Time,
    pub crtime: Option<Time>,
    /// Device number (major, minor) of character and block devices.
    pub rdev: Option<(u32, u32)>,
}

impl Stat {
    /// The whole Unix `st_mode`.
    pub fn mode(&self) -> u32 {
        self.kind.mode_bits() | u32::from(self.perm & 0o7777)
    }
}

/// One name in a directory (never `.` or `..`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    /// Raw bytes: UTF-8 for FAT and NTFS (converted from UTF-16), as stored for ext4.
    pub name: Vec<u8>,
    pub ino: u64,
    pub kind: Kind,
}

/// A guest filesystem opened read-only. `Send + Sync`: one opened filesystem serves
/// many threads.
pub trait FileSystem: Send + Sync + std::fmt::Debug {
    /// "ext4", "fat32", "ntfs", ...
    fn type_name(&self) -> String;
    /// The root directory.
    fn root(&self) -> u64;
    fn stat(&self, ino: u64) -> Result<Stat>;
    /// The names in directory `ino`, in on-disk order, without `.` and `..`.
    fn read_dir(&self, ino: u64) -> Result<Vec<DirEntry>>;
    /// The node named `name` in directory `dir`.
    fn lookup(&self, dir: u64, name: &[u8]) -> Result<Option<u64>> {
        Ok(self.read_dir(dir)?.into_iter().find(|e| e.name == name).map(|e| e.ino))
    }
    fn read_link(&self, ino: u64) -> Result<Vec<u8>>;
    /// The contents of regular file `ino`: random access, holes reported by `allocation`.
    fn open(&self, ino: u64) -> Result<Arc<dyn BlockDev>>;
}

/// Whether vmvault has a reader for filesystems of this kind.
pub fn readable(content: &Content) -> bool {
    matches!(content, Content::Ext { .. } | Content::Fat { .. } | Content::Ntfs)
}

/// Open the filesystem `content` names on `dev`; `Unsupported` for kinds without a reader.
pub fn open(content: &Content, dev: Arc<dyn BlockDev>) -> Result<Arc<dyn FileSystem>> {
    match content {
        Content::Ext { .. } => Ok(Arc::new(crate::ext4::Ext4::open(dev)?)),
        Content::Fat { .. } => Ok(Arc::new(crate::fat::Fat::open(dev)?)),
        Content::Ntfs => Ok(Arc::new(crate::ntfs::Ntfs::open(dev)?)),
        other => Err(Error::Unsupported(format!("vmvault cannot read {} filesystems", other.name()))),
    }
}

/// The node at absolute `path` (`/etc/hostname`), without following symlinks.
pub fn resolve(fs: &dyn FileSystem, path: &[u8]) -> Result<u64> {
    let mut cur = fs.root();
    for part in path.split(|&c| c == b'/').filter(|p| !p.is_empty() && *p != b".") {
        cur = fs.lookup(cur, part)?.ok_or_else(|| Error::NotFound(String::from_utf8_lossy(path).into_owned()))?;
    }
    Ok(cur)
}
