//! Directory entries, read linearly from every block of a directory: hashed (htree)
//! directories keep ordinary entries in their leaf blocks and hide their index in entries
//! with inode 0, and checksum tails also have inode 0, so one pass reads them all.

use crate::error::{Error, Result};
use crate::read::{le16, le32};

/// One name in a directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    /// Raw bytes: ext4 names are not required to be UTF-8.
    pub name: Vec<u8>,
    pub ino: u32,
    /// The type byte (1 file, 2 dir, 7 symlink, …; 0 when the filesystem does not store it).
    pub file_type: u8,
}

/// Parse the entries of directory data `b` (whole blocks of `block_size`).
pub fn parse(b: &[u8], block_size: usize, dir_ino: u32) -> Result<Vec<DirEntry>> {
    let mut out = Vec::new();
    for (i, block) in b.chunks(block_size).enumerate() {
        let mut at = 0usize;
        while at + 8 <= block.len() {
            let ino = le32(block, at);
            let rec_len = usize::from(le16(block, at + 4));
            let name_len = usize::from(block[at + 6]);
            if rec_len < 8 || rec_len % 4 != 0 || at + rec_len > block.len() || 8 + name_len > rec_len {
                return Err(Error::corrupt(
                    "ext4 directory entry",
                    (i * block_size + at) as u64,
                    format!("directory inode {dir_ino}: record length {rec_len}, name length {name_len}"),
                ));
            }
            if ino != 0 && name_len > 0 {
                out.push(DirEntry { name: block[at + 8..at + 8 + name_len].to_vec(), ino, file_type: block[at + 7] });
            }
            at += rec_len;
        }
    }
    Ok(out)
}
