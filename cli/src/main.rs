//! The `vmvault` command line. All work happens in the `archive` crate; this file parses
//! arguments, asks for passphrases, shows progress and prints results.

mod browse;
mod commands;
mod export;
mod human;
mod import;
mod job;
mod mount;
mod overlay;
mod password;
mod progress;
mod prune;
mod restore_files;
mod serve;
mod stages;
mod xapi;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "vmvault",
    version,
    about = "Back up VM disks and memory into a deduplicated, compressed, encrypted repository"
)]
pub struct Cli {
    /// Repository folder.
    #[arg(long, short = 'r', env = "VMVAULT_REPO", global = true)]
    repo: Option<PathBuf>,
    /// Read the passphrase from this file (first line). Otherwise VMVAULT_PASSWORD, or a prompt.
    #[arg(long, global = true, env = "VMVAULT_PASSWORD_FILE")]
    password_file: Option<PathBuf>,
    /// Print machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// Minutes after which another process's unrefreshed lock counts as stale.
    #[arg(long, global = true, env = "VMVAULT_LOCK_STALE_MINUTES", default_value_t = 30)]
    lock_stale_minutes: u64,
    /// Never show progress bars.
    #[arg(long, short = 'q', global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create a repository.
    Init(commands::InitArgs),
    /// Back up disks (and optionally memory) of one VM as a new snapshot.
    Backup(commands::BackupArgs),
    /// List snapshots.
    Snapshots(commands::SnapshotsArgs),
    /// Remove snapshots by retention rules (restic's --keep-* semantics, per VM) or by id.
    Forget(commands::ForgetArgs),
    /// Restore one stream of a snapshot to a file or block device (sparse).
    Restore(commands::RestoreArgs),
    /// Write a snapshot's disk as raw, VHD, qcow2 or VMDK, or the VM as OVA or XVA.
    Export(export::ExportArgs),
    /// Import VHD files (with their differencing chains) or an XVA as a new snapshot.
    Import(import::ImportArgs),
    /// Write one stream of a snapshot, or a file inside its disks, to standard output.
    Cat(commands::CatArgs),
    /// List disks, volumes and files inside a snapshot (ext2/3/4, also on LVM), without mounting.
    Ls(browse::LsArgs),
    /// Mount the repository read-only through FUSE: VMs, snapshots, disk images, guest files.
    Mount(mount::MountArgs),
    /// Copy files or folders out of a snapshot's guest filesystems, keeping their metadata.
    RestoreFiles(restore_files::RestoreFilesArgs),
    /// Verify the repository's structure, and with --read-data every byte.
    Check(commands::CheckArgs),
    /// Delete packs and stream maps no snapshot needs, repack mostly unused packs; safe
    /// while backups run.
    Prune(prune::PruneArgs),
    /// Logical versus stored bytes, dedup and compression ratios.
    Stats,
    /// Manage the key files (passphrases) of a repository.
    #[command(subcommand)]
    Key(commands::KeyCommand),
    /// Remove stale locks (dead processes, or not refreshed for a long time).
    Unlock(commands::UnlockArgs),
    /// Serve snapshots over NBD (read-only, or writable through copy-on-write overlays).
    Serve(serve::ServeArgs),
    /// List, commit (as a new snapshot) or discard the overlays of `serve --writable`.
    #[command(subcommand)]
    Overlay(overlay::OverlayCommand),
    /// Back up VMs from a XenServer / XCP-ng pool, or restore one to a pool.
    #[command(subcommand)]
    Xapi(xapi::XapiCommand),
    /// Run backup jobs from a job file (pool, selection, mode, limits, retention) with run
    /// logs, or show past runs.
    #[command(subcommand)]
    Job(job::JobCommand),
    /// Measure each backup pipeline stage alone (chunk, hash, compress, encrypt).
    BenchStages(stages::StagesArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match commands::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if e.downcast_ref::<commands::BrokenPipe>().is_some() {
                return ExitCode::SUCCESS;
            }
            eprintln!("vmvault: error: {e:#}");
            if let Some(hint) = commands::hint(&e) {
                eprintln!("hint: {hint}");
            }
            ExitCode::FAILURE
        }
    }
}
