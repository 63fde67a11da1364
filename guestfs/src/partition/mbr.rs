//! MBR (DOS) partition tables with extended partitions and their chain of EBRs.

use std::collections::HashSet;

use blockdev::BlockDev;

use super::{inside, Partition, PartitionType, Scheme, Table};
use crate::error::Result;
use crate::read::{array, le32};

const SECTOR: u64 = 512;
const EXTENDED: [u8; 3] = [0x05, 0x0F, 0x85];
/// Most EBRs followed in one chain (libblkid stops at 100 empty hops).
const MAX_LOGICAL: usize = 128;

struct Entry {
    boot: u8,
    kind: u8,
    start: u32,
    count: u32,
}

fn entries(sector: &[u8; 512]) -> [Entry; 4] {
    std::array::from_fn(|i| {
        let e = &sector[446 + 16 * i..446 + 16 * (i + 1)];
        Entry { boot: e[0], kind: e[4], start: le32(e, 8), count: le32(e, 12) }
    })
}

fn signed(sector: &[u8; 512]) -> bool {
    sector[510] == 0x55 && sector[511] == 0xAA
}

/// Does sector 0 look like a filesystem boot sector (which also ends in 55AA) rather than a
/// partition table?
fn is_boot_sector(s: &[u8; 512]) -> bool {
    let jump = s[0] == 0xEB || s[0] == 0xE9;
    let fat = jump && (s[0x36..0x3B] == *b"FAT12" || s[0x36..0x3B] == *b"FAT16" || s[0x52..0x57] == *b"FAT32");
    fat || s[3..11] == *b"NTFS    " || s[3..11] == *b"EXFAT   "
}

pub(super) fn read(dev: &dyn BlockDev) -> Result<Option<Table>> {
    let s0: [u8; 512] = array(dev, 0, "the MBR")?;
    if !signed(&s0) || is_boot_sector(&s0) {
        return Ok(None);
    }
    let es = entries(&s0);
    // Boot flags other than 0 and 0x80 mean this is not a partition table.
    if es.iter().any(|e| e.boot != 0 && e.boot != 0x80) || es.iter().all(|e| e.kind == 0 || e.count == 0) {
        return Ok(None);
    }
    let mut t = Table { scheme: Scheme::Mbr, sector_size: SECTOR, partitions: Vec::new(), warnings: Vec::new() };
    let mut extended = None;
    for (i, e) in es.iter().enumerate() {
        if e.kind == 0 || e.count == 0 {
            continue;
        }
        if EXTENDED.contains(&e.kind) {
            extended = Some(u64::from(e.start));
            continue;
        }
        let p = Partition {
            number: i as u32 + 1,
            start: u64::from(e.start) * SECTOR,
            len: u64::from(e.count) * SECTOR,
            kind: PartitionType::Mbr(e.kind),
        };
        if inside(dev, &p, &mut t.warnings) {
            t.partitions.push(p);
        }
    }
    if let Some(ext) = extended {
        logical(dev, ext, &mut t)?;
    }
    Ok(Some(t))
}

/// Follow the EBR chain of the extended partition starting at sector `ext`.
fn logical(dev: &dyn BlockDev, ext: u64, t: &mut Table) -> Result<()> {
    let mut ebr = ext;
    let mut seen = HashSet::new();
    let mut number = 5;
    loop {
        if !seen.insert(ebr) {
            t.warnings.push(format!("loop in the extended partition chain at sector {ebr}; stopped"));
            break;
        }
        if seen.len() > MAX_LOGICAL {
            t.warnings.push(format!("more than {MAX_LOGICAL} logical partitions; stopped"));
            break;
        }
        if (ebr + 1) * SECTOR > dev.len() {
            t.warnings.push(format!("extended partition chain points past the disk end (sector {ebr})"));
            break;
        }
        let s: [u8; 512] = array(dev, ebr * SECTOR, "an EBR")?;
        if !signed(&s) {
            t.warnings.push(format!("EBR at sector {ebr} has no 55AA signature; chain stopped"));
            break;
        }
        let es = entries(&s);
        let (data, link) = (&es[0], &es[1]);
        if data.kind != 0 && data.count != 0 {
            let p = Partition {
                number,
                start: (ebr + u64::from(data.start)) * SECTOR,
                len: u64::from(data.count) * SECTOR,
                kind: PartitionType::Mbr(data.kind),
            };
            if inside(dev, &p, &mut t.warnings) {
                t.partitions.push(p);
            }
            number += 1;
        }
        if link.kind == 0 || link.start == 0 {
            return Ok(());
        }
        ebr = ext + u64::from(link.start);
    }
    Ok(())
}
