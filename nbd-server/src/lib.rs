//! An NBD server for any [`blockdev::BlockDev`]: the protocol codec as pure functions
//! ([`proto`]), and a tokio server around it ([`serve`]).
//!
//! Implemented (see `../shared/reference/nbd.md` and the protocol document): fixed newstyle
//! handshake with EXPORT_NAME, ABORT, LIST, INFO, GO (EXPORT, NAME, DESCRIPTION,
//! BLOCK_SIZE), STRUCTURED_REPLY, LIST/SET_META_CONTEXT with `base:allocation`; commands
//! READ (holes as OFFSET_HOLE), WRITE (+FUA), FLUSH, TRIM, WRITE_ZEROES (+FAST_ZERO), CACHE,
//! BLOCK_STATUS, DISC. Requests run concurrently and are answered out of order. Not (yet):
//! STARTTLS (answered ERR_POLICY), extended headers (ERR_UNSUP, clients fall back).
//!
//! Threading: device I/O runs on tokio's blocking pool, so a `BlockDev` is called from many
//! threads at once (which the trait allows).

mod command;
pub mod export;
mod handshake;
pub mod proto;
mod server;
mod transmission;

pub use command::errno;
pub use export::{Export, Exports, StaticExports, MAX_PAYLOAD};
pub use server::{serve, serve_connection, Config, Event, EventSink, Listener};
