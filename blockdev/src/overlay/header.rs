//! The overlay file's header: 4096 bytes at offset 0, little-endian, CRC-protected.
//! Byte layout in `format-spec/OVERLAY.md`.

use std::io;

pub(crate) const HEADER_LEN: usize = 4096;
const MAGIC: &[u8; 8] = b"VMVOVRL1";
const VERSION: u32 = 1;
/// Longest base identity accepted (bytes of UTF-8).
pub const MAX_BASE_ID: usize = 2048;
/// Smallest and largest overlay block sizes.
pub const MIN_BLOCK: u32 = 4096;
pub const MAX_BLOCK: u32 = 1 << 20;
/// One bitmap page: the unit in which the block-state map is written back.
pub(crate) const BITMAP_PAGE: u64 = 4096;

/// What an overlay file says about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OverlayHeader {
    /// Granularity of copy-on-write, a power of two in `MIN_BLOCK..=MAX_BLOCK`.
    pub block_size: u32,
    /// Length of the device the overlay presents (and of its base).
    pub size: u64,
    /// Unix seconds when the overlay was created.
    pub created: u64,
    /// Who the base is, in the creator's words (vmvault: `snapshot/stream`). Opening checks it.
    pub base_id: String,
}

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("overlay header: {msg}"))
}

impl OverlayHeader {
    pub fn blocks(&self) -> u64 {
        self.size.div_ceil(u64::from(self.block_size))
    }

    /// Bitmap bytes: 2 bits per block, rounded up to whole pages.
    pub(crate) fn bitmap_len(&self) -> u64 {
        self.blocks().div_ceil(4).div_ceil(BITMAP_PAGE) * BITMAP_PAGE
    }

    pub(crate) fn bitmap_offset(&self) -> u64 {
        HEADER_LEN as u64
    }

    /// Block `i` lives at `data_offset + i * block_size` (the file is sparse).
    pub(crate) fn data_offset(&self) -> u64 {
        (self.bitmap_offset() + self.bitmap_len()).next_multiple_of(u64::from(self.block_size))
    }

    pub(crate) fn validate(&self) -> io::Result<()> {
        let bs = self.block_size;
        if !bs.is_power_of_two() || !(MIN_BLOCK..=MAX_BLOCK).contains(&bs) {
            return Err(bad(format!("block size {bs} is not a power of two in {MIN_BLOCK}..={MAX_BLOCK}")));
        }
        if self.base_id.len() > MAX_BASE_ID {
            return Err(bad(format!("base identity of {} bytes is longer than {MAX_BASE_ID}", self.base_id.len())));
        }
        // The data area must fit in a file: ext4 and XFS allow 2^63 - 1 bytes at most.
        if self.size > 1 << 60 {
            return Err(bad(format!("size {} is beyond what an overlay supports", self.size)));
        }
        Ok(())
    }

    pub(crate) fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.block_size.to_le_bytes());
        b[16..24].copy_from_slice(&self.size.to_le_bytes());
        b[24..32].copy_from_slice(&self.bitmap_offset().to_le_bytes());
        b[32..40].copy_from_slice(&self.bitmap_len().to_le_bytes());
        b[40..48].copy_from_slice(&self.data_offset().to_le_bytes());
        b[48..56].copy_from_slice(&self.created.to_le_bytes());
        let id = self.base_id.as_bytes();
        b[56..58].copy_from_slice(&(id.len() as u16).to_le_bytes());
        b[58..58 + id.len()].copy_from_slice(id);
        let crc = crc32fast::hash(&b[..HEADER_LEN - 4]);
        b[HEADER_LEN - 4..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub(crate) fn from_bytes(b: &[u8]) -> io::Result<Self> {
        let b: &[u8; HEADER_LEN] =
            b.get(..HEADER_LEN).and_then(|s| s.try_into().ok()).ok_or_else(|| bad("short".into()))?;
        if &b[0..8] != MAGIC {
            return Err(bad("not a vmvault overlay (bad magic at offset 0)".into()));
        }
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
        let crc = crc32fast::hash(&b[..HEADER_LEN - 4]);
        if crc != u32_at(HEADER_LEN - 4) {
            return Err(bad(format!("checksum mismatch at offset {}", HEADER_LEN - 4)));
        }
        let version = u32_at(8);
        if version != VERSION {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("overlay version {version} (this build reads {VERSION})"),
            ));
        }
        let id_len = usize::from(u16::from_le_bytes([b[56], b[57]]));
        if id_len > MAX_BASE_ID {
            return Err(bad(format!("base identity length {id_len} at offset 56 exceeds {MAX_BASE_ID}")));
        }
        let base_id = std::str::from_utf8(&b[58..58 + id_len]).map_err(|_| bad("base identity is not UTF-8".into()))?;
        let h = Self { block_size: u32_at(12), size: u64_at(16), created: u64_at(48), base_id: base_id.to_owned() };
        h.validate()?;
        let derived = (h.bitmap_offset(), h.bitmap_len(), h.data_offset());
        if (u64_at(24), u64_at(32), u64_at(40)) != derived {
            return Err(bad(format!("layout fields at offsets 24..48 disagree with block size and size {derived:?}")));
        }
        if b[58 + id_len..HEADER_LEN - 4].iter().any(|&x| x != 0) {
            return Err(bad("reserved bytes are not zero".into()));
        }
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> OverlayHeader {
        OverlayHeader { block_size: 65536, size: (1 << 40) + 512, created: 1_700_000_000, base_id: "snap/xvda".into() }
    }

    #[test]
    fn round_trip_and_layout() {
        let h = sample();
        assert_eq!(OverlayHeader::from_bytes(&h.to_bytes()).unwrap(), h);
        assert_eq!(h.blocks(), (1 << 24) + 1);
        assert_eq!(h.bitmap_len(), 4 << 20 | 4096);
        assert_eq!(h.data_offset() % 65536, 0);
        assert!(h.data_offset() >= 4096 + h.bitmap_len());
    }

    #[test]
    fn every_single_bit_flip_is_rejected() {
        let good = sample().to_bytes();
        for byte in (0..HEADER_LEN).step_by(7) {
            let mut b = good;
            b[byte] ^= 0x10;
            assert!(OverlayHeader::from_bytes(&b).is_err(), "flip at {byte} accepted");
        }
        assert!(OverlayHeader::from_bytes(&good[..100]).is_err());
    }

    #[test]
    fn invalid_block_sizes() {
        for bs in [0, 512, 3 << 12, 2 << 20] {
            let h = OverlayHeader { block_size: bs, ..sample() };
            assert!(h.validate().is_err(), "{bs}");
        }
    }
}
