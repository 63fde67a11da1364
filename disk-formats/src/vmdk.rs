//! A streaming writer of stream-optimized VMDK, the disk format inside OVA packages.
//!
//! Layout (what VMware's streaming consumers, VirtualBox and qemu read): sparse extent header
//! with the grain directory "at end", the embedded descriptor, then for each 32 MiB range
//! holding data its compressed grains (ascending LBA, each behind a grain marker, padded to a
//! sector) followed by a grain-table marker and the table; then the grain-directory marker
//! and directory, a footer marker and the footer (the header again, with the real directory
//! offset), and the end-of-stream marker. 64 KiB grains, 512-entry tables, zlib-wrapped
//! deflate per grain; all-zero grains are not written.

use blockdev::BlockDev;
use flate2::{write::ZlibEncoder, Compression};
use std::io::Write;

use crate::error::IoContext;
use crate::out::{data_granules, is_zero, read_padded, Output};
use crate::{Error, Result};

const GRAIN_SECTORS: u64 = 128;
const GRAIN: u64 = GRAIN_SECTORS * 512;
const GT_ENTRIES: u64 = 512;
/// Sectors reserved for the descriptor (qemu uses 20; VirtualBox may grow it in place).
const DESCRIPTOR_SECTORS: u64 = 20;
/// The first grain starts here (a grain boundary, as mkimg does).
const OVERHEAD_SECTORS: u64 = 128;
/// Flags: valid newline test (bit 0), compressed grains (16), markers (17).
const FLAGS: u32 = 1 | 1 << 16 | 1 << 17;
const GD_AT_END: u64 = u64::MAX;
const MARKER_EOS: u32 = 0;
const MARKER_GT: u32 = 1;
const MARKER_GD: u32 = 2;
const MARKER_FOOTER: u32 = 3;

/// The sparse extent header (little-endian).
fn header(capacity: u64, gd_offset: u64) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[0..4].copy_from_slice(b"KDMV");
    h[4..8].copy_from_slice(&3u32.to_le_bytes());
    h[8..12].copy_from_slice(&FLAGS.to_le_bytes());
    h[12..20].copy_from_slice(&capacity.to_le_bytes());
    h[20..28].copy_from_slice(&GRAIN_SECTORS.to_le_bytes());
    h[28..36].copy_from_slice(&1u64.to_le_bytes());
    h[36..44].copy_from_slice(&DESCRIPTOR_SECTORS.to_le_bytes());
    h[44..48].copy_from_slice(&(GT_ENTRIES as u32).to_le_bytes());
    h[56..64].copy_from_slice(&gd_offset.to_le_bytes());
    h[64..72].copy_from_slice(&OVERHEAD_SECTORS.to_le_bytes());
    h[73..77].copy_from_slice(b"\n \r\n");
    h[77..79].copy_from_slice(&1u16.to_le_bytes());
    h
}

fn marker(num_sectors: u64, kind: u32) -> [u8; 512] {
    let mut m = [0u8; 512];
    m[0..8].copy_from_slice(&num_sectors.to_le_bytes());
    m[12..16].copy_from_slice(&kind.to_le_bytes());
    m
}

/// The embedded descriptor for a disk of `capacity` sectors stored as `file_name`, on a
/// SCSI (LSI Logic) adapter as the OVA descriptor declares.
pub fn descriptor(capacity: u64, file_name: &str) -> String {
    let mut cid = [0u8; 4];
    let _ = getrandom::getrandom(&mut cid);
    let cylinders = (capacity / (255 * 63)).clamp(1, 65535);
    format!(
        "# Disk DescriptorFile\nversion=1\nCID={}\nparentCID=ffffffff\ncreateType=\"streamOptimized\"\n\n\
         # Extent description\nRW {capacity} SPARSE \"{}\"\n\n# The Disk Data Base\n#DDB\n\n\
         ddb.virtualHWVersion = \"4\"\nddb.adapterType = \"lsilogic\"\nddb.geometry.cylinders = \"{cylinders}\"\n\
         ddb.geometry.heads = \"255\"\nddb.geometry.sectors = \"63\"\nddb.thinProvisioned = \"1\"\n",
        hex::encode(cid),
        file_name.replace('"', "_")
    )
}

/// Counts sectors as they are written.
struct Sectors<'a> {
    out: &'a mut dyn Output,
    bytes: u64,
}

impl Sectors<'_> {
    fn put(&mut self, b: &[u8]) -> Result<()> {
        self.out.write_all(b).ctx(|| "writing the VMDK".into())?;
        self.bytes += b.len() as u64;
        Ok(())
    }
    fn pad(&mut self) -> Result<()> {
        let n = self.bytes.next_multiple_of(512) - self.bytes;
        self.put(&vec![0u8; n as usize])
    }
    fn sector(&self) -> u64 {
        self.bytes / 512
    }
}

/// Write `dev` as a stream-optimized VMDK whose descriptor names `file_name`. Returns the
/// bytes written.
pub fn write_stream_optimized(dev: &dyn BlockDev, out: &mut dyn Output, file_name: &str) -> Result<u64> {
    if dev.len() % 512 != 0 {
        return Err(Error::Usage(format!("the disk is {} bytes, not a whole number of sectors", dev.len())));
    }
    let capacity = dev.len() / 512;
    let gd_entries = capacity.div_ceil(GRAIN_SECTORS * GT_ENTRIES);
    if gd_entries > u64::from(u32::MAX) {
        return Err(Error::Usage("the disk is too large for a VMDK".into()));
    }
    let mut w = Sectors { out, bytes: 0 };
    w.put(&header(capacity, GD_AT_END))?;
    let mut desc = descriptor(capacity, file_name).into_bytes();
    desc.resize((DESCRIPTOR_SECTORS * 512) as usize, 0);
    w.put(&desc)?;
    w.put(&vec![0u8; ((OVERHEAD_SECTORS - 1 - DESCRIPTOR_SECTORS) * 512) as usize])?;
    let mut gd = vec![0u32; gd_entries as usize];
    let mut buf = vec![0u8; GRAIN as usize];
    let grains = data_granules(dev, GRAIN).ctx(|| "listing the disk's data".into())?;
    let mut grains = grains.into_iter().flatten().peekable();
    while let Some(&first) = grains.peek() {
        let table = first / GT_ENTRIES;
        let mut gt = vec![0u32; GT_ENTRIES as usize];
        while let Some(g) = grains.next_if(|g| g / GT_ENTRIES == table) {
            read_padded(dev, g * GRAIN, &mut buf).ctx(|| format!("reading the disk at {}", g * GRAIN))?;
            dev.release(g * GRAIN, GRAIN);
            if is_zero(&buf) {
                continue;
            }
            gt[(g % GT_ENTRIES) as usize] = sector32(w.sector())?;
            let mut z = ZlibEncoder::new(Vec::with_capacity(GRAIN as usize / 2), Compression::fast());
            z.write_all(&buf).and_then(|()| z.flush()).ctx(|| "compressing a grain".into())?;
            let data = z.finish().ctx(|| "compressing a grain".into())?;
            w.put(&(g * GRAIN_SECTORS).to_le_bytes())?;
            w.put(&u32::try_from(data.len()).unwrap_or(u32::MAX).to_le_bytes())?;
            w.put(&data)?;
            w.pad()?;
        }
        if gt.iter().any(|&e| e != 0) {
            w.put(&marker(GT_ENTRIES * 4 / 512, MARKER_GT))?;
            gd[table as usize] = sector32(w.sector())?;
            w.put(&gt.iter().flat_map(|e| e.to_le_bytes()).collect::<Vec<u8>>())?;
        }
    }
    let gd_sectors = (gd_entries * 4).div_ceil(512);
    w.put(&marker(gd_sectors, MARKER_GD))?;
    let gd_offset = w.sector();
    w.put(&gd.iter().flat_map(|e| e.to_le_bytes()).collect::<Vec<u8>>())?;
    w.pad()?;
    w.put(&marker(1, MARKER_FOOTER))?;
    w.put(&header(capacity, gd_offset))?;
    w.put(&marker(0, MARKER_EOS))?;
    w.out.flush().ctx(|| "writing the VMDK".into())?;
    Ok(w.bytes)
}

fn sector32(s: u64) -> Result<u32> {
    u32::try_from(s).map_err(|_| Error::Usage("the VMDK would pass 2 TiB of compressed data".into()))
}
