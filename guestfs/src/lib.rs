//! Guest disk contents, read in user space over [`blockdev::BlockDev`]: partition tables
//! ([`partition`]), what each volume holds ([`probe`]), LVM2 ([`lvm`]), and the filesystems
//! themselves behind one [`fs::FileSystem`] trait (ext2/3/4 in [`ext4`], FAT12/16/32 in [`fat`], NTFS in [`ntfs`]); [`Guest`] ties
//! them together for one VM snapshot. Read-only; no `unsafe`; any bytes give a value or an [`Error`],
//! never a panic, and every allocation sized by on-disk values is capped.

mod error;
pub mod ext4;
pub mod fat;
pub mod fs;
mod guest;
mod layout;
pub mod lvm;
pub mod ntfs;
pub mod partition;
pub mod probe;
mod read;
mod rundev;

use std::sync::Arc;

use blockdev::{BlockDev, SliceDev};

pub use error::{Error, Result};
pub use guest::Guest;
pub use layout::{discover, Entry};
pub use partition::{read_table, Partition, PartitionType, Scheme, Table};
pub use probe::{probe, Content};
pub use rundev::{Run, RunDev};

/// A volume found on a disk: a partition, or the whole disk when it has no table.
pub struct Volume {
    /// `p1`, `p5`, ... for partitions; `disk` for a whole disk without a table.
    pub name: String,
    pub partition: Option<Partition>,
    pub content: Content,
    pub dev: SliceDev<Arc<dyn BlockDev>>,
}

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Volume({}, {}, {} bytes)", self.name, self.content.name(), self.dev.len())
    }
}

/// The volumes of a disk and anything worth telling about its table.
#[derive(Debug)]
pub struct Disk {
    pub table: Option<Table>,
    pub volumes: Vec<Volume>,
}

/// Read the partition table (if any) of `dev` and probe every volume.
pub fn open_disk(dev: Arc<dyn BlockDev>) -> Result<Disk> {
    let table = read_table(&*dev)?;
    let mut volumes = Vec::new();
    match &table {
        Some(t) => {
            for p in &t.partitions {
                let slice = SliceDev::new(dev.clone(), p.start, p.len).map_err(|e| Error::io("a partition", e))?;
                let content = probe(&slice)?;
                volumes.push(Volume {
                    name: format!("p{}", p.number),
                    partition: Some(p.clone()),
                    content,
                    dev: slice,
                });
            }
        }
        None => {
            let len = dev.len();
            let slice = SliceDev::new(dev, 0, len).map_err(|e| Error::io("the disk", e))?;
            let content = probe(&slice)?;
            volumes.push(Volume { name: "disk".into(), partition: None, content, dev: slice });
        }
    }
    Ok(Disk { table, volumes })
}
