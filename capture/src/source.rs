//! Disk sources read from a pool.
//!
//! [`HttpRawDisk`] reads a VDI through `GET /export_raw_vdi?format=raw` (reference §5.2): one
//! stream, front to back, opened on the first read. The backup reads each source in
//! increasing offsets, so a forward-only stream is enough; a read behind the stream's
//! position reopens it. A stream that ends before the disk's size is an error, never
//! silently short data — XAPI's exports are delimited by the connection closing, so a
//! dropped connection looks like an early end.
//!
//! [`vhd_block_map`] reads only the head of a `format=vhd` export — footer copy, dynamic
//! header, BAT — to learn which 2 MiB blocks hold data, then closes it: how Xen Orchestra
//! finds the blocks to fetch over NBD (reference §6.4), since XAPI's NBD server has no
//! block status.

use std::io::{self, Read};
use std::sync::{Arc, Mutex};

use blockdev::BlockDev;
use disk_formats::vhd::{DiskType, DynHeader, Footer};

use crate::error::{Error, Result};
use crate::nbd::{BlockMap, Target, TlsTarget};
use crate::run::{Permit, Transfer};
use crate::xapi::records::s;
use crate::xapi::Client;

struct Open {
    body: Box<dyn Read + Send + Sync>,
    pos: u64,
    task: String,
    _permit: Option<Permit>,
}

/// A VDI exported as raw bytes over HTTP.
pub struct HttpRawDisk {
    client: Arc<Client>,
    vdi: String,
    size: u64,
    open: Mutex<Option<Open>>,
    transfer: Transfer,
}

impl std::fmt::Debug for HttpRawDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HttpRawDisk({}, {} bytes)", self.vdi, self.size)
    }
}

impl HttpRawDisk {
    pub fn new(client: Arc<Client>, vdi: String, size: u64, transfer: Transfer) -> Self {
        HttpRawDisk { client, vdi, size, open: Mutex::new(None), transfer }
    }

    fn start(&self) -> io::Result<Open> {
        let permit = self.transfer.slot();
        let task = self.client.create_task("vmvault export_raw_vdi").map_err(io::Error::from)?;
        let body = self
            .client
            .http_get("/export_raw_vdi", &[("vdi", &self.vdi), ("format", "raw"), ("task_id", &task)])
            .map_err(io::Error::from)?;
        Ok(Open { body, pos: 0, task, _permit: permit })
    }

    /// Read exactly `buf.len()` bytes from the stream, counting them.
    fn fill(&self, o: &mut Open, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let n = o.body.read(&mut buf[done..])?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "the export of VDI {} ended after {} of {} bytes",
                        self.vdi,
                        o.pos + done as u64,
                        self.size
                    ),
                ));
            }
            done += n;
            self.transfer.count(n as u64);
        }
        o.pos += buf.len() as u64;
        Ok(())
    }
}

impl BlockDev for HttpRawDisk {
    fn len(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        blockdev::check_range(self.size, offset, buf.len() as u64)?;
        self.transfer.check()?;
        let mut guard = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if guard.as_ref().is_none_or(|o| o.pos > offset) {
            *guard = Some(self.start()?);
        }
        let o = guard.as_mut().expect("opened above");
        let mut skip = vec![0u8; (offset - o.pos).min(1 << 20) as usize];
        while o.pos < offset {
            let n = ((offset - o.pos) as usize).min(skip.len());
            self.fill(o, &mut skip[..n])?;
        }
        let mut r = self.fill(o, buf);
        let done = r.is_ok() && o.pos == self.size;
        if done {
            r = self.expect_end(o);
        }
        if r.is_err() || done {
            // Finished (or broken): the transfer's slot goes to the next export now.
            if let Some(o) = guard.take() {
                self.finish(o);
            }
        }
        r
    }
}

impl HttpRawDisk {
    /// After the last byte the pool closes the connection: wait for that (so the export is
    /// over on its side too before the next one starts), and refuse a longer export.
    fn expect_end(&self, o: &mut Open) -> io::Result<()> {
        let mut one = [0u8; 1];
        loop {
            match o.body.read(&mut one) {
                Ok(0) => return Ok(()),
                Ok(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("the export of VDI {} is longer than its {} bytes", self.vdi, self.size),
                    ))
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Close the stream and forget its task (the pool finishes it).
    fn finish(&self, o: Open) {
        drop(o.body);
        let _ = self.client.call("task.destroy", &[serde_json::json!(o.task)]);
    }
}

impl Drop for HttpRawDisk {
    fn drop(&mut self) {
        if let Some(o) = self.open.get_mut().unwrap_or_else(|e| e.into_inner()).take() {
            self.finish(o);
        }
    }
}

/// Largest BAT read: 2^22 entries of 2 MiB blocks cover 8 TiB, beyond XAPI's 2 TiB VHDs.
const MAX_BAT_ENTRIES: u64 = 1 << 22;

/// Which blocks of VDI `vdi` (of `size` bytes) hold data, from its VHD export's BAT.
pub fn vhd_block_map(client: &Client, vdi: &str, size: u64, transfer: &Transfer) -> Result<BlockMap> {
    let _permit = transfer.slot();
    let task = client.create_task("vmvault block map")?;
    let r = client
        .http_get("/export_raw_vdi", &[("vdi", vdi), ("format", "vhd"), ("task_id", &task)])
        .and_then(|mut body| read_bat(&mut body, size));
    let _ = client.call("task.destroy", &[serde_json::json!(task)]);
    r
}

/// Parse the head of a dynamic VHD stream up to the end of its BAT.
fn read_bat(body: &mut dyn Read, size: u64) -> Result<BlockMap> {
    let io = |e| Error::io("reading the VHD export's header", e);
    let mut head = vec![0u8; 1536];
    body.read_exact(&mut head).map_err(io)?;
    let footer = Footer::from_bytes(&head[..512], 0)?;
    if footer.disk_type != DiskType::Dynamic || footer.data_offset != 512 {
        return Err(Error::protocol("export_raw_vdi?format=vhd", "not a dynamic VHD with its header at 512"));
    }
    if footer.current_size != size {
        return Err(Error::protocol(
            "export_raw_vdi?format=vhd",
            format!("a {} byte VHD for a {size} byte disk", footer.current_size),
        ));
    }
    let header = DynHeader::from_bytes(&head[512..1536], 512)?;
    let block = u64::from(header.block_size);
    let entries = u64::from(header.max_table_entries);
    if header.table_offset < 1536 || entries < size.div_ceil(block) || entries > MAX_BAT_ENTRIES {
        return Err(Error::protocol(
            "export_raw_vdi?format=vhd",
            format!("a BAT of {entries} entries at {}", header.table_offset),
        ));
    }
    io::copy(&mut body.take(header.table_offset - 1536), &mut io::sink()).map_err(io)?;
    let mut bat = vec![0u8; (entries * 4) as usize];
    body.read_exact(&mut bat).map_err(io)?;
    let present = bat
        .chunks_exact(4)
        .take(size.div_ceil(block) as usize)
        .map(|e| u32::from_be_bytes([e[0], e[1], e[2], e[3]]) != u32::MAX)
        .collect();
    Ok(BlockMap { block, present })
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
    Ok(Some(Target { addr, export: s(info, "exportname").to_string(), label: format!("disk {uuid}"), tls }))
}
