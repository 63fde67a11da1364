//! GUID partition tables: the primary header at LBA 1, or the backup at the last LBA when
//! the primary fails its checks; entries checked against their CRC.

use blockdev::BlockDev;

use super::{inside, Partition, PartitionType, Scheme, Table};
use crate::error::{Error, Result};
use crate::read::{array, le32, le64, vec};

/// A GUID as stored (mixed-endian); `Display` prints the usual text form.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 16]
    }
}

impl std::fmt::Display for Guid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = &self.0;
        write!(
            f,
            "{:08X}-{:04X}-{:04X}-{:02X}{:02X}-{:02X}{:02X}{:02X}{:02X}{:02X}{:02X}",
            le32(b, 0),
            u16::from_le_bytes([b[4], b[5]]),
            u16::from_le_bytes([b[6], b[7]]),
            b[8],
            b[9],
            b[10],
            b[11],
            b[12],
            b[13],
            b[14],
            b[15]
        )
    }
}

impl std::fmt::Debug for Guid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Guid({self})")
    }
}

/// Largest entry array read (128 entries × 128 bytes is 16 KiB; allow 64 times that).
const MAX_ENTRY_BYTES: u64 = 1 << 20;

struct Header {
    entries_lba: u64,
    count: u32,
    entry_size: u32,
    entries_crc: u32,
}

/// Check the header at `lba`; `None` with the reason when it is not a valid GPT header.
fn header(dev: &dyn BlockDev, lba: u64, sector: u64) -> Result<std::result::Result<Header, String>> {
    let b: [u8; 512] = array(dev, lba * sector, "a GPT header")?;
    if &b[0..8] != b"EFI PART" {
        return Ok(Err("no EFI PART signature".into()));
    }
    let size = le32(&b, 12) as usize;
    if !(92..=512).contains(&size) {
        return Ok(Err(format!("header size {size}")));
    }
    let mut h = b[..size].to_vec();
    h[16..20].fill(0);
    if crc32fast::hash(&h) != le32(&b, 16) {
        return Ok(Err("header CRC mismatch".into()));
    }
    if le64(&b, 24) != lba {
        return Ok(Err(format!("header says it is at LBA {}, not {lba}", le64(&b, 24))));
    }
    let hdr =
        Header { entries_lba: le64(&b, 72), count: le32(&b, 80), entry_size: le32(&b, 84), entries_crc: le32(&b, 88) };
    let bytes = u64::from(hdr.count) * u64::from(hdr.entry_size);
    if hdr.entry_size < 128 || hdr.entry_size % 8 != 0 || bytes > MAX_ENTRY_BYTES {
        return Ok(Err(format!("{} entries of {} bytes", hdr.count, hdr.entry_size)));
    }
    Ok(Ok(hdr))
}

fn utf16_name(b: &[u8]) -> String {
    let units: Vec<u16> = b.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).take_while(|&u| u != 0).collect();
    String::from_utf16_lossy(&units)
}

pub(super) fn read(dev: &dyn BlockDev, sector: u64) -> Result<Option<Table>> {
    let sectors = dev.len() / sector;
    if sectors < 3 {
        return Ok(None);
    }
    let last = sectors - 1;
    let mut warnings = Vec::new();
    let (hdr, which) = match header(dev, 1, sector)? {
        Ok(h) => (h, "primary"),
        Err(why) => match header(dev, last, sector)? {
            Ok(h) => {
                // Only worth a warning if there was a GPT to damage at all.
                warnings.push(format!("primary GPT header unusable ({why}); using the backup at LBA {last}"));
                (h, "backup")
            }
            Err(_) if why == "no EFI PART signature" => return Ok(None),
            Err(backup) => {
                return Err(Error::corrupt("GPT header", sector, format!("primary: {why}; backup: {backup}")))
            }
        },
    };
    let bytes = u64::from(hdr.count) * u64::from(hdr.entry_size);
    let at = hdr.entries_lba.checked_mul(sector).filter(|a| a.checked_add(bytes).is_some_and(|e| e <= dev.len()));
    let Some(at) = at else {
        return Err(Error::corrupt("GPT entry array", hdr.entries_lba, format!("{which} header points past the disk")));
    };
    let raw = vec(dev, at, bytes as usize, "the GPT entry array")?;
    if crc32fast::hash(&raw) != hdr.entries_crc {
        return Err(Error::corrupt("GPT entry array", at, format!("CRC mismatch ({which} header)")));
    }
    let mut t = Table { scheme: Scheme::Gpt, sector_size: sector, partitions: Vec::new(), warnings };
    for (i, e) in raw.chunks_exact(hdr.entry_size as usize).enumerate() {
        let type_guid = Guid(e[0..16].try_into().unwrap_or([0; 16]));
        if type_guid.is_zero() {
            continue;
        }
        let (first, last_lba) = (le64(e, 32), le64(e, 40));
        if last_lba < first {
            t.warnings.push(format!("GPT entry {} ends before it starts; skipped", i + 1));
            continue;
        }
        let p = Partition {
            number: i as u32 + 1,
            start: first.saturating_mul(sector),
            len: (last_lba - first + 1).saturating_mul(sector),
            kind: PartitionType::Gpt {
                type_guid,
                unique: Guid(e[16..32].try_into().unwrap_or([0; 16])),
                name: utf16_name(&e[56..128]),
            },
        };
        if inside(dev, &p, &mut t.warnings) {
            t.partitions.push(p);
        }
    }
    Ok(Some(t))
}
