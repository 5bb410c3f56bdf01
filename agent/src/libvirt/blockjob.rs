//! Block jobs (libvirt's block pull and active commit), which the `virt` crate offers only as
//! raw FFI: this module is the one place that calls them, each behind a safe function.

use std::ffi::CString;

use virt::domain::Domain;
use virt::sys;

use super::{Libvirt, LibvirtError};

/// Progress of a running block job, in libvirt's units (`cur` of `end`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobProgress {
    pub cur: u64,
    pub end: u64,
}

fn last_error(call: &'static str) -> LibvirtError {
    LibvirtError::from_virt(call, virt::error::Error::last_error())
}

fn disk_name(disk: &str) -> Result<CString, LibvirtError> {
    CString::new(disk).map_err(|_| LibvirtError::Call {
        call: "blockJob",
        message: format!("disk name {disk:?} contains NUL"),
        code: 0,
    })
}

fn lookup(c: &virt::connect::Connect, vm: &str) -> Result<Domain, LibvirtError> {
    c.lookup_domain_by_name(vm).map_err(|e| LibvirtError::from_virt("lookupByName", e))
}

impl Libvirt {
    /// Starts pulling the backing chain of `disk` above `base` into its top image; with no
    /// base, the whole chain (flatten of a running VM's disk): `virDomainBlockRebase`.
    pub async fn block_pull(&self, vm: &str, disk: &str, base: Option<&str>) -> Result<(), LibvirtError> {
        let (vm, disk) = (vm.to_owned(), disk_name(disk)?);
        let base = base.map(disk_name).transpose()?;
        self.call("blockRebase", move |c| {
            let d = lookup(c, &vm)?;
            let base_ptr = base.as_ref().map_or(std::ptr::null(), |b| b.as_ptr());
            // SAFETY: `d` keeps the domain pointer alive for the call; `disk` and `base` are
            // NUL-terminated and outlive it; a NULL base means "pull everything".
            let rc = unsafe { sys::virDomainBlockRebase(d.as_ptr(), disk.as_ptr(), base_ptr, 0, 0) };
            if rc < 0 {
                Err(last_error("blockRebase"))
            } else {
                Ok(())
            }
        })
        .await
    }

    /// The progress of the block job on `disk`, or `None` when no job runs there (finished).
    pub async fn block_job(&self, vm: &str, disk: &str) -> Result<Option<JobProgress>, LibvirtError> {
        let (vm, disk) = (vm.to_owned(), disk_name(disk)?);
        self.call("getBlockJobInfo", move |c| {
            let d = lookup(c, &vm)?;
            let mut info = sys::virDomainBlockJobInfo { type_: 0, bandwidth: 0, cur: 0, end: 0 };
            // SAFETY: as above; `info` is a valid, writable struct of the expected layout.
            let rc = unsafe { sys::virDomainGetBlockJobInfo(d.as_ptr(), disk.as_ptr(), &mut info, 0) };
            match rc {
                r if r < 0 => Err(last_error("getBlockJobInfo")),
                0 => Ok(None),
                _ => Ok(Some(JobProgress { cur: info.cur, end: info.end })),
            }
        })
        .await
    }

    /// Starts committing the active top of `disk` into its immediate backing file (SHALLOW):
    /// once the job is ready, [`block_job_abort`](Self::block_job_abort) with `pivot` switches
    /// the VM to the backing file: `virDomainBlockCommit`.
    pub async fn block_commit_active(&self, vm: &str, disk: &str) -> Result<(), LibvirtError> {
        let (vm, disk) = (vm.to_owned(), disk_name(disk)?);
        self.call("blockCommit", move |c| {
            let d = lookup(c, &vm)?;
            let flags = sys::VIR_DOMAIN_BLOCK_COMMIT_ACTIVE | sys::VIR_DOMAIN_BLOCK_COMMIT_SHALLOW;
            // SAFETY: `d` keeps the domain pointer alive for the call; `disk` is NUL-terminated
            // and outlives it; NULL base and top mean "the active layer into its backing file".
            let rc = unsafe {
                sys::virDomainBlockCommit(d.as_ptr(), disk.as_ptr(), std::ptr::null(), std::ptr::null(), 0, flags)
            };
            if rc < 0 {
                Err(last_error("blockCommit"))
            } else {
                Ok(())
            }
        })
        .await
    }

    /// Ends the block job on `disk` and waits for it to be gone: with `pivot`, a ready active
    /// commit switches the VM to the commit's base; without, the job is abandoned. A pull
    /// stopped half-way leaves the chain as it was (the top holds some copied clusters; the
    /// guest sees the same data).
    pub async fn block_job_abort(&self, vm: &str, disk: &str, pivot: bool) -> Result<(), LibvirtError> {
        let (vm, disk) = (vm.to_owned(), disk_name(disk)?);
        self.call("blockJobAbort", move |c| {
            let d = lookup(c, &vm)?;
            let flags = if pivot { sys::VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT } else { 0 };
            // SAFETY: as above. Without the ASYNC flag the call returns once the job is gone.
            let rc = unsafe { sys::virDomainBlockJobAbort(d.as_ptr(), disk.as_ptr(), flags) };
            if rc < 0 {
                Err(last_error("blockJobAbort"))
            } else {
                Ok(())
            }
        })
        .await
    }
}
