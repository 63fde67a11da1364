//! Inode records: type, permissions, owner, size, times with nanoseconds, links, flags, and
//! the 60-byte `i_block` area (extent tree root, block map, inline data, a fast symlink or a
//! device number). Times reach beyond 2038 through the extra epoch bits.

use crate::read::{le16, le32};

pub use crate::fs::Time;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inode {
    pub ino: u32,
    /// `st_mode`: file type bits and permissions.
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub links: u16,
    pub flags: u32,
    pub atime: Time,
    pub ctime: Time,
    pub mtime: Time,
    /// Creation time, when the inode is large enough to hold it.
    pub crtime: Option<Time>,
    pub block: [u8; 60],
    /// The `system.data` extended attribute kept in the inode body: where inline data longer
    /// than the 60 bytes of `i_block` continues. Empty when there is none.
    pub inline_tail: Vec<u8>,
}

pub const EXTENTS_FL: u32 = 0x80000;
pub const INLINE_DATA_FL: u32 = 0x1000_0000;

fn time(b: &[u8], at: usize, extra: Option<usize>) -> Time {
    let base = i64::from(le32(b, at) as i32);
    match extra.filter(|&e| e + 4 <= b.len()) {
        Some(e) => {
            let x = le32(b, e);
            Time { secs: base + (i64::from(x & 3) << 32), nanos: x >> 2 }
        }
        None => Time { secs: base, nanos: 0 },
    }
}

/// The value of `system.data` (name index 7, name "data") among the extended attributes in
/// an inode body (`area` starts after `i_extra_isize`): the 0xEA020000 magic, then entries of
/// name length, name index, value offset (from the first entry), value block (0 here), value
/// size and hash, and the name, each padded to 4 bytes; a zero word ends them.
fn system_data(area: &[u8]) -> Vec<u8> {
    if area.len() < 4 || le32(area, 0) != 0xEA02_0000 {
        return Vec::new();
    }
    let entries = &area[4..];
    let mut at = 0usize;
    while at + 16 <= entries.len() && le32(entries, at) != 0 {
        let (name_len, index) = (usize::from(entries[at]), entries[at + 1]);
        let (value_at, value_block, value_len) =
            (usize::from(le16(entries, at + 2)), le32(entries, at + 4), le32(entries, at + 8) as usize);
        let Some(name) = entries.get(at + 16..at + 16 + name_len) else { break };
        if index == 7 && name == b"data" && value_block == 0 {
            return entries.get(value_at..value_at + value_len).map(<[u8]>::to_vec).unwrap_or_default();
        }
        at += (16 + name_len).next_multiple_of(4);
    }
    Vec::new()
}

impl Inode {
    /// Parse an inode record of `b.len()` bytes (the superblock's inode size).
    pub fn parse(ino: u32, b: &[u8]) -> Self {
        let extra = if b.len() > 128 { usize::from(le16(b, 0x80)) } else { 0 };
        // An extra field exists when the extra area reaches past its end.
        let has = |end: usize| b.len() > 128 && 128 + extra >= end;
        let x = |off: usize, end: usize| has(end).then_some(off);
        Inode {
            ino,
            mode: le16(b, 0x00),
            uid: u32::from(le16(b, 0x02)) | (u32::from(le16(b, 0x78)) << 16),
            gid: u32::from(le16(b, 0x18)) | (u32::from(le16(b, 0x7A)) << 16),
            size: u64::from(le32(b, 0x04)) | (u64::from(le32(b, 0x6C)) << 32),
            links: le16(b, 0x1A),
            flags: le32(b, 0x20),
            ctime: time(b, 0x0C, x(0x84, 0x88)),
            mtime: time(b, 0x10, x(0x88, 0x8C)),
            atime: time(b, 0x08, x(0x8C, 0x90)),
            crtime: has(0x98).then(|| time(b, 0x90, Some(0x94))),
            block: b[0x28..0x28 + 60].try_into().unwrap_or([0; 60]),
            inline_tail: if le32(b, 0x20) & INLINE_DATA_FL != 0 && b.len() > 128 {
                system_data(&b[(128 + extra).min(b.len())..])
            } else {
                Vec::new()
            },
        }
    }

    pub fn is_dir(&self) -> bool {
        self.mode & 0xF000 == 0x4000
    }

    pub fn is_symlink(&self) -> bool {
        self.mode & 0xF000 == 0xA000
    }

    /// The device number of a character or block device node: the old 16-bit encoding in
    /// `i_block[0]` when set, else the new 32-bit one in `i_block[1]` (as Linux reads it).
    pub fn rdev(&self) -> (u32, u32) {
        let old = le32(&self.block, 0);
        if old != 0 {
            return ((old >> 8) & 0xff, old & 0xff);
        }
        let new = le32(&self.block, 4);
        ((new & 0xfff00) >> 8, (new & 0xff) | ((new >> 12) & 0xfff00))
    }
}
