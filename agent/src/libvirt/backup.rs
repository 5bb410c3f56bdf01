//! Checkpoints (persistent dirty bitmaps in the disks' qcow2 files) and push-mode backup jobs.

use super::{code, Libvirt, LibvirtError};

/// `VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL`.
const BACKUP_REUSE_EXTERNAL: u32 = 1;
/// `VIR_DOMAIN_JOB_STATS_COMPLETED`: the statistics of the last finished job.
const JOB_STATS_COMPLETED: u32 = 1;
/// `virDomainJobType`.
const JOB_NONE: i32 = 0;
const JOB_COMPLETED: i32 = 3;
const JOB_FAILED: i32 = 4;
const JOB_CANCELLED: i32 = 5;
/// `VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE`.
const CHECKPOINT_REDEFINE: u32 = 1;
/// `VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY`.
const CHECKPOINT_DELETE_METADATA_ONLY: u32 = 2;

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
        let flags = if reuse_targets { BACKUP_REUSE_EXTERNAL } else { 0 };
        self.call("backupBegin", move |c| c.backup_begin(&c.lookup_domain(&vm)?, &backup_xml, &checkpoint_xml, flags))
            .await
    }

    /// The state of the domain's backup job: running, or how the last one ended.
    pub async fn backup_job(&self, vm: &str) -> Result<BackupJobState, LibvirtError> {
        let vm = vm.to_owned();
        self.call("getJobStats", move |c| {
            let d = c.lookup_domain(&vm)?;
            if c.job_type(&d, 0)? != JOB_NONE {
                return Ok(BackupJobState::Running);
            }
            Ok(match c.job_type(&d, JOB_STATS_COMPLETED)? {
                JOB_COMPLETED => BackupJobState::Completed,
                JOB_FAILED => BackupJobState::Failed,
                JOB_CANCELLED => BackupJobState::Cancelled,
                _ => BackupJobState::Unknown,
            })
        })
        .await
    }

    /// Aborts the domain's running job (a backup: its targets are left as they are).
    pub async fn abort_job(&self, vm: &str) -> Result<(), LibvirtError> {
        let vm = vm.to_owned();
        self.call("abortJob", move |c| c.abort_job(&c.lookup_domain(&vm)?)).await
    }

    /// Records checkpoint metadata for bitmaps that exist already in the disks (made by
    /// `qemu-img bitmap` while the domain was stopped): `CREATE_REDEFINE`.
    pub async fn checkpoint_redefine(&self, vm: &str, xml: String) -> Result<(), LibvirtError> {
        let vm = vm.to_owned();
        self.call("checkpointCreateXML", move |c| {
            c.create_checkpoint(&c.lookup_domain(&vm)?, &xml, CHECKPOINT_REDEFINE)
        })
        .await
    }

    /// The names of the domain's checkpoints.
    pub async fn checkpoint_names(&self, vm: &str) -> Result<Vec<String>, LibvirtError> {
        let vm = vm.to_owned();
        self.call("listAllCheckpoints", move |c| {
            Ok(c.list_checkpoints(&c.lookup_domain(&vm)?)?.into_iter().map(|cp| cp.name).collect())
        })
        .await
    }

    /// Deletes checkpoint `name` with its bitmaps (of a running domain), or only its metadata.
    /// A missing checkpoint is success.
    pub async fn checkpoint_delete(&self, vm: &str, name: &str, metadata_only: bool) -> Result<(), LibvirtError> {
        let (vm, name) = (vm.to_owned(), name.to_owned());
        let flags = if metadata_only { CHECKPOINT_DELETE_METADATA_ONLY } else { 0 };
        self.call("checkpointDelete", move |c| {
            let cp = match c.lookup_checkpoint(&c.lookup_domain(&vm)?, &name) {
                Err(LibvirtError::Call { code, .. }) if code == code::NO_DOMAIN_CHECKPOINT => return Ok(()),
                r => r?,
            };
            c.delete_checkpoint(&cp, flags)
        })
        .await
    }
}
