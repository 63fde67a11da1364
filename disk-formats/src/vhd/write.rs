//! Streaming VHD writers: dynamic (sparse, 2 MiB blocks) and fixed (raw bytes + footer).

use blockdev::BlockDev;

use super::footer::{random_uuid, DiskType, Footer, MAX_SIZE};
use super::header::{DynHeader, BLOCK_SIZE};
use crate::error::IoContext;
use crate::out::{copy_sparse, data_granules, read_padded, Output};
use crate::{Error, Result};

/// Where the BAT starts in files written here: right after the footer copy and the header.
const TABLE_OFFSET: u64 = 512 + 1024;
/// Every written block's sector bitmap: all sectors present (what qemu and vhd-lib write).
const FULL_BITMAP: [u8; 512] = [0xff; 512];

/// Refuse what VHD cannot hold.
pub fn check_size(size: u64) -> Result<()> {
    if size > MAX_SIZE {
        return Err(Error::Usage(format!(
            "the disk is {size} bytes; VHD holds at most 2040 GiB — export as qcow2, vmdk or raw instead"
        )));
    }
    if size % 512 != 0 {
        return Err(Error::Usage(format!("the disk is {size} bytes, not a whole number of 512-byte sectors")));
    }
    Ok(())
}

/// The layout of a dynamic VHD of `dev`: BAT entries (sector numbers or `u32::MAX`) and the
/// blocks to write, in file order.
struct Plan {
    header: DynHeader,
    bat: Vec<u32>,
    blocks: Vec<u64>,
}

fn plan(dev: &dyn BlockDev) -> Result<Plan> {
    let granules = data_granules(dev, u64::from(BLOCK_SIZE)).ctx(|| "listing the disk's data".into())?;
    plan_blocks(dev.len(), granules.into_iter().flatten())
}

fn plan_blocks(size: u64, chosen: impl Iterator<Item = u64>) -> Result<Plan> {
    let header = DynHeader::new(size, TABLE_OFFSET)?;
    let mut bat = vec![u32::MAX; header.max_table_entries as usize];
    let bat_bytes = (bat.len() as u64 * 4).next_multiple_of(512);
    let block_sectors = (header.bitmap_bytes() + u64::from(BLOCK_SIZE)) / 512;
    let mut sector = (TABLE_OFFSET + bat_bytes) / 512;
    let mut blocks = Vec::new();
    for block in chosen {
        if block as usize >= bat.len() || bat[block as usize] != u32::MAX {
            return Err(Error::Usage(format!("block {block} is past the disk's end or listed twice")));
        }
        // check_size bounds the file below 2^32 sectors.
        bat[block as usize] = u32::try_from(sector).map_err(|_| Error::Usage("VHD file too large".into()))?;
        blocks.push(block);
        sector += block_sectors;
    }
    Ok(Plan { header, bat, blocks })
}

/// Write `dev` as a dynamic VHD: footer copy, header, BAT, one block (bitmap + 2 MiB) per
/// 2 MiB range holding any data, footer. Returns the bytes written.
pub fn write_dynamic(dev: &dyn BlockDev, out: &mut dyn Output) -> Result<u64> {
    write_blocks(dev, None, random_uuid(), None, out)
}

/// The parent a differencing VHD names.
#[derive(Clone, Debug)]
pub struct ParentRef {
    pub unique_id: [u8; 16],
    /// Its file name (the header's parent name; no locators are written).
    pub name: String,
}

/// Write the 2 MiB `blocks` of `dev` (ascending; `None`: those holding data) as a VHD with
/// unique id `uid`: a differencing disk over `parent`, or a dynamic one without. How XAPI
/// exports a VDI against a `base=` (reference §5.2): the blocks where the two chains differ.
pub fn write_blocks(
    dev: &dyn BlockDev,
    blocks: Option<&[u64]>,
    uid: [u8; 16],
    parent: Option<&ParentRef>,
    out: &mut dyn Output,
) -> Result<u64> {
    check_size(dev.len())?;
    let mut plan = match blocks {
        Some(b) => plan_blocks(dev.len(), b.iter().copied())?,
        None => plan(dev)?,
    };
    let kind = match parent {
        Some(p) => {
            plan.header.parent_id = p.unique_id;
            plan.header.parent_name = p.name.clone();
            DiskType::Differencing
        }
        None => DiskType::Dynamic,
    };
    let footer = Footer::new(kind, dev.len(), uid).to_bytes();
    let mut written = 0u64;
    let mut put = |out: &mut dyn Output, b: &[u8]| -> Result<()> {
        written += b.len() as u64;
        out.write_all(b).ctx(|| "writing the VHD".into())
    };
    put(out, &footer)?;
    put(out, &plan.header.to_bytes())?;
    let mut bat: Vec<u8> = plan.bat.iter().flat_map(|e| e.to_be_bytes()).collect();
    bat.resize(bat.len().next_multiple_of(512), 0);
    put(out, &bat)?;
    let mut buf = vec![0u8; BLOCK_SIZE as usize];
    for &block in &plan.blocks {
        let offset = block * u64::from(BLOCK_SIZE);
        read_padded(dev, offset, &mut buf).ctx(|| format!("reading the disk at {offset}"))?;
        put(out, &FULL_BITMAP)?;
        put(out, &buf)?;
        dev.release(offset, buf.len() as u64);
    }
    put(out, &footer)?;
    out.flush().ctx(|| "writing the VHD".into())?;
    Ok(written)
}

/// Write `dev` as a fixed VHD: the raw bytes (holes kept) then the footer.
pub fn write_fixed(dev: &dyn BlockDev, out: &mut dyn Output) -> Result<u64> {
    check_size(dev.len())?;
    copy_sparse(dev, out).ctx(|| "copying the disk".into())?;
    out.write_all(&Footer::new(DiskType::Fixed, dev.len(), random_uuid()).to_bytes())
        .ctx(|| "writing the VHD footer".into())?;
    out.flush().ctx(|| "writing the VHD".into())?;
    Ok(dev.len() + 512)
}

/// The size in bytes [`write_dynamic`] will produce for `dev`, without writing.
pub fn dynamic_size(dev: &dyn BlockDev) -> Result<u64> {
    check_size(dev.len())?;
    let plan = plan(dev)?;
    let bat_bytes = (plan.bat.len() as u64 * 4).next_multiple_of(512);
    let block = plan.header.bitmap_bytes() + u64::from(BLOCK_SIZE);
    Ok(TABLE_OFFSET + bat_bytes + plan.blocks.len() as u64 * block + 512)
}
