//! Shared by the crate's integration tests: sparse source devices and peer tools.

#![allow(dead_code)]

use std::io;
use std::path::Path;
use std::process::Command;

use blockdev::{check_range, Allocation, BlockDev, Run};

/// A device of `len` bytes: zeros except for the given data pieces (sorted, disjoint), which
/// it reports as its only data.
#[derive(Debug)]
pub struct Pieces {
    pub len: u64,
    pub pieces: Vec<(u64, Vec<u8>)>,
}

impl Pieces {
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.len as usize];
        for (at, d) in &self.pieces {
            v[*at as usize..*at as usize + d.len()].copy_from_slice(d);
        }
        v
    }
}

impl BlockDev for Pieces {
    fn len(&self) -> u64 {
        self.len
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        check_range(self.len, offset, buf.len() as u64)?;
        buf.fill(0);
        let end = offset + buf.len() as u64;
        for (at, d) in &self.pieces {
            let (s, e) = ((*at).max(offset), (at + d.len() as u64).min(end));
            if s < e {
                buf[(s - offset) as usize..(e - offset) as usize]
                    .copy_from_slice(&d[(s - at) as usize..(e - at) as usize]);
            }
        }
        Ok(())
    }
    fn allocation(&self, offset: u64, max_len: u64) -> io::Result<Run> {
        check_range(self.len, offset, 1)?;
        let limit = offset + max_len.min(self.len - offset);
        for (at, d) in &self.pieces {
            let e = at + d.len() as u64;
            if offset < *at {
                return Ok(Run { kind: Allocation::Zero, len: (*at).min(limit) - offset });
            }
            if offset < e {
                return Ok(Run { kind: Allocation::Data, len: e.min(limit) - offset });
            }
        }
        Ok(Run { kind: Allocation::Zero, len: limit - offset })
    }
}

/// Bytes from a small xorshift generator.
pub fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect()
}

/// A 37.5 MiB + 1536 B disk whose size is a multiple of neither 2 MiB nor 64 KiB, with data at the
/// start, across a 2 MiB block boundary, a lone sector, a zero-filled "allocated" piece and
/// the last sector.
pub fn sample_disk() -> Pieces {
    let len = (37 << 20) + (1 << 19) + 1536;
    Pieces {
        len,
        pieces: vec![
            (0, noise(1, 100_000)),
            ((4 << 20) - 4096, noise(2, 1 << 20)),
            (30 << 20, noise(3, 512)),
            (33 << 20, vec![0; 70_000]),
            (len - 512, noise(4, 512)),
        ],
    }
}

/// Run a command; panic with its output unless it exits 0.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{cmd:?} failed: {text}");
    text
}

/// Write a device's bytes to a file.
pub fn write_raw(dev: &Pieces, path: &Path) {
    std::fs::write(path, dev.to_vec()).unwrap();
}
