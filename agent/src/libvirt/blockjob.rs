//! Block jobs: libvirt's block pull (rebase) and active commit, their progress and their end.

use super::{Libvirt, LibvirtError};

/// `VIR_DOMAIN_BLOCK_COMMIT_SHALLOW` and `_ACTIVE`.
const COMMIT_SHALLOW: u32 = 1;
const COMMIT_ACTIVE: u32 = 4;
/// `VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT`.
const ABORT_PIVOT: u32 = 2;

/// Progress of a running block job, in libvirt's units (`cur` of `end`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobProgress {
    pub cur: u64,
    pub end: u64,
}

impl Libvirt {
    /// Starts pulling the backing chain of `disk` above `base` into its top image; with no
    /// base, the whole chain (flatten of a running VM's disk): `virDomainBlockRebase`.
    pub async fn block_pull(&self, vm: &str, disk: &str, base: Option<&str>) -> Result<(), LibvirtError> {
        let (vm, disk, base) = (vm.to_owned(), disk.to_owned(), base.map(str::to_owned));
        self.call("blockRebase", move |c| c.block_rebase(&c.lookup_domain(&vm)?, &disk, base.as_deref(), 0)).await
    }

    /// The progress of the block job on `disk`, or `None` when no job runs there (finished).
    pub async fn block_job(&self, vm: &str, disk: &str) -> Result<Option<JobProgress>, LibvirtError> {
        let (vm, disk) = (vm.to_owned(), disk.to_owned());
        self.call("getBlockJobInfo", move |c| c.block_job_info(&c.lookup_domain(&vm)?, &disk)).await
    }

    /// Starts committing the active top of `disk` into its immediate backing file (SHALLOW):
    /// once the job is ready, [`block_job_abort`](Self::block_job_abort) with `pivot` switches
    /// the VM to the backing file: `virDomainBlockCommit`.
    pub async fn block_commit_active(&self, vm: &str, disk: &str) -> Result<(), LibvirtError> {
        let (vm, disk) = (vm.to_owned(), disk.to_owned());
        self.call("blockCommit", move |c| c.block_commit(&c.lookup_domain(&vm)?, &disk, COMMIT_ACTIVE | COMMIT_SHALLOW))
            .await
    }

    /// Ends the block job on `disk` and waits for it to be gone (no ASYNC flag): with `pivot`,
    /// a ready active commit switches the VM to the commit's base; without, the job is
    /// abandoned. A pull stopped half-way leaves the chain as it was (the top holds some
    /// copied clusters; the guest sees the same data).
    pub async fn block_job_abort(&self, vm: &str, disk: &str, pivot: bool) -> Result<(), LibvirtError> {
        let (vm, disk) = (vm.to_owned(), disk.to_owned());
        let flags = if pivot { ABORT_PIVOT } else { 0 };
        self.call("blockJobAbort", move |c| c.block_job_abort(&c.lookup_domain(&vm)?, &disk, flags)).await
    }
}
