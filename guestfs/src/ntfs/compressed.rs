//! NTFS compressed files: LZNT1 and the compression units it is applied to.
//!
//! A compressed attribute is cut into units of 2^`compression_unit` clusters (16 clusters,
//! 64 KiB with 4 KiB clusters). A unit whose clusters are all allocated is stored as is; one
//! whose first cluster is a hole is all zeros; otherwise its allocated clusters hold LZNT1
//! data: chunks of 4 KiB output, each a 16-bit header (size − 3 in bits 0–11, bit 15 set
//! when compressed) followed by the chunk stored or as groups of eight tokens behind a flag
//! byte (literal byte, or a 16-bit back reference whose split between offset and length
//! depends on the position in the chunk). Facts from ntfs-3g's `compress.c` and MS-XCA §2.5.

use std::io;
use std::sync::{Arc, Mutex};

use blockdev::{check_range, Allocation, BlockDev, Run};

use super::record::Extent;

/// Decompress LZNT1 `src` into `out` (a whole compression unit, a multiple of 4 KiB): every
/// chunk fills its 4 KiB of `out`, short chunks are padded with zeros. Errors name the fault;
/// nothing is written beyond a chunk's 4 KiB.
pub fn decompress(src: &[u8], out: &mut [u8]) -> Result<(), &'static str> {
    const CHUNK: usize = 4096;
    out.fill(0);
    let (mut i, mut start) = (0usize, 0usize);
    while i + 2 <= src.len() && start < out.len() {
        let h = u16::from_le_bytes([src[i], src[i + 1]]);
        if h == 0 {
            break;
        }
        let len = usize::from(h & 0x0FFF) + 1;
        let chunk = src.get(i + 2..i + 2 + len).ok_or("an LZNT1 chunk runs past the compressed data")?;
        i += 2 + len;
        let end = (start + CHUNK).min(out.len());
        if h & 0x8000 == 0 {
            let n = len.min(end - start);
            out[start..start + n].copy_from_slice(&chunk[..n]);
        } else {
            let (mut p, mut d) = (0usize, start);
            'tokens: while p < chunk.len() {
                let flags = chunk[p];
                p += 1;
                for bit in 0..8 {
                    if p >= chunk.len() {
                        break 'tokens;
                    }
                    if flags >> bit & 1 == 0 {
                        if d >= end {
                            return Err("an LZNT1 chunk decompresses to more than 4 KiB");
                        }
                        out[d] = chunk[p];
                        d += 1;
                        p += 1;
                        continue;
                    }
                    let t = chunk.get(p..p + 2).ok_or("an LZNT1 back reference is cut short")?;
                    let t = u16::from_le_bytes([t[0], t[1]]);
                    p += 2;
                    let pos = d - start;
                    if pos == 0 {
                        return Err("an LZNT1 back reference at the start of a chunk");
                    }
                    let mut offset_bits = 4u32;
                    let mut x = pos - 1;
                    while x >= 0x10 {
                        offset_bits += 1;
                        x >>= 1;
                    }
                    let back = usize::from(t >> (16 - offset_bits)) + 1;
                    let length = usize::from(t & (0xFFFF >> offset_bits)) + 3;
                    if back > pos {
                        return Err("an LZNT1 back reference before the start of its chunk");
                    }
                    if d + length > end {
                        return Err("an LZNT1 chunk decompresses to more than 4 KiB");
                    }
                    for k in d..d + length {
                        out[k] = out[k - back];
                    }
                    d += length;
                }
            }
        }
        start += CHUNK;
    }
    Ok(())
}

/// The contents of a compressed attribute as a [`BlockDev`]. Keeps the last unit it
/// decompressed, so sequential reads smaller than a unit decompress each unit once.
pub(crate) struct CompressedDev {
    dev: Arc<dyn BlockDev>,
    cluster: u64,
    unit_clusters: u64,
    size: u64,
    /// Bytes from here on read as zeros (the initialized size).
    valid: u64,
    extents: Vec<Extent>,
    last: Mutex<Option<(u64, Arc<Vec<u8>>)>>,
}

impl std::fmt::Debug for CompressedDev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CompressedDev({} bytes, {} extents)", self.size, self.extents.len())
    }
}

impl CompressedDev {
    pub(crate) fn new(
        dev: Arc<dyn BlockDev>,
        cluster: u64,
        unit_log2: u8,
        size: u64,
        valid: u64,
        extents: Vec<Extent>,
    ) -> Self {
        let unit_clusters = 1u64 << unit_log2;
        Self { dev, cluster, unit_clusters, size, valid: valid.min(size), extents, last: Mutex::new(None) }
    }

    fn unit_bytes(&self) -> u64 {
        self.unit_clusters * self.cluster
    }

    /// The cluster holding VCN `vcn` (None for a hole or past the runs).
    fn lcn(&self, vcn: u64) -> Option<u64> {
        let i = self.extents.partition_point(|e| e.vcn + e.len <= vcn);
        let e = self.extents.get(i).filter(|e| e.vcn <= vcn)?;
        e.lcn.map(|l| l + (vcn - e.vcn))
    }

    /// How many clusters at the start of unit `u` are allocated.
    fn allocated(&self, u: u64) -> u64 {
        let first = u * self.unit_clusters;
        (0..self.unit_clusters).take_while(|c| self.lcn(first + c).is_some()).count() as u64
    }

    /// Read `n` clusters from VCN `vcn` on, following the runs.
    fn read_clusters(&self, vcn: u64, n: u64, out: &mut [u8]) -> io::Result<()> {
        let mut c = 0;
        while c < n {
            let lcn = self.lcn(vcn + c).ok_or_else(|| io::Error::other("a compressed run ends inside its unit"))?;
            // Extend over clusters that follow on disk.
            let mut k = 1;
            while c + k < n && self.lcn(vcn + c + k) == Some(lcn + k) {
                k += 1;
            }
            let at = lcn
                .checked_mul(self.cluster)
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "cluster beyond 2^64"))?;
            let (from, to) = ((c * self.cluster) as usize, ((c + k) * self.cluster) as usize);
            self.dev.read_at(at, &mut out[from..to])?;
            c += k;
        }
        Ok(())
    }

    fn unit(&self, u: u64) -> io::Result<Arc<Vec<u8>>> {
        if let Some((n, data)) = &*self.last.lock().expect("lock") {
            if *n == u {
                return Ok(data.clone());
            }
        }
        let ub = self.unit_bytes() as usize;
        let mut out = vec![0u8; ub];
        let k = self.allocated(u);
        if k == self.unit_clusters {
            self.read_clusters(u * self.unit_clusters, k, &mut out)?;
        } else if k > 0 {
            let mut src = vec![0u8; (k * self.cluster) as usize];
            self.read_clusters(u * self.unit_clusters, k, &mut src)?;
            decompress(&src, &mut out)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{e} (compression unit {u})")))?;
        }
        let out = Arc::new(out);
        *self.last.lock().expect("lock") = Some((u, out.clone()));
        Ok(out)
    }
}

impl BlockDev for CompressedDev {
    fn len(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        check_range(self.size, offset, buf.len() as u64)?;
        let ub = self.unit_bytes();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let within = pos % ub;
            let n = ((ub - within) as usize).min(buf.len() - done);
            let out = &mut buf[done..done + n];
            if pos >= self.valid {
                out.fill(0);
            } else {
                let unit = self.unit(pos / ub)?;
                out.copy_from_slice(&unit[within as usize..within as usize + n]);
                let keep = (self.valid - pos).min(n as u64) as usize;
                out[keep..].fill(0);
            }
            done += n;
        }
        Ok(())
    }

    fn allocation(&self, offset: u64, max_len: u64) -> io::Result<Run> {
        check_range(self.size, offset, 1)?;
        let limit = max_len.min(self.size - offset);
        let ub = self.unit_bytes();
        // A unit is a hole exactly when its first cluster is (`unit` reads it as zeros).
        let hole = |u: u64| u * ub >= self.valid || self.lcn(u * self.unit_clusters).is_none();
        let first = offset / ub;
        let kind = if hole(first) { Allocation::Zero } else { Allocation::Data };
        let end = offset + limit;
        let mut u = first;
        while u * ub < end && hole(u) == (kind == Allocation::Zero) {
            // Units wholly inside one extent (or past the runs, or past the valid data)
            // are alike: jump to the last unit that may differ.
            let vcn = u * self.unit_clusters;
            let i = self.extents.partition_point(|e| e.vcn + e.len <= vcn);
            let next = match self.extents.get(i) {
                _ if u * ub >= self.valid => u64::MAX,
                Some(e) if e.vcn <= vcn => (e.vcn + e.len) / self.unit_clusters,
                Some(e) => e.vcn / self.unit_clusters,
                None => u64::MAX,
            };
            let next = if u * ub < self.valid { next.min(self.valid.div_ceil(ub)) } else { next };
            u = next.max(u + 1).min(end.div_ceil(ub));
        }
        Ok(Run { kind, len: (u * ub - offset).min(limit) })
    }
}

#[cfg(test)]
mod tests {
    use super::decompress;

    #[test]
    fn stored_and_compressed_chunks() {
        // A compressed chunk: "abc" literals then a back reference (3 back, length 6)
        // gives "abcabcabc". At position 3, 4 offset bits: (3-1)<<12 | (6-3).
        let token = ((3u16 - 1) << 12) | (6 - 3);
        let mut c = vec![0b0000_1000, b'a', b'b', b'c'];
        c.extend_from_slice(&token.to_le_bytes());
        let mut src = (0xB000u16 | (c.len() as u16 - 1)).to_le_bytes().to_vec();
        src.extend_from_slice(&c);
        // A stored chunk: 4096 raw bytes.
        src.extend_from_slice(&(0x3000u16 | 4095).to_le_bytes());
        src.extend(std::iter::repeat_n(7u8, 4096));
        let mut out = vec![0xFFu8; 8192 + 4096];
        decompress(&src, &mut out).expect("decompress");
        assert_eq!(&out[..9], b"abcabcabc");
        assert!(out[9..4096].iter().all(|&b| b == 0), "a short chunk is padded with zeros");
        assert!(out[4096..8192].iter().all(|&b| b == 7));
        assert!(out[8192..].iter().all(|&b| b == 0));
        // A reference before the chunk's start, and one at its very start, are refused.
        let bad = [0x03, 0xB0, 0b0000_0010, b'a', 0x00, 0x10];
        assert!(decompress(&bad, &mut vec![0; 4096]).is_err());
        let bad = [0x02, 0xB0, 0b0000_0001, 0x00, 0x00];
        assert!(decompress(&bad, &mut vec![0; 4096]).is_err());
    }
}
