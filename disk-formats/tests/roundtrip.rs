//! Writers and readers agree on random sparse disks: dynamic and fixed VHD through `Vhd`,
//! XVA through `Xva` (with synthesized records); reads of odd sizes agree with the whole.

mod common;

use std::sync::Arc;

use blockdev::{read_all, BlockDev, MemDev};
use common::{noise, Pieces};
use disk_formats::out::Stream;
use disk_formats::vhd::{self, Vhd};
use disk_formats::xva::objects::{package, StreamSpec};
use disk_formats::xva::{self, Xva};
use proptest::prelude::*;

fn disk(sectors: u64, pieces: Vec<(u64, usize, u64)>) -> Pieces {
    let len = sectors * 512;
    let mut out: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut next = 0;
    for (at, n, seed) in pieces {
        let at = (at % len).max(next);
        let n = (n as u64).min(len - at) as usize;
        if n == 0 {
            continue;
        }
        out.push((at, noise(seed, n)));
        next = at + n as u64;
    }
    Pieces { len, pieces: out }
}

fn pieces() -> impl Strategy<Value = Pieces> {
    (1u64..40_000, prop::collection::vec((0u64..1 << 25, 1usize..3_000_000, any::<u64>()), 0..6))
        .prop_map(|(s, p)| disk(s, p))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn vhd_writers_and_reader_agree(d in pieces()) {
        let want = d.to_vec();
        for fixed in [false, true] {
            let mut bytes = Vec::new();
            let mut out = Stream(&mut bytes);
            if fixed { vhd::write_fixed(&d, &mut out).unwrap(); } else { vhd::write_dynamic(&d, &mut out).unwrap(); }
            let v = Vhd::open(Arc::new(MemDev::new(bytes))).unwrap();
            prop_assert_eq!(&read_all(&v).unwrap(), &want);
            let mut b = vec![0u8; 3 * 1024 + 7];
            let off = (d.len / 3).min(d.len.saturating_sub(b.len() as u64));
            let n = b.len().min(d.len as usize);
            v.read_at(off, &mut b[..n]).unwrap();
            prop_assert_eq!(&b[..n], &want[off as usize..off as usize + n]);
        }
    }

    #[test]
    fn xva_writer_and_reader_agree(a in pieces(), m in pieces()) {
        let specs = [
            StreamSpec { name: "xvda".into(), size: a.len, memory: false },
            StreamSpec { name: "xvdb".into(), size: m.len, memory: false },
        ];
        let p = package("vm", None, &specs);
        let devs: Vec<(String, &dyn BlockDev)> = p.vdis.iter().map(|(id, s)| {
            (id.clone(), if s == "xvda" { &a as &dyn BlockDev } else { &m as &dyn BlockDev })
        }).collect();
        let mut bytes = Vec::new();
        let n = xva::write(&p.ova, &devs, &mut bytes).unwrap();
        prop_assert_eq!(n, bytes.len() as u64);
        let x = Xva::open(Arc::new(MemDev::new(bytes))).unwrap();
        prop_assert_eq!(&x.ova, &p.ova);
        for (id, s) in &p.vdis {
            let want = if s == "xvda" { a.to_vec() } else { m.to_vec() };
            prop_assert_eq!(read_all(&x.disks[id]).unwrap(), want);
        }
    }
}
