//! A hypervisor in memory, for unit tests of the orchestration. Domains are kept as their XML
//! and a state; the calls that change disks do to the files what libvirt would (a block pull
//! rebases the top, a pivoted commit commits it, on the fake qemu-img's images), so a test
//! checks files.
//!
//! A running domain keeps every file of its disks' chains open, as QEMU does, so the agent's
//! "is this file in use" checks see what they would see on a real host.
//!
//! Calls count in the shared [`Faults`] (a named call can be made to fail, the agent killed at
//! the n-th call). Domains outlive the agent, as with libvirtd.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use super::Hypervisor;
use crate::faults::Faults;
use crate::libvirt::backup::BackupJobState;
use crate::libvirt::blockjob::JobProgress;
use crate::libvirt::domains::VmState;
use crate::libvirt::LibvirtError;
use crate::qemu_img::fake;

/// How a fake domain's guest agent behaves (its freeze and thaw calls can also be failed
/// through [`Faults`], as `domainFSFreeze` and `domainFSThaw`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GuestAgent {
    /// Not running in the guest: libvirt refuses agent commands.
    #[default]
    Absent,
    /// Connected, and answers while the domain runs.
    Answering,
}

#[derive(Debug, Clone)]
pub struct FakeDomain {
    pub xml: String,
    pub state: VmState,
    pub agent: GuestAgent,
    /// Whether the guest's filesystems are frozen, and how many times they were.
    pub guest_frozen: bool,
    pub guest_freezes: usize,
    /// Checkpoint names, oldest first (metadata only: the fake keeps no bitmaps).
    pub checkpoints: Vec<String>,
    /// Disk target → the top a commit job started on.
    commits: HashMap<String, PathBuf>,
    open: Vec<Arc<std::fs::File>>,
    /// A backup job a killed agent left running (see [`FakeHypervisor::leave_backup_job`]).
    lingering_job: Option<LingeringJob>,
    /// A lingering job ended with one of its target files gone (libvirtd 9.0 crashed there).
    pub job_ended_without_its_targets: bool,
}

/// A backup job that runs until aborted, and then for `polls` more looks at it, as libvirt
/// tears an aborted job down after `abortJob` has answered.
#[derive(Debug, Clone)]
struct LingeringJob {
    aborted: bool,
    polls: usize,
    targets: Vec<PathBuf>,
}

impl FakeDomain {
    fn power_off(&mut self) {
        self.state = VmState::Shutdown;
        self.guest_frozen = false;
    }

    /// The guest agent, when it can answer `call` (libvirt's errors otherwise).
    fn answering_agent(&mut self, call: &'static str) -> Result<&mut Self, LibvirtError> {
        let fail = |message: &str, code| LibvirtError::Call { call, message: message.into(), code };
        if !self.state.is_active() {
            return Err(fail("domain is not running", crate::libvirt::code::OPERATION_INVALID));
        }
        if self.agent == GuestAgent::Absent || self.state != VmState::Running {
            return Err(fail("QEMU guest agent is not connected", crate::libvirt::code::AGENT_UNRESPONSIVE));
        }
        Ok(self)
    }

    /// Opens the chains of the disks while the domain runs; closes them when it stops.
    fn refresh_open_files(&mut self) {
        self.open.clear();
        if !self.state.is_active() {
            return;
        }
        let disks = crate::domain::live_disks(&self.xml).unwrap_or_default();
        for mut cur in disks.into_iter().filter_map(|d| d.file).map(PathBuf::from) {
            while let Ok(f) = std::fs::File::open(&cur) {
                self.open.push(Arc::new(f));
                let Some(b) = crate::qemu_img::read_header(&cur).ok().and_then(|h| h.backing_file) else { break };
                cur = cur.parent().unwrap_or(Path::new("/")).join(b);
            }
        }
    }
}

pub struct FakeHypervisor {
    domains: Mutex<HashMap<String, FakeDomain>>,
    /// uuid → (usage, value).
    secrets: Mutex<HashMap<String, (&'static str, Vec<u8>)>>,
    faults: Arc<Faults>,
}

fn injected(call: &'static str) -> LibvirtError {
    LibvirtError::Call { call, message: "injected failure".into(), code: 1 }
}

impl FakeHypervisor {
    pub fn new(faults: Arc<Faults>) -> FakeHypervisor {
        FakeHypervisor { domains: Mutex::default(), secrets: Mutex::default(), faults }
    }

    pub fn domain(&self, vm: &str) -> Option<FakeDomain> {
        self.domains.lock().unwrap().get(vm).cloned()
    }

    /// Makes the guest agent of domain `vm` behave as `agent`.
    pub fn set_guest_agent(&self, vm: &str, agent: GuestAgent) {
        self.with(vm, |d| d.agent = agent).expect("no such fake domain");
    }

    /// Leaves a backup job running in domain `vm`, as a killed agent does; once aborted, it
    /// reports itself running to `polls` more looks, and until it ends the checkpoints of the
    /// domain cannot be deleted (libvirtd 9.0 has crashed on such a delete).
    /// Its `targets` must still exist when it ends.
    pub fn leave_backup_job(&self, vm: &str, polls: usize, targets: &[PathBuf]) {
        let job = LingeringJob { aborted: false, polls, targets: targets.to_vec() };
        self.with(vm, |d| d.lingering_job = Some(job)).expect("no such fake domain");
    }

    pub fn secret_uuids(&self) -> Vec<String> {
        self.secrets.lock().unwrap().keys().cloned().collect()
    }

    pub fn domain_names(&self) -> Vec<String> {
        self.domains.lock().unwrap().keys().cloned().collect()
    }

    async fn enter(&self, call: &'static str) -> Result<(), LibvirtError> {
        if self.faults.enter(call).await {
            return Err(injected(call));
        }
        Ok(())
    }

    /// Runs `f` on domain `vm`, then brings its open files up to date.
    fn with<T>(&self, vm: &str, f: impl FnOnce(&mut FakeDomain) -> T) -> Result<T, LibvirtError> {
        let mut map = self.domains.lock().unwrap();
        let d = map.get_mut(vm).ok_or_else(|| LibvirtError::no_domain(vm))?;
        let r = f(d);
        d.refresh_open_files();
        Ok(r)
    }

    /// The file under disk `target`.
    fn disk_file(&self, vm: &str, target: &str) -> Result<PathBuf, LibvirtError> {
        let xml = self.with(vm, |d| d.xml.clone())?;
        let disks = crate::domain::live_disks(&xml).map_err(|e| LibvirtError::Call {
            call: "getXMLDesc",
            message: e.to_string(),
            code: 1,
        })?;
        disks.into_iter().find(|d| d.target == target).and_then(|d| d.file).map(PathBuf::from).ok_or_else(|| {
            LibvirtError::Call { call: "blockJob", message: format!("no disk {target} with a file"), code: 1 }
        })
    }

    /// Rewrites running domain `vm`'s XML by `edit`, given where the device `xml` names is in it
    /// (as libvirt finds it: a disk by its target, an interface by its MAC).
    fn change_device(
        &self,
        vm: &str,
        call: &'static str,
        xml: &str,
        edit: impl FnOnce(&str, Option<std::ops::Range<usize>>) -> Result<String, String>,
    ) -> Result<(), LibvirtError> {
        let fail = |message: String| LibvirtError::Call { call, message, code: 1 };
        let key = crate::domain::LiveKey::of_device(xml).map_err(|e| fail(e.to_string()))?;
        self.with(vm, |d| {
            if !d.state.is_active() {
                return Err(fail("domain is not running".into()));
            }
            let found = crate::domain::device_range(&d.xml, &key).map_err(|e| fail(e.to_string()))?;
            d.xml = edit(&d.xml, found).map_err(fail)?;
            Ok(())
        })?
    }

    fn switch_disk(&self, vm: &str, from: &Path, to: &Path) -> Result<(), LibvirtError> {
        let (from, to) = (format!("file='{}'", from.display()), format!("file='{}'", to.display()));
        self.with(vm, |d| d.xml = d.xml.replacen(&from, &to, 1))
    }
}

/// A block job's change to the files, failed as libvirt reports it.
fn block_job(call: &'static str, r: Result<(), String>) -> Result<(), LibvirtError> {
    r.map_err(|message| LibvirtError::Call { call, message, code: 1 })
}

fn checkpoint_name(xml: &str) -> Option<String> {
    domain_name(xml)
}

fn domain_name(xml: &str) -> Option<String> {
    let doc = roxmltree::Document::parse(xml).ok()?;
    doc.root_element().children().find(|n| n.has_tag_name("name")).and_then(|n| n.text()).map(str::to_owned)
}

#[async_trait]
impl Hypervisor for FakeHypervisor {
    async fn versions(&self) -> Result<(String, String), LibvirtError> {
        self.enter("getVersion").await?;
        Ok(("9.0.0".into(), "7.2.0".into()))
    }

    async fn capabilities(&self) -> Result<String, LibvirtError> {
        self.enter("getCapabilities").await?;
        Ok("<capabilities><host><cpu><arch>x86_64</arch><model>EPYC-Rome</model></cpu></host>\
            <guest><os_type>hvm</os_type><features><acpi/></features></guest></capabilities>"
            .into())
    }

    /// As libvirt answers under TCG: no host-passthrough; a few named models, one unusable.
    async fn domain_capabilities(&self, _virt_type: &str, _machine: &str) -> Result<String, LibvirtError> {
        self.enter("getDomainCapabilities").await?;
        Ok("<domainCapabilities><cpu><mode name='host-passthrough' supported='no'/>\
            <mode name='host-model' supported='yes'><model fallback='forbid'>EPYC</model></mode>\
            <mode name='custom' supported='yes'><model usable='yes'>qemu64</model>\
            <model usable='no'>Skylake-Server</model></mode></cpu></domainCapabilities>"
            .into())
    }

    async fn domain_state(&self, vm: &str) -> Result<Option<VmState>, LibvirtError> {
        self.enter("getState").await?;
        Ok(self.domain(vm).map(|d| d.state))
    }

    async fn list_vm_states(&self) -> Result<(Vec<(String, VmState)>, Vec<String>), LibvirtError> {
        self.enter("listAllDomains").await?;
        let map = self.domains.lock().unwrap();
        Ok((map.iter().map(|(n, d)| (n.clone(), d.state)).collect(), Vec::new()))
    }

    async fn define(&self, xml: String) -> Result<(), LibvirtError> {
        self.enter("defineXML").await?;
        let name = domain_name(&xml).ok_or_else(|| LibvirtError::Call {
            call: "defineXML",
            message: "XML without a name".into(),
            code: 1,
        })?;
        let mut map = self.domains.lock().unwrap();
        let old = map.get(&name);
        let state = old.map_or(VmState::Shutdown, |d| d.state);
        let (agent, guest_frozen, guest_freezes) =
            old.map_or((GuestAgent::Absent, false, 0), |d| (d.agent, d.guest_frozen, d.guest_freezes));
        let checkpoints = old.map(|d| d.checkpoints.clone()).unwrap_or_default();
        let (commits, open) = (HashMap::new(), Vec::new());
        let lingering_job = old.and_then(|d| d.lingering_job.clone());
        let job_ended_without_its_targets = old.is_some_and(|d| d.job_ended_without_its_targets);
        let mut d = FakeDomain {
            xml,
            state,
            agent,
            guest_frozen,
            guest_freezes,
            checkpoints,
            commits,
            open,
            lingering_job,
            job_ended_without_its_targets,
        };
        d.refresh_open_files();
        map.insert(name, d);
        Ok(())
    }

    async fn start(&self, vm: &str, paused: bool) -> Result<(), LibvirtError> {
        self.enter("create").await?;
        self.with(vm, |d| {
            if !d.state.is_active() {
                d.state = if paused { VmState::Paused } else { VmState::Running };
            }
        })
    }

    async fn xml(&self, vm: &str) -> Result<String, LibvirtError> {
        self.enter("getXMLDesc").await?;
        self.with(vm, |d| d.xml.clone())
    }

    async fn destroy(&self, vm: &str) -> Result<(), LibvirtError> {
        self.enter("destroy").await?;
        self.with(vm, FakeDomain::power_off)
    }

    async fn shutdown(&self, vm: &str) -> Result<(), LibvirtError> {
        self.enter("shutdown").await?;
        self.with(vm, FakeDomain::power_off)
    }

    async fn undefine(&self, vm: &str, _remove_tpm_state: bool) -> Result<(), LibvirtError> {
        self.enter("undefine").await?;
        self.domains.lock().unwrap().remove(vm);
        Ok(())
    }

    async fn suspend(&self, vm: &str) -> Result<(), LibvirtError> {
        self.enter("suspend").await?;
        self.with(vm, |d| d.state = VmState::Paused)
    }

    async fn resume(&self, vm: &str) -> Result<(), LibvirtError> {
        self.enter("resume").await?;
        self.with(vm, |d| d.state = VmState::Running)
    }

    async fn snapshot_disks(&self, vm: &str, disks: Vec<(String, Option<String>)>) -> Result<(), LibvirtError> {
        self.enter("snapshotCreateXML").await?;
        let switches: Vec<(PathBuf, String)> = disks
            .into_iter()
            .filter_map(|(target, new)| Some((self.disk_file(vm, &target), new?)))
            .map(|(old, new)| old.map(|o| (o, new)))
            .collect::<Result<_, _>>()?;
        for (old, new) in switches {
            self.switch_disk(vm, &old, Path::new(&new))?;
        }
        Ok(())
    }

    async fn block_pull(&self, vm: &str, disk: &str, base: Option<&str>) -> Result<(), LibvirtError> {
        self.enter("blockRebase").await?;
        let top = self.disk_file(vm, disk)?;
        // The job finishes at once: a safe rebase copies what the top lacks, as the pull does.
        block_job("blockRebase", fake::pull(&top, base.map(Path::new)))
    }

    async fn block_job(&self, vm: &str, disk: &str) -> Result<Option<JobProgress>, LibvirtError> {
        self.enter("getBlockJobInfo").await?;
        // A commit is ready at once; a pull has already finished.
        self.with(vm, |d| d.commits.contains_key(disk).then_some(JobProgress { cur: 1, end: 1 }))
    }

    async fn block_commit_active(&self, vm: &str, disk: &str) -> Result<(), LibvirtError> {
        self.enter("blockCommit").await?;
        let top = self.disk_file(vm, disk)?;
        self.with(vm, |d| d.commits.insert(disk.to_owned(), top)).map(drop)
    }

    async fn block_job_abort(&self, vm: &str, disk: &str, pivot: bool) -> Result<(), LibvirtError> {
        self.enter("blockJobAbort").await?;
        let Some(top) = self.with(vm, |d| d.commits.remove(disk))? else { return Ok(()) };
        if pivot {
            let header = crate::qemu_img::read_header(&top).map_err(|e| LibvirtError::Call {
                call: "blockJobAbort",
                message: e.to_string(),
                code: 1,
            })?;
            let base = header.backing_file.map(|b| top.parent().unwrap_or(Path::new("/")).join(b));
            let base = base.ok_or_else(|| injected("blockJobAbort"))?;
            block_job("blockJobAbort", fake::commit_top(&top))?;
            self.switch_disk(vm, &top, &base)?;
        }
        Ok(())
    }

    /// The job ends at once: each target (pre-created) gets what differs from the disk, which
    /// is what a full job or an incremental one on an overlay writes; the checkpoint is recorded.
    async fn backup_begin(
        &self,
        vm: &str,
        backup_xml: String,
        checkpoint_xml: String,
        _reuse_targets: bool,
    ) -> Result<(), LibvirtError> {
        self.enter("backupBegin").await?;
        let name = checkpoint_name(&checkpoint_xml).ok_or_else(|| injected("backupBegin"))?;
        let doc = roxmltree::Document::parse(&backup_xml).map_err(|_| injected("backupBegin"))?;
        for disk in doc.descendants().filter(|n| n.has_tag_name("disk")) {
            let target = disk.children().find(|c| c.has_tag_name("target")).and_then(|t| t.attribute("file"));
            if let (Some(dev), Some(target)) = (disk.attribute("name"), target) {
                let source = self.disk_file(vm, dev)?;
                block_job("backupBegin", fake::copy_changed(&source, Path::new(target)))?;
                block_job("backupBegin", fake::set_bitmap(&source, &name, true))?;
            }
        }
        self.with(vm, |d| d.checkpoints.push(name))
    }

    async fn backup_job(&self, vm: &str) -> Result<BackupJobState, LibvirtError> {
        self.enter("getJobStats").await?;
        self.with(vm, |d| match &mut d.lingering_job {
            None => BackupJobState::Completed,
            Some(LingeringJob { aborted: true, polls: 0, targets }) => {
                d.job_ended_without_its_targets |= targets.iter().any(|t| !t.exists());
                d.lingering_job = None;
                BackupJobState::Cancelled
            }
            Some(job) => {
                job.polls = job.polls.saturating_sub(usize::from(job.aborted));
                BackupJobState::Running
            }
        })
    }

    async fn abort_job(&self, vm: &str) -> Result<(), LibvirtError> {
        self.enter("abortJob").await?;
        self.with(vm, |d| {
            if let Some(job) = &mut d.lingering_job {
                job.aborted = true;
            }
        })
    }

    async fn checkpoint_redefine(&self, vm: &str, xml: String) -> Result<(), LibvirtError> {
        self.enter("checkpointCreateXML").await?;
        let name = checkpoint_name(&xml).ok_or_else(|| injected("checkpointCreateXML"))?;
        self.with(vm, |d| d.checkpoints.push(name))
    }

    async fn checkpoint_names(&self, vm: &str) -> Result<Vec<String>, LibvirtError> {
        self.enter("listAllCheckpoints").await?;
        self.with(vm, |d| d.checkpoints.clone())
    }

    /// Without `metadata_only`, the bitmaps go from the disks' files too, as libvirt removes
    /// them from a running domain's disks.
    async fn checkpoint_delete(&self, vm: &str, name: &str, metadata_only: bool) -> Result<(), LibvirtError> {
        self.enter("checkpointDelete").await?;
        if self.with(vm, |d| d.lingering_job.is_some())? {
            let message = "a backup job is still running".into();
            return Err(LibvirtError::Call { call: "checkpointDelete", message, code: 1 });
        }
        let xml = self.with(vm, |d| {
            d.checkpoints.retain(|c| c != name);
            d.xml.clone()
        })?;
        if !metadata_only {
            for file in crate::domain::live_disks(&xml).unwrap_or_default().into_iter().filter_map(|d| d.file) {
                let _ = fake::set_bitmap(Path::new(&file), name, false);
            }
        }
        Ok(())
    }

    async fn attach_device(&self, vm: &str, xml: String) -> Result<(), LibvirtError> {
        self.enter("attachDeviceFlags").await?;
        self.change_device(vm, "attachDeviceFlags", &xml, |domain, found| match found {
            Some(_) => Err("a device with this target or MAC is already attached".into()),
            None => {
                let at = domain.find("</devices>").ok_or("no <devices>")?;
                Ok(format!("{}{xml}\n  {}", &domain[..at], &domain[at..]))
            }
        })
    }

    async fn detach_device(&self, vm: &str, xml: String) -> Result<(), LibvirtError> {
        self.enter("detachDeviceFlags").await?;
        self.change_device(vm, "detachDeviceFlags", &xml, |domain, found| {
            let r = found.ok_or("no such device")?;
            Ok(format!("{}{}", &domain[..r.start], &domain[r.end..]))
        })
    }

    async fn update_device(&self, vm: &str, xml: String) -> Result<(), LibvirtError> {
        self.enter("updateDeviceFlags").await?;
        self.change_device(vm, "updateDeviceFlags", &xml, |domain, found| {
            let r = found.ok_or("no such device")?;
            Ok(format!("{}{xml}{}", &domain[..r.start], &domain[r.end..]))
        })
    }

    async fn set_ceph_secret(&self, uuid: &str, key: Vec<u8>) -> Result<(), LibvirtError> {
        self.enter("secretDefineXML").await?;
        self.secrets.lock().unwrap().insert(uuid.to_owned(), ("ceph", key));
        Ok(())
    }

    async fn set_vtpm_secret(&self, uuid: &str, _vm: &str, key: Vec<u8>) -> Result<(), LibvirtError> {
        self.enter("secretDefineXML").await?;
        let mut secrets = self.secrets.lock().unwrap();
        if secrets.get(uuid).is_some_and(|(usage, _)| *usage != "vtpm") {
            // As libvirt refuses to change a secret's usage.
            let message = format!("a secret with UUID {uuid} is already defined for another usage");
            return Err(LibvirtError::Call { call: "secretDefineXML", message, code: 1 });
        }
        secrets.insert(uuid.to_owned(), ("vtpm", key));
        Ok(())
    }

    async fn vtpm_secret_value(&self, uuid: &str) -> Result<Option<Vec<u8>>, LibvirtError> {
        self.enter("secretGetValue").await?;
        Ok(self.secrets.lock().unwrap().get(uuid).filter(|(usage, _)| *usage == "vtpm").map(|(_, key)| key.clone()))
    }

    async fn remove_vtpm_secret(&self, uuid: &str) -> Result<(), LibvirtError> {
        self.enter("secretUndefine").await?;
        self.secrets.lock().unwrap().retain(|u, (usage, _)| u != uuid || *usage != "vtpm");
        Ok(())
    }

    async fn guest_agent_connected(&self, vm: &str) -> Result<bool, LibvirtError> {
        self.enter("guestAgentConnected").await?;
        self.with(vm, |d| d.state.is_active() && d.agent == GuestAgent::Answering)
    }

    async fn guest_fs_freeze(&self, vm: &str, _timeout: Duration) -> Result<u32, LibvirtError> {
        self.enter("domainFSFreeze").await?;
        self.with(vm, |d| {
            let d = d.answering_agent("domainFSFreeze")?;
            if d.guest_frozen {
                // As qemu-ga answers a second freeze.
                return Err(LibvirtError::Call { call: "domainFSFreeze", message: "already frozen".into(), code: 1 });
            }
            d.guest_frozen = true;
            d.guest_freezes += 1;
            Ok(1)
        })?
    }

    async fn guest_fs_thaw(&self, vm: &str, _timeout: Duration) -> Result<(), LibvirtError> {
        self.enter("domainFSThaw").await?;
        self.with(vm, |d| d.answering_agent("domainFSThaw").map(|d| d.guest_frozen = false))?
    }
}
