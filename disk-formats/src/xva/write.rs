//! Streaming an XVA: `ova.xml`, then each VDI (in the string order of their ids, as XAPI
//! reads them) as 1 MiB chunks with XXH64 checksum members. All-zero chunks are omitted
//! except a VDI's first and last, which XAPI's importer requires.

use std::io::Write;

use blockdev::{Allocation, BlockDev};
use xxhash_rust::xxh64::xxh64;

use super::{int_field, OvaXml, CHUNK};
use crate::error::IoContext;
use crate::out::is_zero;
use crate::tarball::{now, pad, write_end, write_header, write_member};
use crate::{Error, Result};

/// Write the package: `ova` and, for each `(VDI id, device)`, the device's bytes. Returns
/// the bytes written.
pub fn write(ova: &OvaXml, disks: &[(String, &dyn BlockDev)], out: &mut dyn Write) -> Result<u64> {
    let mut disks: Vec<&(String, &dyn BlockDev)> = disks.iter().collect();
    disks.sort_by(|a, b| a.0.cmp(&b.0));
    for (id, dev) in &disks {
        let vdi =
            ova.find(id).filter(|o| o.class == "VDI").ok_or_else(|| Error::Usage(format!("no VDI {id} in ova.xml")))?;
        if int_field(&vdi.snapshot, "virtual_size") != Some(dev.len()) {
            return Err(Error::Usage(format!("VDI {id}'s virtual_size is not its data's {} bytes", dev.len())));
        }
    }
    let mtime = now();
    let mut n = write_member(out, "ova.xml", ova.to_xml().as_bytes(), mtime)?;
    let mut buf = vec![0u8; CHUNK as usize];
    for (id, dev) in disks {
        let chunks = dev.len().div_ceil(CHUNK);
        for i in 0..chunks {
            let off = i * CHUNK;
            let len = CHUNK.min(dev.len() - off) as usize;
            let data = &mut buf[..len];
            let must = i == 0 || i + 1 == chunks;
            let hole = dev.allocation(off, len as u64).ctx(|| format!("reading VDI {id}"))?;
            if hole.kind == Allocation::Zero && hole.len >= len as u64 {
                if !must {
                    continue;
                }
                data.fill(0);
            } else {
                dev.read_at(off, data).ctx(|| format!("reading VDI {id} at {off}"))?;
                dev.release(off, len as u64);
                if !must && is_zero(data) {
                    continue;
                }
            }
            let name = format!("{id}/{i:08}");
            n += write_header(out, &name, len as u64, mtime)?;
            out.write_all(data).ctx(|| "writing the XVA".into())?;
            n += len as u64 + pad(out, len as u64)?;
            n += write_member(out, &format!("{name}.xxhash"), format!("{:016X}", xxh64(data, 0)).as_bytes(), mtime)?;
        }
    }
    n += write_end(out)?;
    out.flush().ctx(|| "writing the XVA".into())?;
    Ok(n)
}
