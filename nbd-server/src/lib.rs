//! An NBD server for any [`blockdev::BlockDev`]: the protocol codec as pure functions
//! ([`proto`]), and a tokio server around it ([`serve`]).
//!
//! Implemented (see `../shared/reference/nbd.md` and the protocol document): fixed newstyle
//! handshake with EXPORT_NAME, ABORT, LIST, INFO, GO (EXPORT, NAME, DESCRIPTION,
//! BLOCK_SIZE), STRUCTURED_REPLY, LIST/SET_META_CONTEXT with `base:allocation`; commands
//! READ (holes as OFFSET_HOLE), WRITE (+FUA), FLUSH, TRIM, WRITE_ZEROES (+FAST_ZERO), CACHE,
//! BLOCK_STATUS, DISC. Requests run concurrently and are answered out of order. STARTTLS with
//! rustls (X.509 certificate and key; TLS optional or required). Not implemented: extended
//! headers (answered ERR_UNSUP; every client falls back), TLS-PSK, client certificates.
//!
//! Threading: device I/O runs on tokio's blocking pool, so a `BlockDev` is called from many
//! threads at once (which the trait allows).

mod command;
pub mod export;
mod handshake;
pub mod proto;
mod server;
pub mod tls;
mod transmission;

pub use command::errno;
pub use export::{Export, Exports, StaticExports, MAX_PAYLOAD};
pub use server::{serve, serve_connection, Config, Event, EventSink, Listener};
pub use tls::Tls;
