//! Where a file's blocks are: the extent tree (ext4) or the direct/indirect block map
//! (ext2/3), flattened into a sorted list of runs. Holes are absent from the list;
//! unwritten (preallocated) extents are kept and read as zeros.

use blockdev::BlockDev;

use super::inode::{Inode, EXTENTS_FL};
use crate::error::{Error, Result};
use crate::read::{le16, le32, vec};
pub use crate::rundev::Run;

/// Most runs kept for one file (a pathologically fragmented 16 TiB file would have more).
const MAX_RUNS: usize = 1 << 22;
const MAX_DEPTH: u16 = 5;

fn corrupt(ino: u32, what: impl Into<String>) -> Error {
    Error::corrupt("ext4 block map", u64::from(ino), format!("inode {ino}: {}", what.into()))
}

/// All runs of `inode`, sorted by logical block.
pub fn runs(dev: &dyn BlockDev, block_size: u64, inode: &Inode) -> Result<Vec<Run>> {
    let mut out = Vec::new();
    if inode.flags & EXTENTS_FL != 0 {
        let node = inode.block.to_vec();
        extent_node(dev, block_size, inode.ino, &node, MAX_DEPTH + 1, &mut out)?;
        out.sort_by_key(|r| r.logical);
        if out.windows(2).any(|w| w[0].logical + w[0].len > w[1].logical) {
            return Err(corrupt(inode.ino, "overlapping extents"));
        }
    } else {
        block_map(dev, block_size, inode, &mut out)?;
    }
    Ok(out)
}

fn extent_node(dev: &dyn BlockDev, bs: u64, ino: u32, node: &[u8], budget: u16, out: &mut Vec<Run>) -> Result<()> {
    if node.len() < 12 || le16(node, 0) != 0xF30A {
        return Err(corrupt(ino, "bad extent header magic"));
    }
    let (entries, depth) = (usize::from(le16(node, 2)), le16(node, 6));
    if 12 + 12 * entries > node.len() || depth >= budget {
        return Err(corrupt(ino, format!("extent node with {entries} entries at depth {depth}")));
    }
    for e in node[12..12 + 12 * entries].chunks_exact(12) {
        if depth == 0 {
            let raw_len = u64::from(le16(e, 4));
            let (len, unwritten) = if raw_len > 32768 { (raw_len - 32768, true) } else { (raw_len, false) };
            let physical = (u64::from(le16(e, 6)) << 32) | u64::from(le32(e, 8));
            if len > 0 {
                if out.len() >= MAX_RUNS {
                    return Err(corrupt(ino, "too many extents"));
                }
                out.push(Run { logical: u64::from(le32(e, 0)), physical, len, unwritten });
            }
        } else {
            let child = (u64::from(le16(e, 8)) << 32) | u64::from(le32(e, 4));
            let at = child
                .checked_mul(bs)
                .filter(|a| a + bs <= dev.len())
                .ok_or_else(|| corrupt(ino, "extent index past the end"))?;
            let b = vec(dev, at, bs as usize, "an ext4 extent node")?;
            extent_node(dev, bs, ino, &b, depth, out)?;
        }
    }
    Ok(())
}

/// ext2/3 block maps: 12 direct pointers, then single, double and triple indirect blocks.
fn block_map(dev: &dyn BlockDev, bs: u64, inode: &Inode, out: &mut Vec<Run>) -> Result<()> {
    let ptr = |i: usize| u64::from(le32(&inode.block, 4 * i));
    let blocks = inode.size.div_ceil(bs);
    for i in 0..12 {
        push(out, i as u64, ptr(i), inode.ino)?;
    }
    let mut logical = 12;
    for (level, slot) in [(1u32, 12usize), (2, 13), (3, 14)] {
        if logical >= blocks {
            break;
        }
        indirect(dev, bs, inode.ino, ptr(slot), level, &mut logical, blocks, out)?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn indirect(
    dev: &dyn BlockDev,
    bs: u64,
    ino: u32,
    block: u64,
    level: u32,
    logical: &mut u64,
    blocks: u64,
    out: &mut Vec<Run>,
) -> Result<()> {
    let span = (bs / 4).pow(level);
    if block == 0 {
        *logical += span; // a hole covering everything below this pointer
        return Ok(());
    }
    let at = block
        .checked_mul(bs)
        .filter(|a| a + bs <= dev.len())
        .ok_or_else(|| corrupt(ino, "indirect block past the end"))?;
    let b = vec(dev, at, bs as usize, "an ext2/3 indirect block")?;
    for p in b.chunks_exact(4).map(|c| u64::from(le32(c, 0))) {
        if *logical >= blocks {
            break;
        }
        if level == 1 {
            push(out, *logical, p, ino)?;
            *logical += 1;
        } else {
            indirect(dev, bs, ino, p, level - 1, logical, blocks, out)?;
        }
    }
    Ok(())
}

/// Append block `logical` at `physical` (0 = hole), merging with the previous run.
fn push(out: &mut Vec<Run>, logical: u64, physical: u64, ino: u32) -> Result<()> {
    if physical == 0 {
        return Ok(());
    }
    if let Some(last) = out.last_mut() {
        if last.logical + last.len == logical && last.physical + last.len == physical {
            last.len += 1;
            return Ok(());
        }
    }
    if out.len() >= MAX_RUNS {
        return Err(corrupt(ino, "too many blocks"));
    }
    out.push(Run { logical, physical, len: 1, unwritten: false });
    Ok(())
}
