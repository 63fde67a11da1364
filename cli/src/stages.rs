//! `vmvault bench-stages`: the throughput of each backup pipeline stage alone, on one
//! thread, so the bottleneck is visible. Input: the data regions of a file, or generated
//! half-compressible data.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use archive::chunker::{is_zero, Chunker, ChunkerParams};
use archive::crypto::MasterKey;
use clap::Args;
use hmac::Mac;

#[derive(Args, Debug)]
pub struct StagesArgs {
    /// Take the sample from this file (its non-zero 1 MiB blocks); default: generated data.
    #[arg(long)]
    input: Option<PathBuf>,
    /// Sample size in MiB.
    #[arg(long, default_value_t = 256)]
    size_mib: usize,
}

fn sample(a: &StagesArgs) -> Result<Vec<u8>> {
    let want = a.size_mib << 20;
    let mut out = Vec::with_capacity(want);
    if let Some(p) = &a.input {
        use std::io::Read;
        let mut f = std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?;
        let mut block = vec![0u8; 1 << 20];
        while out.len() < want {
            let n = f.read(&mut block)?;
            if n == 0 {
                break;
            }
            if !is_zero(&block[..n]) {
                out.extend_from_slice(&block[..n]);
            }
        }
        out.truncate(want);
    } else {
        // Text-like half: words from a small alphabet; random half: xorshift output.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        while out.len() < want {
            for _ in 0..4096 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                out.extend_from_slice(&x.to_le_bytes());
            }
            for i in 0..32768u32 {
                out.push(b"etaoin shrdlu\n"[(i.wrapping_mul(2654435761) >> 28) as usize % 14]);
            }
        }
        out.truncate(want);
    }
    Ok(out)
}

fn measure(name: &str, bytes: usize, f: impl FnOnce()) -> (String, f64) {
    let t = Instant::now();
    f();
    let mbps = bytes as f64 / t.elapsed().as_secs_f64() / 1e6;
    (name.to_string(), mbps)
}

pub fn run(a: StagesArgs, json: bool) -> Result<()> {
    let data = sample(&a)?;
    let n = data.len();
    let key = MasterKey::from_bytes(&[7u8; 64]);
    let sealer = key.sealer()?;
    let mut results = Vec::new();
    for spec in ["fixed:1M", "fastcdc:64K:256K:1M", "fastcdc:256K:1M:4M"] {
        let ch = Chunker::new(ChunkerParams::parse(spec)?, key.gear_seed())?;
        results.push(measure(&format!("chunk {spec}"), n, || {
            let mut pos = 0;
            while let Some(c) = ch.next_cut(pos as u64, &data[pos..], true) {
                pos += c;
            }
        }));
    }
    let pieces: Vec<&[u8]> = data.chunks(1 << 20).collect();
    results.push(measure("hash blake3-keyed", n, || {
        for p in &pieces {
            std::hint::black_box(key.chunk_id(p));
        }
    }));
    results.push(measure("hash hmac-sha256", n, || {
        for p in &pieces {
            let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(&[7u8; 32]).expect("any key length");
            m.update(p);
            std::hint::black_box(m.finalize());
        }
    }));
    let mut compressed = Vec::new();
    for level in [1, 3] {
        let mut out = Vec::new();
        let r = measure(&format!("compress zstd-{level}"), n, || {
            out = pieces.iter().map(|p| zstd::bulk::compress(p, level).unwrap_or_default()).collect::<Vec<_>>();
        });
        let ratio = n as f64 / out.iter().map(Vec::len).sum::<usize>().max(1) as f64;
        results.push((format!("{} (ratio {ratio:.2})", r.0), r.1));
        compressed = out;
    }
    results.push(measure("decompress zstd-3", n, || {
        for c in &compressed {
            std::hint::black_box(zstd::bulk::decompress(c, 1 << 20).unwrap_or_default());
        }
    }));
    results.push(measure("encrypt aes-256-gcm", n, || {
        for p in &pieces {
            std::hint::black_box(sealer.seal(b"aad", p).unwrap_or_default());
        }
    }));
    if json {
        let v: serde_json::Map<String, serde_json::Value> =
            results.iter().map(|(k, v)| (k.clone(), serde_json::json!((v * 10.0).round() / 10.0))).collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "one thread, {} MiB sample{}",
            n >> 20,
            a.input.as_ref().map(|p| format!(" from {}", p.display())).unwrap_or_default()
        );
        for (k, v) in &results {
            println!("{k:<40} {v:>9.1} MB/s");
        }
    }
    Ok(())
}
