//! Disk sources read from a pool.
//!
//! [`HttpDisk`] reads a VDI through `GET /export_raw_vdi` (reference §5.2): one stream, front
//! to back, opened on the first read. By default it asks for `format=vhd` — XAPI's streamed
//! dynamic VHD — and parses it on the fly: the BAT says which 2 MiB blocks hold data, so
//! [`BlockDev::allocation`] reports the others as zeros (the backup never asks for them and
//! the pool never sends them), and each block's sector bitmap zeroes the sectors it marks
//! unwritten. VHDs stop at 2040 GiB (`VDI_TOO_LARGE`); larger disks are read as `format=raw`.
//! The backup reads in increasing offsets, so a forward-only stream is enough; a read behind
//! the stream's position reopens it. A stream that ends early is an error, never silently
//! short data — XAPI's exports are delimited by the connection closing, so a dropped
//! connection looks like an early end.
//!
//! [`vhd_block_map`] reads only the head of a `format=vhd` export — footer copy, dynamic
//! header, BAT — to learn which blocks hold data, then closes it: how Xen Orchestra finds
//! the blocks to fetch over NBD (reference §6.4), since XAPI's NBD server has no block status.
//!
//! With a *base* (`base=`, a previous snapshot of the same disk that still has its data), the
//! pool sends a differencing VHD of the 2 MiB blocks where the two differ ([`HttpDisk::delta`]):
//! blocks it leaves out, and sectors their bitmaps leave unset, are the base's — read from the
//! previous backup of it, which holds the same bytes. That is how a pool without NBD still
//! gives incrementals (Xen Orchestra's delta backups over HTTP).

use std::io::{self, Read};
use std::sync::{Arc, Mutex, OnceLock};

use blockdev::{Allocation, BlockDev, Run};
use disk_formats::vhd::{DiskType, DynHeader, Footer};

use crate::error::{Error, Result};
use crate::nbd::{BlockMap, Target, TlsTarget};
use crate::run::{Permit, Transfer};
use crate::xapi::records::s;
use crate::xapi::Client;

/// Largest disk XAPI exports as VHD (`VDI_TOO_LARGE` beyond, reference §5.2).
pub const VHD_MAX: u64 = 2040 << 30;

struct Open {
    body: Box<dyn Read + Send + Sync>,
    /// Bytes of the stream consumed (for `raw`, the disk offset).
    pos: u64,
    /// The sector bitmap of the VHD block last entered.
    bitmap: Option<(u64, Vec<u8>)>,
    _permit: Option<Permit>,
}

/// Where export streams of one disk come from: the pool, or — in tests and fuzzing —
/// anything that can replay one.
pub trait Exports: Send + Sync {
    /// A new stream of the whole disk as `format` (`raw` or `vhd`), from its first byte.
    fn open(&self, format: &str) -> io::Result<Box<dyn Read + Send + Sync>>;
}

/// `GET /export_raw_vdi` of one VDI (as its difference from `base`), each under a task of
/// its own.
struct PoolExports {
    client: Arc<Client>,
    vdi: String,
    base: Option<String>,
}

/// An export's body; dropping it closes the connection and forgets the task (the pool
/// finishes it).
struct TaskBody {
    body: Box<dyn Read + Send + Sync>,
    client: Arc<Client>,
    task: String,
}

impl Read for TaskBody {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.body.read(buf)
    }
}

impl Drop for TaskBody {
    fn drop(&mut self) {
        self.body = Box::new(io::empty());
        let _ = self.client.call("task.destroy", &[serde_json::json!(self.task)]);
    }
}

impl PoolExports {
    fn export(&self, format: &str) -> Result<TaskBody> {
        let task = self.client.create_task("vmvault export_raw_vdi")?;
        // Made first, so a failed request forgets the task too.
        let mut t = TaskBody { body: Box::new(io::empty()), client: self.client.clone(), task };
        let mut query = vec![("vdi", self.vdi.as_str()), ("format", format), ("task_id", t.task.as_str())];
        if let Some(base) = &self.base {
            query.push(("base", base.as_str()));
        }
        t.body = self.client.http_get("/export_raw_vdi", &query)?;
        Ok(t)
    }
}

impl Exports for PoolExports {
    fn open(&self, format: &str) -> io::Result<Box<dyn Read + Send + Sync>> {
        Ok(Box::new(self.export(format)?))
    }
}

/// Where a VHD stream keeps each block, from its head.
#[derive(Debug)]
struct VhdHead {
    block: u64,
    bitmap: u64,
    /// Stream offset of each block's bitmap, `None` for blocks not in the file.
    at: Vec<Option<u64>>,
    /// Bytes up to the end of the BAT.
    consumed: u64,
    map: BlockMap,
    /// Stream offset just past the last byte of the disk the stream holds (the rest is the
    /// tail of a block past the disk's end, and the footer); `None` when no block is present.
    end: Option<u64>,
}

/// A VDI exported over HTTP.
pub struct HttpDisk {
    exports: Box<dyn Exports>,
    label: String,
    size: u64,
    vhd: bool,
    /// A differencing export: what it leaves out is read here (the base's backup).
    parent: Option<Arc<dyn BlockDev>>,
    head: OnceLock<VhdHead>,
    open: Mutex<Option<Open>>,
    transfer: Transfer,
    finish_at: u64,
}

impl std::fmt::Debug for HttpDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HttpDisk({}, {} bytes, {})", self.label, self.size, if self.vhd { "vhd" } else { "raw" })
    }
}

fn early_end(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, what)
}

impl HttpDisk {
    /// VDI `vdi` of `size` bytes, as a VHD stream when XAPI can make one, else raw.
    pub fn new(client: Arc<Client>, vdi: String, size: u64, transfer: Transfer) -> Self {
        let label = format!("VDI {vdi}");
        HttpDisk::over(Box::new(PoolExports { client, vdi, base: None }), label, size, transfer)
    }

    /// VDI `vdi` as its difference from VDI `base` (`format=vhd&base=`), everything the
    /// difference leaves out read from `parent`: the backup of `base`.
    pub fn delta(
        client: Arc<Client>,
        vdi: String,
        base: String,
        size: u64,
        transfer: Transfer,
        parent: Arc<dyn BlockDev>,
    ) -> Self {
        let label = format!("VDI {vdi} (against {base})");
        HttpDisk::over(Box::new(PoolExports { client, vdi, base: Some(base) }), label, size, transfer).on(parent)
    }

    /// The streams are differencing VHDs over `parent`.
    pub fn on(mut self, parent: Arc<dyn BlockDev>) -> Self {
        self.parent = Some(parent);
        self
    }

    /// A disk of `size` bytes read from the streams of `exports` (`label` names it in errors).
    pub fn over(exports: Box<dyn Exports>, label: String, size: u64, transfer: Transfer) -> Self {
        let vhd = size <= VHD_MAX;
        let (head, open) = (OnceLock::new(), Mutex::new(None));
        HttpDisk { exports, label, size, vhd, parent: None, head, open, transfer, finish_at: size }
    }

    /// Close the stream once a read reaches `end` (the last byte the caller plans to read:
    /// a CBT backup's last changed range), so the export slot goes to the next disk.
    pub fn finish_at(mut self, end: u64) -> Self {
        self.finish_at = end.min(self.size);
        self
    }

    /// Read the disk as `format=raw` (every byte crosses the network).
    pub fn raw(mut self) -> Self {
        self.vhd = false;
        self
    }

    fn start(&self) -> io::Result<Open> {
        let permit = self.transfer.slot();
        let body = self.exports.open(if self.vhd { "vhd" } else { "raw" })?;
        let mut o = Open { body, pos: 0, bitmap: None, _permit: permit };
        if self.vhd {
            let head = read_head(&mut o.body, self.size, self.parent.is_some())?;
            self.transfer.count(head.consumed);
            o.pos = head.consumed;
            if self.head.get().is_some_and(|h| h.at != head.at) {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "the export's block table changed"));
            }
            let _ = self.head.set(head);
        }
        Ok(o)
    }

    /// The VHD head, opening the stream to read it if need be.
    fn head(&self, guard: &mut Option<Open>) -> io::Result<&VhdHead> {
        if self.head.get().is_none() {
            let o = self.start()?;
            let empty = self.head.get().is_some_and(|h| h.end.is_none());
            if empty {
                drop(o); // nothing to read: the slot goes now
            } else {
                *guard = Some(o);
            }
        }
        Ok(self.head.get().expect("set by start"))
    }

    /// Read exactly `buf.len()` bytes from the stream, counting them.
    fn fill(&self, o: &mut Open, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let n = o.body.read(&mut buf[done..])?;
            if n == 0 {
                let at = o.pos + done as u64;
                return Err(early_end(format!("the export of {} ended after {at} bytes", self.label)));
            }
            done += n;
            self.transfer.count(n as u64);
        }
        o.pos += buf.len() as u64;
        Ok(())
    }

    /// The stream, positioned at `to` (reopened when already past it).
    fn seek<'a>(&self, guard: &'a mut Option<Open>, to: u64) -> io::Result<&'a mut Open> {
        if guard.as_ref().is_none_or(|o| o.pos > to) {
            *guard = None;
            *guard = Some(self.start()?);
        }
        let o = guard.as_mut().expect("opened above");
        if o.pos > to {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("offset {to} is inside the VHD's head")));
        }
        let mut skip = vec![0u8; (to - o.pos).min(1 << 20) as usize];
        while o.pos < to {
            let n = ((to - o.pos) as usize).min(skip.len());
            self.fill(o, &mut skip[..n])?;
        }
        Ok(o)
    }

    /// Read `buf` from VHD block `b` at `within`, honouring its sector bitmap: sectors it
    /// marks unwritten are zeros, or the parent's in a differencing VHD.
    fn read_block(&self, guard: &mut Option<Open>, at: u64, b: u64, within: u64, buf: &mut [u8]) -> io::Result<()> {
        let head = self.head.get().expect("read after the head");
        let start = b * head.block;
        let data = at + head.bitmap + within;
        let has_bitmap = guard.as_ref().is_some_and(|o| o.pos <= data && o.bitmap.as_ref().is_some_and(|m| m.0 == b));
        if !has_bitmap {
            let o = self.seek(guard, at)?;
            let mut bitmap = vec![0u8; head.bitmap as usize];
            self.fill(o, &mut bitmap)?;
            o.bitmap = Some((b, bitmap));
        }
        let o = self.seek(guard, data)?;
        self.fill(o, buf)?;
        let bitmap = &o.bitmap.as_ref().expect("read above").1;
        // Sectors by their place in the block (the read need not start on a sector); runs of
        // unwritten ones are zeros, or read from the parent at once.
        let unwritten = |at: u64| {
            let s = (at / 512) as usize;
            bitmap.get(s / 8).is_none_or(|byte| byte & (0x80 >> (s % 8)) == 0)
        };
        let mut pos = 0usize;
        while pos < buf.len() {
            let mut end = pos;
            let skip = unwritten(within + pos as u64);
            while end < buf.len() && unwritten(within + end as u64) == skip {
                let at = within + end as u64;
                end += ((512 - at % 512) as usize).min(buf.len() - end);
            }
            if skip {
                match &self.parent {
                    Some(p) => p.read_at(start + within + pos as u64, &mut buf[pos..end])?,
                    None => buf[pos..end].fill(0),
                }
            }
            pos = end;
        }
        Ok(())
    }

    fn read_vhd(&self, guard: &mut Option<Open>, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let block = self.head(guard)?.block;
        let mut done = 0usize;
        while done < buf.len() {
            let off = offset + done as u64;
            let (b, within) = (off / block, off % block);
            let n = ((block - within) as usize).min(buf.len() - done);
            let piece = &mut buf[done..done + n];
            match (self.head.get().and_then(|h| h.at.get(b as usize).copied().flatten()), &self.parent) {
                (None, None) => piece.fill(0),
                (None, Some(p)) => p.read_at(off, piece)?,
                (Some(at), _) => self.read_block(guard, at, b, within, piece)?,
            }
            done += n;
        }
        Ok(())
    }

    /// After the last byte of data the pool sends the rest (a VHD's footer) and closes the
    /// connection: wait for that, so the export is over on its side before the next starts.
    fn expect_end(&self, o: &mut Open) -> io::Result<()> {
        let mut rest = Vec::new();
        // A block's tail and a footer (VHD) or nothing (raw); more is not an end.
        let block = self.head.get().map_or(0, |h| h.block);
        (&mut o.body).take(block + (1 << 20)).read_to_end(&mut rest)?;
        self.transfer.count(rest.len() as u64);
        let ok = if self.vhd {
            rest.len() >= 512
                && Footer::from_bytes(&rest[rest.len() - 512..], 0).is_ok_and(|f| f.current_size == self.size)
        } else {
            rest.is_empty()
        };
        if !ok {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the export of {} does not end where its {} bytes do", self.label, self.size),
            ));
        }
        Ok(())
    }
}

impl BlockDev for HttpDisk {
    fn len(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        blockdev::check_range(self.size, offset, buf.len() as u64)?;
        self.transfer.check()?;
        let mut guard = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let (mut r, end) = if self.vhd {
            let r = self.read_vhd(&mut guard, offset, buf);
            (r, self.head.get().and_then(|h| h.end))
        } else {
            let r = self.seek(&mut guard, offset).and_then(|o| self.fill(o, buf));
            (r, Some(self.size))
        };
        let done = r.is_ok() && guard.as_ref().is_some_and(|o| Some(o.pos) == end);
        if done {
            r = self.expect_end(guard.as_mut().expect("open when done"));
        }
        if r.is_err() || done || offset + buf.len() as u64 >= self.finish_at {
            // Finished (or broken, or past what the caller needs): the transfer's slot goes
            // to the next export now.
            *guard = None;
        }
        r
    }

    fn allocation(&self, offset: u64, max_len: u64) -> io::Result<Run> {
        blockdev::check_range(self.size, offset, 1)?;
        let max_len = max_len.min(self.size - offset);
        if !self.vhd {
            return Ok(Run { kind: Allocation::Data, len: max_len });
        }
        let mut guard = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let run = self.head(&mut guard)?.map.run(offset, max_len);
        match &self.parent {
            // Blocks a differencing VHD leaves out are the parent's, zeros or not.
            Some(p) if run.kind == Allocation::Zero => p.allocation(offset, run.len),
            _ => Ok(run),
        }
    }
}

/// Largest BAT read: 2^22 entries of 2 MiB blocks cover 8 TiB, beyond XAPI's 2 TiB VHDs.
const MAX_BAT_ENTRIES: u64 = 1 << 22;

/// Which blocks of VDI `vdi` (of `size` bytes) hold data — with a `base`, which differ from
/// it — from its VHD export's BAT.
pub fn vhd_block_map(
    client: &Arc<Client>,
    vdi: &str,
    base: Option<&str>,
    size: u64,
    transfer: &Transfer,
) -> Result<BlockMap> {
    let _permit = transfer.slot();
    let exports = PoolExports { client: client.clone(), vdi: vdi.to_string(), base: base.map(String::from) };
    let mut body = exports.export("vhd")?;
    read_head(&mut body, size, base.is_some()).map(|h| h.map)
}

/// Parse the head of a dynamic (or, `differencing`, a differencing) VHD stream up to the end
/// of its BAT.
fn read_head(body: &mut dyn Read, size: u64, differencing: bool) -> Result<VhdHead> {
    let io = |e| Error::io("reading the VHD export's header", e);
    let bad = |d: String| Error::protocol("export_raw_vdi?format=vhd", d);
    let mut head = vec![0u8; 1536];
    body.read_exact(&mut head).map_err(io)?;
    let footer = Footer::from_bytes(&head[..512], 0)?;
    let want = if differencing { DiskType::Differencing } else { DiskType::Dynamic };
    if footer.disk_type != want || footer.data_offset != 512 {
        return Err(bad(format!("not a {want:?} VHD with its header at 512")));
    }
    if footer.current_size != size {
        return Err(bad(format!("a {} byte VHD for a {size} byte disk", footer.current_size)));
    }
    let header = DynHeader::from_bytes(&head[512..1536], 512)?;
    let block = u64::from(header.block_size);
    let entries = u64::from(header.max_table_entries);
    if header.table_offset < 1536 || entries < size.div_ceil(block) || entries > MAX_BAT_ENTRIES {
        return Err(bad(format!("a BAT of {entries} entries at {}", header.table_offset)));
    }
    io::copy(&mut body.take(header.table_offset - 1536), &mut io::sink()).map_err(io)?;
    let mut bat = vec![0u8; (entries * 4) as usize];
    body.read_exact(&mut bat).map_err(io)?;
    let consumed = header.table_offset + entries * 4;
    let bitmap = header.bitmap_bytes();
    let at: Vec<Option<u64>> = bat
        .chunks_exact(4)
        .take(size.div_ceil(block) as usize)
        .map(|e| u32::from_be_bytes([e[0], e[1], e[2], e[3]]))
        .map(|e| (e != u32::MAX).then(|| u64::from(e) * 512))
        .collect();
    // Blocks must lie after the table and not overlap (any order is fine).
    let mut sorted: Vec<u64> = at.iter().flatten().copied().collect();
    sorted.sort_unstable();
    let overlap = sorted.windows(2).any(|w| w[1] < w[0] + bitmap + block);
    if sorted.first().is_some_and(|&a| a < consumed) || overlap {
        return Err(bad("blocks overlap each other or the block table".into()));
    }
    let map = BlockMap { block, present: at.iter().map(Option::is_some).collect() };
    let end = (0u64..).zip(&at).filter_map(|(b, a)| a.map(|a| a + bitmap + block.min(size - b * block))).max();
    Ok(VhdHead { block, bitmap, at, consumed, map, end })
}

/// Whether the pool's NBD server wants TLS: only the `insecure_nbd` purpose alone means
/// plain text (the server refuses both purposes at once, reference §6.1).
pub fn nbd_wants_tls(client: &Client) -> Result<bool> {
    let nets = client.call("network.get_all_records", &[])?;
    let purposes: Vec<&str> = nets
        .as_object()
        .into_iter()
        .flat_map(|m| m.values())
        .flat_map(|n| n.get("purpose").and_then(serde_json::Value::as_array).into_iter().flatten())
        .filter_map(serde_json::Value::as_str)
        .collect();
    Ok(!(purposes.contains(&"insecure_nbd") && !purposes.contains(&"nbd")))
}

/// Where VDI `vdi` (uuid `uuid`, for messages) can be read over NBD (`VDI.get_nbd_info`), or
/// `None` when the pool offers no NBD. With `tls`, the host's certificate from the answer is
/// pinned and its `subject` is the name checked.
pub fn nbd_target(client: &Client, vdi: &str, uuid: &str, tls: bool) -> Result<Option<Target>> {
    let infos = client.call("VDI.get_nbd_info", &[serde_json::json!(vdi)])?;
    let infos = infos.as_array().cloned().unwrap_or_default();
    // The host we talk to (its address is known to work), else the first offered.
    let host = client.base().host_str().unwrap_or("").trim_matches(['[', ']']).to_string();
    let Some(info) = infos.iter().find(|i| s(i, "address") == host).or(infos.first()) else { return Ok(None) };
    let bad = |d: String| Error::protocol("VDI.get_nbd_info", d);
    let (address, port) = (s(info, "address"), disk_formats::xva::int_field(info, "port").unwrap_or(10809));
    let addr = if address.contains(':') { format!("[{address}]:{port}") } else { format!("{address}:{port}") };
    let tls = if tls {
        let pin = crate::xapi::tls::Trust::pin_pem(s(info, "cert"))
            .map_err(|e| bad(format!("the host's certificate: {e}")))?;
        let config = pin.client_config().ok_or_else(|| bad("no TLS configuration for the pin".into()))?;
        let name = rustls::pki_types::ServerName::try_from(s(info, "subject").to_string())
            .map_err(|e| bad(format!("subject {:?}: {e}", s(info, "subject"))))?;
        Some(TlsTarget { config, name })
    } else {
        None
    };
    let (export, label) = (s(info, "exportname").to_string(), format!("disk {uuid}"));
    Ok(Some(Target { addr, export, label, tls, block_status: false }))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    /// Streams replayed from bytes, counting how many were opened.
    struct Replay {
        bytes: Vec<u8>,
        opened: Arc<AtomicU64>,
    }

    impl Exports for Replay {
        fn open(&self, _format: &str) -> io::Result<Box<dyn Read + Send + Sync>> {
            self.opened.fetch_add(1, Ordering::SeqCst);
            Ok(Box::new(io::Cursor::new(self.bytes.clone())))
        }
    }

    /// A 9 MiB + 3 KiB disk with data in blocks 0 and 3 (of 2 MiB) and its VHD stream.
    fn sample() -> (Vec<u8>, Vec<u8>) {
        let mut data = vec![0u8; (9 << 20) + 3072];
        for (i, b) in data[..4096].iter_mut().enumerate() {
            *b = (i % 251) as u8 + 1;
        }
        let n = data.len();
        data[(6 << 20) + 5..(6 << 20) + 700].fill(7);
        data[n - 10..].fill(9);
        // A sparse file, so the writer sees the holes (as XAPI's VHD chains do).
        let file = tempfile::tempfile().unwrap();
        file.set_len(data.len() as u64).unwrap();
        for (at, len) in [(0, 4096), ((6 << 20) + 5, 695), (n - 10, 10)] {
            std::os::unix::fs::FileExt::write_all_at(&file, &data[at..at + len], at as u64).unwrap();
        }
        let dev = blockdev::FileDev::from_file(file, false).unwrap();
        let mut out = disk_formats::out::Stream(Vec::new());
        disk_formats::vhd::write_dynamic(&dev, &mut out).unwrap();
        (data, out.0)
    }

    fn disk(bytes: Vec<u8>, size: u64) -> (HttpDisk, Arc<AtomicU64>, Transfer) {
        let opened = Arc::new(AtomicU64::new(0));
        let transfer = Transfer::default();
        let exports = Box::new(Replay { bytes, opened: opened.clone() });
        (HttpDisk::over(exports, "test disk".into(), size, transfer.clone()), opened, transfer)
    }

    #[test]
    fn a_vhd_stream_reads_back_the_disk_and_reports_its_holes() {
        let (data, vhd) = sample();
        let (d, opened, transfer) = disk(vhd.clone(), data.len() as u64);
        let run = d.allocation(2 << 20, 4 << 20).unwrap();
        assert_eq!((run.kind, run.len), (Allocation::Zero, 4 << 20));
        assert_eq!(d.allocation(0, 1 << 30).unwrap().len, 2 << 20);
        let mut got = vec![0u8; data.len()];
        // Read in pieces, forward, as the archive does (holes included).
        for (i, chunk) in got.chunks_mut(1 << 20).enumerate() {
            d.read_at(i as u64 * (1 << 20), chunk).unwrap();
        }
        assert!(got == data);
        assert_eq!(opened.load(Ordering::SeqCst), 1, "one stream, front to back");
        assert_eq!(
            transfer.received.load(Ordering::SeqCst),
            vhd.len() as u64,
            "the whole stream was consumed, footer included"
        );
        // A read behind the stream reopens it.
        let mut b = vec![0u8; 100];
        d.read_at(10, &mut b).unwrap();
        assert_eq!(b, data[10..110]);
        assert_eq!(opened.load(Ordering::SeqCst), 2);
    }

    /// A stream of a `size`-byte disk of 4 KiB blocks as a `kind` VHD: block 0 present with
    /// only sector 1 marked written (0xaa), the others left out.
    fn one_sector(kind: DiskType, size: u64) -> Vec<u8> {
        use disk_formats::vhd::footer::random_uuid;
        let mut header = DynHeader::new(size, 1536).unwrap();
        header.block_size = 4096;
        header.max_table_entries = size.div_ceil(4096) as u32;
        let footer = Footer::new(kind, size, random_uuid()).to_bytes();
        let mut stream = footer.to_vec();
        stream.extend_from_slice(&header.to_bytes());
        let mut bat = vec![0xffu8; (size.div_ceil(4096) * 4).next_multiple_of(512) as usize];
        let first = (1536 + bat.len() as u32) / 512;
        bat[..4].copy_from_slice(&first.to_be_bytes());
        stream.extend_from_slice(&bat);
        let mut bitmap = vec![0u8; 512];
        bitmap[0] = 0x40;
        stream.extend_from_slice(&bitmap);
        stream.extend_from_slice(&[0xaa; 4096]);
        stream.extend_from_slice(&footer);
        stream
    }

    #[test]
    fn sector_bitmaps_apply_to_the_sectors_a_read_covers() {
        let size = 4096u64;
        let (d, _, _) = disk(one_sector(DiskType::Dynamic, size), size);
        let mut b = vec![1u8; 512];
        d.read_at(256, &mut b).unwrap();
        assert!(b[..256].iter().all(|&x| x == 0), "sector 0 is not written");
        assert!(b[256..].iter().all(|&x| x == 0xaa), "sector 1 is");
    }

    #[test]
    fn a_differencing_stream_leaves_what_it_omits_to_the_parent() {
        let size = 3 * 4096u64;
        let parent: Arc<dyn BlockDev> = Arc::new(blockdev::MemDev::new(vec![0x55; size as usize]));
        let (d, opened, _) = disk(one_sector(DiskType::Differencing, size), size);
        let d = d.on(parent.clone());
        // Blocks left out are the parent's: its allocation, its bytes.
        assert_eq!(d.allocation(4096, 8192).unwrap(), Run { kind: Allocation::Data, len: 8192 });
        let mut got = vec![0u8; size as usize];
        d.read_at(0, &mut got).unwrap();
        assert!(got[..512].iter().all(|&x| x == 0x55), "an unmarked sector of a present block is the parent's");
        assert!(got[512..1024].iter().all(|&x| x == 0xaa), "the marked one is the stream's");
        assert!(got[1024..].iter().all(|&x| x == 0x55), "the rest is the parent's");
        assert_eq!(opened.load(Ordering::SeqCst), 1);
        // A whole-disk VHD where a difference was asked for, and the other way round: refused.
        let (d, _, _) = disk(one_sector(DiskType::Dynamic, size), size);
        let e = d.on(parent).read_at(0, &mut got).unwrap_err().to_string();
        assert!(e.contains("not a Differencing VHD"), "{e}");
        let (d, _, _) = disk(one_sector(DiskType::Differencing, size), size);
        let e = d.read_at(0, &mut got).unwrap_err().to_string();
        assert!(e.contains("not a Dynamic VHD"), "{e}");
    }

    #[test]
    fn a_short_long_or_foreign_stream_is_an_error() {
        let (data, vhd) = sample();
        let size = data.len() as u64;
        let read_all = |d: &HttpDisk| {
            let mut got = vec![0u8; size as usize];
            d.read_at(0, &mut got)
        };
        let (d, _, _) = disk(vhd[..vhd.len() / 2].to_vec(), size);
        let e = read_all(&d).unwrap_err().to_string();
        assert!(e.contains("ended after"), "{e}");
        // All data there but no footer: not the end of a VHD either.
        let (d, _, _) = disk(vhd[..vhd.len() - 700].to_vec(), size);
        assert!(read_all(&d).unwrap_err().to_string().contains("does not end"));
        let mut longer = vhd.clone();
        longer.extend_from_slice(&[1; 100]);
        let (d, _, _) = disk(longer, size);
        assert!(read_all(&d).unwrap_err().to_string().contains("does not end"));
        let (d, _, _) = disk(vhd.clone(), size + 512);
        assert!(d.allocation(0, 1).unwrap_err().to_string().contains("byte VHD for a"));
        // A raw stream of the same disk reads back too; a short one is refused.
        let (d, _, _) = disk(data.clone(), size);
        let mut got = vec![0u8; size as usize];
        d.raw().read_at(0, &mut got).unwrap();
        assert!(got == data);
        let (d, _, _) = disk(data[..100].to_vec(), size);
        assert!(d.raw().read_at(0, &mut got).is_err());
    }
}
