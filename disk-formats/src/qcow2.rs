//! A streaming qcow2 (version 3) writer.
//!
//! The device's data clusters are known before writing (from its zero extents), so the whole
//! layout is computed first and written front to back: header, refcount table, refcount
//! blocks, L1 table, L2 tables, data clusters in guest order. Clusters are 64 KiB, refcounts
//! 16-bit, every used cluster has refcount 1 and every L1/L2 entry carries the "copied" bit,
//! as for a freshly written image. Zero ranges stay unallocated (L2 entry 0).

use std::ops::Range;

use blockdev::BlockDev;

use crate::error::IoContext;
use crate::out::{data_granules, read_padded, Output};
use crate::{Error, Result};

pub const MAGIC: &[u8; 4] = b"QFI\xfb";
const CLUSTER_BITS: u32 = 16;
const CLUSTER: u64 = 1 << CLUSTER_BITS;
/// Entries of one L2 table (one cluster of u64).
const L2_ENTRIES: u64 = CLUSTER / 8;
/// 16-bit refcounts: entries per refcount block.
const RB_ENTRIES: u64 = CLUSTER * 8 / 16;
/// L1/L2 entry flag: refcount is exactly one.
const COPIED: u64 = 1 << 63;
/// qemu refuses an L1 table over 32 MiB.
const MAX_L1_BYTES: u64 = 32 << 20;

/// Where everything goes, in clusters from the file's start.
#[derive(Debug)]
struct Layout {
    size: u64,
    l1_size: u64,
    refcount_table: u64,
    refcount_blocks: u64,
    l1_clusters: u64,
    /// L2 table numbers present, ascending.
    l2: Vec<u64>,
    /// Data cluster ranges (guest cluster numbers), ascending.
    data: Vec<Range<u64>>,
    data_clusters: u64,
}

impl Layout {
    fn new(dev: &dyn BlockDev) -> Result<Self> {
        let size = dev.len();
        let l1_size = size.div_ceil(CLUSTER * L2_ENTRIES).max(1);
        if l1_size * 8 > MAX_L1_BYTES {
            return Err(Error::Usage(format!("{size} bytes is beyond what a qcow2 image with 64 KiB clusters holds")));
        }
        let data = data_granules(dev, CLUSTER).ctx(|| "listing the disk's data".into())?;
        let mut l2: Vec<u64> = Vec::new();
        for r in &data {
            for t in r.start / L2_ENTRIES..=(r.end - 1) / L2_ENTRIES {
                if l2.last() != Some(&t) {
                    l2.push(t);
                }
            }
        }
        let data_clusters: u64 = data.iter().map(|r| r.end - r.start).sum();
        let l1_clusters = (l1_size * 8).div_ceil(CLUSTER);
        let (mut rt, mut rb) = (1u64, 1u64);
        loop {
            let total = 1 + rt + rb + l1_clusters + l2.len() as u64 + data_clusters;
            let (rb2, rt2) = (total.div_ceil(RB_ENTRIES), (total.div_ceil(RB_ENTRIES) * 8).div_ceil(CLUSTER));
            if (rb2, rt2) == (rb, rt) {
                break;
            }
            (rb, rt) = (rb2, rt2);
        }
        Ok(Layout { size, l1_size, refcount_table: rt, refcount_blocks: rb, l1_clusters, l2, data, data_clusters })
    }

    fn rt_offset(&self) -> u64 {
        CLUSTER
    }
    fn rb_offset(&self) -> u64 {
        self.rt_offset() + self.refcount_table * CLUSTER
    }
    fn l1_offset(&self) -> u64 {
        self.rb_offset() + self.refcount_blocks * CLUSTER
    }
    fn l2_offset(&self) -> u64 {
        self.l1_offset() + self.l1_clusters * CLUSTER
    }
    fn data_offset(&self) -> u64 {
        self.l2_offset() + self.l2.len() as u64 * CLUSTER
    }
    fn total_clusters(&self) -> u64 {
        self.data_offset() / CLUSTER + self.data_clusters
    }

    fn header(&self) -> Vec<u8> {
        let mut h = vec![0u8; CLUSTER as usize];
        h[0..4].copy_from_slice(MAGIC);
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        h[20..24].copy_from_slice(&CLUSTER_BITS.to_be_bytes());
        h[24..32].copy_from_slice(&self.size.to_be_bytes());
        // l1_size ≤ 4 M entries (MAX_L1_BYTES / 8), refcount table clusters far below 2^32.
        h[36..40].copy_from_slice(&u32::try_from(self.l1_size).unwrap_or(u32::MAX).to_be_bytes());
        h[40..48].copy_from_slice(&self.l1_offset().to_be_bytes());
        h[48..56].copy_from_slice(&self.rt_offset().to_be_bytes());
        h[56..60].copy_from_slice(&u32::try_from(self.refcount_table).unwrap_or(u32::MAX).to_be_bytes());
        h[96..100].copy_from_slice(&4u32.to_be_bytes()); // refcount_order: 16-bit
        h[100..104].copy_from_slice(&104u32.to_be_bytes()); // header_length
                                                            // Bytes 104..112 stay zero: the header extension list's end marker.
        h
    }
}

fn put_u64s(out: &mut dyn Output, entries: &[u64], clusters: u64) -> Result<()> {
    let mut b: Vec<u8> = entries.iter().flat_map(|e| e.to_be_bytes()).collect();
    b.resize((clusters * CLUSTER) as usize, 0);
    out.write_all(&b).ctx(|| "writing the qcow2 image".into())
}

/// Write `dev` as a qcow2 v3 image. Returns the bytes written.
pub fn write(dev: &dyn BlockDev, out: &mut dyn Output) -> Result<u64> {
    let l = Layout::new(dev)?;
    let w = |out: &mut dyn Output, b: &[u8]| out.write_all(b).ctx(|| "writing the qcow2 image".into());
    w(out, &l.header())?;
    let rbs: Vec<u64> = (0..l.refcount_blocks).map(|i| l.rb_offset() + i * CLUSTER).collect();
    put_u64s(out, &rbs, l.refcount_table)?;
    let total = l.total_clusters();
    for block in 0..l.refcount_blocks {
        let first = block * RB_ENTRIES;
        let used = total.saturating_sub(first).min(RB_ENTRIES) as usize;
        let mut b = vec![0u8; CLUSTER as usize];
        for e in b.chunks_exact_mut(2).take(used) {
            e.copy_from_slice(&1u16.to_be_bytes());
        }
        w(out, &b)?;
    }
    let mut l1 = vec![0u64; l.l1_size as usize];
    for (k, &t) in l.l2.iter().enumerate() {
        l1[t as usize] = (l.l2_offset() + k as u64 * CLUSTER) | COPIED;
    }
    put_u64s(out, &l1, l.l1_clusters)?;
    write_l2_tables(&l, out)?;
    write_data(dev, &l, out)?;
    out.flush().ctx(|| "writing the qcow2 image".into())?;
    Ok(total * CLUSTER)
}

fn write_l2_tables(l: &Layout, out: &mut dyn Output) -> Result<()> {
    let mut host = l.data_offset();
    let mut clusters = l.data.iter().flat_map(|r| r.clone()).peekable();
    for &t in &l.l2 {
        let mut table = vec![0u64; L2_ENTRIES as usize];
        while let Some(&c) = clusters.peek() {
            if c / L2_ENTRIES != t {
                break;
            }
            table[(c % L2_ENTRIES) as usize] = host | COPIED;
            host += CLUSTER;
            clusters.next();
        }
        put_u64s(out, &table, 1)?;
    }
    Ok(())
}

fn write_data(dev: &dyn BlockDev, l: &Layout, out: &mut dyn Output) -> Result<()> {
    let mut buf = vec![0u8; 2 << 20];
    for r in &l.data {
        let (mut pos, end) = (r.start * CLUSTER, r.end * CLUSTER);
        while pos < end {
            let n = (end - pos).min(buf.len() as u64) as usize;
            read_padded(dev, pos, &mut buf[..n]).ctx(|| format!("reading the disk at {pos}"))?;
            out.write_all(&buf[..n]).ctx(|| "writing the qcow2 image".into())?;
            dev.release(pos, n as u64);
            pos += n as u64;
        }
    }
    Ok(())
}

/// The size in bytes [`write`] will produce for `dev`.
pub fn image_size(dev: &dyn BlockDev) -> Result<u64> {
    Ok(Layout::new(dev)?.total_clusters() * CLUSTER)
}
