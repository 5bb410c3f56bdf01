//! The hypervisor port: every domain operation the agent needs, as one trait. libvirt
//! ([`crate::libvirt::Libvirt`]) is the real one; [`fake`] keeps domains in memory so that the
//! orchestration (create, clone, freeze, flatten, recovery) is unit-tested without a daemon.

#[cfg(test)]
pub mod fake;

use std::time::Duration;

use async_trait::async_trait;

use crate::libvirt::backup::BackupJobState;
use crate::libvirt::blockjob::JobProgress;
use crate::libvirt::domains::VmState;
use crate::libvirt::LibvirtError;

#[async_trait]
pub trait Hypervisor: Send + Sync {
    /// `(libvirt version, hypervisor version)` as dotted strings.
    async fn versions(&self) -> Result<(String, String), LibvirtError>;
    /// The host capabilities XML (`virsh capabilities`).
    async fn capabilities(&self) -> Result<String, LibvirtError>;
    /// What a domain of type `virt_type` (`kvm`, `qemu`) on `machine` can have, x86_64
    /// (`virsh domcapabilities`).
    async fn domain_capabilities(&self, virt_type: &str, machine: &str) -> Result<String, LibvirtError>;
    /// The state of domain `vm`, or `None` when no such domain is defined.
    async fn domain_state(&self, vm: &str) -> Result<Option<VmState>, LibvirtError>;
    /// Every managed domain (named as a VM uuid) with its state, plus those shutting down.
    async fn list_vm_states(&self) -> Result<(Vec<(String, VmState)>, Vec<String>), LibvirtError>;
    /// Defines (or redefines) a domain persistently from `xml`.
    async fn define(&self, xml: String) -> Result<(), LibvirtError>;
    /// Starts defined domain `vm` (paused when asked); a running one is left as it is.
    async fn start(&self, vm: &str, paused: bool) -> Result<(), LibvirtError>;
    /// The live (or, when stopped, the persistent) XML.
    async fn xml(&self, vm: &str) -> Result<String, LibvirtError>;
    /// Hard power-off; a domain that is not running is left as it is.
    async fn destroy(&self, vm: &str) -> Result<(), LibvirtError>;
    /// Asks the guest to shut down (ACPI); returns at once.
    async fn shutdown(&self, vm: &str) -> Result<(), LibvirtError>;
    /// Removes the definition, and the TPM state when `remove_tpm_state`. A missing domain is
    /// success.
    async fn undefine(&self, vm: &str, remove_tpm_state: bool) -> Result<(), LibvirtError>;
    async fn suspend(&self, vm: &str) -> Result<(), LibvirtError>;
    async fn resume(&self, vm: &str) -> Result<(), LibvirtError>;
    /// Switches the running domain's disks to pre-created overlays, all at one instant: every
    /// disk target with its new top file, or `None` to leave it alone.
    async fn snapshot_disks(&self, vm: &str, disks: Vec<(String, Option<String>)>) -> Result<(), LibvirtError>;
    /// Starts pulling the chain of `disk` above `base` (all of it when `None`) into its top.
    async fn block_pull(&self, vm: &str, disk: &str, base: Option<&str>) -> Result<(), LibvirtError>;
    /// The block job on `disk`, or `None` when none runs there.
    async fn block_job(&self, vm: &str, disk: &str) -> Result<Option<JobProgress>, LibvirtError>;
    /// Starts committing the active top of `disk` into its backing file.
    async fn block_commit_active(&self, vm: &str, disk: &str) -> Result<(), LibvirtError>;
    /// Ends the block job on `disk`: with `pivot`, a ready commit switches to its base.
    async fn block_job_abort(&self, vm: &str, disk: &str, pivot: bool) -> Result<(), LibvirtError>;
    /// Starts a push-mode backup job of running domain `vm` that also creates a checkpoint
    /// (see [`crate::libvirt::backup`]).
    async fn backup_begin(
        &self,
        vm: &str,
        backup_xml: String,
        checkpoint_xml: String,
        reuse_targets: bool,
    ) -> Result<(), LibvirtError>;
    /// Whether the backup job runs, or how the last one ended.
    async fn backup_job(&self, vm: &str) -> Result<BackupJobState, LibvirtError>;
    /// Aborts the running job of domain `vm`.
    async fn abort_job(&self, vm: &str) -> Result<(), LibvirtError>;
    /// Records checkpoint metadata for bitmaps that exist already in the disks.
    async fn checkpoint_redefine(&self, vm: &str, xml: String) -> Result<(), LibvirtError>;
    /// The names of domain `vm`'s checkpoints.
    async fn checkpoint_names(&self, vm: &str) -> Result<Vec<String>, LibvirtError>;
    /// Deletes a checkpoint with its bitmaps, or its metadata only; a missing one is success.
    async fn checkpoint_delete(&self, vm: &str, name: &str, metadata_only: bool) -> Result<(), LibvirtError>;
    /// Plugs the device `xml` describes into running domain `vm`, and into its definition when
    /// the domain is persistent.
    async fn attach_device(&self, vm: &str, xml: String) -> Result<(), LibvirtError>;
    /// Asks running domain `vm` to unplug the device `xml` describes (and removes it from the
    /// definition). The guest may release it later: callers watch the live XML.
    async fn detach_device(&self, vm: &str, xml: String) -> Result<(), LibvirtError>;
    /// Changes a device of running domain `vm` in place: a CD-ROM drive's medium.
    async fn update_device(&self, vm: &str, xml: String) -> Result<(), LibvirtError>;
    /// Defines the ceph-usage secret `uuid` with value `key`.
    async fn set_ceph_secret(&self, uuid: &str, key: Vec<u8>) -> Result<(), LibvirtError>;
    /// Defines the vtpm-usage secret `uuid` of VM `vm` with value `key`.
    async fn set_vtpm_secret(&self, uuid: &str, vm: &str, key: Vec<u8>) -> Result<(), LibvirtError>;
    /// The value of vtpm-usage secret `uuid`, or `None` when there is none.
    async fn vtpm_secret_value(&self, uuid: &str) -> Result<Option<Vec<u8>>, LibvirtError>;
    /// Removes vtpm-usage secret `uuid` (a secret of another usage stays); a missing one is
    /// success.
    async fn remove_vtpm_secret(&self, uuid: &str) -> Result<(), LibvirtError>;
    /// Whether the guest agent of running domain `vm` is connected (the guest has opened its
    /// channel): a quick look that asks the guest nothing.
    async fn guest_agent_connected(&self, vm: &str) -> Result<bool, LibvirtError>;
    /// Freezes the guest's filesystems through its agent, waiting at most `timeout` for the
    /// agent's answer; returns how many were frozen.
    async fn guest_fs_freeze(&self, vm: &str, timeout: Duration) -> Result<u32, LibvirtError>;
    /// Thaws the guest's filesystems; a guest that is not frozen stays as it is.
    async fn guest_fs_thaw(&self, vm: &str, timeout: Duration) -> Result<(), LibvirtError>;

    /// Asks the guest to shut down and waits up to `timeout` for it to stop. Returns whether it
    /// stopped.
    async fn shutdown_and_wait(&self, vm: &str, timeout: Duration) -> Result<bool, LibvirtError> {
        if !self.domain_state(vm).await?.is_some_and(VmState::is_active) {
            return Ok(true);
        }
        self.shutdown(vm).await?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match self.domain_state(vm).await? {
                None => return Ok(true),
                Some(s) if !s.is_active() => return Ok(true),
                Some(_) if tokio::time::Instant::now() >= deadline => return Ok(false),
                Some(_) => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
    }
}
