//! A read-only FAT12/16/32 reader over [`BlockDev`], with long (VFAT) names.
//!
//! FAT has no inode numbers: a node is numbered by the byte offset of its 32-byte directory
//! entry in the volume (always a multiple of 32, never 0), and the root by [`ROOT`], so a
//! node can be found again from its number alone. The allocation table is read into memory
//! on first use (capped by [`MAX_FAT`]); cluster chains are checked for loops, free or
//! out-of-range links and for being long enough for the file's size. Times are stored in
//! local time without a zone: they are read as UTC (as `mtools` and Linux with `tz=UTC`).
//! Short names are decoded as Latin-1 (the OEM code page is not recorded on disk).

use std::sync::{Arc, OnceLock};

use blockdev::{BlockDev, SliceDev};

use crate::error::{Error, Result};
use crate::fs::{DirEntry, FileSystem, Kind, Stat, Time};
use crate::read::{array, le16, le32, vec};
use crate::rundev::{Run, RunDev};

/// The root directory's node number (not a directory-entry offset: those are multiples of 32).
pub const ROOT: u64 = 1;
/// Largest allocation table read into memory (16 M clusters of FAT32).
const MAX_FAT: u64 = 64 << 20;
/// Largest directory read.
const MAX_DIR: u64 = 64 << 20;

const ATTR_READ_ONLY: u8 = 0x01;
const ATTR_VOLUME_ID: u8 = 0x08;
const ATTR_DIRECTORY: u8 = 0x10;
const ATTR_LONG_NAME: u8 = 0x0F;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bits {
    Fat12,
    Fat16,
    Fat32,
}

/// The BIOS parameter block, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub bits: Bits,
    pub sector_size: u64,
    pub cluster_size: u64,
    /// Byte offset and length of the first allocation table.
    pub fat_at: u64,
    pub fat_len: u64,
    /// The FAT12/16 root directory region (offset, length); FAT32 roots are a chain.
    pub root_region: Option<(u64, u64)>,
    pub root_cluster: u32,
    /// Byte offset of cluster 2.
    pub data_at: u64,
    /// Clusters 2..cluster_count + 2 exist.
    pub cluster_count: u32,
}

fn bad(detail: impl Into<String>) -> Error {
    Error::corrupt("FAT boot sector", 0, detail)
}

impl Geometry {
    pub fn parse(b: &[u8; 512], volume_len: u64) -> Result<Self> {
        let sector_size = u64::from(le16(b, 11));
        let spc = u64::from(b[13]);
        let reserved = u64::from(le16(b, 14));
        let fats = u64::from(b[16]);
        let root_entries = u64::from(le16(b, 17));
        let total = match le16(b, 19) {
            0 => u64::from(le32(b, 32)),
            n => u64::from(n),
        };
        let fat_sectors = match le16(b, 22) {
            0 => u64::from(le32(b, 36)),
            n => u64::from(n),
        };
        if !(512..=4096).contains(&sector_size) || !sector_size.is_power_of_two() {
            return Err(bad(format!("{sector_size} bytes per sector")));
        }
        if spc == 0 || !spc.is_power_of_two() {
            return Err(bad(format!("{spc} sectors per cluster")));
        }
        if reserved == 0 || fats == 0 || fat_sectors == 0 {
            return Err(bad(format!("{reserved} reserved sectors, {fats} FATs of {fat_sectors} sectors")));
        }
        let root_sectors = (root_entries * 32).div_ceil(sector_size);
        let data_sector = reserved + fats * fat_sectors + root_sectors;
        if total <= data_sector || total * sector_size > volume_len.max(sector_size) + sector_size * spc {
            return Err(bad(format!("{total} sectors in a volume of {volume_len} bytes")));
        }
        let clusters = (total - data_sector) / spc;
        let bits = match clusters {
            0..4085 => Bits::Fat12,
            4085..65525 => Bits::Fat16,
            _ => Bits::Fat32,
        };
        if bits == Bits::Fat32 && root_entries != 0 || bits != Bits::Fat32 && root_entries == 0 {
            return Err(bad(format!("{root_entries} root entries with {clusters} clusters")));
        }
        let cluster_count = u32::try_from(clusters).map_err(|_| bad(format!("{clusters} clusters")))?;
        let root_region =
            (bits != Bits::Fat32).then(|| ((reserved + fats * fat_sectors) * sector_size, root_entries * 32));
        Ok(Self {
            bits,
            sector_size,
            cluster_size: sector_size * spc,
            fat_at: reserved * sector_size,
            fat_len: fat_sectors * sector_size,
            root_region,
            root_cluster: if bits == Bits::Fat32 { le32(b, 44) } else { 0 },
            data_at: data_sector * sector_size,
            cluster_count,
        })
    }
}

/// An open FAT volume. `Send + Sync`.
pub struct Fat {
    dev: Arc<dyn BlockDev>,
    /// The data area, so that cluster `c` is block `c - 2`.
    data: Arc<dyn BlockDev>,
    pub geometry: Geometry,
    table: OnceLock<std::result::Result<Vec<u8>, String>>,
}

impl std::fmt::Debug for Fat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Fat({:?}, {} clusters)", self.geometry.bits, self.geometry.cluster_count)
    }
}

/// A parsed short directory entry.
#[derive(Clone, Debug)]
struct Short {
    attr: u8,
    cluster: u32,
    size: u32,
    raw: [u8; 32],
}

impl Short {
    /// The first cluster's high half exists only on FAT32 (elsewhere the field is reserved).
    fn parse(raw: [u8; 32], bits: Bits) -> Self {
        let cluster_hi = if bits == Bits::Fat32 { u32::from(le16(&raw, 20)) << 16 } else { 0 };
        Short { attr: raw[11], cluster: cluster_hi | u32::from(le16(&raw, 26)), size: le32(&raw, 28), raw }
    }
}

/// Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// A FAT date and time (2-second resolution) plus hundredths, as UTC.
fn fat_time(date: u16, time: u16, centis: u8) -> Time {
    if date == 0 {
        return Time::default();
    }
    let (y, m, d) =
        (1980 + i64::from(date >> 9), i64::from((date >> 5) & 0xF).clamp(1, 12), i64::from(date & 0x1F).max(1));
    let (h, mi, s) = (i64::from(time >> 11), i64::from((time >> 5) & 0x3F), i64::from(time & 0x1F) * 2);
    let extra = u32::from(centis.min(199));
    Time {
        secs: days_from_civil(y, m, d) * 86400 + h * 3600 + mi * 60 + s + i64::from(extra / 100),
        nanos: (extra % 100) * 10_000_000,
    }
}

fn short_name(raw: &[u8; 32]) -> Vec<u8> {
    let case = raw[12];
    let part = |b: &[u8], lower: bool| -> String {
        let mut s: String = b.iter().map(|&c| char::from(c)).collect::<String>().trim_end_matches(' ').to_owned();
        if lower {
            s = s.to_ascii_lowercase();
        }
        s
    };
    let mut base_bytes = raw[0..8].to_vec();
    if base_bytes[0] == 0x05 {
        base_bytes[0] = 0xE5; // a real 0xE5 first byte, escaped
    }
    let base = part(&base_bytes, case & 0x08 != 0);
    let ext = part(&raw[8..11], case & 0x10 != 0);
    let name = if ext.is_empty() { base } else { format!("{base}.{ext}") };
    name.into_bytes()
}

fn short_checksum(raw: &[u8; 32]) -> u8 {
    raw[..11].iter().fold(0u8, |sum, &c| (sum >> 1 | sum << 7).wrapping_add(c))
}

impl Fat {
    pub fn open(dev: Arc<dyn BlockDev>) -> Result<Self> {
        let boot: [u8; 512] = array(&*dev, 0, "the FAT boot sector")?;
        if boot[510..512] != [0x55, 0xAA] {
            return Err(bad("no 55 AA signature"));
        }
        let geometry = Geometry::parse(&boot, dev.len())?;
        let data_len = dev.len().saturating_sub(geometry.data_at);
        let data: Arc<dyn BlockDev> = Arc::new(
            SliceDev::new(dev.clone(), geometry.data_at, data_len).map_err(|e| Error::io("the FAT data area", e))?,
        );
        Ok(Self { dev, data, geometry, table: OnceLock::new() })
    }

    fn table(&self) -> Result<&[u8]> {
        let g = &self.geometry;
        let t = self.table.get_or_init(|| {
            let need = match g.bits {
                Bits::Fat12 => (u64::from(g.cluster_count) + 2) * 3 / 2 + 1,
                Bits::Fat16 => (u64::from(g.cluster_count) + 2) * 2,
                Bits::Fat32 => (u64::from(g.cluster_count) + 2) * 4,
            };
            if need > g.fat_len || need > MAX_FAT {
                return Err(format!("allocation table of {need} bytes (room for {})", g.fat_len));
            }
            vec(&*self.dev, g.fat_at, need as usize, "the FAT allocation table").map_err(|e| e.to_string())
        });
        t.as_deref().map_err(|e| Error::corrupt("FAT allocation table", self.geometry.fat_at, e.clone()))
    }

    /// The entry of cluster `c`: the next cluster, or None at the end of a chain.
    fn next(&self, table: &[u8], c: u32) -> Result<Option<u32>> {
        let (v, eoc, bad_c) = match self.geometry.bits {
            Bits::Fat12 => {
                let at = c as usize * 3 / 2;
                let w = le16(table, at);
                (u32::from(if c % 2 == 0 { w & 0xFFF } else { w >> 4 }), 0xFF8, 0xFF7)
            }
            Bits::Fat16 => (u32::from(le16(table, c as usize * 2)), 0xFFF8, 0xFFF7),
            Bits::Fat32 => (le32(table, c as usize * 4) & 0x0FFF_FFFF, 0x0FFF_FFF8, 0x0FFF_FFF7),
        };
        match v {
            v if v >= eoc => Ok(None),
            v if v == bad_c || v < 2 || v - 2 >= self.geometry.cluster_count => {
                Err(Error::corrupt("FAT cluster chain", u64::from(c), format!("cluster {c} links to {v:#x}")))
            }
            v => Ok(Some(v)),
        }
    }

    /// The runs of the chain starting at `first`, checked for loops (no chain is longer than
    /// the volume) and, with `size`, long enough for it.
    fn chain(&self, first: u32, size: Option<u64>) -> Result<Vec<Run>> {
        let count = self.geometry.cluster_count;
        if first < 2 || first - 2 >= count {
            return Err(Error::corrupt("FAT directory entry", u64::from(first), format!("first cluster {first}")));
        }
        let table = self.table()?;
        let mut runs: Vec<Run> = Vec::new();
        let (mut c, mut n) = (first, 0u64);
        let want = size.map(|s| s.div_ceil(self.geometry.cluster_size));
        loop {
            let physical = u64::from(c - 2);
            match runs.last_mut() {
                Some(r) if r.physical + r.len == physical => r.len += 1,
                _ => runs.push(Run { logical: n, physical, len: 1, unwritten: false }),
            }
            n += 1;
            // Folders have no size: a chain longer than the largest folder read is a loop.
            if n > u64::from(count) || (want.is_none() && n > MAX_DIR / self.geometry.cluster_size) {
                return Err(Error::corrupt("FAT cluster chain", u64::from(first), "the chain loops"));
            }
            if want.is_some_and(|w| n >= w) {
                break;
            }
            match self.next(table, c)? {
                Some(next) => c = next,
                None => break,
            }
        }
        if let Some(w) = want.filter(|&w| n < w) {
            return Err(Error::corrupt("FAT cluster chain", u64::from(first), format!("{n} clusters for {w}")));
        }
        // A chain that comes back to a cluster it passed would repeat its bytes.
        let mut spans: Vec<(u64, u64)> = runs.iter().map(|r| (r.physical, r.len)).collect();
        spans.sort_unstable();
        if let Some(w) = spans.windows(2).find(|w| w[0].0 + w[0].1 > w[1].0) {
            let again = w[1].0 + 2;
            return Err(Error::corrupt(
                "FAT cluster chain",
                u64::from(first),
                format!("the chain loops (cluster {again} twice)"),
            ));
        }
        Ok(runs)
    }

    fn short(&self, ino: u64) -> Result<Short> {
        if ino % 32 != 0 || ino == 0 || ino + 32 > self.dev.len() {
            return Err(Error::NotFound(format!("FAT node {ino}")));
        }
        let raw: [u8; 32] = array(&*self.dev, ino, "a FAT directory entry")?;
        Ok(Short::parse(raw, self.geometry.bits))
    }

    /// The bytes of directory `ino` and the device offset of each of its clusters' start
    /// (to number entries by where they are).
    fn dir_bytes(&self, ino: u64) -> Result<(Vec<u8>, Vec<(u64, u64)>)> {
        let (start, len, runs) = if ino == ROOT {
            match self.geometry.root_region {
                Some((at, len)) => (at, len, None),
                None => (0, 0, Some(self.chain(self.geometry.root_cluster, None)?)),
            }
        } else {
            let s = self.short(ino)?;
            if s.attr & ATTR_DIRECTORY == 0 {
                return Err(Error::Unsupported(format!("FAT node {ino} is not a directory")));
            }
            (0, 0, Some(self.chain(s.cluster, None)?))
        };
        let Some(runs) = runs else {
            return Ok((vec(&*self.dev, start, len as usize, "the FAT root directory")?, vec![(0, start)]));
        };
        let cs = self.geometry.cluster_size;
        let total: u64 = runs.iter().map(|r| r.len * cs).sum();
        if total > MAX_DIR {
            return Err(Error::corrupt("FAT directory", ino, format!("{total} bytes")));
        }
        let mut out = Vec::with_capacity(total as usize);
        let mut map = Vec::new();
        for r in &runs {
            let at = self.geometry.data_at + r.physical * cs;
            map.push((out.len() as u64, at));
            let b = vec(&*self.dev, at, (r.len * cs) as usize, "a FAT directory")?;
            out.extend_from_slice(&b);
        }
        Ok((out, map))
    }

    /// The entries of a directory: (name, node number, short entry), without `.` and `..`
    /// and volume labels.
    fn entries(&self, ino: u64) -> Result<Vec<(Vec<u8>, u64, Short)>> {
        let (bytes, map) = self.dir_bytes(ino)?;
        let where_is = |pos: u64| {
            let i = map.partition_point(|&(logical, _)| logical <= pos) - 1;
            map[i].1 + (pos - map[i].0)
        };
        let mut out = Vec::new();
        let mut long: Vec<u16> = Vec::new();
        let mut long_sum: Option<u8> = None;
        for (k, e) in bytes.chunks_exact(32).enumerate() {
            let raw: [u8; 32] = e.try_into().unwrap_or([0; 32]);
            match raw[0] {
                0x00 => break,
                0xE5 => {
                    long.clear();
                    long_sum = None;
                    continue;
                }
                _ => {}
            }
            let attr = raw[11];
            if attr & 0x3F == ATTR_LONG_NAME {
                let seq = raw[0];
                if seq & 0x40 != 0 {
                    long.clear();
                    long_sum = Some(raw[13]);
                }
                // Pieces come last-first: prepend this one's 13 characters.
                let mut piece: Vec<u16> = Vec::with_capacity(13);
                for r in [1..11, 14..26, 28..32] {
                    piece.extend(raw[r].chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])));
                }
                if let Some(end) = piece.iter().position(|&c| c == 0) {
                    piece.truncate(end);
                }
                piece.extend_from_slice(&long);
                long = piece;
                continue;
            }
            let use_long = long_sum == Some(short_checksum(&raw)) && !long.is_empty();
            let name = if use_long { String::from_utf16_lossy(&long).into_bytes() } else { short_name(&raw) };
            long.clear();
            long_sum = None;
            if attr & ATTR_VOLUME_ID != 0 || name == b"." || name == b".." {
                continue;
            }
            let node = where_is(k as u64 * 32);
            out.push((name, node, Short::parse(raw, self.geometry.bits)));
        }
        Ok(out)
    }

    fn kind(s: &Short) -> Kind {
        if s.attr & ATTR_DIRECTORY != 0 {
            Kind::Dir
        } else {
            Kind::File
        }
    }
}

impl FileSystem for Fat {
    fn type_name(&self) -> String {
        match self.geometry.bits {
            Bits::Fat12 => "fat12",
            Bits::Fat16 => "fat16",
            Bits::Fat32 => "fat32",
        }
        .into()
    }

    fn root(&self) -> u64 {
        ROOT
    }

    fn stat(&self, ino: u64) -> Result<Stat> {
        if ino == ROOT {
            let t = Time::default();
            return Ok(Stat {
                ino,
                kind: Kind::Dir,
                perm: 0o755,
                uid: 0,
                gid: 0,
                size: 0,
                nlink: 2,
                atime: t,
                mtime: t,
                ctime: t,
                crtime: None,
                rdev: None,
            });
        }
        let s = self.short(ino)?;
        let r = &s.raw;
        let kind = Self::kind(&s);
        let perm = match (kind, s.attr & ATTR_READ_ONLY != 0) {
            (Kind::Dir, _) => 0o755,
            (_, true) => 0o444,
            _ => 0o644,
        };
        let mtime = fat_time(le16(r, 24), le16(r, 22), 0);
        Ok(Stat {
            ino,
            kind,
            perm,
            uid: 0,
            gid: 0,
            size: if kind == Kind::File { u64::from(s.size) } else { 0 },
            nlink: if kind == Kind::Dir { 2 } else { 1 },
            atime: fat_time(le16(r, 18), 0, 0),
            mtime,
            ctime: mtime,
            crtime: Some(fat_time(le16(r, 16), le16(r, 14), r[13])),
            rdev: None,
        })
    }

    fn read_dir(&self, ino: u64) -> Result<Vec<DirEntry>> {
        Ok(self.entries(ino)?.into_iter().map(|(name, ino, s)| DirEntry { name, ino, kind: Self::kind(&s) }).collect())
    }

    /// FAT names match without regard to case, as on Windows and Linux's vfat.
    fn lookup(&self, dir: u64, name: &[u8]) -> Result<Option<u64>> {
        let entries = self.entries(dir)?;
        let exact = entries.iter().find(|(n, _, _)| n == name);
        let folded = || {
            let want = String::from_utf8_lossy(name).to_lowercase();
            entries.iter().find(|(n, _, _)| String::from_utf8_lossy(n).to_lowercase() == want)
        };
        Ok(exact.or_else(folded).map(|(_, ino, _)| *ino))
    }

    fn read_link(&self, ino: u64) -> Result<Vec<u8>> {
        Err(Error::Unsupported(format!("FAT node {ino}: FAT has no symlinks")))
    }

    fn open(&self, ino: u64) -> Result<Arc<dyn BlockDev>> {
        let s = self.short(ino)?;
        if Self::kind(&s) != Kind::File {
            return Err(Error::Unsupported(format!("FAT node {ino} is not a file")));
        }
        let size = u64::from(s.size);
        let runs = if size == 0 { Vec::new() } else { self.chain(s.cluster, Some(size))? };
        Ok(Arc::new(RunDev::new(self.data.clone(), self.geometry.cluster_size, size, runs)))
    }
}
