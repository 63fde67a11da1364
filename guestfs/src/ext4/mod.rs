//! A read-only ext2/3/4 reader over [`BlockDev`], written here because `ext4-view` (0.9)
//! exposes neither inode numbers nor timestamps and is not `Send`: the superblock, group
//! descriptors, inode records, extent trees and ext2/3 block maps, directories, symlinks,
//! and file contents as devices.

mod dir;
mod extent;
mod inode;
mod superblock;

use std::sync::Arc;

use blockdev::BlockDev;

pub use crate::rundev::RunDev as FileDev;
pub use dir::DirEntry;
pub use extent::Run;
pub use inode::{Inode, Time, EXTENTS_FL, INLINE_DATA_FL};
pub use superblock::Superblock;

use crate::error::{Error, Result};
use crate::fs::{self, FileSystem, Kind, Stat};
use crate::read::{array, le32, vec};

/// Largest directory read into memory at once.
const MAX_DIR: u64 = 256 << 20;
/// The root directory's inode.
pub const ROOT: u32 = 2;

/// Largest group descriptor table read (a 16 TiB filesystem with 4 KiB blocks has 131 072
/// groups: 8 MiB of 64-byte descriptors).
const MAX_GDT: u64 = 64 << 20;

/// An open ext2/3/4 filesystem. `Send + Sync`; reads go straight to the device.
pub struct Ext4 {
    dev: Arc<dyn BlockDev>,
    pub sb: Superblock,
    /// 2, 3 or 4.
    version: u8,
    /// Inode table block of each group.
    inode_tables: Vec<u64>,
}

impl std::fmt::Debug for Ext4 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ext4({:?}, {} groups)", self.sb.label, self.inode_tables.len())
    }
}

impl Ext4 {
    pub fn open(dev: Arc<dyn BlockDev>) -> Result<Self> {
        let raw = array(&*dev, 1024, "the ext4 superblock")?;
        let sb = Superblock::parse(&raw)?;
        let version = crate::probe::ext_version(&raw);
        let groups = sb.groups();
        let gdt_bytes = groups * u64::from(sb.desc_size);
        if gdt_bytes > MAX_GDT {
            return Err(Error::corrupt("ext4 superblock", 1024, format!("{groups} block groups")));
        }
        let gdt_at = (u64::from(sb.first_data_block) + 1) * sb.block_size;
        let gdt = vec(&*dev, gdt_at, gdt_bytes as usize, "the ext4 group descriptors")?;
        let wide = sb.incompat & superblock::INCOMPAT_64BIT != 0 && sb.desc_size >= 64;
        let inode_tables = gdt
            .chunks_exact(usize::from(sb.desc_size))
            .map(|d| u64::from(le32(d, 0x08)) | if wide { u64::from(le32(d, 0x28)) << 32 } else { 0 })
            .collect();
        Ok(Self { dev, sb, version, inode_tables })
    }

    /// Inode `ino` (1-based).
    pub fn inode(&self, ino: u32) -> Result<Inode> {
        if ino == 0 || ino > self.sb.inodes_count {
            return Err(Error::corrupt("ext4 inode number", 0, format!("{ino} is out of range")));
        }
        let index = u64::from(ino - 1);
        let group = index / u64::from(self.sb.inodes_per_group);
        let table = self.inode_tables[group as usize];
        let size = u64::from(self.sb.inode_size);
        let at = table
            .checked_mul(self.sb.block_size)
            .and_then(|t| t.checked_add((index % u64::from(self.sb.inodes_per_group)) * size))
            .filter(|&a| a + size <= self.dev.len())
            .ok_or_else(|| Error::corrupt("ext4 group descriptor", group, format!("inode table block {table}")))?;
        let b = vec(&*self.dev, at, size as usize, "an ext4 inode")?;
        Ok(Inode::parse(ino, &b))
    }
}

impl Ext4 {
    /// The contents of `inode` as a device (regular files, directories, slow symlinks).
    pub fn contents(&self, inode: &Inode) -> Result<FileDev> {
        if inode.flags & INLINE_DATA_FL != 0 {
            // The first 60 bytes live in i_block, the rest in the system.data attribute.
            let mut data = inode.block.to_vec();
            data.extend_from_slice(&inode.inline_tail);
            if inode.size > data.len() as u64 {
                return Err(Error::corrupt(
                    "ext4 inline data",
                    u64::from(inode.ino),
                    format!("inode {}: {} bytes, {} stored", inode.ino, inode.size, data.len()),
                ));
            }
            data.truncate(inode.size as usize);
            return Ok(FileDev::inline(self.dev.clone(), data));
        }
        let runs = extent::runs(&*self.dev, self.sb.block_size, inode)?;
        Ok(FileDev::new(self.dev.clone(), self.sb.block_size, inode.size, runs))
    }

    /// The entries of directory `inode` (including `.` and `..`).
    pub fn read_dir(&self, inode: &Inode) -> Result<Vec<DirEntry>> {
        if !inode.is_dir() {
            return Err(Error::Unsupported(format!("inode {} is not a directory", inode.ino)));
        }
        if inode.size > MAX_DIR {
            return Err(Error::corrupt("ext4 directory", u64::from(inode.ino), format!("{} bytes", inode.size)));
        }
        if inode.flags & INLINE_DATA_FL != 0 {
            // i_block holds the parent's inode number, then entries; the system.data
            // attribute holds more entries. Neither stores `.` or `..`.
            let parent = le32(&inode.block, 0);
            let mut out = vec![
                DirEntry { name: b".".to_vec(), ino: inode.ino, file_type: 2 },
                DirEntry { name: b"..".to_vec(), ino: parent, file_type: 2 },
            ];
            out.extend(dir::parse(&inode.block[4..], 56, inode.ino)?);
            if !inode.inline_tail.is_empty() {
                out.extend(dir::parse(&inode.inline_tail, inode.inline_tail.len(), inode.ino)?);
            }
            return Ok(out);
        }
        let data = blockdev::read_all(&self.contents(inode)?).map_err(|e| Error::io("reading a directory", e))?;
        dir::parse(&data, self.sb.block_size as usize, inode.ino)
    }

    /// The target of symlink `inode`.
    pub fn read_link(&self, inode: &Inode) -> Result<Vec<u8>> {
        if !inode.is_symlink() || inode.size > 65536 {
            return Err(Error::Unsupported(format!("inode {} is not a symlink", inode.ino)));
        }
        // Fast symlinks keep the target in i_block (no extents, no blocks).
        if inode.size < 60 && inode.flags & (EXTENTS_FL | INLINE_DATA_FL) == 0 {
            return Ok(inode.block[..inode.size as usize].to_vec());
        }
        blockdev::read_all(&self.contents(inode)?).map_err(|e| Error::io("reading a symlink", e))
    }

    /// The inode at absolute `path` (`/etc/hostname`), without following symlinks.
    pub fn lookup(&self, path: &[u8]) -> Result<Inode> {
        self.inode(ino32(fs::resolve(self, path)?)?)
    }
}

fn ino32(ino: u64) -> Result<u32> {
    u32::try_from(ino).map_err(|_| Error::NotFound(format!("ext4 inode {ino}")))
}

fn kind_of(inode: &Inode) -> Result<Kind> {
    Kind::from_mode(u32::from(inode.mode)).ok_or_else(|| {
        Error::corrupt("ext4 inode", u64::from(inode.ino), format!("file type bits {:#o}", inode.mode & 0xF000))
    })
}

/// Kind from a directory entry's type byte, without reading the inode.
fn kind_of_entry(t: u8) -> Option<Kind> {
    Some(match t {
        1 => Kind::File,
        2 => Kind::Dir,
        3 => Kind::CharDevice,
        4 => Kind::BlockDevice,
        5 => Kind::Fifo,
        6 => Kind::Socket,
        7 => Kind::Symlink,
        _ => return None,
    })
}

impl FileSystem for Ext4 {
    fn type_name(&self) -> String {
        format!("ext{}", self.version)
    }

    fn root(&self) -> u64 {
        u64::from(ROOT)
    }

    fn stat(&self, ino: u64) -> Result<Stat> {
        let i = self.inode(ino32(ino)?)?;
        let kind = kind_of(&i)?;
        Ok(Stat {
            ino,
            kind,
            perm: i.mode & 0o7777,
            uid: i.uid,
            gid: i.gid,
            size: if matches!(kind, Kind::File | Kind::Dir | Kind::Symlink) { i.size } else { 0 },
            nlink: u32::from(i.links),
            atime: i.atime,
            mtime: i.mtime,
            ctime: i.ctime,
            crtime: i.crtime,
            rdev: matches!(kind, Kind::CharDevice | Kind::BlockDevice).then(|| i.rdev()),
        })
    }

    fn read_dir(&self, ino: u64) -> Result<Vec<fs::DirEntry>> {
        let dir = self.inode(ino32(ino)?)?;
        let mut out = Vec::new();
        for e in Ext4::read_dir(self, &dir)? {
            if e.name == b"." || e.name == b".." {
                continue;
            }
            let kind = match kind_of_entry(e.file_type) {
                Some(k) => k,
                // No type in the entry (ext2 without the filetype feature): ask the inode.
                None => kind_of(&self.inode(e.ino)?)?,
            };
            out.push(fs::DirEntry { name: e.name, ino: u64::from(e.ino), kind });
        }
        Ok(out)
    }

    fn read_link(&self, ino: u64) -> Result<Vec<u8>> {
        Ext4::read_link(self, &self.inode(ino32(ino)?)?)
    }

    fn open(&self, ino: u64) -> Result<Arc<dyn BlockDev>> {
        let i = self.inode(ino32(ino)?)?;
        if kind_of(&i)? != Kind::File {
            return Err(Error::Unsupported(format!("ext4 inode {ino} is not a regular file")));
        }
        Ok(Arc::new(self.contents(&i)?))
    }
}
