//! One VM's disks as a browsable tree: the disks, every volume found on them (partitions,
//! whole disks, logical volumes), and each volume's filesystem opened on first use and then
//! shared. The CLI (`ls`, `cat`, `restore-files`) and the FUSE view both walk this.

use std::sync::{Arc, OnceLock};

use blockdev::BlockDev;

use crate::error::{Error, Result};
use crate::fs::{self, FileSystem};
use crate::layout::{discover, Entry};

/// The disks and volumes of one snapshot.
pub struct Guest {
    pub disks: Vec<(String, Arc<dyn BlockDev>)>,
    /// Every volume, in disk order.
    pub volumes: Vec<Entry>,
    /// The filesystem of each volume, opened on first use (the error is kept too, so a
    /// damaged volume is not re-read on every access).
    filesystems: Vec<OnceLock<std::result::Result<Arc<dyn FileSystem>, String>>>,
}

impl std::fmt::Debug for Guest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guest").field("volumes", &self.volumes).finish_non_exhaustive()
    }
}

impl Guest {
    /// Read the partition tables and LVM metadata of `disks` (nothing of the filesystems yet).
    pub fn open(disks: Vec<(String, Arc<dyn BlockDev>)>) -> Result<Self> {
        let volumes = discover(&disks)?;
        let filesystems = volumes.iter().map(|_| OnceLock::new()).collect();
        Ok(Self { disks, volumes, filesystems })
    }

    /// The volumes listed under `disk`, with their index.
    pub fn volumes_of<'a>(&'a self, disk: &'a str) -> impl Iterator<Item = (usize, &'a Entry)> + 'a {
        self.volumes.iter().enumerate().filter(move |(_, v)| v.disk == disk)
    }

    /// The index of volume `name` under `disk`.
    pub fn volume(&self, disk: &str, name: &str) -> Option<usize> {
        self.volumes_of(disk).find(|(_, v)| v.name == name).map(|(i, _)| i)
    }

    /// Whether volume `index` holds a filesystem vmvault can read (by its magic).
    pub fn browsable(&self, index: usize) -> bool {
        self.volumes.get(index).is_some_and(|v| v.content.as_ref().is_ok_and(fs::readable))
    }

    /// The filesystem of volume `index`, opened once.
    pub fn filesystem(&self, index: usize) -> Result<Arc<dyn FileSystem>> {
        let v = self.volumes.get(index).ok_or_else(|| Error::NotFound(format!("volume {index}")))?;
        let slot = &self.filesystems[index];
        let opened = slot.get_or_init(|| {
            let content = v.content.as_ref().map_err(|why| format!("{}/{}: {why}", v.disk, v.name))?;
            let dev = v.dev.clone().ok_or_else(|| format!("{}/{} cannot be read", v.disk, v.name))?;
            fs::open(content, dev).map_err(|e| format!("{}/{}: {e}", v.disk, v.name))
        });
        opened.clone().map_err(Error::Unsupported)
    }
}
