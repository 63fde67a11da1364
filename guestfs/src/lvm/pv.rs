//! A physical volume's label, PV header and the committed metadata text of its first
//! metadata area.

use blockdev::BlockDev;

use crate::error::{Error, Result};
use crate::read::{array, le32, le64, vec};

const MDA_MAGIC: &[u8; 16] = b" LVM2 x[5A%r0N*>";
/// Largest metadata text read (LVM's default metadata area is ~1 MiB).
const MAX_TEXT: u64 = 16 << 20;
/// Most data or metadata area entries read from a PV header.
const MAX_AREAS: usize = 16;

/// LVM's CRC: the IEEE table, initial value 0xf597a6cf, no final XOR.
pub(crate) fn lvm_crc(data: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new_with_initial(!0xf597_a6cf);
    h.update(data);
    !h.finalize()
}

/// What the label of a PV says.
#[derive(Clone, Debug)]
pub struct PvLabel {
    /// 32 characters, no dashes.
    pub uuid: String,
    pub device_size: u64,
    /// Metadata areas: (byte offset, size).
    pub metadata_areas: Vec<(u64, u64)>,
}

/// The PV label in the first four sectors, or `None` if there is none.
pub fn read_label(dev: &dyn BlockDev) -> Result<Option<PvLabel>> {
    for sector in 0..4u64 {
        if (sector + 1) * 512 > dev.len() {
            break;
        }
        let s: [u8; 512] = array(dev, sector * 512, "an LVM label")?;
        if &s[0..8] != b"LABELONE" || &s[24..32] != b"LVM2 001" {
            continue;
        }
        if lvm_crc(&s[20..]) != le32(&s, 16) {
            return Err(Error::corrupt("LVM label", sector * 512 + 16, "CRC mismatch"));
        }
        let off = le32(&s, 20) as usize;
        if !(32..=512 - 40 - 32).contains(&off) {
            return Err(Error::corrupt("LVM label", sector * 512 + 20, format!("PV header offset {off}")));
        }
        let h = &s[off..];
        let uuid = String::from_utf8_lossy(&h[..32]).into_owned();
        let device_size = le64(h, 32);
        // Data areas, then metadata areas, each list ended by a zero pair.
        let mut at = 40;
        let mut lists = [Vec::new(), Vec::new()];
        for list in &mut lists {
            loop {
                if at + 16 > h.len() || list.len() > MAX_AREAS {
                    return Err(Error::corrupt(
                        "LVM PV header",
                        sector * 512 + (off + at) as u64,
                        "area list too long",
                    ));
                }
                let (o, n) = (le64(h, at), le64(h, at + 8));
                at += 16;
                if o == 0 && n == 0 {
                    break;
                }
                list.push((o, n));
            }
        }
        let [_, metadata_areas] = lists;
        return Ok(Some(PvLabel { uuid, device_size, metadata_areas }));
    }
    Ok(None)
}

/// The committed metadata text (slot 0) of the first usable metadata area.
pub fn read_metadata(dev: &dyn BlockDev, label: &PvLabel) -> Result<Option<Vec<u8>>> {
    for &(start, size) in &label.metadata_areas {
        let h: [u8; 512] = array(dev, start, "an LVM metadata area header")?;
        if &h[4..20] != MDA_MAGIC {
            continue;
        }
        if lvm_crc(&h[4..]) != le32(&h, 0) {
            return Err(Error::corrupt("LVM metadata area header", start, "CRC mismatch"));
        }
        let (off, len, crc) = (le64(&h, 40), le64(&h, 48), le32(&h, 56));
        if len == 0 {
            continue; // no metadata committed here (e.g. ignored area)
        }
        if len > MAX_TEXT || off < 512 || off >= size || size <= 512 {
            return Err(Error::corrupt(
                "LVM metadata area header",
                start + 40,
                format!("text of {len} bytes at {off}"),
            ));
        }
        // The area after its first 512 bytes is a ring: the text may wrap to offset 512.
        let first = len.min(size - off);
        let mut text = vec(dev, start + off, first as usize, "LVM metadata text")?;
        if first < len {
            text.extend(vec(dev, start + 512, (len - first) as usize, "LVM metadata text")?);
        }
        if lvm_crc(&text) != crc {
            return Err(Error::corrupt("LVM metadata text", start + off, "CRC mismatch"));
        }
        return Ok(Some(text));
    }
    Ok(None)
}
