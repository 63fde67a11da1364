//! Everything readable on a VM's disks, named the way the browse tree shows it: per disk,
//! `p1`, `p2`, … for partitions (or `disk` for a whole-disk volume), and `VG-LV` for each
//! logical volume, listed under the disk holding the VG's first PV. PVs themselves are not
//! listed again; LVs that cannot be read are listed with the reason.

use std::sync::Arc;

use blockdev::BlockDev;

use crate::error::Result;
use crate::probe::{probe, Content};
use crate::{lvm, open_disk};

/// One browsable volume.
pub struct Entry {
    /// The disk it is listed under (`xvda`).
    pub disk: String,
    /// Its name under the disk: `p1`, `disk`, `vg0-root`.
    pub name: String,
    /// What it holds, or why it cannot be read.
    pub content: std::result::Result<Content, String>,
    pub dev: Option<Arc<dyn BlockDev>>,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match &self.content {
            Ok(c) => c.name(),
            Err(e) => format!("unreadable: {e}"),
        };
        write!(f, "{}/{} ({what})", self.disk, self.name)
    }
}

/// Partition tables, volumes and LVM of the given disks, in disk order.
pub fn discover(disks: &[(String, Arc<dyn BlockDev>)]) -> Result<Vec<Entry>> {
    let mut entries = Vec::new();
    let mut pvs: Vec<(String, Arc<dyn BlockDev>)> = Vec::new();
    for (disk, dev) in disks {
        for v in open_disk(dev.clone())?.volumes {
            let vdev: Arc<dyn BlockDev> = Arc::new(v.dev);
            if v.content == Content::LvmPv {
                pvs.push((disk.clone(), vdev));
                continue;
            }
            entries.push(Entry { disk: disk.clone(), name: v.name, content: Ok(v.content), dev: Some(vdev) });
        }
    }
    let devices: Vec<Arc<dyn BlockDev>> = pvs.iter().map(|(_, d)| d.clone()).collect();
    for g in lvm::scan(&devices)? {
        // Listed under the disk of the VG's first PV that is present.
        let home = g
            .devices
            .iter()
            .flatten()
            .find_map(|d| pvs.iter().find(|(_, p)| Arc::ptr_eq(p, d)).map(|(disk, _)| disk.clone()))
            .unwrap_or_default();
        for lv in &g.vg.lvs {
            let name = format!("{}-{}", g.vg.name, lv.name);
            let (content, dev) = match g.open(&lv.name) {
                Ok(d) => {
                    let d: Arc<dyn BlockDev> = Arc::new(d);
                    (probe(&*d).map_err(|e| e.to_string()), Some(d))
                }
                Err(e) => (Err(e.to_string()), None),
            };
            entries.push(Entry { disk: home.clone(), name, content, dev });
        }
    }
    Ok(entries)
}
