//! A read-only ext2/3/4 reader over [`BlockDev`], written here because `ext4-view` (0.9)
//! exposes neither inode numbers nor timestamps and is not `Send`: the superblock, group
//! descriptors, inode records, extent trees and ext2/3 block maps, directories, symlinks,
//! and file contents as devices.

mod dir;
mod extent;
mod file;
mod inode;
mod superblock;

use std::sync::Arc;

use blockdev::BlockDev;

pub use dir::DirEntry;
pub use extent::Run;
pub use file::FileDev;
pub use inode::{Inode, Time, EXTENTS_FL, INLINE_DATA_FL};
pub use superblock::Superblock;

use crate::error::{Error, Result};
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
        let sb = Superblock::parse(&array(&*dev, 1024, "the ext4 superblock")?)?;
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
        Ok(Self { dev, sb, inode_tables })
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
            // Up to 60 bytes live in i_block; longer inline data continues in an xattr.
            if inode.size > 60 {
                return Err(Error::Unsupported(format!("inode {}: inline data beyond 60 bytes", inode.ino)));
            }
            return Ok(FileDev::inline(self.dev.clone(), inode.block[..inode.size as usize].to_vec()));
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
        let mut cur = self.inode(ROOT)?;
        for part in path.split(|&c| c == b'/').filter(|p| !p.is_empty()) {
            let entries = self.read_dir(&cur)?;
            let e = entries
                .iter()
                .find(|e| e.name == part)
                .ok_or_else(|| Error::NotFound(String::from_utf8_lossy(path).into_owned()))?;
            cur = self.inode(e.ino)?;
        }
        Ok(cur)
    }
}
