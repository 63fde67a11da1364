//! The splitter and chunkers over arbitrary device contents: pieces tile the device exactly
//! and reproduce its bytes.
#![no_main]
use archive::chunker::{Chunker, ChunkerParams};
use archive::splitter::{Piece, Splitter};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, body)) = data.split_first() else { return };
    let params = if sel & 1 == 0 { "fixed:4K" } else { "fastcdc:64:256:1K" };
    let ch = Chunker::new(ChunkerParams::parse(params).unwrap(), u64::from(sel)).unwrap();
    let dev = blockdev::MemDev::new(body.to_vec());
    let mut sp = Splitter::new(&dev, &ch, 4096, 0, body.len() as u64, "fuzz");
    let mut out = Vec::new();
    while let Some(p) = sp.next_piece().unwrap() {
        match p {
            Piece::Zero { offset, len } => {
                assert_eq!(offset, out.len() as u64);
                out.resize(out.len() + len as usize, 0);
            }
            Piece::Data { offset, data } => {
                assert_eq!(offset, out.len() as u64);
                out.extend_from_slice(&data);
            }
        }
    }
    assert_eq!(out, body);
});
