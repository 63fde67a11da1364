//! The ext2/3/4 superblock (1024 bytes at byte 1024) and the features this reader accepts.

use crate::error::{Error, Result};
use crate::read::{le16, le32};

const INCOMPAT_FILETYPE: u32 = 0x2;
const INCOMPAT_RECOVER: u32 = 0x4;
const INCOMPAT_EXTENTS: u32 = 0x40;
pub(crate) const INCOMPAT_64BIT: u32 = 0x80;
const INCOMPAT_MMP: u32 = 0x100;
const INCOMPAT_FLEX_BG: u32 = 0x200;
const INCOMPAT_EA_INODE: u32 = 0x400;
const INCOMPAT_CSUM_SEED: u32 = 0x2000;
const INCOMPAT_LARGEDIR: u32 = 0x4000;
pub(crate) const INCOMPAT_INLINE_DATA: u32 = 0x8000;
/// Everything a read-only walk can handle (checksums are not verified; a journal that needs
/// recovery is read as it is on disk).
const SUPPORTED: u32 = INCOMPAT_FILETYPE
    | INCOMPAT_RECOVER
    | INCOMPAT_EXTENTS
    | INCOMPAT_64BIT
    | INCOMPAT_MMP
    | INCOMPAT_FLEX_BG
    | INCOMPAT_EA_INODE
    | INCOMPAT_CSUM_SEED
    | INCOMPAT_LARGEDIR
    | INCOMPAT_INLINE_DATA;

/// The superblock fields this reader uses, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    pub inodes_count: u32,
    pub blocks_count: u64,
    pub first_data_block: u32,
    pub block_size: u64,
    pub inodes_per_group: u32,
    pub blocks_per_group: u32,
    pub inode_size: u16,
    pub desc_size: u16,
    pub incompat: u32,
    pub label: String,
    /// True when the journal needs recovery: recent changes may be missing from what is read.
    pub needs_recovery: bool,
}

fn bad(detail: String) -> Error {
    Error::corrupt("ext4 superblock", 1024, detail)
}

impl Superblock {
    pub fn parse(b: &[u8; 1024]) -> Result<Self> {
        if le16(b, 0x38) != 0xEF53 {
            return Err(bad("no ext2/3/4 magic".into()));
        }
        let log = le32(b, 0x18);
        if log > 6 {
            return Err(bad(format!("block size 1024 << {log}")));
        }
        let incompat = le32(b, 0x60);
        if incompat & !SUPPORTED != 0 {
            return Err(Error::Unsupported(format!(
                "ext4 incompatible features {:#x} are not supported (encryption, compression, meta_bg, …)",
                incompat & !SUPPORTED
            )));
        }
        let rev = le32(b, 0x4C);
        let inode_size = if rev == 0 { 128 } else { le16(b, 0x58) };
        let desc_size = if incompat & INCOMPAT_64BIT != 0 { le16(b, 0xFE) } else { 32 };
        let block_size = 1024u64 << log;
        let sb = Superblock {
            inodes_count: le32(b, 0x00),
            blocks_count: u64::from(le32(b, 0x04))
                | if incompat & INCOMPAT_64BIT != 0 { u64::from(le32(b, 0x150)) << 32 } else { 0 },
            first_data_block: le32(b, 0x14),
            block_size,
            inodes_per_group: le32(b, 0x28),
            blocks_per_group: le32(b, 0x20),
            inode_size,
            desc_size,
            incompat,
            label: String::from_utf8_lossy(&b[0x78..0x88]).trim_end_matches('\0').to_owned(),
            needs_recovery: incompat & INCOMPAT_RECOVER != 0,
        };
        if !(128..=block_size).contains(&u64::from(sb.inode_size)) || !sb.inode_size.is_power_of_two() {
            return Err(bad(format!("inode size {}", sb.inode_size)));
        }
        if !(32..=1024).contains(&sb.desc_size) || !sb.desc_size.is_power_of_two() {
            return Err(bad(format!("group descriptor size {}", sb.desc_size)));
        }
        if sb.inodes_per_group == 0 || sb.blocks_per_group == 0 || sb.inodes_count == 0 {
            return Err(bad("zero inodes or blocks per group".into()));
        }
        Ok(sb)
    }

    pub fn groups(&self) -> u64 {
        u64::from(self.inodes_count).div_ceil(u64::from(self.inodes_per_group))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> [u8; 1024] {
        let mut b = [0u8; 1024];
        b[0x38..0x3A].copy_from_slice(&0xEF53u16.to_le_bytes());
        b[0x00..0x04].copy_from_slice(&1024u32.to_le_bytes()); // inodes
        b[0x04..0x08].copy_from_slice(&8192u32.to_le_bytes()); // blocks
        b[0x18..0x1C].copy_from_slice(&2u32.to_le_bytes()); // 4 KiB
        b[0x20..0x24].copy_from_slice(&32768u32.to_le_bytes());
        b[0x28..0x2C].copy_from_slice(&1024u32.to_le_bytes());
        b[0x4C..0x50].copy_from_slice(&1u32.to_le_bytes());
        b[0x58..0x5A].copy_from_slice(&256u16.to_le_bytes());
        b[0x60..0x64].copy_from_slice(&0x2C2u32.to_le_bytes()); // filetype, extents, 64bit, flex_bg
        b[0xFE..0x100].copy_from_slice(&64u16.to_le_bytes());
        b
    }

    #[test]
    fn parses_and_rejects() {
        let sb = Superblock::parse(&good()).unwrap();
        assert_eq!((sb.block_size, sb.inode_size, sb.desc_size, sb.groups()), (4096, 256, 64, 1));
        let mut b = good();
        b[0x38] = 0;
        assert!(Superblock::parse(&b).is_err());
        let mut b = good();
        b[0x60..0x64].copy_from_slice(&0x10000u32.to_le_bytes()); // encrypt
        assert!(matches!(Superblock::parse(&b), Err(Error::Unsupported(_))));
        let mut b = good();
        b[0x58..0x5A].copy_from_slice(&100u16.to_le_bytes());
        assert!(Superblock::parse(&b).is_err());
        let mut b = good();
        b[0x18..0x1C].copy_from_slice(&40u32.to_le_bytes());
        assert!(Superblock::parse(&b).is_err());
        let mut b = good();
        b[0x28..0x2C].copy_from_slice(&0u32.to_le_bytes());
        assert!(Superblock::parse(&b).is_err());
    }
}
