//! Checking an XVA and reading its VDIs in place.
//!
//! [`Xva::open`] reads the whole package once: `ova.xml` first, then every chunk, verifying
//! each chunk's checksum member, the chunk order, and that each VDI's chunks add up to its
//! `virtual_size` exactly. What it keeps is where each chunk's bytes sit in the file; an
//! [`XvaDisk`] reads them from there (and zeros between them).

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read};
use std::sync::Arc;

use blockdev::{check_range, Allocation, BlockDev, Run};
use xxhash_rust::xxh64::Xxh64;

use super::{int_field, OvaXml};
use crate::{Error, Result};

/// Largest `ova.xml` accepted.
const MAX_OVA_XML: u64 = 256 << 20;

/// A checked XVA: its metadata and its VDIs by id.
#[derive(Debug)]
pub struct Xva {
    pub ova: OvaXml,
    pub disks: BTreeMap<String, XvaDisk>,
}

/// One VDI of an XVA, read from the package file.
pub struct XvaDisk {
    file: Arc<dyn BlockDev>,
    size: u64,
    /// (offset in the disk, offset in the file, length), ascending, disjoint.
    extents: Vec<(u64, u64, u64)>,
}

impl std::fmt::Debug for XvaDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XvaDisk").field("size", &self.size).field("extents", &self.extents.len()).finish()
    }
}

/// Sequential reads of a device, for the tar reader.
struct DevReader<'a> {
    dev: &'a dyn BlockDev,
    pos: u64,
}

impl Read for DevReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (self.dev.len().saturating_sub(self.pos)).min(buf.len() as u64) as usize;
        self.dev.read_at(self.pos, &mut buf[..n])?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// Progress through one VDI's chunks.
struct Cursor {
    id: String,
    size: u64,
    offset: u64,
    last: Option<u64>,
    first_len: Option<u64>,
    extents: Vec<(u64, u64, u64)>,
}

/// A chunk whose checksum member is still to come.
struct Pending {
    name: String,
    xxh64: u64,
    /// Where the chunk's bytes are in the file, for a legacy SHA-1 checksum member.
    data_at: u64,
    len: u64,
}

fn corrupt(at: u64, detail: impl Into<String>) -> Error {
    Error::corrupt("XVA", at, detail)
}

/// Split `Ref:N/00000012[.xxhash|.checksum]` into id, counter and suffix.
fn parse_name(name: &str, at: u64) -> Result<(&str, u64, &str)> {
    let (id, rest) = name.split_once('/').ok_or_else(|| corrupt(at, format!("unexpected member {name:?}")))?;
    if id.is_empty() || id.contains("..") || name.starts_with('/') || rest.contains('/') {
        return Err(corrupt(at, format!("member {name:?} escapes its folder")));
    }
    let (digits, suffix) = rest.split_once('.').unwrap_or((rest, ""));
    if digits.len() != 8 || !digits.bytes().all(|b| b.is_ascii_digit()) || !matches!(suffix, "" | "xxhash" | "checksum")
    {
        return Err(corrupt(at, format!("unexpected member {name:?}")));
    }
    Ok((id, digits.parse().unwrap_or(0), suffix))
}

impl Xva {
    /// Read and check the package in `file`.
    pub fn open(file: Arc<dyn BlockDev>) -> Result<Self> {
        let mut magic = [0u8; 4];
        if file.len() >= 4 {
            file.read_at(0, &mut magic).map_err(|e| Error::io("reading the XVA", e))?;
        }
        if magic[..2] == [0x1f, 0x8b] || magic == [0x28, 0xb5, 0x2f, 0xfd] {
            return Err(Error::Unsupported("a compressed XVA: decompress it first (gunzip / zstd -d)".into()));
        }
        let mut archive = tar::Archive::new(DevReader { dev: &*file, pos: 0 });
        let mut entries = archive.entries().map_err(|e| corrupt(0, e.to_string()))?;
        let ova = {
            let mut first =
                entries.next().ok_or_else(|| corrupt(0, "an empty archive"))?.map_err(|e| corrupt(0, e.to_string()))?;
            let name = String::from_utf8_lossy(&first.path_bytes()).into_owned();
            if name != "ova.xml" {
                return Err(corrupt(0, format!("first member is {name:?}, expected ova.xml")));
            }
            if first.size() > MAX_OVA_XML {
                return Err(corrupt(0, format!("ova.xml of {} bytes", first.size())));
            }
            let mut text = String::new();
            first.read_to_string(&mut text).map_err(|e| corrupt(0, format!("ova.xml: {e}")))?;
            OvaXml::parse(&text)?
        };
        let mut sizes: HashMap<String, u64> = HashMap::new();
        for vdi in ova.streamed_vdis()? {
            let size = int_field(&vdi.snapshot, "virtual_size")
                .ok_or_else(|| corrupt(0, format!("VDI {} has no virtual_size", vdi.id)))?;
            sizes.insert(vdi.id.clone(), size);
        }
        let mut done: BTreeMap<String, XvaDisk> = BTreeMap::new();
        let mut cur: Option<Cursor> = None;
        let mut pending: Option<Pending> = None;
        for entry in entries {
            let mut entry = entry.map_err(|e| corrupt(0, e.to_string()))?;
            let at = entry.raw_header_position();
            let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            let (id, counter, suffix) = parse_name(&name, at)?;
            if suffix.is_empty() {
                if let Some(p) = pending.take() {
                    return Err(corrupt(at, format!("chunk {} has no checksum member", p.name)));
                }
                if cur.as_ref().is_none_or(|c| c.id != id) {
                    if let Some(c) = cur.take() {
                        finish(c, &file, &mut done)?;
                    }
                    let size = *sizes
                        .get(id)
                        .ok_or_else(|| corrupt(at, format!("data for {id:?}, which is no streamed VDI")))?;
                    if done.contains_key(id) || done.keys().next_back().is_some_and(|last| last.as_str() > id) {
                        return Err(corrupt(at, format!("the chunks of {id} are out of order")));
                    }
                    cur = Some(Cursor {
                        id: id.into(),
                        size,
                        offset: 0,
                        last: None,
                        first_len: None,
                        extents: Vec::new(),
                    });
                }
                let c = cur.as_mut().expect("set above");
                let data_at = entry.raw_file_position();
                pending = Some(read_chunk(c, &mut entry, &name, counter, (at, data_at))?);
            } else {
                let p = pending.take().ok_or_else(|| corrupt(at, format!("checksum {name:?} without its chunk")))?;
                if name.strip_suffix(&format!(".{suffix}")) != Some(p.name.as_str()) {
                    return Err(corrupt(at, format!("checksum {name:?} follows chunk {}", p.name)));
                }
                if entry.size() > 128 {
                    return Err(corrupt(at, format!("checksum member of {} bytes", entry.size())));
                }
                let mut text = String::new();
                entry.read_to_string(&mut text).map_err(|e| corrupt(at, e.to_string()))?;
                let want = if suffix == "xxhash" { format!("{:016X}", p.xxh64) } else { sha1_of(&*file, &p)? };
                if !text.trim().eq_ignore_ascii_case(&want) {
                    return Err(corrupt(at, format!("chunk {} checksum {}, computed {want}", p.name, text.trim())));
                }
            }
        }
        if let Some(p) = pending {
            return Err(corrupt(file.len(), format!("chunk {} has no checksum member", p.name)));
        }
        if let Some(c) = cur.take() {
            finish(c, &file, &mut done)?;
        }
        for (id, size) in sizes {
            if !done.contains_key(&id) {
                if size > 0 {
                    return Err(corrupt(file.len(), format!("no data for VDI {id}")));
                }
                done.insert(id, XvaDisk { file: file.clone(), size, extents: Vec::new() });
            }
        }
        Ok(Xva { ova, disks: done })
    }
}

fn read_chunk(
    c: &mut Cursor,
    entry: &mut impl Read,
    name: &str,
    counter: u64,
    (at, data_at): (u64, u64),
) -> Result<Pending> {
    let skipped = match c.last {
        Some(last) if counter <= last => return Err(corrupt(at, format!("chunk {name} comes after counter {last}"))),
        Some(last) => counter - last - 1,
        None => counter,
    };
    c.last = Some(counter);
    let (n, xxh64) = {
        let mut xx = Xxh64::new(0);
        let mut buf = vec![0u8; 256 << 10];
        let mut len = 0u64;
        loop {
            let n = entry.read(&mut buf).map_err(|e| corrupt(at, format!("{name}: {e}")))?;
            if n == 0 {
                break;
            }
            xx.update(&buf[..n]);
            len += n as u64;
        }
        (len, xx.digest())
    };
    if skipped > 0 {
        let unit = c.first_len.ok_or_else(|| corrupt(at, format!("chunk {name} skips chunks before any was sent")))?;
        c.offset = skipped
            .checked_mul(unit)
            .and_then(|s| s.checked_add(c.offset))
            .ok_or_else(|| corrupt(at, "offset overflows"))?;
    }
    if n > 0 {
        c.first_len.get_or_insert(n);
        let end = c.offset.checked_add(n).filter(|&e| e <= c.size);
        let Some(end) = end else {
            return Err(corrupt(at, format!("chunk {name} ends past VDI {}'s {} bytes", c.id, c.size)));
        };
        c.extents.push((c.offset, data_at, n));
        c.offset = end;
    }
    Ok(Pending { name: name.into(), xxh64, data_at, len: n })
}

/// SHA-1 of a chunk already passed, read again from the file: only legacy packages (before
/// XXH64 members) need it, so the common path hashes once.
fn sha1_of(file: &dyn BlockDev, p: &Pending) -> Result<String> {
    let mut sha = sha1_smol::Sha1::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut done = 0;
    while done < p.len {
        let n = (p.len - done).min(buf.len() as u64) as usize;
        file.read_at(p.data_at + done, &mut buf[..n]).map_err(|e| Error::io(format!("reading {}", p.name), e))?;
        sha.update(&buf[..n]);
        done += n as u64;
    }
    Ok(sha.digest().to_string())
}

fn finish(c: Cursor, file: &Arc<dyn BlockDev>, done: &mut BTreeMap<String, XvaDisk>) -> Result<()> {
    if c.offset != c.size {
        return Err(corrupt(file.len(), format!("VDI {}: chunks cover {} of its {} bytes", c.id, c.offset, c.size)));
    }
    done.insert(c.id, XvaDisk { file: file.clone(), size: c.size, extents: c.extents });
    Ok(())
}

impl XvaDisk {
    fn find(&self, off: u64) -> std::result::Result<usize, usize> {
        self.extents.binary_search_by(|e| {
            if e.0 + e.2 <= off {
                std::cmp::Ordering::Less
            } else if e.0 > off {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        })
    }
}

impl BlockDev for XvaDisk {
    fn len(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        check_range(self.size, offset, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let off = offset + done as u64;
            let rest = buf.len() - done;
            match self.find(off) {
                Ok(i) => {
                    let (v, f, l) = self.extents[i];
                    let n = ((v + l - off) as usize).min(rest);
                    self.file.read_at(f + (off - v), &mut buf[done..done + n])?;
                    done += n;
                }
                Err(i) => {
                    let next = self.extents.get(i).map_or(self.size, |e| e.0);
                    let n = ((next - off) as usize).min(rest);
                    buf[done..done + n].fill(0);
                    done += n;
                }
            }
        }
        Ok(())
    }

    fn allocation(&self, offset: u64, max_len: u64) -> io::Result<Run> {
        check_range(self.size, offset, 1)?;
        let max = max_len.min(self.size - offset).max(1);
        Ok(match self.find(offset) {
            Ok(i) => {
                let mut end = self.extents[i].0 + self.extents[i].2;
                let mut j = i + 1;
                while j < self.extents.len() && self.extents[j].0 == end {
                    end += self.extents[j].2;
                    j += 1;
                }
                Run { kind: Allocation::Data, len: (end - offset).min(max) }
            }
            Err(i) => {
                let next = self.extents.get(i).map_or(self.size, |e| e.0);
                Run { kind: Allocation::Zero, len: (next - offset).min(max) }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tarball::{write_end, write_member};
    use crate::xva::objects::{package, StreamSpec};

    /// A package with legacy SHA-1 `.checksum` members (before XXH64) for a 3000-byte VDI.
    fn legacy(data: &[u8], checksum: &str) -> Vec<u8> {
        let specs = [StreamSpec { name: "xvda".into(), size: data.len() as u64, memory: false }];
        let p = package("vm", None, &specs);
        let id = &p.vdis[0].0;
        let mut out = Vec::new();
        write_member(&mut out, "ova.xml", p.ova.to_xml().as_bytes(), 0).unwrap();
        write_member(&mut out, &format!("{id}/00000000"), data, 0).unwrap();
        write_member(&mut out, &format!("{id}/00000000.checksum"), checksum.as_bytes(), 0).unwrap();
        write_end(&mut out).unwrap();
        out
    }

    #[test]
    fn legacy_sha1_checksums_are_verified() {
        let data = vec![7u8; 3000];
        let good = sha1_smol::Sha1::from(&data).digest().to_string();
        let x = Xva::open(Arc::new(blockdev::MemDev::new(legacy(&data, &good)))).unwrap();
        assert_eq!(blockdev::read_all(x.disks.values().next().unwrap()).unwrap(), data);
        let bad = "0".repeat(40);
        let e = Xva::open(Arc::new(blockdev::MemDev::new(legacy(&data, &bad)))).unwrap_err().to_string();
        assert!(e.contains("checksum") && e.contains(&good), "{e}");
    }
}
