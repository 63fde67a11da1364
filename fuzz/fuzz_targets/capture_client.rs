//! What a pool sends the capture client, from arbitrary bytes: XAPI's JSON-RPC and XML-RPC
//! answers decode to a value or an error; an NBD server's handshake and read replies (the
//! input as everything the server says) end in a session or an error, and reads return the
//! requested length or an error — never a panic, never a hang (the input ends).
#![no_main]
use std::io::{self, Read, Write};

use capture::nbd::Session;
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

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = decode(Protocol::JsonRpc, "VM.get_record", text);
        let _ = decode(Protocol::XmlRpc, "VM.get_record", text);
    }
    let _ = capture::cbt::decode(&String::from_utf8_lossy(data), 1 << 24);
    if let Ok(mut s) = Session::over(Replay(io::Cursor::new(data.to_vec())), "/disk?session_id=x") {
        let size = s.size();
        for (off, len) in [(0u64, 512usize), (100, 3000), (size.saturating_sub(1), 1)] {
            if off.checked_add(len as u64).is_some_and(|e| e <= size) && len as u64 <= size {
                let mut buf = vec![0u8; len];
                let _ = s.read(off, &mut buf);
            }
        }
    }
});
