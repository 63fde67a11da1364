//! The VHD hard disk footer (512 bytes, big-endian), its checksum and CHS geometry.

use crate::{Error, Result};

/// `conectix`.
pub const FOOTER_COOKIE: &[u8; 8] = b"conectix";
/// Footer and header version 1.0.
pub const VERSION: u32 = 0x0001_0000;
/// Largest disk VHD holds: 2040 GiB (qemu refuses more than `0xff000000` sectors).
pub const MAX_SIZE: u64 = 0xff00_0000 * 512;
/// Seconds from the Unix epoch to VHD's epoch, 2000-01-01 00:00:00 UTC.
pub const EPOCH_OFFSET: u64 = 946_684_800;
/// Creator application written by vmvault. Readers (qemu among them) take the disk size from
/// the footer's current size for every creator but `vpc ` and `qemu`, which is what we want.
pub const CREATOR: &[u8; 4] = b"vmvt";
/// Host OS code `Wi2k`, what every common writer puts.
pub const HOST_WI2K: u32 = 0x5769_326B;

/// Footer field "disk type".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskType {
    Fixed,
    Dynamic,
    Differencing,
}

impl DiskType {
    fn code(self) -> u32 {
        match self {
            DiskType::Fixed => 2,
            DiskType::Dynamic => 3,
            DiskType::Differencing => 4,
        }
    }
}

/// Cylinders, heads, sectors per track.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub cylinders: u16,
    pub heads: u8,
    pub sectors: u8,
}

impl Geometry {
    /// The VHD specification's appendix algorithm (cylinders rounded down, as the spec and
    /// qemu do, so C×H×S never exceeds the disk).
    pub fn for_size(size: u64) -> Self {
        let total = (size / 512).min(65535 * 16 * 255);
        let (spt, heads, cth);
        if total >= 65535 * 16 * 63 {
            (spt, heads) = (255, 16);
            cth = total / spt;
        } else {
            let mut s = 17;
            let mut c = total / s;
            let mut h = c.div_ceil(1024).max(4);
            if c >= h * 1024 || h > 16 {
                (s, h) = (31, 16);
                c = total / s;
            }
            if c >= h * 1024 {
                (s, h) = (63, 16);
                c = total / s;
            }
            (spt, heads, cth) = (s, h, c);
        }
        // Bounded by the caps above: cylinders ≤ 65535, heads ≤ 16, sectors ≤ 255.
        Geometry {
            cylinders: u16::try_from(cth / heads).unwrap_or(u16::MAX),
            heads: u8::try_from(heads).unwrap_or(16),
            sectors: u8::try_from(spt).unwrap_or(255),
        }
    }
}

/// The footer, as read or to be written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Footer {
    pub features: u32,
    /// Offset of the dynamic header; `u64::MAX` for fixed disks.
    pub data_offset: u64,
    /// Modification time, seconds since 2000-01-01 UTC.
    pub timestamp: u32,
    pub creator_app: [u8; 4],
    pub creator_version: u32,
    pub creator_host: u32,
    pub original_size: u64,
    pub current_size: u64,
    pub geometry: Geometry,
    pub disk_type: DiskType,
    pub unique_id: [u8; 16],
    pub saved_state: bool,
}

impl Footer {
    /// A footer for a new disk of `size` bytes written now by vmvault.
    pub fn new(disk_type: DiskType, size: u64, unique_id: [u8; 16]) -> Self {
        Footer {
            features: 2,
            data_offset: if disk_type == DiskType::Fixed { u64::MAX } else { 512 },
            timestamp: vhd_now(),
            creator_app: *CREATOR,
            creator_version: VERSION,
            creator_host: HOST_WI2K,
            original_size: size,
            current_size: size,
            geometry: Geometry::for_size(size),
            disk_type,
            unique_id,
            saved_state: false,
        }
    }

    /// The 512 bytes, checksum included.
    pub fn to_bytes(&self) -> [u8; 512] {
        let mut b = [0u8; 512];
        b[0..8].copy_from_slice(FOOTER_COOKIE);
        b[8..12].copy_from_slice(&self.features.to_be_bytes());
        b[12..16].copy_from_slice(&VERSION.to_be_bytes());
        b[16..24].copy_from_slice(&self.data_offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.timestamp.to_be_bytes());
        b[28..32].copy_from_slice(&self.creator_app);
        b[32..36].copy_from_slice(&self.creator_version.to_be_bytes());
        b[36..40].copy_from_slice(&self.creator_host.to_be_bytes());
        b[40..48].copy_from_slice(&self.original_size.to_be_bytes());
        b[48..56].copy_from_slice(&self.current_size.to_be_bytes());
        b[56..58].copy_from_slice(&self.geometry.cylinders.to_be_bytes());
        b[58] = self.geometry.heads;
        b[59] = self.geometry.sectors;
        b[60..64].copy_from_slice(&self.disk_type.code().to_be_bytes());
        b[68..84].copy_from_slice(&self.unique_id);
        b[84] = u8::from(self.saved_state);
        let sum = checksum(&b, 64);
        b[64..68].copy_from_slice(&sum.to_be_bytes());
        b
    }

    /// Parse and verify 512 footer bytes found at file offset `at`.
    pub fn from_bytes(b: &[u8], at: u64) -> Result<Self> {
        let bad = |d: String| Error::corrupt("VHD footer", at, d);
        let b: &[u8; 512] = b.try_into().map_err(|_| bad(format!("{} bytes, expected 512", b.len())))?;
        if &b[0..8] != FOOTER_COOKIE {
            return Err(bad(format!("cookie {:?}, expected \"conectix\"", String::from_utf8_lossy(&b[0..8]))));
        }
        let (stored, computed) = (be32(b, 64), checksum(b, 64));
        if stored != computed {
            return Err(bad(format!("checksum {stored:#010x}, computed {computed:#010x}")));
        }
        let version = be32(b, 12);
        if version >> 16 != 1 {
            return Err(Error::Unsupported(format!("VHD footer version {version:#010x}")));
        }
        let disk_type = match be32(b, 60) {
            2 => DiskType::Fixed,
            3 => DiskType::Dynamic,
            4 => DiskType::Differencing,
            t => return Err(bad(format!("disk type {t}, expected 2, 3 or 4"))),
        };
        let current_size = be64(b, 48);
        if current_size % 512 != 0 {
            return Err(bad(format!("current size {current_size} is not a multiple of 512")));
        }
        if current_size > MAX_SIZE {
            return Err(bad(format!("current size {current_size} exceeds VHD's 2040 GiB")));
        }
        Ok(Footer {
            features: be32(b, 8),
            data_offset: be64(b, 16),
            timestamp: be32(b, 24),
            creator_app: b[28..32].try_into().unwrap_or_default(),
            creator_version: be32(b, 32),
            creator_host: be32(b, 36),
            original_size: be64(b, 40),
            current_size,
            geometry: Geometry { cylinders: u16::from_be_bytes([b[56], b[57]]), heads: b[58], sectors: b[59] },
            disk_type,
            unique_id: b[68..84].try_into().unwrap_or_default(),
            saved_state: b[84] != 0,
        })
    }
}

/// One's complement of the byte sum, the 4 bytes at `field` counted as zero.
pub fn checksum(b: &[u8], field: usize) -> u32 {
    let sum = b
        .iter()
        .enumerate()
        .filter(|(i, _)| !(field..field + 4).contains(i))
        .fold(0u32, |s, (_, &x)| s.wrapping_add(u32::from(x)));
    !sum
}

/// Now, in VHD time (saturating at the format's 2136 limit).
pub fn vhd_now() -> u32 {
    let unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    u32::try_from(unix.saturating_sub(EPOCH_OFFSET)).unwrap_or(u32::MAX)
}

/// A random version-4 UUID.
pub fn random_uuid() -> [u8; 16] {
    let mut u = [0u8; 16];
    // getrandom failing means no entropy source at all; a fixed id still makes a valid file.
    let _ = getrandom::getrandom(&mut u);
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    u
}

pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap_or_default())
}

pub(crate) fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_matches_qemu_for_common_sizes() {
        // Worked by hand from the specification's algorithm (C/H/S).
        assert_eq!(Geometry::for_size(64 << 20), Geometry { cylinders: 963, heads: 8, sectors: 17 });
        assert_eq!(Geometry::for_size(2 << 30), Geometry { cylinders: 4161, heads: 16, sectors: 63 });
        assert_eq!(Geometry::for_size(1 << 40), Geometry { cylinders: 65535, heads: 16, sectors: 255 });
    }

    #[test]
    fn footer_round_trips_and_detects_damage() {
        let f = Footer::new(DiskType::Dynamic, 10 << 20, random_uuid());
        let mut b = f.to_bytes();
        assert_eq!(Footer::from_bytes(&b, 0).unwrap(), f);
        b[100] ^= 1;
        let e = Footer::from_bytes(&b, 7).unwrap_err().to_string();
        assert!(e.contains("checksum") && e.contains("byte 7"), "{e}");
    }
}
