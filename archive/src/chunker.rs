//! Sans-I/O chunking: where a run of data is cut into chunks.
//!
//! Two chunkers, chosen at `init` and stored in the config:
//! - `fixed`: cut at every multiple of `size` in absolute stream offsets (and where a data run
//!   starts or ends). In-place block rewrites, the way disks change, leave every other chunk
//!   identical.
//! - `fastcdc`: FastCDC 2020 (the `fastcdc` crate's gear hash, normalization level 1), with
//!   the gear table seeded from the repository's id key so boundaries leak nothing. Cuts
//!   restart at the start of every data run.
//!
//! Neither chunker is needed to *read* a repository: stream maps list every chunk explicitly.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Chunker choice and sizes, as stored in the config.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum ChunkerParams {
    Fixed { size: u32 },
    Fastcdc { min: u32, avg: u32, max: u32 },
}

/// Largest chunk any chunker may produce: 16 MiB (also a cap on allocations when reading).
pub const MAX_CHUNK: u32 = 16 << 20;

impl ChunkerParams {
    /// Parse `fixed:1M` or `fastcdc:256K:1M:4M` (sizes take K and M suffixes).
    pub fn parse(s: &str) -> Result<Self> {
        let parts: Vec<&str> = s.split(':').collect();
        let p = match parts.as_slice() {
            ["fixed", size] => ChunkerParams::Fixed { size: parse_size(size)? },
            ["fastcdc", min, avg, max] => {
                ChunkerParams::Fastcdc { min: parse_size(min)?, avg: parse_size(avg)?, max: parse_size(max)? }
            }
            _ => {
                return Err(Error::Usage(format!(
                    "chunker {s:?}: expected fixed:SIZE or fastcdc:MIN:AVG:MAX (e.g. fixed:1M)"
                )))
            }
        };
        p.validate()?;
        Ok(p)
    }

    pub fn validate(&self) -> Result<()> {
        use fastcdc::v2020 as f;
        let ok = match *self {
            ChunkerParams::Fixed { size } => size >= 4096 && size <= MAX_CHUNK && size % 4096 == 0,
            ChunkerParams::Fastcdc { min, avg, max } => {
                (f::MINIMUM_MIN..=f::MINIMUM_MAX).contains(&min)
                    && (f::AVERAGE_MIN..=f::AVERAGE_MAX).contains(&avg)
                    && (f::MAXIMUM_MIN..=f::MAXIMUM_MAX.min(MAX_CHUNK)).contains(&max)
                    && min <= avg
                    && avg <= max
                    && avg.is_power_of_two()
            }
        };
        if ok {
            Ok(())
        } else {
            Err(Error::Usage(format!(
                "chunker {self}: fixed sizes must be multiples of 4 KiB up to 16 MiB; fastcdc needs \
                 64 B <= min <= avg <= max <= 16 MiB, min <= 1 MiB, avg a power of two <= 4 MiB"
            )))
        }
    }

    /// Largest chunk this chunker produces.
    pub fn max_chunk(&self) -> usize {
        match *self {
            ChunkerParams::Fixed { size } => size as usize,
            ChunkerParams::Fastcdc { max, .. } => max as usize,
        }
    }
}

impl std::fmt::Display for ChunkerParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            ChunkerParams::Fixed { size } => write!(f, "fixed:{}", fmt_size(size)),
            ChunkerParams::Fastcdc { min, avg, max } => {
                write!(f, "fastcdc:{}:{}:{}", fmt_size(min), fmt_size(avg), fmt_size(max))
            }
        }
    }
}

fn parse_size(s: &str) -> Result<u32> {
    let (num, mult) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 1024),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 1024 * 1024),
        _ => (s, 1),
    };
    num.parse::<u32>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| Error::Usage(format!("{s:?} is not a size (use e.g. 4096, 64K, 1M)")))
}

fn fmt_size(n: u32) -> String {
    if n % (1 << 20) == 0 {
        format!("{}M", n >> 20)
    } else if n % 1024 == 0 {
        format!("{}K", n >> 10)
    } else {
        n.to_string()
    }
}

/// A ready-to-run chunker.
#[derive(Clone)]
pub enum Chunker {
    Fixed { size: u64 },
    Cdc(Box<Cdc>),
}

impl std::fmt::Debug for Chunker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Chunker::Fixed { size } => write!(f, "Chunker::Fixed({size})"),
            Chunker::Cdc(c) => write!(f, "Chunker::Cdc({}/{}/{})", c.min, c.avg, c.max),
        }
    }
}

/// FastCDC state: sizes, masks and the seeded gear tables.
#[derive(Clone)]
#[allow(missing_debug_implementations)]
pub struct Cdc {
    min: usize,
    avg: usize,
    max: usize,
    mask_s: u64,
    mask_l: u64,
    gear: Box<[u64; 256]>,
    gear_ls: Box<[u64; 256]>,
}

impl Chunker {
    pub fn new(params: ChunkerParams, gear_seed: u64) -> Result<Self> {
        params.validate()?;
        Ok(match params {
            ChunkerParams::Fixed { size } => Chunker::Fixed { size: u64::from(size) },
            ChunkerParams::Fastcdc { min, avg, max } => {
                use fastcdc::v2020 as f;
                let bits = f::logarithm2(avg) as usize;
                // Normalization level 1, as the crate's default.
                let (gear, gear_ls) = f::get_gear_with_seed(gear_seed);
                Chunker::Cdc(Box::new(Cdc {
                    min: min as usize,
                    avg: avg as usize,
                    max: max as usize,
                    mask_s: f::MASKS[bits + 1],
                    mask_l: f::MASKS[bits - 1],
                    gear,
                    gear_ls,
                }))
            }
        })
    }

    /// Length of the next chunk of a data run, given `data` (the run's uncut bytes, starting
    /// at absolute stream offset `start`). `run_ends` says whether `data` reaches the end of
    /// the run. Returns `None` when more bytes are needed to decide.
    pub fn next_cut(&self, start: u64, data: &[u8], run_ends: bool) -> Option<usize> {
        if data.is_empty() {
            return None;
        }
        match self {
            Chunker::Fixed { size } => {
                let want = (size - start % size) as usize;
                if data.len() >= want {
                    Some(want)
                } else if run_ends {
                    Some(data.len())
                } else {
                    None
                }
            }
            Chunker::Cdc(c) => {
                if data.len() < c.max && !run_ends {
                    return None;
                }
                let (_, cut) = fastcdc::v2020::cut_gear(
                    data,
                    c.min,
                    c.avg,
                    c.max,
                    c.mask_s,
                    c.mask_l,
                    c.mask_s << 1,
                    c.mask_l << 1,
                    &c.gear,
                    &c.gear_ls,
                );
                Some(cut.max(1).min(data.len()))
            }
        }
    }
}

/// True when every byte is zero.
pub fn is_zero(data: &[u8]) -> bool {
    // Folding 4 KiB at a time vectorizes well and still exits early on data.
    data.chunks(4096).all(|c| c.iter().fold(0u8, |a, &b| a | b) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cut_all(ch: &Chunker, data: &[u8], step: usize) -> Vec<usize> {
        // Feed `step` bytes at a time, as the streaming splitter does.
        let mut cuts = Vec::new();
        let mut pos = 0;
        let mut avail = 0;
        while pos < data.len() {
            avail = (avail + step).min(data.len());
            while let Some(n) = ch.next_cut(pos as u64, &data[pos..avail], avail == data.len()) {
                cuts.push(n);
                pos += n;
                if pos == avail {
                    break;
                }
            }
        }
        cuts
    }

    #[test]
    fn parse_and_display() {
        assert_eq!(ChunkerParams::parse("fixed:1M").unwrap(), ChunkerParams::Fixed { size: 1 << 20 });
        let p = ChunkerParams::parse("fastcdc:256K:1M:4M").unwrap();
        assert_eq!(p.to_string(), "fastcdc:256K:1M:4M");
        assert!(ChunkerParams::parse("fixed:1000").is_err());
        assert!(ChunkerParams::parse("fastcdc:1M:256K:4M").is_err());
        assert!(ChunkerParams::parse("rabin:1M").is_err());
    }

    #[test]
    fn streaming_cuts_equal_bulk_cuts() {
        let mut data = vec![0u8; 5 << 20];
        let mut x = 0x1234_5678_9abc_def0u64;
        for b in data.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        for params in ["fixed:64K", "fastcdc:16K:64K:256K"] {
            let ch = Chunker::new(ChunkerParams::parse(params).unwrap(), 42).unwrap();
            let bulk = cut_all(&ch, &data, data.len());
            for step in [1000, 65536, 3 << 20] {
                assert_eq!(cut_all(&ch, &data, step), bulk, "{params} step {step}");
            }
            assert_eq!(bulk.iter().sum::<usize>(), data.len());
            assert!(bulk.iter().all(|&n| n <= ch_max(&ch)));
        }
    }

    fn ch_max(ch: &Chunker) -> usize {
        match ch {
            Chunker::Fixed { size } => *size as usize,
            Chunker::Cdc(c) => c.max,
        }
    }

    #[test]
    fn fixed_cuts_follow_absolute_offsets() {
        let ch = Chunker::new(ChunkerParams::Fixed { size: 8192 }, 0).unwrap();
        assert_eq!(ch.next_cut(4096, &[1u8; 10000], false), Some(4096));
        assert_eq!(ch.next_cut(8192, &[1u8; 100], false), None);
        assert_eq!(ch.next_cut(8192, &[1u8; 100], true), Some(100));
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 10000]));
        let mut v = vec![0u8; 10000];
        v[9999] = 1;
        assert!(!is_zero(&v));
        assert!(is_zero(&[]));
    }
}
