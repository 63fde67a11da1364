//! `vmvault mount REPO MOUNTPOINT`: the repository as a read-only filesystem through FUSE
//! (layout in `mount::tree`), in the foreground until Ctrl-C, SIGTERM or `fusermount3 -u`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use archive::reader::RepoReader;
use clap::Args;

use crate::commands::Ctx;

#[derive(Args, Debug)]
pub struct MountArgs {
    /// An empty folder to mount on.
    mountpoint: PathBuf,
    /// Decompressed-chunk cache in memory, in MiB (file contents are also kept in the
    /// kernel's page cache, which needs no budget here).
    #[arg(long, default_value_t = 64)]
    cache_mib: usize,
    /// Threads answering the kernel. [default: 4 per core, 4 to 32]
    #[arg(long)]
    threads: Option<usize>,
    /// Let other users read (needs user_allow_other in /etc/fuse.conf unless root); the
    /// guests' permission bits then apply to them.
    #[arg(long)]
    allow_other: bool,
}

pub fn run(ctx: &Ctx, a: MountArgs) -> Result<()> {
    let repo = Arc::new(ctx.open()?);
    let lock = repo.lock(archive::lock::LockKind::Read, "mount")?;
    let reader = Arc::new(RepoReader::new(repo.clone(), 256, a.cache_mib << 20)?);
    let mut opts = mount::Options { allow_other: a.allow_other, quiet: ctx.quiet, ..Default::default() };
    if let Some(t) = a.threads {
        opts.threads = t;
    }
    let mounted = mount::mount(reader, &a.mountpoint, &opts).with_context(|| {
        format!("mounting on {} (is fuse3 installed and the folder empty?)", a.mountpoint.display())
    })?;
    println!(
        "mounted {} on {}; Ctrl-C or `fusermount3 -u {}` unmounts",
        repo.path().display(),
        a.mountpoint.display(),
        a.mountpoint.display()
    );
    use std::io::Write;
    std::io::stdout().flush()?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let signalled = rt.block_on(async {
        let ended = async {
            while !mounted.is_finished() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        };
        tokio::select! {
            _ = crate::serve::shutdown_signal() => true,
            _ = ended => false,
        }
    });
    if signalled {
        mounted.unmount().context("unmounting")?;
    } else {
        mounted.wait()?;
    }
    if !ctx.quiet {
        eprintln!("unmounted {}", a.mountpoint.display());
    }
    drop(lock);
    Ok(())
}
