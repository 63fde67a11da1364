//! Disk sources read from a pool.
//!
//! [`HttpRawDisk`] reads a VDI through `GET /export_raw_vdi?format=raw` (reference §5.2): one
//! stream, front to back, opened on the first read. The backup reads each source in
//! increasing offsets, so a forward-only stream is enough; a read behind the stream's
//! position reopens it. A stream that ends before the disk's size is an error, never
//! silently short data — XAPI's exports are delimited by the connection closing, so a
//! dropped connection looks like an early end.

use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use blockdev::BlockDev;

use crate::run::{Permit, Semaphore};
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
    /// Bytes received from the pool (shared with the caller's counters).
    pub received: Arc<AtomicU64>,
    cancel: Arc<AtomicBool>,
    exports: Option<Arc<Semaphore>>,
}

impl std::fmt::Debug for HttpRawDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HttpRawDisk({}, {} bytes)", self.vdi, self.size)
    }
}

impl HttpRawDisk {
    pub fn new(client: Arc<Client>, vdi: String, size: u64, received: Arc<AtomicU64>) -> Self {
        HttpRawDisk { client, vdi, size, open: Mutex::new(None), received, cancel: Arc::default(), exports: None }
    }

    /// Hold a permit of `exports` while the export runs (the pool's transfer limit).
    pub fn limit(mut self, exports: Arc<Semaphore>) -> Self {
        self.exports = Some(exports);
        self
    }

    /// Fail reads (`Interrupted`) once `flag` is set.
    pub fn cancel_on(mut self, flag: Arc<AtomicBool>) -> Self {
        self.cancel = flag;
        self
    }

    fn start(&self) -> io::Result<Open> {
        let permit = self.exports.as_ref().map(|s| s.acquire());
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
            self.received.fetch_add(n as u64, Ordering::Relaxed);
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
        if self.cancel.load(Ordering::Relaxed) {
            return Err(io::Error::new(io::ErrorKind::Interrupted, "interrupted"));
        }
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
