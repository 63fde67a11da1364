//! Partition tables: GPT (primary header, or the backup one when the primary is damaged)
//! and MBR (primary, extended and logical partitions). 512-byte sectors, as VM disks use;
//! GPT is also tried with 4096-byte sectors.

mod gpt;
mod mbr;

use blockdev::BlockDev;

pub use gpt::Guid;

use crate::error::Result;

/// Which kind of table a disk has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    Mbr,
    Gpt,
}

/// What a table says a partition is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PartitionType {
    /// The MBR type byte (0x83 Linux, 0x8E LVM, 0x07 NTFS, ...).
    Mbr(u8),
    /// GPT type and unique GUIDs and the partition name.
    Gpt { type_guid: Guid, unique: Guid, name: String },
}

/// One partition: where it is and what its table says it is (contents are probed separately).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    /// The number Linux gives it: GPT entry index + 1; MBR primaries 1-4, logicals from 5.
    pub number: u32,
    /// Byte offset and length on the disk.
    pub start: u64,
    pub len: u64,
    pub kind: PartitionType,
}

/// A partition table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Table {
    pub scheme: Scheme,
    pub sector_size: u64,
    pub partitions: Vec<Partition>,
    /// Things that were wrong but did not stop reading (a damaged primary GPT header, an entry
    /// beyond the disk end, a loop in the extended partition chain).
    pub warnings: Vec<String>,
}

/// The partition table of `dev`, or `None` when it has none (a whole-disk filesystem or
/// volume). A table that is present but unreadable is an error.
pub fn read_table(dev: &dyn BlockDev) -> Result<Option<Table>> {
    if dev.len() < 1024 {
        return Ok(None);
    }
    for sector in [512u64, 4096] {
        if let Some(t) = gpt::read(dev, sector)? {
            return Ok(Some(t));
        }
    }
    mbr::read(dev)
}

/// Keep a partition only if it lies inside the disk; say so otherwise.
fn inside(dev: &dyn BlockDev, p: &Partition, warnings: &mut Vec<String>) -> bool {
    let ok = p.len > 0 && p.start.checked_add(p.len).is_some_and(|end| end <= dev.len());
    if !ok {
        warnings.push(format!(
            "partition {} ({} bytes at byte {}) does not fit in the {}-byte disk; skipped",
            p.number,
            p.len,
            p.start,
            dev.len()
        ));
    }
    ok
}
