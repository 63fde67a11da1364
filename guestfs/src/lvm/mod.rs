//! LVM2 read without the kernel: PV labels, the metadata text, volume groups spanning
//! several disks, and logical volumes as devices ([`LvDev`]). Linear and striped segments
//! are read; thin pools, mirrors, RAID, snapshots and caches are listed with the reason they
//! cannot be.

mod config;
mod lv;
mod pv;
mod vg;

use std::sync::Arc;

use blockdev::BlockDev;

pub use config::{parse, Section, Value};
pub use lv::LvDev;
pub use pv::{read_label, read_metadata, PvLabel};
pub use vg::{volume_group, LogicalVolume, PhysicalVolume, Segment, VolumeGroup};

use crate::error::{Error, Result};

/// A volume group and the devices found for its PVs (`None` for a PV not among the scanned
/// devices: its LVs cannot be read).
pub struct Group {
    pub vg: VolumeGroup,
    pub devices: Vec<Option<Arc<dyn BlockDev>>>,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let found = self.devices.iter().filter(|d| d.is_some()).count();
        write!(f, "Group({}, {} LVs, {found}/{} PVs)", self.vg.name, self.vg.lvs.len(), self.devices.len())
    }
}

impl Group {
    /// The logical volume `name` as a device.
    pub fn open(&self, name: &str) -> Result<LvDev> {
        let lv = self
            .vg
            .lvs
            .iter()
            .find(|l| l.name == name)
            .ok_or_else(|| Error::NotFound(format!("LV {name} in VG {}", self.vg.name)))?;
        let segments = lv.layout.as_ref().map_err(|why| Error::Unsupported(format!("LV {name}: {why}")))?;
        let used = |i: usize| segments.iter().any(|s| s.stripes.iter().any(|&(p, _)| p == i));
        if let Some((_, pv)) = self.vg.pvs.iter().enumerate().find(|&(i, _)| used(i) && self.devices[i].is_none()) {
            return Err(Error::Unsupported(format!(
                "LV {name} needs PV {} ({}), which is not on any disk of this snapshot",
                pv.name, pv.uuid
            )));
        }
        let pvs: Vec<_> =
            self.vg.pvs.iter().zip(&self.devices).map(|(pv, dev)| dev.clone().map(|d| (d, pv.pe_start))).collect();
        LvDev::new(name, self.vg.extent_size, segments, &pvs).map_err(|e| Error::io(format!("LV {name}"), e))
    }
}

/// Find the volume groups whose PVs are among `devs` (partitions or whole disks). PVs of
/// one VG are joined by the VG id; the newest metadata (highest seqno) wins.
pub fn scan(devs: &[Arc<dyn BlockDev>]) -> Result<Vec<Group>> {
    let mut found: Vec<(PvLabel, VolumeGroup, Arc<dyn BlockDev>)> = Vec::new();
    for dev in devs {
        let Some(label) = read_label(&**dev)? else { continue };
        let Some(text) = read_metadata(&**dev, &label)? else { continue };
        let vg = vg::volume_group(&parse(&text)?)?;
        found.push((label, vg, dev.clone()));
    }
    let mut groups: Vec<Group> = Vec::new();
    for (_, vg, _) in &found {
        match groups.iter_mut().find(|g| g.vg.id == vg.id) {
            Some(g) if g.vg.seqno >= vg.seqno => {}
            Some(g) => g.vg = vg.clone(),
            None => groups.push(Group { vg: vg.clone(), devices: Vec::new() }),
        }
    }
    for g in &mut groups {
        g.devices =
            g.vg.pvs
                .iter()
                .map(|pv| found.iter().find(|(l, _, _)| l.uuid == pv.uuid).map(|(_, _, d)| d.clone()))
                .collect();
    }
    Ok(groups)
}
