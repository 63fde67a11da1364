//! The dynamic disk header (1024 bytes, big-endian) and its parent locators.

use super::footer::{be32, be64, checksum, VERSION};
use crate::{Error, Result};

/// `cxsparse`.
pub const HEADER_COOKIE: &[u8; 8] = b"cxsparse";
/// Default and written block size: 2 MiB.
pub const BLOCK_SIZE: u32 = 2 << 20;
/// Largest block size accepted when reading (blocks are read whole).
const MAX_BLOCK_SIZE: u32 = 256 << 20;

/// A parent locator entry (differencing disks).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Locator {
    /// Platform code: `W2ru`, `W2ku`, `MacX`, …
    pub code: [u8; 4],
    /// Bytes of platform data.
    pub length: u32,
    /// Absolute file offset of the data.
    pub offset: u64,
}

/// The dynamic disk header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DynHeader {
    pub table_offset: u64,
    pub max_table_entries: u32,
    pub block_size: u32,
    pub parent_id: [u8; 16],
    pub parent_timestamp: u32,
    /// The parent's file name, decoded from UTF-16BE (empty when none).
    pub parent_name: String,
    pub locators: Vec<Locator>,
}

impl DynHeader {
    /// A header for a new dynamic disk of `size` bytes whose BAT follows at `table_offset`.
    pub fn new(size: u64, table_offset: u64) -> Result<Self> {
        let entries = u32::try_from(size.div_ceil(u64::from(BLOCK_SIZE)))
            .map_err(|_| Error::Usage(format!("{size} bytes need too many VHD blocks")))?;
        Ok(DynHeader {
            table_offset,
            max_table_entries: entries,
            block_size: BLOCK_SIZE,
            parent_id: [0; 16],
            parent_timestamp: 0,
            parent_name: String::new(),
            locators: Vec::new(),
        })
    }

    /// The 1024 bytes, checksum included. Of the parent fields, the id, timestamp and name
    /// are written; locators are not (differencing disks written here name their parent by
    /// unique id and file name only).
    pub fn to_bytes(&self) -> [u8; 1024] {
        let mut b = [0u8; 1024];
        b[0..8].copy_from_slice(HEADER_COOKIE);
        b[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
        b[16..24].copy_from_slice(&self.table_offset.to_be_bytes());
        b[24..28].copy_from_slice(&VERSION.to_be_bytes());
        b[28..32].copy_from_slice(&self.max_table_entries.to_be_bytes());
        b[32..36].copy_from_slice(&self.block_size.to_be_bytes());
        b[40..56].copy_from_slice(&self.parent_id);
        b[56..60].copy_from_slice(&self.parent_timestamp.to_be_bytes());
        for (i, unit) in self.parent_name.encode_utf16().take(256).enumerate() {
            b[64 + 2 * i..66 + 2 * i].copy_from_slice(&unit.to_be_bytes());
        }
        let sum = checksum(&b, 36);
        b[36..40].copy_from_slice(&sum.to_be_bytes());
        b
    }

    /// Parse and verify 1024 header bytes found at file offset `at`.
    pub fn from_bytes(b: &[u8], at: u64) -> Result<Self> {
        let bad = |d: String| Error::corrupt("VHD dynamic header", at, d);
        if b.len() != 1024 {
            return Err(bad(format!("{} bytes, expected 1024", b.len())));
        }
        if &b[0..8] != HEADER_COOKIE {
            return Err(bad(format!("cookie {:?}, expected \"cxsparse\"", String::from_utf8_lossy(&b[0..8]))));
        }
        let (stored, computed) = (be32(b, 36), checksum(b, 36));
        if stored != computed {
            return Err(bad(format!("checksum {stored:#010x}, computed {computed:#010x}")));
        }
        let block_size = be32(b, 32);
        if block_size < 512 || !block_size.is_power_of_two() || block_size > MAX_BLOCK_SIZE {
            return Err(bad(format!("block size {block_size} is not a power of two from 512 B to 256 MiB")));
        }
        let units: Vec<u16> =
            b[64..576].chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])).take_while(|&u| u != 0).collect();
        let locators = (0..8)
            .map(|i| &b[576 + 24 * i..600 + 24 * i])
            .filter(|e| be32(e, 0) != 0)
            .map(|e| Locator { code: e[0..4].try_into().unwrap_or_default(), length: be32(e, 8), offset: be64(e, 16) })
            .collect();
        Ok(DynHeader {
            table_offset: be64(b, 16),
            max_table_entries: be32(b, 28),
            block_size,
            parent_id: b[40..56].try_into().unwrap_or_default(),
            parent_timestamp: be32(b, 56),
            parent_name: String::from_utf16_lossy(&units),
            locators,
        })
    }

    /// Bytes of the sector bitmap in front of each block: one bit per sector, rounded up to
    /// whole sectors.
    pub fn bitmap_bytes(&self) -> u64 {
        (u64::from(self.block_size) / 512).div_ceil(8).next_multiple_of(512)
    }
}

/// Decode a locator's platform data into a path: UTF-16LE for `W2ru`/`W2ku`, a `file://` URL
/// in UTF-8 for `MacX`. Other codes (deprecated, Mac aliases) give `None`.
pub fn locator_path(code: &[u8; 4], data: &[u8]) -> Option<String> {
    let text = match code {
        b"W2ru" | b"W2ku" => {
            let units: Vec<u16> =
                data.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).take_while(|&u| u != 0).collect();
            String::from_utf16(&units).ok()?
        }
        b"MacX" => {
            let s = std::str::from_utf8(data).ok()?.trim_end_matches('\0');
            s.strip_prefix("file://").unwrap_or(s).to_string()
        }
        _ => return None,
    };
    (!text.is_empty()).then(|| text.replace('\\', "/"))
}
