//! The read cache returns the base's bytes for every read, stores only data blocks, respects
//! its size limit, and leaves no file behind.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use blockdev::{read_all, BlockDev, FileDev, ReadCache, Run};
use proptest::prelude::*;

/// A sparse file base (so it reports holes) that counts its reads.
struct Counting {
    inner: FileDev,
    reads: AtomicUsize,
}

impl BlockDev for Counting {
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.inner.read_at(offset, buf)
    }
    fn allocation(&self, offset: u64, max_len: u64) -> std::io::Result<Run> {
        self.inner.allocation(offset, max_len)
    }
}

const BLOCK: u64 = 64 * 1024;
const LEN: u64 = 20 * BLOCK + 1234;

fn base(dir: &std::path::Path) -> (Counting, Vec<u8>) {
    let path = dir.join("base.img");
    let mut content = vec![0u8; LEN as usize];
    for (i, b) in content.iter_mut().enumerate() {
        // Data in blocks 0-4 and 12-20 (with a short tail); a hole in between.
        let blk = i as u64 / BLOCK;
        if blk < 5 || blk >= 12 {
            *b = (i % 251) as u8 + 1;
        }
    }
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(LEN).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&content[..(5 * BLOCK) as usize], 0).unwrap();
    f.write_all_at(&content[(12 * BLOCK) as usize..], 12 * BLOCK).unwrap();
    (Counting { inner: FileDev::open(&path).unwrap(), reads: AtomicUsize::new(0) }, content)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]
    #[test]
    fn every_read_equals_the_base(reads in proptest::collection::vec((0..LEN, 1..300_000u64), 1..30)) {
        let dir = tempfile::tempdir().unwrap();
        let (b, content) = base(dir.path());
        let cache = ReadCache::new(b, dir.path(), BLOCK, u64::MAX).unwrap();
        for (off, len) in reads {
            let len = len.min(LEN - off) as usize;
            let mut buf = vec![0xEEu8; len];
            cache.read_at(off, &mut buf).unwrap();
            prop_assert_eq!(&buf[..], &content[off as usize..off as usize + len]);
        }
        prop_assert_eq!(read_all(&cache).unwrap(), content);
    }
}

#[test]
fn second_reads_come_from_the_cache_and_holes_are_not_stored() {
    let dir = tempfile::tempdir().unwrap();
    let (b, content) = base(dir.path());
    let cache = ReadCache::new(b, dir.path(), BLOCK, u64::MAX).unwrap();
    assert_eq!(read_all(&cache).unwrap(), content);
    cache.wait_idle();
    let after_first = cache.base().reads.load(Ordering::Relaxed);
    assert!(after_first > 0);
    // Blocks 0-4 and 12-20: 14 blocks of data are cached, the hole is not.
    assert_eq!(cache.cached_bytes(), 14 * BLOCK);
    for off in [0, 3 * BLOCK + 17, 15 * BLOCK, LEN - 100] {
        let mut buf = vec![0u8; 100];
        cache.read_at(off, &mut buf).unwrap();
        assert_eq!(buf, content[off as usize..off as usize + 100]);
    }
    let mut hole = vec![1u8; 4096];
    cache.read_at(7 * BLOCK, &mut hole).unwrap();
    assert!(hole.iter().all(|&x| x == 0));
    assert_eq!(cache.base().reads.load(Ordering::Relaxed), after_first, "a cached block was read from the base again");
    // Nothing named is left in the folder: only the base image.
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("base.img")]);
}

#[test]
fn the_size_limit_holds_and_reads_stay_correct_beyond_it() {
    let dir = tempfile::tempdir().unwrap();
    let (b, content) = base(dir.path());
    let cache = ReadCache::new(b, dir.path(), BLOCK, 3 * BLOCK).unwrap();
    assert_eq!(read_all(&cache).unwrap(), content);
    cache.wait_idle();
    assert_eq!(read_all(&cache).unwrap(), content);
    cache.wait_idle();
    assert!(cache.cached_bytes() <= 3 * BLOCK, "{}", cache.cached_bytes());
}

#[test]
fn concurrent_readers_see_the_base() {
    let dir = tempfile::tempdir().unwrap();
    let (b, content) = base(dir.path());
    let cache = Arc::new(ReadCache::new(b, dir.path(), BLOCK, u64::MAX).unwrap());
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let (cache, content) = (cache.clone(), &content);
            s.spawn(move || {
                for i in 0..200u64 {
                    let off = (i * 7919 + t * 104_729) % (LEN - 5000);
                    let mut buf = vec![0u8; 5000];
                    cache.read_at(off, &mut buf).unwrap();
                    assert_eq!(buf, content[off as usize..off as usize + 5000]);
                }
            });
        }
    });
}

#[test]
fn bad_block_sizes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (b, _) = base(dir.path());
    assert!(ReadCache::new(b, dir.path(), 3000, 1).is_err());
}
