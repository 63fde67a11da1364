//! Volume groups from metadata text: extent size, physical volumes, logical volumes and
//! their segments. Linear and striped segments are mapped; other kinds are named as
//! unsupported.

use super::config::{Section, Value};
use crate::error::{Error, Result};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PhysicalVolume {
    /// The name inside the metadata (`pv0`).
    pub name: String,
    /// UUID without dashes, as in the label.
    pub uuid: String,
    /// Where extents start, in bytes from the start of the PV.
    pub pe_start: u64,
    pub pe_count: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    pub start_extent: u64,
    pub extent_count: u64,
    /// Bytes per stripe chunk (0 for one stripe).
    pub stripe_size: u64,
    /// (index into the VG's PVs, first physical extent) per stripe.
    pub stripes: Vec<(usize, u64)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogicalVolume {
    pub name: String,
    /// Size in extents.
    pub extents: u64,
    /// The segments, or why this LV cannot be read.
    pub layout: std::result::Result<Vec<Segment>, String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeGroup {
    pub name: String,
    pub id: String,
    pub seqno: i64,
    /// Bytes per extent.
    pub extent_size: u64,
    pub pvs: Vec<PhysicalVolume>,
    pub lvs: Vec<LogicalVolume>,
}

fn need<T>(v: Option<T>, what: &str, vg: &str) -> Result<T> {
    v.ok_or_else(|| Error::corrupt("LVM metadata", 0, format!("VG {vg}: missing or malformed {what}")))
}

fn non_negative(v: i64, what: &str, vg: &str) -> Result<u64> {
    u64::try_from(v).map_err(|_| Error::corrupt("LVM metadata", 0, format!("VG {vg}: negative {what}")))
}

/// The VG described by a metadata text (its one top-level section).
pub fn volume_group(text: &Section) -> Result<VolumeGroup> {
    let (name, s) = need(text.sections().next(), "volume group section", "?")?;
    let extent_sectors = non_negative(need(s.int("extent_size"), "extent_size", name)?, "extent_size", name)?;
    if extent_sectors == 0 || extent_sectors > 1 << 32 {
        return Err(Error::corrupt("LVM metadata", 0, format!("VG {name}: extent_size {extent_sectors}")));
    }
    let mut pvs = Vec::new();
    for (pv_name, pv) in need(s.section("physical_volumes"), "physical_volumes", name)?.sections() {
        let pe_start = non_negative(need(pv.int("pe_start"), "pe_start", name)?, "pe_start", name)?;
        pvs.push(PhysicalVolume {
            name: pv_name.to_owned(),
            uuid: need(pv.str("id"), "PV id", name)?.replace('-', ""),
            pe_start: pe_start
                .checked_mul(512)
                .ok_or_else(|| Error::corrupt("LVM metadata", 0, "pe_start overflows"))?,
            pe_count: non_negative(pv.int("pe_count").unwrap_or(0), "pe_count", name)?,
        });
    }
    let mut lvs = Vec::new();
    if let Some(l) = s.section("logical_volumes") {
        for (lv_name, lv) in l.sections() {
            lvs.push(logical_volume(lv_name, lv, &pvs));
        }
    }
    Ok(VolumeGroup {
        name: name.to_owned(),
        id: s.str("id").unwrap_or_default().to_owned(),
        seqno: s.int("seqno").unwrap_or(0),
        extent_size: extent_sectors * 512,
        pvs,
        lvs,
    })
}

fn logical_volume(name: &str, lv: &Section, pvs: &[PhysicalVolume]) -> LogicalVolume {
    let mut segments = Vec::new();
    let mut layout = Ok(());
    for (key, seg) in lv.sections().filter(|(k, _)| k.starts_with("segment")) {
        match segment(seg, pvs) {
            Ok(s) => segments.push(s),
            Err(why) => {
                layout = Err(format!("{key}: {why}"));
                break;
            }
        }
    }
    segments.sort_by_key(|s| s.start_extent);
    let extents = segments.iter().map(|s| s.extent_count).sum();
    // Segments must tile the LV from extent 0 without gaps.
    let mut next = 0;
    for s in &segments {
        if layout.is_ok() && s.start_extent != next {
            layout = Err(format!("segments leave a gap or overlap at extent {next}"));
        }
        next = s.start_extent.saturating_add(s.extent_count);
    }
    LogicalVolume { name: name.to_owned(), extents, layout: layout.map(|()| segments) }
}

fn segment(seg: &Section, pvs: &[PhysicalVolume]) -> std::result::Result<Segment, String> {
    let kind = seg.str("type").unwrap_or("?");
    if kind != "striped" {
        return Err(format!("segment type {kind:?} is not supported (linear and striped are)"));
    }
    let int = |k: &str| seg.int(k).and_then(|v| u64::try_from(v).ok()).ok_or(format!("bad {k}"));
    let (start_extent, extent_count, count) = (int("start_extent")?, int("extent_count")?, int("stripe_count")?);
    let stripe_size = if count > 1 { int("stripe_size")? * 512 } else { 0 };
    let list = seg.list("stripes").ok_or("no stripes")?;
    if count == 0 || list.len() as u64 != 2 * count || (count > 1 && (stripe_size == 0 || extent_count % count != 0)) {
        return Err(format!("{count} stripes do not match the stripe list"));
    }
    let mut stripes = Vec::new();
    for pair in list.chunks_exact(2) {
        match (&pair[0], &pair[1]) {
            (Value::Str(pv), Value::Int(pe)) if *pe >= 0 => {
                let i = pvs.iter().position(|p| p.name == *pv).ok_or(format!("unknown PV {pv}"))?;
                stripes.push((i, *pe as u64));
            }
            _ => return Err("malformed stripe list".into()),
        }
    }
    Ok(Segment { start_extent, extent_count, stripe_size, stripes })
}
