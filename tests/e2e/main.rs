//! End-to-end tests: the real `vmvault` binary against real files.

mod basic;
mod boot;
mod browse;
mod crash;
mod forget;
mod formats;
mod mount;
mod nbd;
mod prune;
mod util;
mod xapi;
