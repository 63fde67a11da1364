//! The FUSE view of a repository ([`tree`] for the layout): every VM, snapshot, disk image
//! and file inside the guests' filesystems, read-only, in user space. Mounting needs only
//! `/dev/fuse` and `fusermount3` (no libfuse, no root).

mod fuse;
pub mod tree;

use std::path::Path;
use std::sync::Arc;

use archive::reader::RepoReader;

pub use tree::Tree;

/// How to mount.
#[derive(Clone, Debug)]
pub struct Options {
    /// Threads answering the kernel (reads block on the repository, so more than cores).
    pub threads: usize,
    /// Let other users in (FUSE `allow_other`, needs `user_allow_other` in
    /// /etc/fuse.conf unless root); the guest's permission bits then apply to them.
    pub allow_other: bool,
    /// Do not log failed reads.
    pub quiet: bool,
}

impl Default for Options {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Self { threads: (cores * 4).clamp(4, 32), allow_other: false, quiet: false }
    }
}

/// A mounted repository. Dropping it does not unmount: call [`Mounted::unmount`].
#[derive(Debug)]
pub struct Mounted {
    unmounter: fuser::SessionUnmounter,
    thread: std::thread::JoinHandle<std::io::Result<()>>,
}

impl Mounted {
    /// Unmount (idempotent) and wait for the session to end.
    pub fn unmount(mut self) -> std::io::Result<()> {
        // Already unmounted from outside (fusermount3 -u) is fine.
        let _ = self.unmounter.unmount();
        self.wait()
    }

    /// Wait until the filesystem is unmounted, by anyone.
    pub fn wait(self) -> std::io::Result<()> {
        self.thread.join().map_err(|_| std::io::Error::other("the FUSE session panicked"))?
    }

    /// Whether the session has ended (unmounted from outside).
    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }
}

/// Mount the repository `reader` reads at `mountpoint`, served by background threads.
pub fn mount(reader: Arc<RepoReader>, mountpoint: &Path, opts: &Options) -> std::io::Result<Mounted> {
    let (uid, gid) = (rustix::process::getuid().as_raw(), rustix::process::getgid().as_raw());
    let tree = Tree::new(reader, uid, gid);
    let fs = fuse::Fs::new(tree, opts.quiet);
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::RO,
        fuser::MountOption::NoDev,
        fuser::MountOption::NoSuid,
        fuser::MountOption::FSName("vmvault".into()),
        fuser::MountOption::Subtype("vmvault".into()),
    ];
    if opts.allow_other {
        config.acl = fuser::SessionACL::All;
        config.mount_options.push(fuser::MountOption::DefaultPermissions);
    }
    config.n_threads = Some(opts.threads.max(1));
    config.clone_fd = true;
    let mut session = fuser::Session::new(fs, mountpoint, &config)?;
    let unmounter = session.unmount_callable();
    let thread = std::thread::Builder::new().name("vmvault-fuse".into()).spawn(move || session.run())?;
    Ok(Mounted { unmounter, thread })
}
