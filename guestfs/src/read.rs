//! Small helpers for reading fixed structures from a device.

use blockdev::BlockDev;

use crate::error::{Error, Result};

/// Read `N` bytes at `offset`; `what` names the structure for the error.
pub(crate) fn array<const N: usize>(dev: &dyn BlockDev, offset: u64, what: &str) -> Result<[u8; N]> {
    let mut b = [0u8; N];
    dev.read_at(offset, &mut b).map_err(|e| Error::io(format!("reading {what} at byte {offset}"), e))?;
    Ok(b)
}

/// Read `len` bytes at `offset` (callers cap `len`).
pub(crate) fn vec(dev: &dyn BlockDev, offset: u64, len: usize, what: &str) -> Result<Vec<u8>> {
    let mut b = vec![0u8; len];
    dev.read_at(offset, &mut b).map_err(|e| Error::io(format!("reading {what} at byte {offset}"), e))?;
    Ok(b)
}

pub(crate) fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

pub(crate) fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

pub(crate) fn le64(b: &[u8], at: usize) -> u64 {
    u64::from(le32(b, at)) | (u64::from(le32(b, at + 4)) << 32)
}
