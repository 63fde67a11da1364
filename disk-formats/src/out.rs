//! Where writers put their bytes, and what they read from.
//!
//! Writers stream: they write front to back, never seek back, and skip runs of zeros through
//! [`Output::zeros`], which leaves a hole in a file and writes zeros down a pipe.

use std::fs::File;
use std::io::{self, BufWriter, Seek, SeekFrom, Write};
use std::ops::Range;

use blockdev::{Allocation, BlockDev};

/// A byte sink that can skip zeros cheaply.
pub trait Output: Write {
    /// Append `n` zero bytes: a hole in a file, real zeros on a stream.
    fn zeros(&mut self, n: u64) -> io::Result<()>;
}

/// A file written front to back, with holes where zeros are skipped.
#[derive(Debug)]
pub struct SparseFile {
    w: BufWriter<File>,
    pos: u64,
}

impl SparseFile {
    /// Write into `file` (truncated by the caller) from its start.
    pub fn new(file: File) -> Self {
        Self { w: BufWriter::with_capacity(1 << 20, file), pos: 0 }
    }

    /// Fix the file's length (a trailing hole needs it) and flush.
    pub fn finish(mut self) -> io::Result<File> {
        self.w.flush()?;
        let file = self.w.into_inner().map_err(io::IntoInnerError::into_error)?;
        file.set_len(self.pos)?;
        Ok(file)
    }
}

impl Write for SparseFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.w.write(buf)?;
        self.pos += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.w.flush()
    }
}

impl Output for SparseFile {
    fn zeros(&mut self, n: u64) -> io::Result<()> {
        if n < 64 << 10 {
            return write_zeros(self, n);
        }
        self.w.flush()?;
        let to = self.pos.checked_add(n).ok_or_else(|| io::Error::other("file offset overflows"))?;
        self.w.get_mut().seek(SeekFrom::Start(to))?;
        self.pos = to;
        Ok(())
    }
}

/// Any writer (a pipe, standard output, a hasher); zeros are written out.
#[derive(Debug)]
pub struct Stream<W: Write>(pub W);

impl<W: Write> Write for Stream<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl<W: Write> Output for Stream<W> {
    fn zeros(&mut self, n: u64) -> io::Result<()> {
        write_zeros(&mut self.0, n)
    }
}

/// Write `n` zero bytes.
pub fn write_zeros(w: &mut (impl Write + ?Sized), mut n: u64) -> io::Result<()> {
    static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        w.write_all(&ZEROS[..k])?;
        n -= k as u64;
    }
    Ok(())
}

/// The granules (units of `granule` bytes, counted from 0) that hold any data in `dev`, as
/// sorted, merged ranges of granule numbers. Costs metadata only: [`BlockDev::allocation`].
pub fn data_granules(dev: &dyn BlockDev, granule: u64) -> io::Result<Vec<Range<u64>>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    let mut pos = 0;
    while pos < dev.len() {
        let run = dev.allocation(pos, dev.len() - pos)?;
        if run.len == 0 {
            return Err(io::Error::other(format!("the device reported an empty run at {pos}")));
        }
        if run.kind == Allocation::Data {
            let (first, end) = (pos / granule, (pos + run.len).div_ceil(granule));
            match out.last_mut() {
                Some(last) if last.end >= first => last.end = last.end.max(end),
                _ => out.push(first..end),
            }
        }
        pos += run.len;
    }
    Ok(out)
}

/// Fill `buf` from `dev` at `offset`; bytes past the device's end read as zeros.
pub fn read_padded(dev: &dyn BlockDev, offset: u64, buf: &mut [u8]) -> io::Result<()> {
    let have = dev.len().saturating_sub(offset).min(buf.len() as u64) as usize;
    dev.read_at(offset, &mut buf[..have])?;
    buf[have..].fill(0);
    Ok(())
}

/// True when every byte is zero.
pub fn is_zero(buf: &[u8]) -> bool {
    let mut wide = buf.chunks_exact(16);
    wide.by_ref().all(|c| u128::from_ne_bytes(c.try_into().unwrap_or_default()) == 0)
        && wide.remainder().iter().all(|&b| b == 0)
}

/// Copy all of `dev` to `out`: data read in 1 MiB pieces (all-zero pieces of 64 KiB become
/// [`Output::zeros`]), zero runs skipped without reading.
pub fn copy_sparse(dev: &dyn BlockDev, out: &mut dyn Output) -> io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0;
    while pos < dev.len() {
        let run = dev.allocation(pos, dev.len() - pos)?;
        let end = pos + run.len.max(1).min(dev.len() - pos);
        if run.kind == Allocation::Zero {
            out.zeros(end - pos)?;
            pos = end;
            continue;
        }
        while pos < end {
            let n = (end - pos).min(buf.len() as u64) as usize;
            dev.read_at(pos, &mut buf[..n])?;
            write_skipping_zeros(out, &buf[..n])?;
            pos += n as u64;
        }
    }
    Ok(())
}

/// Write `buf`, turning all-zero 64 KiB pieces into [`Output::zeros`].
pub fn write_skipping_zeros(out: &mut dyn Output, buf: &[u8]) -> io::Result<()> {
    for piece in buf.chunks(64 << 10) {
        if is_zero(piece) {
            out.zeros(piece.len() as u64)?;
        } else {
            out.write_all(piece)?;
        }
    }
    Ok(())
}

/// Hands the writing to a background thread, so reading and decompressing the next blocks
/// overlaps the write system calls (and page-cache copies) of the previous ones. Bytes are
/// batched into 4 MiB messages; at most four are in flight.
#[derive(Debug)]
pub struct Background<W: Output + Send + 'static> {
    buf: Vec<u8>,
    tx: Option<std::sync::mpsc::SyncSender<Op>>,
    thread: Option<std::thread::JoinHandle<io::Result<W>>>,
}

#[derive(Debug)]
enum Op {
    Data(Vec<u8>),
    Zeros(u64),
}

const BATCH: usize = 4 << 20;

impl<W: Output + Send + 'static> Background<W> {
    pub fn new(mut inner: W) -> io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Op>(4);
        let thread = std::thread::Builder::new().name("vmvault-write".into()).spawn(move || {
            for op in rx {
                match op {
                    Op::Data(b) => inner.write_all(&b)?,
                    Op::Zeros(n) => inner.zeros(n)?,
                }
            }
            inner.flush()?;
            Ok(inner)
        })?;
        Ok(Self { buf: Vec::with_capacity(BATCH), tx: Some(tx), thread: Some(thread) })
    }

    fn send(&mut self, op: Op) -> io::Result<()> {
        let sent = self.tx.as_ref().is_some_and(|tx| tx.send(op).is_ok());
        if sent {
            Ok(())
        } else {
            // The writer stopped: its error says why.
            Err(self.join().err().unwrap_or_else(|| io::Error::other("the writer thread stopped")))
        }
    }

    fn send_buf(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let b = std::mem::replace(&mut self.buf, Vec::with_capacity(BATCH));
        self.send(Op::Data(b))
    }

    fn join(&mut self) -> io::Result<W> {
        self.tx = None;
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| io::Error::other("the writer thread panicked"))?,
            None => Err(io::Error::other("the writer thread already finished")),
        }
    }

    /// Write what is buffered, wait for the thread, and return the inner output.
    pub fn finish(mut self) -> io::Result<W> {
        self.send_buf()?;
        self.join()
    }
}

impl<W: Output + Send + 'static> Write for Background<W> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let n = b.len().min(BATCH - self.buf.len());
        self.buf.extend_from_slice(&b[..n]);
        if self.buf.len() == BATCH {
            self.send_buf()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.send_buf()
    }
}

impl<W: Output + Send + 'static> Output for Background<W> {
    fn zeros(&mut self, n: u64) -> io::Result<()> {
        self.send_buf()?;
        self.send(Op::Zeros(n))
    }
}
