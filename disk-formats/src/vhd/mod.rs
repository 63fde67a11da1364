//! Microsoft VHD: fixed, dynamic and differencing disks.
//!
//! [`footer`] and [`header`] are sans-I/O codecs of the two structures; [`write`] streams a
//! device out as a dynamic or fixed VHD; [`Vhd`] reads any VHD (with its parents) as a
//! device; [`open_chain`] finds parents on disk; [`FixedView`] shows a device as a fixed VHD
//! without copying it.

mod chain;
pub mod footer;
pub mod header;
mod read;
mod view;
pub mod write;

pub use chain::open_chain;
pub use footer::{DiskType, Footer, Geometry};
pub use header::DynHeader;
pub use read::{Layer, Vhd};
pub use view::FixedView;
pub use write::{write_blocks, write_dynamic, write_fixed, ParentRef};
