//! What a partition or volume holds, by magic numbers (as libblkid does); never by the
//! partition type alone.

use blockdev::BlockDev;

use crate::error::Result;
use crate::read::{le16, le32};

/// The content of a volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Content {
    /// ext2, ext3 or ext4 (the number), with the volume label.
    Ext {
        version: u8,
        label: String,
    },
    Xfs,
    Btrfs,
    Ntfs,
    Exfat,
    /// FAT12/16/32, decided by the cluster count.
    Fat {
        bits: u8,
    },
    Swap,
    LvmPv,
    Luks,
    Unknown,
}

impl Content {
    /// A short name for listings: "ext4", "ntfs", "lvm2-pv", ...
    pub fn name(&self) -> String {
        match self {
            Content::Ext { version, .. } => format!("ext{version}"),
            Content::Xfs => "xfs".into(),
            Content::Btrfs => "btrfs".into(),
            Content::Ntfs => "ntfs".into(),
            Content::Exfat => "exfat".into(),
            Content::Fat { bits } => format!("fat{bits}"),
            Content::Swap => "swap".into(),
            Content::LvmPv => "lvm2-pv".into(),
            Content::Luks => "luks".into(),
            Content::Unknown => "unknown".into(),
        }
    }
}

/// Bytes at the start of a volume needed to recognise every kind (btrfs's superblock
/// sits at 64 KiB).
const PROBE_LEN: u64 = 0x10000 + 4096;

/// Identify what `dev` holds.
pub fn probe(dev: &dyn BlockDev) -> Result<Content> {
    let n = PROBE_LEN.min(dev.len()) as usize;
    let b = crate::read::vec(dev, 0, n, "the start of a volume")?;
    let at = |o: usize, m: &[u8]| b.get(o..o + m.len()) == Some(m);
    if at(0, b"LUKS\xBA\xBE") {
        return Ok(Content::Luks);
    }
    // LVM2: LABELONE in one of the first four sectors, "LVM2 001" 24 bytes after it.
    if (0..4).any(|s| at(s * 512, b"LABELONE") && at(s * 512 + 0x18, b"LVM2 001")) {
        return Ok(Content::LvmPv);
    }
    if b.len() >= 1024 + 0x80 && le16(&b, 1024 + 0x38) == 0xEF53 {
        return Ok(ext(&b[1024..]));
    }
    if at(0, b"XFSB") {
        return Ok(Content::Xfs);
    }
    if at(0x10040, b"_BHRfS_M") {
        return Ok(Content::Btrfs);
    }
    if at(3, b"NTFS    ") {
        return Ok(Content::Ntfs);
    }
    if at(3, b"EXFAT   ") {
        return Ok(Content::Exfat);
    }
    if let Some(bits) = fat(&b) {
        return Ok(Content::Fat { bits });
    }
    for page in [4096usize, 8192, 16384, 32768, 65536] {
        if at(page - 10, b"SWAPSPACE2") || at(page - 10, b"SWAP-SPACE") {
            return Ok(Content::Swap);
        }
    }
    Ok(Content::Unknown)
}

/// ext2/3/4 from the superblock's feature flags (`sb` starts at the superblock).
/// 2, 3 or 4, from the features of an ext superblock (as blkid decides it).
pub(crate) fn ext_version(sb: &[u8]) -> u8 {
    let (compat, incompat, ro) = (le32(sb, 0x5C), le32(sb, 0x60), le32(sb, 0x64));
    let journal = compat & 0x4 != 0;
    let beyond_ext3 = incompat & !(0x2 | 0x4 | 0x10) != 0 || ro & !(0x1 | 0x2 | 0x4) != 0;
    if beyond_ext3 {
        4
    } else if journal {
        3
    } else {
        2
    }
}

fn ext(sb: &[u8]) -> Content {
    let version = ext_version(sb);
    let label = String::from_utf8_lossy(&sb[0x78..0x88]).trim_end_matches('\0').to_owned();
    Content::Ext { version, label }
}

/// FAT12/16/32 from a plausible BIOS parameter block, by cluster count.
fn fat(b: &[u8]) -> Option<u8> {
    if b.len() < 512 || !(b[0] == 0xEB || b[0] == 0xE9) || b[510] != 0x55 || b[511] != 0xAA {
        return None;
    }
    let bps = u32::from(le16(b, 0x0B));
    let spc = u32::from(b[0x0D]);
    let reserved = u32::from(le16(b, 0x0E));
    let fats = u32::from(b[0x10]);
    let root_entries = u32::from(le16(b, 0x11));
    if !matches!(bps, 512 | 1024 | 2048 | 4096) || !spc.is_power_of_two() || reserved == 0 || !(1..=4).contains(&fats) {
        return None;
    }
    let total = match le16(b, 0x13) {
        0 => le32(b, 0x20),
        n => u32::from(n),
    };
    let per_fat = match le16(b, 0x16) {
        0 => le32(b, 0x24),
        n => u32::from(n),
    };
    let root_sectors = (root_entries * 32).div_ceil(bps);
    let meta = reserved.checked_add(fats.checked_mul(per_fat)?)?.checked_add(root_sectors)?;
    let clusters = total.checked_sub(meta)? / spc;
    Some(if clusters < 4085 {
        12
    } else if clusters < 65525 {
        16
    } else {
        32
    })
}
