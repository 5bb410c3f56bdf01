//! Native `/vm/clone`: one VM into N copies, in parallel. Linked clones are overlays on a
//! frozen snapshot of the source (see [`super::freeze`]); copies are flat, independent files.
//! The source keeps running and sees the same data. Each clone is all-or-nothing on its own:
//! one failing does not undo the others, and leaves nothing behind.

use futures::StreamExt;
use serde_json::{json, Value};
use std::collections::HashSet;

use super::assemble::{self, NewVm, Source};
use super::capture::{self, capture, Freeze};
use super::cloud_init;
use super::derived::{fresh_nics, path_beside, random_uuid};
use super::volumes::{self, CLONE_SNAPSHOT_PREFIX};
use crate::app::App;
use crate::error::{AgentError, AgentResult};
use crate::model::VmSpec;
use crate::storage::location::Location;
use crate::tasks::TaskCtx;
use crate::wire::cloud_init::CloudInitChoice;
use crate::wire::native::{CloneMode, CloneSpec, CloneVmCmd, CloneVmRsp};

const MAX_CLONES: usize = 1000;

/// One clone to make: its spec (volumes already pointing at their targets) and, per volume,
/// the source volume it is made from (uuid and install path).
struct Plan {
    spec: VmSpec,
    sources: Vec<(String, String)>,
}

/// Works out every clone's spec and target paths, and checks them all before anything is made.
fn plan(app: &App, cmd: &CloneVmCmd, source: &VmSpec) -> AgentResult<Vec<Plan>> {
    let n = cmd.names.len().max(cmd.clones.len());
    if n == 0 {
        return Err(AgentError::invalid("give at least one clone in `names` or `clones`"));
    }
    if n > MAX_CLONES {
        return Err(AgentError::invalid(format!("{n} clones requested; at most {MAX_CLONES} per call")));
    }
    if !cmd.names.is_empty() && !cmd.clones.is_empty() && cmd.names.len() != cmd.clones.len() {
        return Err(AgentError::invalid(format!(
            "`names` has {} entries but `clones` has {}",
            cmd.names.len(),
            cmd.clones.len()
        )));
    }
    let shared = cmd.cloud_init.as_ref().map(|c| c.validate("cloudInit")).transpose()?.unwrap_or_default();
    if shared.hostname.is_some() {
        return Err(AgentError::invalid(
            "cloudInit.hostname: each clone has its own host name; give it in clones[i].cloudInit.hostname",
        ));
    }
    let mut uuids = HashSet::new();
    let mut targets = HashSet::new();
    // Volume uuids are the management plane's records: none may name two volumes.
    let mut volume_uuids: HashSet<String> = source.volumes.iter().map(|v| v.uuid.clone()).collect();
    let mut plans = Vec::with_capacity(n);
    let empty = CloneSpec::default();
    for i in 0..n {
        let c = cmd.clones.get(i).unwrap_or(&empty);
        let uuid = c.uuid.clone().unwrap_or_else(random_uuid);
        crate::domain::check_uuid(&uuid).map_err(|e| e.context(format!("clones[{i}].uuid")))?;
        if uuid == source.uuid || !uuids.insert(uuid.clone()) {
            return Err(AgentError::invalid(format!("clone uuid {uuid} is used twice")));
        }
        if app.vms.is_known(&uuid) {
            return Err(AgentError::conflict(format!("VM {uuid} already exists on this host")));
        }
        let mut spec = source.clone();
        spec.uuid = uuid.clone();
        spec.name = cmd
            .names
            .get(i)
            .cloned()
            .or_else(|| c.name.clone())
            .unwrap_or_else(|| format!("{}-clone-{}", source.name, i + 1));
        crate::domain::xml_safe(&format!("clones[{i}] name"), &spec.name)?;
        spec.serial_number = uuid::Uuid::new_v4().to_string();
        spec.renew_genid();
        // Its own NVRAM, made beside its own root.
        spec.nvram = None;
        if let Some(f) = cmd.firmware {
            f.check_machine(spec.machine).map_err(|e| AgentError::invalid(format!("firmware: {e}")))?;
            spec.firmware = f;
        }
        spec.nics = fresh_nics(&source.nics, c.nics.as_ref()).map_err(|e| e.context(format!("clones[{i}].nics")))?;
        if !cmd.full {
            spec.volumes.truncate(1);
        }
        if c.data_install_paths.len() > spec.data_volumes().len() {
            return Err(AgentError::invalid(format!(
                "clones[{i}].dataInstallPaths names more volumes than are cloned"
            )));
        }
        let new_uuids = volume_uuids_of(i, c, spec.data_volumes().len())?;
        let mut sources = Vec::new();
        let volumes = spec.volumes.iter_mut();
        for ((k, v), new_volume) in volumes.enumerate().zip(new_uuids) {
            if !volume_uuids.insert(new_volume.clone()) {
                return Err(AgentError::invalid(format!("clones[{i}]: volume uuid {new_volume} is used twice")));
            }
            let given = if k == 0 { c.root_install_path.clone() } else { c.data_install_paths.get(k - 1).cloned() };
            let target = given.unwrap_or_else(|| path_beside(&v.install_path(), &new_volume));
            let target = Location::confined(&target, app.storage.roots())?;
            match &target {
                Location::Rbd(p) => p.require_image()?,
                Location::File(confined) if confined.symlink_metadata().is_ok() => {
                    return Err(AgentError::conflict(format!(
                        "clones[{i}]: volume {} already exists",
                        confined.display()
                    )))
                }
                Location::File(_) => {}
            }
            if !targets.insert(target.clone()) {
                return Err(AgentError::invalid(format!("clones[{i}]: install path {target} is named twice")));
            }
            sources.push((v.uuid.clone(), v.install_path()));
            *v = v.moved_to(new_volume, target, v.rbd.clone());
        }
        spec.cloud_init = clone_cloud_init(app, source, &spec, &shared, c, i)?;
        plans.push(Plan { spec, sources });
    }
    Ok(plans)
}

/// The volume uuids of clone `i`, root first: those given, checked, or new ones.
fn volume_uuids_of(i: usize, c: &CloneSpec, data_volumes: usize) -> AgentResult<Vec<String>> {
    let data = match &c.data_volume_uuids {
        Some(given) if given.len() != data_volumes => {
            return Err(AgentError::invalid(format!(
                "clones[{i}].dataVolumeUuids has {} uuids but {data_volumes} data volumes are cloned: give one per \
                 cloned data volume, in the source's order",
                given.len()
            )))
        }
        Some(given) => given.clone(),
        None => (0..data_volumes).map(|_| random_uuid()).collect(),
    };
    let root = c.root_volume_uuid.clone().unwrap_or_else(random_uuid);
    let all: Vec<String> = std::iter::once(root).chain(data).collect();
    for (k, u) in all.iter().enumerate() {
        let field = if k == 0 { "rootVolumeUuid".to_owned() } else { format!("dataVolumeUuids[{}]", k - 1) };
        crate::domain::check_uuid(u).map_err(|e| e.context(format!("clones[{i}].{field}")))?;
    }
    Ok(all)
}

/// Clone `i`'s seed (`spec` with its NICs and volumes in place): the source's settings under the
/// call's (`shared`) and the clone entry's, the clone's own host name; none when no one asks.
fn clone_cloud_init(
    app: &App,
    source: &VmSpec,
    spec: &VmSpec,
    shared: &CloudInitChoice,
    entry: &CloneSpec,
    i: usize,
) -> AgentResult<Option<crate::model::CloudInit>> {
    let at = format!("clones[{i}].cloudInit");
    let own = entry.cloud_init.as_ref().map(|c| c.validate(&at)).transpose()?;
    if source.cloud_init.is_none() && *shared == CloudInitChoice::default() && own.is_none() {
        return Ok(None);
    }
    let own = own.unwrap_or_default();
    let network_given = shared.network.is_some() || own.network.is_some();
    let inherited = cloud_init::inherit(source, &spec.nics, network_given).map_err(|e| e.context(at))?;
    let choice = cloud_init::merge(cloud_init::merge(inherited, shared), &own);
    cloud_init::settle(app, spec, choice).map(Some)
}

pub async fn clone(app: &App, ctx: &TaskCtx, cmd: CloneVmCmd) -> AgentResult<CloneVmRsp> {
    let owner = app.vms.lock(&cmd.vm_uuid).await?;
    let mut source = owner.load()?;
    let mut plans = plan(app, &cmd, &source)?;
    check_plans(app, ctx, &plans).await?;
    if source.tpm_encrypted {
        let key = super::tpm::key_of(app, &source.uuid).await?;
        plans.iter_mut().for_each(|p| p.spec.tpm_key = Some(key.clone()));
    }

    // Linked clones need frozen files; copies read a stopped source as it is. The TPM state is
    // taken at the same instant as the disks.
    let staging = app.config.state_dir.join("staging").join(format!("tpm-{}", ctx.task_id));
    let rbd_snapshot = format!("{CLONE_SNAPSHOT_PREFIX}{}", uuid::Uuid::new_v4().simple());
    let opts = capture::Options {
        with_data: cmd.full,
        freeze: if cmd.mode == CloneMode::Linked { Freeze::Always } else { Freeze::WhenRunning },
        rbd_snapshot: &rbd_snapshot,
        rbd_snapshot_temporary: true,
        tpm_to: Some(&staging),
        task_id: &ctx.task_id,
        quiesce: cmd.quiesce,
    };
    let captured = capture(app, &owner, &mut source, opts, &ctx.stop)
        .await
        .map_err(|e| e.context("step 'freeze source' failed"))?;
    let captured = &captured;

    let tpm_source = captured.tpm_copied.then_some(staging.as_path());
    let source_nvram = source.nvram.as_deref();
    let linked = cmd.mode == CloneMode::Linked;
    let total = plans.len();
    // Clones finish in any order (several run at once): progress counts the finished ones.
    let finished = &std::sync::atomic::AtomicUsize::new(0);
    // Each answer, with the snapshots a linked clone made in it depends on.
    let answers: Vec<(Value, Vec<String>)> = futures::stream::iter(plans)
        .map(|p| async move {
            let name = p.spec.name.clone();
            let uuid = p.spec.uuid.clone();
            let sources: Vec<Source> = (p.sources.iter())
                .map(|(volume, path)| Source::Clone { from: captured.point(volume, path), linked })
                .collect();
            // The source's variables (boot entries, enrolled keys) only suit the same firmware.
            let nvram_from = source_nvram.filter(|_| p.spec.firmware == source.firmware);
            let new =
                NewVm { spec: &p.spec, sources: &sources, tpm_from: tpm_source, nvram_from, strategy: cmd.strategy };
            let r = match app.vms.lock(&uuid).await {
                Ok(clone) => assemble::make(app, ctx, &clone, new).await,
                Err(e) => Err(e),
            };
            let done = finished.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            ctx.progress((done * 100 / total) as u8, "clone finished");
            match r {
                Ok(inv) => {
                    let parents = sources.into_iter().filter_map(|s| match s {
                        Source::Clone { from, linked: true } => Some(from),
                        _ => None,
                    });
                    (json!({ "inventory": inv }), parents.collect())
                }
                Err(e) => {
                    let failed =
                        json!({ "uuid": uuid, "name": name, "error": e.error_code(), "message": e.to_string() });
                    (failed, Vec::new())
                }
            }
        })
        .buffered(app.config.clone.parallelism)
        .collect()
        .await;
    let _ = std::fs::remove_dir_all(&staging);
    // A snapshot a linked clone was just made from has a clone: it stays without asking the
    // cluster, whose listing of a snapshot's clones opens every one of them.
    let (results, parents): (Vec<Value>, Vec<Vec<String>>) = answers.into_iter().unzip();
    let depended_on: HashSet<&str> = parents.iter().flatten().map(String::as_str).collect();
    captured.drop_unused_rbd_snapshots(app, &depended_on).await;
    let rbd_sources =
        captured.rbd_snapshots.iter().map(|(image, snap)| json!({"installPath": image, "snapshotPath": snap}));
    Ok(CloneVmRsp {
        number_of_cloned_vm: results.iter().filter(|r| r.get("inventory").is_some()).count(),
        inventories: results,
        source_volumes: captured.frozen.iter().map(|z| json!(z)).chain(rbd_sources).collect(),
        quiesced: captured.quiesced,
    })
}

/// The checks that need the host or the cluster: no clone's domain exists, every source is
/// usable (each checked once) and every RBD target is free. The domain lookups and the RBD
/// checks are a call each, made concurrently.
async fn check_plans(app: &App, ctx: &TaskCtx, plans: &[Plan]) -> AgentResult<()> {
    let mut sources = HashSet::new();
    let mut rbd_targets = Vec::new();
    for p in plans {
        for ((_, s), v) in p.sources.iter().zip(p.spec.volumes.iter()) {
            if Location::is_rbd(&v.install_path()) {
                rbd_targets.push(v.install_path().clone());
            }
            if !sources.insert(s.as_str()) {
                continue;
            }
            volumes::store(app, s)?.check_source(s, &ctx.stop).await?;
        }
    }
    let parallelism = app.config.clone.parallelism;
    let vms: Vec<String> = plans.iter().map(|p| p.spec.uuid.clone()).collect();
    let domains: Vec<AgentResult<()>> = futures::stream::iter(vms)
        .map(|vm: String| async move {
            match app.libvirt.domain_state(&vm).await? {
                Some(_) => Err(AgentError::conflict(format!("a domain for VM {vm} already exists on this host"))),
                None => Ok(()),
            }
        })
        .buffer_unordered(parallelism)
        .collect()
        .await;
    domains.into_iter().collect::<AgentResult<()>>()?;
    let checks: Vec<AgentResult<()>> = futures::stream::iter(rbd_targets)
        .map(|t: String| async move { volumes::store(app, &t)?.check_free(&t, &ctx.stop).await })
        .buffer_unordered(parallelism)
        .collect()
        .await;
    checks.into_iter().collect()
}
