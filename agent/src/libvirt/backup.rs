//! Checkpoints (persistent dirty bitmaps in the disks' qcow2 files) and push-mode backup jobs,
//! which the `virt` crate offers only as raw FFI: this module is the one place that calls them,
//! each behind a safe function.

use std::ffi::{CStr, CString};

use virt::domain::Domain;
use virt::sys;

use super::{Libvirt, LibvirtError};

/// Where the domain's backup job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackupJobState {
    Running,
    Completed,
    Failed,
    Cancelled,
    /// No job runs and libvirt keeps no result (the agent restarted, or it was read already).
    Unknown,
}

fn last_error(call: &'static str) -> LibvirtError {
    LibvirtError::from_virt(call, virt::error::Error::last_error())
}

fn c_string(call: &'static str, s: &str) -> Result<CString, LibvirtError> {
    CString::new(s).map_err(|_| LibvirtError::Call { call, message: format!("{s:?} contains NUL"), code: 0 })
}

fn lookup(c: &virt::connect::Connect, vm: &str) -> Result<Domain, LibvirtError> {
    c.lookup_domain_by_name(vm).map_err(|e| LibvirtError::from_virt("lookupByName", e))
}

fn check(call: &'static str, rc: i32) -> Result<(), LibvirtError> {
    if rc < 0 {
        Err(last_error(call))
    } else {
        Ok(())
    }
}

/// The job type `virDomainGetJobStats` answers (of the running job, or with `completed` of the
/// last finished one); the statistics themselves are not needed.
fn job_type(d: &Domain, completed: bool) -> Result<i32, LibvirtError> {
    let (mut kind, mut params, mut n) = (0, std::ptr::null_mut(), 0);
    let flags = if completed { sys::VIR_DOMAIN_JOB_STATS_COMPLETED } else { 0 };
    // SAFETY: `d` keeps the domain pointer alive; the out-pointers are valid; libvirt allocates
    // `params`, which is freed right after.
    let rc = unsafe { sys::virDomainGetJobStats(d.as_ptr(), &mut kind, &mut params, &mut n, flags) };
    check("getJobStats", rc)?;
    // SAFETY: `params`/`n` are what libvirt returned (NULL/0 is accepted).
    unsafe { sys::virTypedParamsFree(params, n) };
    Ok(kind)
}

impl Libvirt {
    /// Starts a push-mode backup job (`virDomainBackupBegin`): `backup_xml` names the disks and
    /// their targets; `checkpoint_xml` the checkpoint created at the same instant. With
    /// `reuse_targets` the targets exist already (pre-created with their backing files).
    pub async fn backup_begin(
        &self,
        vm: &str,
        backup_xml: String,
        checkpoint_xml: String,
        reuse_targets: bool,
    ) -> Result<(), LibvirtError> {
        let vm = vm.to_owned();
        let (backup, checkpoint) = (c_string("backupBegin", &backup_xml)?, c_string("backupBegin", &checkpoint_xml)?);
        self.call("backupBegin", move |c| {
            let d = lookup(c, &vm)?;
            let flags = if reuse_targets { sys::VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL } else { 0 };
            // SAFETY: `d` keeps the domain pointer alive; both strings are NUL-terminated and
            // outlive the call.
            let rc = unsafe { sys::virDomainBackupBegin(d.as_ptr(), backup.as_ptr(), checkpoint.as_ptr(), flags) };
            check("backupBegin", rc)
        })
        .await
    }

    /// The state of the domain's backup job: running, or how the last one ended.
    pub async fn backup_job(&self, vm: &str) -> Result<BackupJobState, LibvirtError> {
        let vm = vm.to_owned();
        self.call("getJobStats", move |c| {
            let d = lookup(c, &vm)?;
            if job_type(&d, false)? != sys::VIR_DOMAIN_JOB_NONE as i32 {
                return Ok(BackupJobState::Running);
            }
            Ok(match job_type(&d, true)? as u32 {
                sys::VIR_DOMAIN_JOB_COMPLETED => BackupJobState::Completed,
                sys::VIR_DOMAIN_JOB_FAILED => BackupJobState::Failed,
                sys::VIR_DOMAIN_JOB_CANCELLED => BackupJobState::Cancelled,
                _ => BackupJobState::Unknown,
            })
        })
        .await
    }

    /// Aborts the domain's running job (a backup: its targets are left as they are).
    pub async fn abort_job(&self, vm: &str) -> Result<(), LibvirtError> {
        let vm = vm.to_owned();
        self.call("abortJob", move |c| {
            let d = lookup(c, &vm)?;
            // SAFETY: `d` keeps the domain pointer alive for the call.
            check("abortJob", unsafe { sys::virDomainAbortJob(d.as_ptr()) })
        })
        .await
    }

    /// Records checkpoint metadata for bitmaps that exist already in the disks (made by
    /// `qemu-img bitmap` while the domain was stopped): `CREATE_REDEFINE`.
    pub async fn checkpoint_redefine(&self, vm: &str, xml: String) -> Result<(), LibvirtError> {
        let vm = vm.to_owned();
        let xml = c_string("checkpointCreateXML", &xml)?;
        self.call("checkpointCreateXML", move |c| {
            let d = lookup(c, &vm)?;
            // SAFETY: as above; the returned checkpoint is freed at once.
            let cp = unsafe {
                sys::virDomainCheckpointCreateXML(d.as_ptr(), xml.as_ptr(), sys::VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE)
            };
            if cp.is_null() {
                return Err(last_error("checkpointCreateXML"));
            }
            // SAFETY: `cp` is a valid checkpoint reference we own.
            unsafe { sys::virDomainCheckpointFree(cp) };
            Ok(())
        })
        .await
    }

    /// The names of the domain's checkpoints.
    pub async fn checkpoint_names(&self, vm: &str) -> Result<Vec<String>, LibvirtError> {
        let vm = vm.to_owned();
        self.call("listAllCheckpoints", move |c| {
            let d = lookup(c, &vm)?;
            let mut list: *mut sys::virDomainCheckpointPtr = std::ptr::null_mut();
            // SAFETY: `list` receives an array libvirt allocates; each element and the array are
            // freed below.
            let n = unsafe { sys::virDomainListAllCheckpoints(d.as_ptr(), &mut list, 0) };
            check("listAllCheckpoints", n)?;
            let mut names = Vec::new();
            for i in 0..n as usize {
                // SAFETY: `i < n`, the array's length; every element is a valid checkpoint.
                unsafe {
                    let cp = *list.add(i);
                    let name = sys::virDomainCheckpointGetName(cp);
                    if !name.is_null() {
                        names.push(CStr::from_ptr(name).to_string_lossy().into_owned());
                    }
                    sys::virDomainCheckpointFree(cp);
                }
            }
            // SAFETY: the array was allocated by libvirt with malloc.
            unsafe { libc::free(list.cast()) };
            Ok(names)
        })
        .await
    }

    /// Deletes checkpoint `name` with its bitmaps (of a running domain), or only its metadata.
    /// A missing checkpoint is success.
    pub async fn checkpoint_delete(&self, vm: &str, name: &str, metadata_only: bool) -> Result<(), LibvirtError> {
        let vm = vm.to_owned();
        let name = c_string("checkpointDelete", name)?;
        self.call("checkpointDelete", move |c| {
            let d = lookup(c, &vm)?;
            // SAFETY: as above.
            let cp = unsafe { sys::virDomainCheckpointLookupByName(d.as_ptr(), name.as_ptr(), 0) };
            if cp.is_null() {
                let e = last_error("checkpointLookupByName");
                return match e {
                    LibvirtError::Call { code, .. } if code == sys::VIR_ERR_NO_DOMAIN_CHECKPOINT as i32 => Ok(()),
                    e => Err(e),
                };
            }
            let flags = if metadata_only { sys::VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY } else { 0 };
            // SAFETY: `cp` is a valid checkpoint reference we own, freed after the call.
            let rc = unsafe { sys::virDomainCheckpointDelete(cp, flags) };
            let result = check("checkpointDelete", rc);
            unsafe { sys::virDomainCheckpointFree(cp) };
            result
        })
        .await
    }
}
