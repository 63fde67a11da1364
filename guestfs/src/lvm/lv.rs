//! A logical volume as a [`BlockDev`]: byte ranges mapped through linear and striped
//! segments onto the physical volumes' devices.

use std::io;
use std::sync::Arc;

use blockdev::{check_range, BlockDev, Run};

use super::vg::Segment;

/// One mapped segment: bytes `start..end` of the LV.
struct Mapped {
    start: u64,
    end: u64,
    stripe_size: u64,
    /// Per stripe: the PV device and the byte where this segment's extents begin on it.
    stripes: Vec<(Arc<dyn BlockDev>, u64)>,
}

/// A readable logical volume. `Send + Sync` like its PV devices.
pub struct LvDev {
    name: String,
    len: u64,
    segments: Vec<Mapped>,
}

impl std::fmt::Debug for LvDev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LvDev({}, {} bytes, {} segments)", self.name, self.len, self.segments.len())
    }
}

impl LvDev {
    /// Map `segments` (checked to tile the LV) onto `pvs` (device and pe_start per PV index;
    /// `None` for a PV that is not present, which no segment may use).
    pub(crate) fn new(
        name: &str,
        extent_size: u64,
        segments: &[Segment],
        pvs: &[Option<(Arc<dyn BlockDev>, u64)>],
    ) -> io::Result<Self> {
        let bad = |m: String| io::Error::new(io::ErrorKind::InvalidData, format!("LV {name}: {m}"));
        let mut mapped = Vec::new();
        for s in segments {
            let start = s.start_extent.checked_mul(extent_size).ok_or_else(|| bad("size overflows".into()))?;
            let len = s.extent_count.checked_mul(extent_size).ok_or_else(|| bad("size overflows".into()))?;
            let per_stripe = len / s.stripes.len() as u64;
            let mut stripes = Vec::new();
            for &(pv, pe) in &s.stripes {
                let (dev, pe_start) =
                    pvs.get(pv).and_then(Option::as_ref).ok_or_else(|| bad(format!("PV #{pv} missing")))?;
                let at = pe.checked_mul(extent_size).and_then(|b| b.checked_add(*pe_start));
                let at = at.ok_or_else(|| bad("extent offset overflows".into()))?;
                check_range(dev.len(), at, per_stripe).map_err(|_| bad(format!("extents past the end of PV #{pv}")))?;
                stripes.push((dev.clone(), at));
            }
            mapped.push(Mapped { start, end: start + len, stripe_size: s.stripe_size, stripes });
        }
        let len = mapped.last().map_or(0, |m| m.end);
        Ok(Self { name: name.to_owned(), len, segments: mapped })
    }

    /// Where byte `x` of the LV lives: (device, byte on it, bytes contiguous from there).
    fn locate(&self, x: u64) -> (&Arc<dyn BlockDev>, u64, u64) {
        let i = self.segments.partition_point(|m| m.end <= x);
        let m = &self.segments[i];
        let off = x - m.start;
        if m.stripes.len() == 1 {
            let (dev, at) = &m.stripes[0];
            return (dev, at + off, m.end - x);
        }
        let n = m.stripes.len() as u64;
        let (chunk, within) = (off / m.stripe_size, off % m.stripe_size);
        let (dev, at) = &m.stripes[(chunk % n) as usize];
        (dev, at + (chunk / n) * m.stripe_size + within, m.stripe_size - within)
    }
}

impl BlockDev for LvDev {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        check_range(self.len, offset, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let (dev, at, run) = self.locate(offset + done as u64);
            let n = run.min((buf.len() - done) as u64) as usize;
            dev.read_at(at, &mut buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    fn allocation(&self, offset: u64, max_len: u64) -> io::Result<Run> {
        check_range(self.len, offset, 1)?;
        let (dev, at, run) = self.locate(offset);
        dev.allocation(at, run.min(max_len).min(self.len - offset))
    }
}
