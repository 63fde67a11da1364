//! What a pool sends the capture client, from arbitrary bytes: XAPI's JSON-RPC and XML-RPC
//! answers decode to a value or an error; an NBD server's handshake and read replies (the
//! input as everything the server says) end in a session or an error, and reads return the
//! requested length or an error — never a panic, never a hang (the input ends); the input as
//! a `/export_raw_vdi?format=vhd` stream reads as a disk or fails.
#![no_main]
use std::io::{self, Read, Write};

use blockdev::BlockDev;
use capture::nbd::Session;
use capture::source::{Exports, HttpDisk};
use capture::xapi::wire::{decode, Protocol};
use libfuzzer_sys::fuzz_target;

/// The server side of a connection: replies from the input, requests swallowed.
struct Replay(io::Cursor<Vec<u8>>);

impl Read for Replay {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Replay {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Export streams replayed from the input.
struct Stream(Vec<u8>);

impl Exports for Stream {
    fn open(&self, _format: &str) -> io::Result<Box<dyn Read + Send + Sync>> {
        Ok(Box::new(io::Cursor::new(self.0.clone())))
    }
}

fuzz_target!(|data: &[u8]| {
    // The size a VHD footer at the start claims (bytes 48..56), when it is small.
    let claimed = data.get(48..56).map(|b| u64::from_be_bytes(b.try_into().unwrap()));
    if let Some(size) = claimed.filter(|&s| s > 0 && s <= 16 << 20) {
        let mut buf = vec![0u8; size as usize];
        // As a whole disk, and as a difference from a parent (a footer of type 4).
        let parent: std::sync::Arc<dyn blockdev::BlockDev> = std::sync::Arc::new(blockdev::MemDev::new(vec![5; size as usize]));
        for delta in [false, true] {
            let mut disk = HttpDisk::over(Box::new(Stream(data.to_vec())), "fuzz".into(), size, Default::default());
            if delta {
                disk = disk.on(parent.clone());
            }
            if disk.allocation(0, size).is_ok() {
                let _ = disk.read_at(0, &mut buf);
                let _ = disk.read_at(size / 3, &mut buf[..(size / 2) as usize]);
            }
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = decode(Protocol::JsonRpc, "VM.get_record", text);
        let _ = decode(Protocol::XmlRpc, "VM.get_record", text);
    }
    let _ = capture::cbt::decode(&String::from_utf8_lossy(data), 1 << 24);
    // The bytes as an NBD server's side: simple replies, then structured ones with block status.
    if let Ok(mut s) = Session::over(Replay(io::Cursor::new(data.to_vec())), "/disk?session_id=x") {
        read_some(&mut s);
    }
    if let Ok(mut s) = Session::with_block_status(Replay(io::Cursor::new(data.to_vec())), "disk") {
        if s.size() > 0 {
            let _ = s.block_status(0, s.size());
        }
        read_some(&mut s);
    }
});

fn read_some(s: &mut Session) {
    let size = s.size();
    for (off, len) in [(0u64, 512usize), (100, 3000), (size.saturating_sub(1), 1)] {
        if off.checked_add(len as u64).is_some_and(|e| e <= size) && len as u64 <= size {
            let mut buf = vec![0u8; len];
            let _ = s.read(off, &mut buf);
        }
    }
}
