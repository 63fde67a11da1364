//! A read-only NTFS reader over [`BlockDev`].
//!
//! Nodes are MFT record numbers (the root is record 5), so hard links share one. Files are
//! read through their data runs ([`RunDev`]), honouring the initialized size (bytes beyond it
//! read as zeros) and holes; LZNT1-compressed files through [`compressed`]; attributes spread
//! over extension records through `$ATTRIBUTE_LIST`. Directories are read by walking the
//! `$I30` index B-tree in order (loops and depth checked); DOS 8.3 aliases and the metadata
//! files (records below 16: `$MFT`, `$LogFile`, ...) are not listed, as with ntfs-3g.
//!
//! What a Unix view needs that NTFS lacks, decided here:
//! - Permissions: folders 0755, files 0644 (0444 with the read-only attribute), owner root;
//!   Windows ACLs are not mapped.
//! - Symbolic links and junctions (reparse points) are symlinks; their target is the print
//!   name with `\` turned into `/` (`..\lib\x` → `../lib/x`; an absolute `C:\Windows` stays
//!   `C:/Windows`, which does not resolve outside Windows). ntfs-3g's Interix links
//!   (`IntxLNK`) and device files (`IntxCHR`, `IntxBLK`) are shown as such.
//! - Alternate data streams are not listed (a Linux tool copying the tree would drop or
//!   misplace them) but open by name: `file:stream` (or `file:stream:$DATA`), as with
//!   ntfs-3g's `streams_interface=windows`.
//! - Files Windows stores elsewhere (WOF/CompactOS compression, Data Deduplication, cloud
//!   placeholders) and EFS-encrypted files refuse to open with a message rather than read
//!   as the zeros or ciphertext their `$DATA` holds.
//!
//! Own code rather than the `ntfs` crate (0.4): it hides the initialized size (so bytes past
//! a file's valid data would come back as stale disk contents), the compression unit and the
//! runs of attribute-list values, has no LZNT1, and would add binrw / derive_more / strum's
//! proc macros to the build.

mod compressed;
mod record;

use std::collections::HashSet;
use std::sync::{Arc, Mutex, OnceLock};

use blockdev::BlockDev;

use compressed::CompressedDev;
use record::{Attr, Body, FileName, Record};

use crate::error::{Error, Result};
use crate::fs::{DirEntry, FileSystem, Kind, Stat, Time};
use crate::read::{array, le16, le32, le64, vec};
use crate::rundev::{Run, RunDev};

/// The root directory's record number.
pub const ROOT: u64 = 5;
const UPCASE: u64 = 10;
/// Records below this are the filesystem's own metadata.
const FIRST_USER: u64 = 16;
/// Node numbers from here on name alternate data streams (record numbers are below 2^47
/// on any real volume: that is 128 Ti records).
const STREAM_BASE: u64 = 1 << 47;
const MAX_STREAMS: usize = 1 << 20;
/// Largest small value read whole (attribute lists, reparse data, `$UpCase`).
const MAX_SMALL_VALUE: u64 = 1 << 20;
/// Largest attribute value (and extent of its runs): 2^60 bytes (NTFS's own limit is
/// 2^64 − 1, Windows' 256 TiB), so byte arithmetic on it cannot overflow.
const MAX_VALUE: u64 = 1 << 60;
/// Largest compression unit (Windows makes 16 clusters of at most 4 KiB).
const MAX_COMPRESSION_UNIT: u64 = 1 << 20;
const MAX_EXTENSION_RECORDS: usize = 4096;
const MAX_INDEX_DEPTH: usize = 32;
/// Largest Interix special file worth looking into (`IntxLNK` + a UTF-16 path).
const MAX_INTERIX: u64 = 8 + 2 * 4096;

const FILE_ATTRIBUTE_READONLY: u32 = 0x1;
const FILE_ATTRIBUTE_SYSTEM: u32 = 0x4;
const FILE_ATTRIBUTE_REPARSE_POINT: u32 = 0x400;
const FILE_NAME_IS_DIRECTORY: u32 = 0x1000_0000;

const TAG_MOUNT_POINT: u32 = 0xA000_0003;
const TAG_SYMLINK: u32 = 0xA000_000C;

pub struct Ntfs {
    dev: Arc<dyn BlockDev>,
    cluster: u64,
    record_size: u64,
    /// The contents of `$MFT`.
    mft: Arc<dyn BlockDev>,
    /// `$UpCase`, for case-insensitive names (empty when unreadable: ASCII folding then).
    upcase: OnceLock<Vec<u16>>,
    /// Alternate data streams opened by name: node `STREAM_BASE + i` is `streams[i]`.
    streams: Mutex<Vec<(u64, Vec<u16>)>>,
}

impl std::fmt::Debug for Ntfs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ntfs(cluster {}, record {}, {} bytes)", self.cluster, self.record_size, self.dev.len())
    }
}

/// A file: its base record's flags and every attribute of its base and extension records.
struct File {
    flags: u16,
    attrs: Vec<Attr>,
}

/// A file with what `stat` needs of it.
struct Node {
    file: File,
    /// The DOS file attributes (read-only, system, ...).
    attributes: u32,
    /// `$STANDARD_INFORMATION` (times at 0x00..0x20).
    si: Vec<u8>,
    /// Names other than DOS 8.3 aliases: the link count.
    names: usize,
    shape: Shape,
}

/// What a file is, as a Unix view sees it.
struct Shape {
    kind: Kind,
    size: u64,
    target: Option<Vec<u8>>,
    rdev: Option<(u32, u32)>,
}

fn bad(detail: impl Into<String>) -> Error {
    Error::corrupt("NTFS boot sector", 0, detail)
}

fn units(s: &str) -> Vec<u16> {
    s.encode_utf16().collect()
}

/// NT time (100 ns units since 1601-01-01 UTC) as Unix time.
fn nt_time(t: u64) -> Time {
    const UNIX_EPOCH: i64 = 11_644_473_600;
    Time { secs: (t / 10_000_000) as i64 - UNIX_EPOCH, nanos: (t % 10_000_000) as u32 * 100 }
}

impl Ntfs {
    pub fn open(dev: Arc<dyn BlockDev>) -> Result<Ntfs> {
        let b: [u8; 512] = array(&*dev, 0, "the NTFS boot sector")?;
        if &b[3..11] != b"NTFS    " {
            return Err(bad("no NTFS signature"));
        }
        let sector = u64::from(le16(&b, 0x0B));
        if !(256..=4096).contains(&sector) || !sector.is_power_of_two() {
            return Err(bad(format!("{sector} bytes per sector")));
        }
        let spc = match b[0x0D] {
            0 => return Err(bad("0 sectors per cluster")),
            n @ 1..=0x80 => u64::from(n),
            n if 256 - u32::from(n) <= 12 => 1u64 << (256 - u32::from(n)),
            n => return Err(bad(format!("sectors per cluster code {n:#x}"))),
        };
        let cluster = sector * spc;
        if !spc.is_power_of_two() || cluster > 2 << 20 {
            return Err(bad(format!("{cluster}-byte clusters")));
        }
        let record_size = match b[0x40] as i8 {
            n @ 1..=127 => u64::from(n as u8) * cluster,
            n @ -16..=-9 => 1u64 << -i32::from(n),
            n => return Err(bad(format!("file record size code {n}"))),
        };
        if !(512..=65536).contains(&record_size) || !record_size.is_power_of_two() {
            return Err(bad(format!("{record_size}-byte file records")));
        }
        let mft_at = le64(&b, 0x30).checked_mul(cluster).ok_or_else(|| bad("$MFT beyond 2^64"))?;
        // Bootstrap: record 0 ($MFT) describes where the MFT is. Its first piece maps at
        // least the records that hold the rest (if an attribute list spreads it).
        let rec0 = Record::parse(vec(&*dev, mft_at, record_size as usize, "$MFT's own record")?, mft_at)?;
        let no_data = || bad("$MFT has no data");
        let first = value_dev(&dev, cluster, &parts(&rec0.attrs, record::DATA, DataName::Unnamed, |_, _| false))?;
        let mut fs = Ntfs {
            dev,
            cluster,
            record_size,
            mft: first.ok_or_else(no_data)?,
            upcase: OnceLock::new(),
            streams: Mutex::new(Vec::new()),
        };
        let whole = fs.file(0)?;
        fs.mft = fs.data_dev(&whole.attrs, DataName::Unnamed)?.ok_or_else(no_data)?;
        if fs.stat(ROOT)?.kind != Kind::Dir {
            return Err(Error::corrupt("NTFS root directory", 0, "record 5 is not a directory"));
        }
        Ok(fs)
    }

    /// MFT record `n`, fixed up and parsed.
    fn record(&self, n: u64) -> Result<Record> {
        let rs = self.record_size;
        let at = n.checked_mul(rs).filter(|a| a.checked_add(rs).is_some_and(|e| e <= self.mft.len()));
        let at = at.ok_or_else(|| Error::NotFound(format!("NTFS record {n} (beyond the MFT)")))?;
        let buf = vec(&*self.mft, at, rs as usize, "an NTFS file record")?;
        Record::parse(buf, at).map_err(|e| match e {
            Error::Corrupt { what, offset, detail } => {
                Error::Corrupt { what, offset, detail: format!("{detail} (record {n}; the offset is within $MFT)") }
            }
            other => other,
        })
    }

    /// File `n` with the attributes of its extension records.
    fn file(&self, n: u64) -> Result<File> {
        let rec = self.record(n)?;
        if rec.base != 0 {
            return Err(Error::corrupt("NTFS file record", n, "an extension record where a file was expected"));
        }
        let mut attrs = rec.attrs;
        if let Some(list) = attrs.iter().find(|a| a.ty == record::ATTRIBUTE_LIST).cloned() {
            let bytes = self.small_value(&[list], "an attribute list")?;
            let mut others: Vec<u64> =
                record::parse_attribute_list(&bytes, 0)?.into_iter().filter(|&r| r != n).collect();
            others.sort_unstable();
            others.dedup();
            if others.len() > MAX_EXTENSION_RECORDS {
                return Err(Error::corrupt("NTFS attribute list", n, format!("{} extension records", others.len())));
            }
            for r in others {
                let ext = self.record(r)?;
                if record::record_of(ext.base) != n {
                    return Err(Error::corrupt(
                        "NTFS attribute list",
                        n,
                        format!("record {r} belongs to another file"),
                    ));
                }
                attrs.extend(ext.attrs);
            }
        }
        Ok(File { flags: rec.flags, attrs })
    }

    /// A small attribute's whole value.
    fn small_value(&self, parts: &[Attr], what: &str) -> Result<Vec<u8>> {
        let Some(dev) = value_dev(&self.dev, self.cluster, parts)? else { return Ok(Vec::new()) };
        if dev.len() > MAX_SMALL_VALUE {
            return Err(Error::corrupt("NTFS attribute", 0, format!("{what} of {} bytes", dev.len())));
        }
        vec(&*dev, 0, dev.len() as usize, what)
    }

    /// The pieces of the `$DATA` attribute `name` selects, or `None` when there is none.
    fn data_dev(&self, attrs: &[Attr], name: DataName) -> Result<Option<Arc<dyn BlockDev>>> {
        value_dev(&self.dev, self.cluster, &self.parts(attrs, record::DATA, name))
    }

    fn parts(&self, attrs: &[Attr], ty: u32, name: DataName) -> Vec<Attr> {
        parts(attrs, ty, name, |a, b| self.same_name(a, b))
    }

    fn upcase(&self) -> &[u16] {
        self.upcase.get_or_init(|| {
            let table = self
                .file(UPCASE)
                .and_then(|f| self.small_value(&self.parts(&f.attrs, record::DATA, DATA_UNNAMED), "$UpCase"));
            table.map(|b| record::utf16_units(&b)).unwrap_or_default()
        })
    }

    /// Names compared as Windows does: code unit by code unit through `$UpCase`.
    fn same_name(&self, a: &[u16], b: &[u16]) -> bool {
        let table = self.upcase();
        let up = |c: u16| match table.get(usize::from(c)) {
            Some(&u) => u,
            None if (u16::from(b'a')..=u16::from(b'z')).contains(&c) => c - 32,
            None => c,
        };
        a.len() == b.len() && a.iter().zip(b).all(|(&x, &y)| x == y || up(x) == up(y))
    }

    /// The names in directory `dir` as (record, `$FILE_NAME`), in index order.
    fn index_entries(&self, dir: &File, ino: u64) -> Result<Vec<(u64, FileName)>> {
        const WHAT: &str = "NTFS directory index";
        let i30 = units("$I30");
        let root = self.parts(&dir.attrs, record::INDEX_ROOT, DataName::Exact(&i30));
        let root = match root.first().map(|a| &a.body) {
            Some(Body::Resident(v)) if v.len() >= 0x20 => v.clone(),
            _ => return Err(Error::corrupt(WHAT, ino, "no readable $INDEX_ROOT")),
        };
        let block_size = u64::from(le32(&root, 8));
        let alloc = self.parts(&dir.attrs, record::INDEX_ALLOCATION, DataName::Exact(&i30));
        let walk = Walk {
            alloc: value_dev(&self.dev, self.cluster, &alloc)?,
            block_size,
            vcn_size: if block_size >= self.cluster { self.cluster } else { 512 },
            ino,
        };
        let mut out = Vec::new();
        walk.node(&root, 0x10, 0, &mut HashSet::new(), &mut out)?;
        Ok(out)
    }

    /// Record `ino` with its DOS attributes, `$STANDARD_INFORMATION`, names and shape.
    fn node(&self, ino: u64) -> Result<Node> {
        let f = self.file(ino)?;
        let si = match self.parts(&f.attrs, record::STANDARD_INFORMATION, DATA_UNNAMED).first().map(|a| &a.body) {
            Some(Body::Resident(v)) if v.len() >= 0x24 => v.clone(),
            _ => {
                return Err(Error::corrupt(
                    "NTFS file record",
                    ino,
                    format!("record {ino} has no $STANDARD_INFORMATION"),
                ))
            }
        };
        let attributes = le32(&si, 0x20);
        let names = f
            .attrs
            .iter()
            .filter(|a| a.ty == record::FILE_NAME)
            .filter_map(|a| match &a.body {
                Body::Resident(v) => FileName::parse(v),
                Body::NonResident(_) => None,
            })
            .filter(|n| n.namespace != record::NAMESPACE_DOS)
            .count();
        let shape = self.shape(&f, attributes)?;
        Ok(Node { file: f, attributes, si, names, shape })
    }

    /// Kind, size and link target of `f`; `si_attributes` from its `$STANDARD_INFORMATION`.
    fn shape(&self, f: &File, si_attributes: u32) -> Result<Shape> {
        if let Some(target) = self.reparse(f)?.and_then(|(tag, data)| link_target(tag, &data)) {
            return Ok(Shape { kind: Kind::Symlink, size: target.len() as u64, target: Some(target), rdev: None });
        }
        if f.flags & record::RECORD_IS_DIRECTORY != 0 {
            return Ok(Shape { kind: Kind::Dir, size: 0, target: None, rdev: None });
        }
        let parts = self.parts(&f.attrs, record::DATA, DATA_UNNAMED);
        // From the attribute, so a file whose data cannot be opened (EFS) still has a size.
        let size = value_size(&parts).unwrap_or(0);
        let plain = Shape { kind: Kind::File, size, target: None, rdev: None };
        if si_attributes & FILE_ATTRIBUTE_SYSTEM == 0 || !(8..=MAX_INTERIX).contains(&size) {
            return Ok(plain);
        }
        let Ok(Some(dev)) = value_dev(&self.dev, self.cluster, &parts) else { return Ok(plain) };
        let head = vec(&*dev, 0, size as usize, "an Interix special file")?;
        Ok(interix(&head).unwrap_or(plain))
    }

    /// The reparse tag and data of `f`, if it is a reparse point.
    fn reparse(&self, f: &File) -> Result<Option<(u32, Vec<u8>)>> {
        let parts = self.parts(&f.attrs, record::REPARSE_POINT, DATA_UNNAMED);
        if parts.is_empty() {
            return Ok(None);
        }
        let b = self.small_value(&parts, "reparse data")?;
        if b.len() < 8 {
            return Err(Error::corrupt("NTFS reparse point", 0, format!("{} bytes", b.len())));
        }
        let len = usize::from(le16(&b, 4));
        let data =
            b.get(8..8 + len).ok_or_else(|| Error::corrupt("NTFS reparse point", 0, format!("{len} bytes of data")))?;
        Ok(Some((le32(&b, 0), data.to_vec())))
    }

    fn stream(&self, ino: u64) -> Result<(u64, Vec<u16>)> {
        let i = usize::try_from(ino - STREAM_BASE).unwrap_or(usize::MAX);
        let streams = self.streams.lock().expect("lock");
        streams.get(i).cloned().ok_or_else(|| Error::NotFound(format!("NTFS stream node {ino}")))
    }

    /// Node for stream `name` of `file` (interned).
    fn stream_node(&self, file: u64, name: Vec<u16>) -> Result<u64> {
        let mut streams = self.streams.lock().expect("lock");
        if let Some(i) = streams.iter().position(|(f, n)| *f == file && *n == name) {
            return Ok(STREAM_BASE + i as u64);
        }
        if streams.len() >= MAX_STREAMS {
            return Err(Error::Unsupported(format!("more than {MAX_STREAMS} alternate data streams opened")));
        }
        streams.push((file, name));
        Ok(STREAM_BASE + streams.len() as u64 - 1)
    }

    /// `name` among a folder's `entries`: exact, then case-insensitive (as Windows).
    fn find_name(&self, entries: &[DirEntry], name: &[u8]) -> Option<u64> {
        if let Some(e) = entries.iter().find(|e| e.name == name) {
            return Some(e.ino);
        }
        let wanted = units(std::str::from_utf8(name).ok()?);
        entries
            .iter()
            .find(|e| std::str::from_utf8(&e.name).is_ok_and(|n| self.same_name(&units(n), &wanted)))
            .map(|e| e.ino)
    }

    /// What `stat` shows of record `ino`.
    fn stat_of(ino: u64, node: &Node) -> Stat {
        let perm = match node.shape.kind {
            Kind::Dir => 0o755,
            Kind::Symlink => 0o777,
            _ if node.attributes & FILE_ATTRIBUTE_READONLY != 0 => 0o444,
            _ => 0o644,
        };
        let si = &node.si;
        Stat {
            ino,
            kind: node.shape.kind,
            perm,
            uid: 0,
            gid: 0,
            size: node.shape.size,
            nlink: node.names.max(1) as u32,
            atime: nt_time(le64(si, 0x18)),
            mtime: nt_time(le64(si, 0x08)),
            ctime: nt_time(le64(si, 0x10)),
            crtime: Some(nt_time(le64(si, 0))),
            rdev: node.shape.rdev,
        }
    }
}

#[derive(Clone, Copy)]
enum DataName<'a> {
    Unnamed,
    /// Byte for byte (index names such as `$I30`).
    Exact(&'a [u16]),
    /// Case-insensitive, as Windows names streams.
    Stream(&'a [u16]),
}
const DATA_UNNAMED: DataName<'static> = DataName::Unnamed;

/// The attributes (or pieces of one) of type `ty` that `name` selects; `same` compares
/// stream names.
fn parts(attrs: &[Attr], ty: u32, name: DataName, same: impl Fn(&[u16], &[u16]) -> bool) -> Vec<Attr> {
    attrs
        .iter()
        .filter(|a| {
            a.ty == ty
                && match name {
                    DataName::Unnamed => a.name.is_empty(),
                    DataName::Exact(n) => a.name == n,
                    DataName::Stream(n) => same(&a.name, n),
                }
        })
        .cloned()
        .collect()
}

/// A walk over one directory's index B-tree.
struct Walk {
    alloc: Option<Arc<dyn BlockDev>>,
    block_size: u64,
    vcn_size: u64,
    ino: u64,
}

impl Walk {
    fn corrupt(&self, detail: impl Into<String>) -> Error {
        Error::corrupt("NTFS directory index", self.ino, format!("{} (directory record {})", detail.into(), self.ino))
    }

    /// The entries of the node whose index header is at `header` in `buf`, in order:
    /// each entry's subtree comes before the entry.
    fn node(
        &self,
        buf: &[u8],
        header: usize,
        depth: usize,
        seen: &mut HashSet<u64>,
        out: &mut Vec<(u64, FileName)>,
    ) -> Result<()> {
        let start = header + le32(buf, header) as usize;
        let end = header.saturating_add(le32(buf, header + 4) as usize).min(buf.len());
        let mut off = start;
        loop {
            if off + 0x10 > end {
                return Err(self.corrupt("entries run past their node"));
            }
            let (len, key_len, flags) =
                (usize::from(le16(buf, off + 8)), usize::from(le16(buf, off + 10)), le16(buf, off + 12));
            if len < 0x10 || off + len > end || 0x10 + key_len > len {
                return Err(self.corrupt(format!("an entry of {len} bytes with a {key_len}-byte key")));
            }
            if flags & 1 != 0 {
                if len < 0x18 {
                    return Err(self.corrupt("a sub-node entry without its VCN"));
                }
                self.block(le64(buf, off + len - 8), depth + 1, seen, out)?;
            }
            if flags & 2 != 0 {
                return Ok(());
            }
            if let Some(name) = FileName::parse(&buf[off + 0x10..off + 0x10 + key_len]) {
                out.push((record::record_of(le64(buf, off)), name));
            }
            off += len;
        }
    }

    fn block(&self, vcn: u64, depth: usize, seen: &mut HashSet<u64>, out: &mut Vec<(u64, FileName)>) -> Result<()> {
        if depth > MAX_INDEX_DEPTH {
            return Err(self.corrupt("the index is deeper than 32 levels"));
        }
        if !seen.insert(vcn) {
            return Err(self.corrupt(format!("index block {vcn} is reached twice (a loop)")));
        }
        let alloc = self.alloc.as_ref().ok_or_else(|| self.corrupt("a sub-node but no $INDEX_ALLOCATION"))?;
        if !(512..=65536).contains(&self.block_size) || !self.block_size.is_power_of_two() {
            return Err(self.corrupt(format!("{}-byte index blocks", self.block_size)));
        }
        let at =
            vcn.checked_mul(self.vcn_size).filter(|a| a.checked_add(self.block_size).is_some_and(|e| e <= alloc.len()));
        let at = at.ok_or_else(|| self.corrupt(format!("index block {vcn} beyond the allocation")))?;
        let mut b = vec(&**alloc, at, self.block_size as usize, "an NTFS index block")?;
        record::fixup(&mut b, b"INDX", "NTFS index block", at)?;
        if le64(&b, 0x10) != vcn {
            return Err(self.corrupt(format!("index block {vcn} says it is block {}", le64(&b, 0x10))));
        }
        self.node(&b, 0x18, depth, seen, out)
    }
}

/// The length of the value of the attribute made of `parts` (`None` when there is none):
/// a resident value's length, or the size the piece at cluster 0 records.
fn value_size(parts: &[Attr]) -> Option<u64> {
    let head = parts.iter().find(|a| match &a.body {
        Body::Resident(_) => true,
        Body::NonResident(nr) => nr.lowest_vcn == 0,
    })?;
    Some(match &head.body {
        Body::Resident(v) => v.len() as u64,
        Body::NonResident(nr) => nr.size,
    })
}

/// The contents of the attribute made of `parts` (one resident attribute, or the pieces
/// of a non-resident one from any records) as a device.
fn value_dev(dev: &Arc<dyn BlockDev>, cluster: u64, parts: &[Attr]) -> Result<Option<Arc<dyn BlockDev>>> {
    const WHAT: &str = "NTFS attribute";
    let Some(first) = parts.first() else { return Ok(None) };
    let mut pieces = Vec::new();
    for p in parts {
        match &p.body {
            Body::Resident(v) => return Ok(Some(Arc::new(RunDev::inline(dev.clone(), v.clone())))),
            Body::NonResident(nr) => pieces.push(nr),
        }
    }
    pieces.sort_by_key(|p| p.lowest_vcn);
    let head = pieces[0];
    if head.lowest_vcn != 0 {
        return Err(Error::corrupt(WHAT, 0, format!("type {:#x}: no piece starts at cluster 0", first.ty)));
    }
    let mut extents: Vec<record::Extent> = Vec::new();
    for p in &pieces {
        for e in &p.extents {
            if extents.last().is_some_and(|l| l.vcn + l.len > e.vcn) {
                return Err(Error::corrupt(WHAT, 0, format!("type {:#x}: overlapping runs", first.ty)));
            }
            extents.push(*e);
        }
    }
    let end = extents.last().map_or(0, |e| e.vcn + e.len);
    if head.size > MAX_VALUE || end.checked_mul(cluster).is_none_or(|b| b > MAX_VALUE) {
        return Err(Error::corrupt(WHAT, 0, format!("type {:#x}: {} bytes in {end} clusters", first.ty, head.size)));
    }
    if first.flags & record::ATTR_ENCRYPTED != 0 {
        return Err(Error::Unsupported("the file is encrypted (EFS); vmvault cannot decrypt it".into()));
    }
    match first.flags & record::ATTR_COMPRESSION_MASK {
        0 => {
            let runs = extents
                .iter()
                .filter_map(|e| Some(Run { logical: e.vcn, physical: e.lcn?, len: e.len, unwritten: false }))
                .collect();
            Ok(Some(Arc::new(RunDev::new(dev.clone(), cluster, head.size, runs).valid_up_to(head.initialized))))
        }
        1 if head.compression_unit >= 1 && cluster << head.compression_unit <= MAX_COMPRESSION_UNIT => {
            Ok(Some(Arc::new(CompressedDev::new(
                dev.clone(),
                cluster,
                head.compression_unit,
                head.size,
                head.initialized,
                extents,
            ))))
        }
        1 => Err(Error::corrupt(WHAT, 0, format!("compression unit of 2^{} clusters", head.compression_unit))),
        n => Err(Error::Unsupported(format!("NTFS compression method {n} (only LZNT1 is known)"))),
    }
}

/// The target of a symlink or junction reparse point, `\` turned into `/`.
fn link_target(tag: u32, data: &[u8]) -> Option<Vec<u8>> {
    let header = match tag {
        TAG_SYMLINK => 12,
        TAG_MOUNT_POINT => 8,
        _ => return None,
    };
    if data.len() < header {
        return None;
    }
    let path = &data[header..];
    let (sub_off, sub_len, print_off, print_len) = (
        usize::from(le16(data, 0)),
        usize::from(le16(data, 2)),
        usize::from(le16(data, 4)),
        usize::from(le16(data, 6)),
    );
    let (name, substitute) = match path.get(print_off..print_off + print_len) {
        Some(p) if print_len > 0 => (p, false),
        _ => (path.get(sub_off..sub_off + sub_len)?, true),
    };
    let mut s = String::from_utf16_lossy(&record::utf16_units(name));
    if substitute {
        s = s.strip_prefix("\\??\\").map(str::to_owned).unwrap_or(s);
    }
    Some(s.replace('\\', "/").into_bytes())
}

/// ntfs-3g's Interix special files: `IntxLNK\1` + UTF-16 target, `IntxCHR\0` / `IntxBLK\0`
/// + 64-bit major and minor.
fn interix(head: &[u8]) -> Option<Shape> {
    if let Some(t) = head.strip_prefix(b"IntxLNK\x01") {
        let target = String::from_utf16_lossy(&record::utf16_units(t)).into_bytes();
        return Some(Shape { kind: Kind::Symlink, size: target.len() as u64, target: Some(target), rdev: None });
    }
    let kind = match head.get(..8)? {
        b"IntxCHR\0" => Kind::CharDevice,
        b"IntxBLK\0" => Kind::BlockDevice,
        _ => return None,
    };
    if head.len() != 24 {
        return None;
    }
    let (major, minor) = (u32::try_from(le64(head, 8)).ok()?, u32::try_from(le64(head, 16)).ok()?);
    Some(Shape { kind, size: 0, target: None, rdev: Some((major, minor)) })
}

impl FileSystem for Ntfs {
    fn type_name(&self) -> String {
        "ntfs".into()
    }

    fn root(&self) -> u64 {
        ROOT
    }

    fn stat(&self, ino: u64) -> Result<Stat> {
        if ino < STREAM_BASE {
            return Ok(Self::stat_of(ino, &self.node(ino)?));
        }
        // A stream: its file's metadata with the stream's size.
        let (file, name) = self.stream(ino)?;
        let node = self.node(file)?;
        let parts = self.parts(&node.file.attrs, record::DATA, DataName::Stream(&name));
        let size =
            value_size(&parts).ok_or_else(|| Error::NotFound(format!("stream {}", String::from_utf16_lossy(&name))))?;
        let st = Self::stat_of(file, &node);
        let perm = if st.perm & 0o200 == 0 { 0o444 } else { 0o644 };
        Ok(Stat { ino, kind: Kind::File, perm, size, nlink: 1, rdev: None, ..st })
    }

    fn read_dir(&self, ino: u64) -> Result<Vec<DirEntry>> {
        if ino >= STREAM_BASE {
            return Err(Error::Unsupported(format!("NTFS node {ino} is a stream, not a folder")));
        }
        let dir = self.file(ino)?;
        if dir.flags & record::RECORD_IS_DIRECTORY == 0 {
            return Err(Error::Unsupported(format!("NTFS record {ino} is not a folder")));
        }
        let mut out = Vec::new();
        for (rec, name) in self.index_entries(&dir, ino)? {
            if name.namespace == record::NAMESPACE_DOS || rec < FIRST_USER || rec >= STREAM_BASE {
                continue;
            }
            let by_flags = if name.attributes & FILE_NAME_IS_DIRECTORY != 0 { Kind::Dir } else { Kind::File };
            // Reparse points and system files (Interix links) need their record to tell.
            let kind = if name.attributes & (FILE_ATTRIBUTE_REPARSE_POINT | FILE_ATTRIBUTE_SYSTEM) != 0 {
                self.stat(rec).map_or(by_flags, |s| s.kind)
            } else {
                by_flags
            };
            out.push(DirEntry { name: String::from_utf16_lossy(&name.name).into_bytes(), ino: rec, kind });
        }
        Ok(out)
    }

    fn lookup(&self, dir: u64, name: &[u8]) -> Result<Option<u64>> {
        let entries = self.read_dir(dir)?;
        if let Some(ino) = self.find_name(&entries, name) {
            return Ok(Some(ino));
        }
        // `file:stream` or `file:stream:$DATA` names an alternate data stream.
        let Some(colon) = name.iter().position(|&c| c == b':') else { return Ok(None) };
        let Some(file) = self.find_name(&entries, &name[..colon]) else { return Ok(None) };
        let Ok(stream) = std::str::from_utf8(&name[colon + 1..]) else { return Ok(None) };
        let stream = match stream.rsplit_once(':') {
            Some((s, ty)) if ty.eq_ignore_ascii_case("$DATA") => s,
            Some(_) => return Ok(None),
            None => stream,
        };
        if stream.is_empty() {
            return Ok(Some(file));
        }
        let wanted = units(stream);
        let f = self.file(file)?;
        let Some(found) = self.parts(&f.attrs, record::DATA, DataName::Stream(&wanted)).into_iter().next() else {
            return Ok(None);
        };
        self.stream_node(file, found.name).map(Some)
    }

    fn read_link(&self, ino: u64) -> Result<Vec<u8>> {
        if ino >= STREAM_BASE {
            return Err(Error::Unsupported(format!("NTFS node {ino} is a stream, not a symbolic link")));
        }
        (self.node(ino)?.shape)
            .target
            .ok_or_else(|| Error::Unsupported(format!("NTFS record {ino} is not a symbolic link")))
    }

    fn open(&self, ino: u64) -> Result<Arc<dyn BlockDev>> {
        if ino >= STREAM_BASE {
            let (file, name) = self.stream(ino)?;
            let f = self.file(file)?;
            return self
                .data_dev(&f.attrs, DataName::Stream(&name))?
                .ok_or_else(|| Error::NotFound(format!("stream node {ino}")));
        }
        let f = self.file(ino)?;
        if f.flags & record::RECORD_IS_DIRECTORY != 0 {
            return Err(Error::Unsupported(format!("NTFS record {ino} is a folder")));
        }
        if let Some((tag, _)) = self.reparse(&f)? {
            let stored_elsewhere = match tag {
                0x8000_0017 => Some("WOF (CompactOS) compression"),
                0x8000_0013 => Some("Data Deduplication"),
                0xC000_0004 => Some("hierarchical storage (HSM)"),
                t if t & 0xFFFF_0FFF == 0x9000_001A => Some("a cloud files placeholder"),
                _ => None,
            };
            if let Some(how) = stored_elsewhere {
                return Err(Error::Unsupported(format!(
                    "NTFS record {ino} is stored through {how} (reparse tag {tag:#010x}); vmvault cannot read it yet"
                )));
            }
        }
        Ok(self
            .data_dev(&f.attrs, DATA_UNNAMED)?
            .unwrap_or_else(|| Arc::new(RunDev::inline(self.dev.clone(), Vec::new()))))
    }
}
