//! End-to-end tests: the real `vmvault` binary against real files.

mod basic;
mod crash;
mod nbd;
mod util;
