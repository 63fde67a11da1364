//! Talking to XenServer / XCP-ng: the API client, the records it returns, and disk access.

pub mod client;
pub mod records;
pub mod tls;
pub mod wire;

pub use client::{Client, Connect};
pub use tls::Trust;
pub use wire::Protocol;
