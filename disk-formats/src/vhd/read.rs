//! Reading VHD files as devices: fixed, dynamic, and differencing over a parent.
//!
//! Everything an image says is checked when it is opened (footer and header checksums, the
//! BAT's entries inside the file, the parent's unique id), so reads afterwards only meet I/O
//! errors. Dynamic blocks are read whole, ignoring their sector bitmap (as qemu does);
//! differencing blocks take each sector from this file when its bitmap bit is set and from
//! the parent otherwise.

use std::io;
use std::sync::Arc;

use blockdev::{check_range, Allocation, BlockDev, Run};

use super::footer::{DiskType, Footer};
use super::header::{locator_path, DynHeader};
use crate::error::IoContext;
use crate::{Error, Result};

/// A VHD file's own structures, parsed and checked, before its parent is known.
pub struct Layer {
    file: Arc<dyn BlockDev>,
    footer: Footer,
    sparse: Option<Sparse>,
}

impl std::fmt::Debug for Layer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Layer").field("footer", &self.footer).field("sparse", &self.sparse.is_some()).finish()
    }
}

#[derive(Debug)]
struct Sparse {
    header: DynHeader,
    /// Entries covering the disk (extra entries past the disk's end are not loaded).
    bat: Vec<u32>,
    bitmap_bytes: u64,
}

impl Layer {
    /// Parse a VHD file: the footer at the end (or its copy at 0), the dynamic header and BAT.
    pub fn open(file: Arc<dyn BlockDev>) -> Result<Self> {
        let len = file.len();
        if len < 512 {
            return Err(Error::corrupt("VHD file", 0, format!("{len} bytes is shorter than a footer")));
        }
        let footer = match read_footer(&*file, len - 512) {
            Ok(f) => f,
            Err(end_err) => match read_footer(&*file, 0) {
                Ok(f) if f.disk_type != DiskType::Fixed => f,
                _ => return Err(end_err),
            },
        };
        let sparse = match footer.disk_type {
            DiskType::Fixed => {
                if footer.current_size > len - 512 {
                    return Err(Error::corrupt(
                        "VHD file",
                        len,
                        format!("a fixed disk of {} bytes needs a longer file", footer.current_size),
                    ));
                }
                None
            }
            _ => Some(Sparse::open(&*file, &footer)?),
        };
        Ok(Layer { file, footer, sparse })
    }

    pub fn footer(&self) -> &Footer {
        &self.footer
    }

    pub fn header(&self) -> Option<&DynHeader> {
        self.sparse.as_ref().map(|s| &s.header)
    }

    /// The unique id of the parent this layer needs, for differencing disks.
    pub fn parent_id(&self) -> Option<[u8; 16]> {
        (self.footer.disk_type == DiskType::Differencing).then(|| self.sparse.as_ref().map(|s| s.header.parent_id))?
    }

    /// Where the parent may be, most trusted first: relative locators (`W2ru`, `MacX`), then
    /// absolute ones (`W2ku`), then the parent's bare file name. Paths use `/`.
    pub fn parent_hints(&self) -> Vec<String> {
        let Some(s) = &self.sparse else { return Vec::new() };
        let mut hints: Vec<(u8, String)> = Vec::new();
        for loc in &s.header.locators {
            let rank = match &loc.code {
                b"W2ru" | b"MacX" => 0,
                b"W2ku" => 1,
                _ => continue,
            };
            if loc.length == 0
                || loc.length > 64 << 10
                || loc.offset.saturating_add(u64::from(loc.length)) > self.file.len()
            {
                continue;
            }
            let mut data = vec![0u8; loc.length as usize];
            if self.file.read_at(loc.offset, &mut data).is_ok() {
                if let Some(p) = locator_path(&loc.code, &data) {
                    hints.push((rank, p));
                }
            }
        }
        hints.sort_by_key(|h| h.0);
        let mut out: Vec<String> = hints.into_iter().map(|h| h.1).collect();
        if !s.header.parent_name.is_empty() {
            out.push(s.header.parent_name.replace('\\', "/"));
        }
        out.dedup();
        out
    }
}

fn read_footer(file: &dyn BlockDev, at: u64) -> Result<Footer> {
    let mut b = [0u8; 512];
    file.read_at(at, &mut b).ctx(|| format!("reading the VHD footer at {at}"))?;
    Footer::from_bytes(&b, at)
}

impl Sparse {
    fn open(file: &dyn BlockDev, footer: &Footer) -> Result<Self> {
        let len = file.len();
        let at = footer.data_offset;
        if at.checked_add(1024).is_none_or(|end| end > len) {
            return Err(Error::corrupt("VHD footer", len - 512, format!("header offset {at} is outside the file")));
        }
        let mut hb = vec![0u8; 1024];
        file.read_at(at, &mut hb).ctx(|| format!("reading the VHD header at {at}"))?;
        let header = DynHeader::from_bytes(&hb, at)?;
        let bs = u64::from(header.block_size);
        let needed = footer.current_size.div_ceil(bs);
        if u64::from(header.max_table_entries) < needed {
            return Err(Error::corrupt(
                "VHD dynamic header",
                at,
                format!(
                    "{} BAT entries cannot cover {} bytes of {bs}-byte blocks",
                    header.max_table_entries, footer.current_size
                ),
            ));
        }
        let t = header.table_offset;
        if t.checked_add(needed * 4).is_none_or(|end| end > len) {
            return Err(Error::corrupt("VHD dynamic header", at, format!("BAT at {t} runs past the file's end")));
        }
        let mut raw = vec![0u8; (needed * 4) as usize];
        file.read_at(t, &mut raw).ctx(|| format!("reading the VHD BAT at {t}"))?;
        let bat: Vec<u32> = raw.chunks_exact(4).map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]])).collect();
        let bitmap_bytes = header.bitmap_bytes();
        for (i, &e) in bat.iter().enumerate().filter(|(_, &e)| e != u32::MAX) {
            let start = u64::from(e) * 512;
            if start + bitmap_bytes + bs > len {
                return Err(Error::corrupt(
                    "VHD BAT",
                    t + 4 * i as u64,
                    format!("block {i} at byte {start} runs past the file's end ({len})"),
                ));
            }
        }
        Ok(Sparse { header, bat, bitmap_bytes })
    }
}

/// A VHD disk (with its parents, for a differencing disk) readable as a device.
#[derive(Debug)]
pub struct Vhd {
    layer: Layer,
    parent: Option<Arc<Vhd>>,
}

impl Vhd {
    /// A fixed or dynamic disk, or a differencing disk over `parent` (whose unique id and size
    /// must match what the child records).
    pub fn new(layer: Layer, parent: Option<Arc<Vhd>>) -> Result<Self> {
        match (layer.parent_id(), &parent) {
            (None, None) => {}
            (None, Some(_)) => return Err(Error::Usage("only a differencing VHD has a parent".into())),
            (Some(_), None) => {
                return Err(Error::Usage("a differencing VHD needs its parent (see the parent locators)".into()))
            }
            (Some(id), Some(p)) => {
                if p.layer.footer.unique_id != id {
                    return Err(Error::Usage(format!(
                        "the parent's unique id {} is not the {} the child names",
                        hex::encode(p.layer.footer.unique_id),
                        hex::encode(id)
                    )));
                }
                if p.len() != layer.footer.current_size {
                    return Err(Error::Usage(format!(
                        "the parent is {} bytes, the child {}",
                        p.len(),
                        layer.footer.current_size
                    )));
                }
            }
        }
        Ok(Vhd { layer, parent })
    }

    /// Open a single fixed or dynamic VHD.
    pub fn open(file: Arc<dyn BlockDev>) -> Result<Self> {
        Vhd::new(Layer::open(file)?, None)
    }

    /// Any VHD read alone: a differencing disk shows only its own blocks (zeros, and
    /// `Allocation::Zero`, elsewhere; sector bitmaps are not consulted) — what applying it
    /// as a set of blocks onto an existing disk writes, as XAPI's `/import_raw_vdi` does.
    pub fn blocks_of(file: Arc<dyn BlockDev>) -> Result<Self> {
        Ok(Vhd { layer: Layer::open(file)?, parent: None })
    }

    pub fn layer(&self) -> &Layer {
        &self.layer
    }

    /// Number of files in the chain (1 without a parent).
    pub fn depth(&self) -> usize {
        1 + self.parent.as_ref().map_or(0, |p| p.depth())
    }

    /// Read `buf.len()` bytes at `off` inside one block (`bi`, offset `r` in it).
    fn read_in_block(&self, s: &Sparse, bi: usize, r: u64, off: u64, buf: &mut [u8]) -> io::Result<()> {
        let entry = s.bat[bi];
        if entry == u32::MAX {
            return match &self.parent {
                Some(p) => p.read_at(off, buf),
                None => {
                    buf.fill(0);
                    Ok(())
                }
            };
        }
        let data = u64::from(entry) * 512 + s.bitmap_bytes;
        let Some(parent) = &self.parent else { return self.layer.file.read_at(data + r, buf) };
        let mut bitmap = vec![0u8; s.bitmap_bytes as usize];
        self.layer.file.read_at(u64::from(entry) * 512, &mut bitmap)?;
        let bit = |pos: u64| bitmap[(pos / 512 / 8) as usize] & (0x80 >> ((pos / 512) % 8)) != 0;
        let mut done = 0u64;
        while done < buf.len() as u64 {
            let here = bit(r + done);
            let mut end = (r + done) / 512 * 512 + 512;
            while end < r + buf.len() as u64 && bit(end) == here {
                end += 512;
            }
            let n = (end.min(r + buf.len() as u64) - (r + done)) as usize;
            let piece = &mut buf[done as usize..done as usize + n];
            if here {
                self.layer.file.read_at(data + r + done, piece)?;
            } else {
                parent.read_at(off + done, piece)?;
            }
            done += n as u64;
        }
        Ok(())
    }
}

impl BlockDev for Vhd {
    fn len(&self) -> u64 {
        self.layer.footer.current_size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        check_range(self.len(), offset, buf.len() as u64)?;
        let Some(s) = &self.layer.sparse else { return self.layer.file.read_at(offset, buf) };
        let bs = u64::from(s.header.block_size);
        let mut done = 0usize;
        while done < buf.len() {
            let off = offset + done as u64;
            let (bi, r) = ((off / bs) as usize, off % bs);
            let n = ((bs - r) as usize).min(buf.len() - done);
            self.read_in_block(s, bi, r, off, &mut buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    fn allocation(&self, offset: u64, max_len: u64) -> io::Result<Run> {
        check_range(self.len(), offset, 1)?;
        let max = max_len.min(self.len() - offset).max(1);
        let Some(s) = &self.layer.sparse else { return self.layer.file.allocation(offset, max) };
        let bs = u64::from(s.header.block_size);
        let present = |pos: u64| s.bat[(pos / bs) as usize] != u32::MAX;
        let block_end = |pos: u64| ((pos / bs + 1) * bs).min(offset + max);
        let here = present(offset);
        if !here {
            // An absent block of a differencing disk is whatever the parent has there.
            if let Some(p) = &self.parent {
                return p.allocation(offset, block_end(offset) - offset);
            }
        }
        // Extend over following blocks in the same state.
        let mut end = block_end(offset);
        while end < offset + max && present(end) == here {
            end = block_end(end);
        }
        Ok(Run { kind: if here { Allocation::Data } else { Allocation::Zero }, len: end - offset })
    }

    fn will_need(&self, offset: u64, len: u64) {
        if self.layer.sparse.is_none() {
            self.layer.file.will_need(offset, len);
        }
    }
}
