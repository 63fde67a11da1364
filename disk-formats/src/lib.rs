#![recursion_limit = "256"]
//! Disk image and VM package formats over [`blockdev::BlockDev`]: what `vmvault export`
//! writes and `vmvault import` reads.
//!
//! - [`vhd`]: VHD fixed/dynamic writers, a reader for fixed, dynamic and differencing chains,
//!   and a fixed-VHD view for the FUSE mount.
//! - [`qcow2`]: a streaming qcow2 v3 writer.
//! - [`vmdk`]: a streaming stream-optimized VMDK writer.
//! - [`ova`]: OVF descriptor + SHA-256 manifest + stream-optimized VMDKs in a tar.
//! - [`xva`]: XenServer / XCP-ng packages (`ova.xml` + checksummed 1 MiB chunks): writer and
//!   checking reader.
//!
//! Writers stream front to back into an [`out::Output`] and take time proportional to the
//! disk's data: they ask the device for its zero extents ([`BlockDev::allocation`]) and leave
//! those unallocated. Readers check every structure when they open a file, so bad input is a
//! clear [`Error`], never a panic or wrong bytes.
//!
//! [`BlockDev::allocation`]: blockdev::BlockDev::allocation

mod error;
pub mod out;
pub mod ova;
pub mod qcow2;
mod tarball;
pub mod vhd;
pub mod vmdk;
pub mod xva;

pub use error::{Error, Result};
