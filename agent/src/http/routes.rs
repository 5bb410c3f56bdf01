//! The path table: which command paths exist, whether each is sync or async, and which handler
//! serves it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde_json::Value;

use crate::app::App;
use crate::compat;
use crate::error::AgentResult;
use crate::image_cache;
use crate::ops;
use crate::tasks::TaskCtx;

pub type HandlerFuture = Pin<Box<dyn Future<Output = AgentResult<Value>> + Send>>;
pub type Handler = fn(Arc<App>, TaskCtx, Value) -> HandlerFuture;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// Answered in the HTTP response; a `taskuuid` header is refused.
    Sync,
    /// Acknowledged at once; the result goes to `callbackurl`.
    Async,
}

pub struct Route {
    pub path: &'static str,
    pub style: Style,
    pub handler: Handler,
}

fn encode<T: serde::Serialize>(rsp: T) -> AgentResult<Value> {
    serde_json::to_value(rsp)
        .map_err(|e| crate::error::AgentError::internal(format!("cannot encode the response: {e}")))
}

/// `answer` with the Ceph cluster's capacity added, when the cluster reports one.
async fn with_ceph_capacity(app: &App, mut answer: Value) -> Value {
    match (app.ceph.capacity().await, answer.as_object_mut()) {
        (Ok(c), Some(m)) => {
            m.insert("totalCapacity".into(), c.total.into());
            m.insert("availableCapacity".into(), c.available.into());
        }
        (Err(e), _) => tracing::warn!(error = %e, "cannot read the Ceph cluster's capacity for the answer"),
        _ => {}
    }
    answer
}

/// Adapts `async fn(&App, &TaskCtx, Cmd) -> AgentResult<Rsp>` to a [`Handler`]: decodes the
/// command (naming a bad field) and encodes the response.
macro_rules! typed {
    ($f:path) => {
        |app: Arc<App>, ctx: TaskCtx, body: Value| -> HandlerFuture {
            Box::pin(async move {
                let cmd = crate::wire::decode(&body)?;
                let rsp = $f(&app, &ctx, cmd).await?;
                encode(rsp)
            })
        }
    };
}

/// Like `typed!`, for the Ceph primary-storage paths: a successful answer also carries the
/// cluster's `totalCapacity`/`availableCapacity`, from which the management node keeps the
/// storage's capacity (as from ZStack's Ceph agent).
macro_rules! ceph {
    ($f:path) => {
        |app: Arc<App>, ctx: TaskCtx, body: Value| -> HandlerFuture {
            Box::pin(async move {
                let cmd = crate::wire::decode(&body)?;
                let rsp = $f(&app, &ctx, cmd).await?;
                Ok(with_ceph_capacity(&app, encode(rsp)?).await)
            })
        }
    };
}

/// Like `typed!`, for native commands: unknown fields are refused ([`crate::wire::decode_native`]).
macro_rules! native {
    ($f:path) => {
        |app: Arc<App>, ctx: TaskCtx, body: Value| -> HandlerFuture {
            Box::pin(async move {
                let cmd = crate::wire::decode_native(&body)?;
                let rsp = $f(&app, &ctx, cmd).await?;
                encode(rsp)
            })
        }
    };
}

/// A path of a network service this agent does not provide: answered in-band with an error
/// naming the service ([`compat::network::unsupported`]), never a 404.
macro_rules! unsupported {
    ($service:literal) => {
        |_: Arc<App>, ctx: TaskCtx, _: Value| -> HandlerFuture {
            Box::pin(async move { Err(compat::network::unsupported($service, &ctx.path)) })
        }
    };
}

fn echo(_: Arc<App>, _: TaskCtx, _: Value) -> HandlerFuture {
    Box::pin(async { Ok(Value::Null) })
}

/// ZStack's paths, with the semantics of its Python agent.
static ZSTACK_ROUTES: &[Route] = &[
    Route { path: "/host/echo", style: Style::Sync, handler: echo },
    Route { path: "/host/connect", style: Style::Sync, handler: typed!(compat::host::connect) },
    Route { path: "/host/ping", style: Style::Async, handler: typed!(compat::host::ping) },
    Route { path: "/host/fact", style: Style::Async, handler: typed!(compat::host::fact) },
    Route {
        path: "/host/update/configuration",
        style: Style::Async,
        handler: typed!(compat::host::update_configuration),
    },
    Route { path: "/host/capacity", style: Style::Async, handler: typed!(compat::host::capacity) },
    Route { path: "/vm/vmsync", style: Style::Async, handler: typed!(compat::host::vm_sync) },
    Route { path: "/job/cancel", style: Style::Async, handler: typed!(compat::host::cancel) },
    Route { path: "/vm/start", style: Style::Async, handler: typed!(compat::vm::start) },
    Route { path: "/vm/stop", style: Style::Async, handler: typed!(compat::vm::stop) },
    Route { path: "/vm/destroy", style: Style::Async, handler: typed!(compat::vm::destroy) },
    Route { path: "/vm/volume/takesnapshot", style: Style::Async, handler: typed!(compat::snapshot::take) },
    Route { path: "/vm/volume/mergesnapshot", style: Style::Async, handler: typed!(compat::snapshot::merge) },
    Route { path: "/vm/reboot", style: Style::Async, handler: typed!(compat::vm_devices::reboot) },
    Route { path: "/vm/pause", style: Style::Async, handler: typed!(compat::vm_devices::pause) },
    Route { path: "/vm/resume", style: Style::Async, handler: typed!(compat::vm_devices::resume) },
    Route { path: "/vm/attachdatavolume", style: Style::Async, handler: typed!(compat::vm_devices::attach_volume) },
    Route { path: "/vm/detachdatavolume", style: Style::Async, handler: typed!(compat::vm_devices::detach_volume) },
    Route { path: "/vm/iso/attach", style: Style::Async, handler: typed!(compat::vm_devices::attach_iso) },
    Route { path: "/vm/iso/detach", style: Style::Async, handler: typed!(compat::vm_devices::detach_iso) },
    Route { path: "/vm/attachnic", style: Style::Async, handler: typed!(compat::vm_devices::attach_nic) },
    Route { path: "/vm/detachnic", style: Style::Async, handler: typed!(compat::vm_devices::detach_nic) },
    Route { path: "/vm/getvncport", style: Style::Async, handler: typed!(compat::vm_devices::get_vnc_port) },
    Route { path: "/vm/checkstate", style: Style::Async, handler: typed!(compat::vm_devices::check_state) },
    Route { path: "/vm/volumesync", style: Style::Async, handler: typed!(compat::vm_devices::volume_sync) },
    Route { path: "/vm/createcephsecret", style: Style::Async, handler: typed!(compat::vm::create_ceph_secret) },
    Route {
        path: "/localstorage/snapshot/offlinemerge",
        style: Style::Async,
        handler: typed!(compat::localstorage::offline_merge),
    },
    Route {
        path: "/localstorage/volume/estimatetemplatesize",
        style: Style::Async,
        handler: typed!(compat::localstorage::estimate_template_size),
    },
    Route {
        path: "/localstorage/getphysicalcapacity",
        style: Style::Async,
        handler: typed!(compat::localstorage_files::physical_capacity),
    },
    Route {
        path: "/localstorage/volume/createfolder",
        style: Style::Async,
        handler: typed!(compat::localstorage_files::create_folder),
    },
    Route {
        path: "/localstorage/deletedir",
        style: Style::Async,
        handler: typed!(compat::localstorage_files::delete_dir),
    },
    Route { path: "/localstorage/unlink", style: Style::Async, handler: typed!(compat::localstorage_files::unlink) },
    Route {
        path: "/localstorage/check/initializedfile",
        style: Style::Async,
        handler: typed!(compat::localstorage_files::check_initialized_file),
    },
    Route {
        path: "/localstorage/create/initializedfile",
        style: Style::Async,
        handler: typed!(compat::localstorage_files::create_initialized_file),
    },
    Route {
        path: "/localstorage/getqcow2reference",
        style: Style::Async,
        handler: typed!(compat::localstorage_files::qcow2_reference),
    },
    Route {
        path: "/localstorage/volume/batchgetsize",
        style: Style::Async,
        handler: typed!(compat::localstorage_files::batch_get_size),
    },
    Route {
        path: "/localstorage/volume/getbaseimagepath",
        style: Style::Async,
        handler: typed!(compat::localstorage_files::base_image_path),
    },
    Route {
        path: "/localstorage/snapshot/verifychain",
        style: Style::Async,
        handler: typed!(compat::localstorage_files::verify_chain),
    },
    Route {
        path: "/localstorage/snapshot/rebasebackingfiles",
        style: Style::Async,
        handler: typed!(compat::localstorage_files::rebase_backing_files),
    },
    Route {
        path: "/localstorage/volume/hardlink",
        style: Style::Async,
        handler: typed!(compat::localstorage_files::hardlink),
    },
    Route {
        path: "/localstorage/snapshot/revert",
        style: Style::Async,
        handler: typed!(compat::localstorage::revert_snapshot),
    },
    Route {
        path: "/localstorage/snapshot/merge",
        style: Style::Async,
        handler: typed!(compat::localstorage::merge_snapshot),
    },
    Route { path: "/localstorage/init", style: Style::Async, handler: typed!(compat::localstorage::init) },
    Route { path: "/localstorage/checkbits", style: Style::Async, handler: typed!(compat::localstorage::check_bits) },
    Route {
        path: "/localstorage/volume/createvolumefromcache",
        style: Style::Async,
        handler: typed!(compat::localstorage::create_volume_from_cache),
    },
    Route {
        path: "/localstorage/volume/createempty",
        style: Style::Async,
        handler: typed!(compat::localstorage::create_empty),
    },
    Route {
        path: "/localstorage/volume/getsize",
        style: Style::Async,
        handler: typed!(compat::localstorage::get_size),
    },
    Route {
        path: "/localstorage/volume/getbackingchain",
        style: Style::Async,
        handler: typed!(compat::localstorage::get_backing_chain),
    },
    Route { path: "/localstorage/delete", style: Style::Async, handler: typed!(compat::localstorage::delete) },
    Route {
        path: "/localstorage/volume/createwithbacking",
        style: Style::Async,
        handler: typed!(compat::localstorage::create_with_backing),
    },
    Route {
        path: "/localstorage/volume/createtemplate",
        style: Style::Async,
        handler: typed!(compat::localstorage::create_template),
    },
    Route {
        path: "/localstorage/reinit/image",
        style: Style::Async,
        handler: typed!(compat::localstorage::reinit_image),
    },
    Route {
        path: "/localstorage/sftp/download",
        style: Style::Async,
        handler: typed!(compat::localstorage::sftp_download),
    },
    Route {
        path: "/localstorage/sftp/upload",
        style: Style::Async,
        handler: typed!(compat::localstorage::sftp_upload),
    },
    Route {
        path: "/network/checkphysicalnetworkinterface",
        style: Style::Sync,
        handler: typed!(compat::network::check_interfaces),
    },
    Route {
        path: "/network/l2novlan/createbridge",
        style: Style::Async,
        handler: typed!(compat::network::create_novlan),
    },
    Route { path: "/network/l2vlan/createbridge", style: Style::Async, handler: typed!(compat::network::create_vlan) },
    Route {
        path: "/network/l2novlan/checkbridge",
        style: Style::Async,
        handler: typed!(compat::network::check_novlan),
    },
    Route { path: "/network/l2vlan/checkbridge", style: Style::Async, handler: typed!(compat::network::check_vlan) },
    Route {
        path: "/network/l2novlan/deletebridge",
        style: Style::Async,
        handler: typed!(compat::network::delete_novlan),
    },
    Route { path: "/network/l2vlan/deletebridge", style: Style::Async, handler: typed!(compat::network::delete_vlan) },
    Route { path: "/flatnetworkprovider/dhcp/connect", style: Style::Async, handler: unsupported!("flat DHCP") },
    Route { path: "/flatnetworkprovider/dhcp/apply", style: Style::Async, handler: unsupported!("flat DHCP") },
    Route { path: "/flatnetworkprovider/dhcp/batchApply", style: Style::Async, handler: unsupported!("flat DHCP") },
    Route { path: "/flatnetworkprovider/dhcp/prepare", style: Style::Async, handler: unsupported!("flat DHCP") },
    Route { path: "/flatnetworkprovider/dhcp/batchPrepare", style: Style::Async, handler: unsupported!("flat DHCP") },
    Route { path: "/flatnetworkprovider/dhcp/release", style: Style::Async, handler: unsupported!("flat DHCP") },
    Route {
        path: "/flatnetworkprovider/dhcp/resetDefaultGateway",
        style: Style::Async,
        handler: unsupported!("flat DHCP"),
    },
    Route {
        path: "/flatnetworkprovider/dhcp/deletenamespace",
        style: Style::Async,
        handler: unsupported!("flat DHCP"),
    },
    Route { path: "/flatnetworkprovider/dhcp/flush", style: Style::Async, handler: unsupported!("flat DHCP") },
    Route { path: "/flatnetworkprovider/arping", style: Style::Async, handler: unsupported!("flat DHCP") },
    Route { path: "/flatnetworkprovider/userdata/apply", style: Style::Async, handler: unsupported!("flat user data") },
    Route {
        path: "/flatnetworkprovider/userdata/batchapply",
        style: Style::Async,
        handler: unsupported!("flat user data"),
    },
    Route {
        path: "/flatnetworkprovider/userdata/release",
        style: Style::Async,
        handler: unsupported!("flat user data"),
    },
    Route {
        path: "/flatnetworkprovider/userdata/cleanup",
        style: Style::Async,
        handler: unsupported!("flat user data"),
    },
    Route { path: "/flatnetworkprovider/eip/apply", style: Style::Async, handler: unsupported!("flat EIP") },
    Route { path: "/flatnetworkprovider/eip/delete", style: Style::Async, handler: unsupported!("flat EIP") },
    Route { path: "/flatnetworkprovider/eip/batchapply", style: Style::Async, handler: unsupported!("flat EIP") },
    Route { path: "/flatnetworkprovider/eip/batchdelete", style: Style::Async, handler: unsupported!("flat EIP") },
    Route { path: "/securitygroup/applyrules", style: Style::Async, handler: unsupported!("security groups") },
    Route { path: "/securitygroup/refreshrulesonhost", style: Style::Async, handler: unsupported!("security groups") },
    Route {
        path: "/securitygroup/checkdefaultrulesonhost",
        style: Style::Async,
        handler: unsupported!("security groups"),
    },
    Route { path: "/securitygroup/cleanupunusedrules", style: Style::Async, handler: unsupported!("security groups") },
    Route { path: "/securitygroup/updategroupmember", style: Style::Async, handler: unsupported!("security groups") },
    Route { path: "/ceph/primarystorage/echo", style: Style::Sync, handler: echo },
    Route { path: "/ceph/primarystorage/connect", style: Style::Async, handler: ceph!(compat::ceph::connect) },
    Route { path: "/ceph/primarystorage/ping", style: Style::Async, handler: ceph!(compat::ceph::ping) },
    Route { path: "/ceph/primarystorage/init", style: Style::Async, handler: ceph!(compat::ceph::init) },
    Route {
        path: "/ceph/primarystorage/volume/createempty",
        style: Style::Async,
        handler: ceph!(compat::ceph::create_empty),
    },
    Route { path: "/ceph/primarystorage/volume/clone", style: Style::Async, handler: ceph!(compat::ceph::clone) },
    Route { path: "/ceph/primarystorage/volume/flatten", style: Style::Async, handler: ceph!(compat::ceph::flatten) },
    Route {
        path: "/ceph/primarystorage/snapshot/create",
        style: Style::Async,
        handler: ceph!(compat::ceph::snapshot_create),
    },
    Route {
        path: "/ceph/primarystorage/snapshot/protect",
        style: Style::Async,
        handler: ceph!(compat::ceph::snapshot_protect),
    },
    Route {
        path: "/ceph/primarystorage/snapshot/unprotect",
        style: Style::Async,
        handler: ceph!(compat::ceph::snapshot_unprotect),
    },
    Route {
        path: "/ceph/primarystorage/snapshot/delete",
        style: Style::Async,
        handler: ceph!(compat::ceph::snapshot_delete),
    },
    Route { path: "/ceph/primarystorage/volume/cp", style: Style::Async, handler: ceph!(compat::ceph::copy) },
    Route { path: "/ceph/primarystorage/getvolumesize", style: Style::Async, handler: ceph!(compat::ceph::get_size) },
    Route { path: "/ceph/primarystorage/delete", style: Style::Async, handler: ceph!(compat::ceph::delete) },
    Route {
        path: "/ceph/primarystorage/volume/getbackingchain",
        style: Style::Async,
        handler: ceph!(compat::ceph::get_backing_chain),
    },
];

/// The native one-call operations, on paths no ZStack plugin registers.
pub(super) static NATIVE_ROUTES: &[Route] = &[
    Route { path: "/vm/create", style: Style::Async, handler: native!(ops::create::create) },
    Route { path: "/vm/changeimage", style: Style::Async, handler: native!(ops::change_image::change_image) },
    Route { path: "/vm/clone", style: Style::Async, handler: native!(ops::clone::clone) },
    Route { path: "/vm/flatten", style: Style::Async, handler: native!(ops::flatten::flatten) },
    Route { path: "/vm/snapshotgroup/take", style: Style::Async, handler: native!(ops::snapshot_group::take) },
    Route { path: "/vm/snapshotgroup/get", style: Style::Async, handler: native!(ops::snapshot_group::get) },
    Route { path: "/vm/createfromsnapshot", style: Style::Async, handler: native!(ops::snapshot_group::create_from) },
    Route { path: "/vm/backup", style: Style::Async, handler: native!(ops::backup::backup) },
    Route { path: "/vm/createfrombackup", style: Style::Async, handler: native!(ops::backup::create_from) },
    Route { path: "/image/cache", style: Style::Async, handler: native!(image_cache::cache) },
];

/// The route for `path` (a trailing `/` is ignored).
pub fn find(path: &str) -> Option<&'static Route> {
    let path = if path.len() > 1 { path.strip_suffix('/').unwrap_or(path) } else { path };
    ZSTACK_ROUTES.iter().chain(NATIVE_ROUTES).find(|r| r.path == path)
}

/// Every served path, for `--help`-style listings and tests.
pub fn paths() -> impl Iterator<Item = (&'static str, Style)> {
    ZSTACK_ROUTES.iter().chain(NATIVE_ROUTES).map(|r| (r.path, r.style))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailing_slash_finds_the_same_route() {
        assert_eq!(find("/host/ping/").map(|r| r.path), Some("/host/ping"));
        assert!(find("/host/nope").is_none());
        assert!(find("/").is_none());
    }

    #[test]
    fn paths_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for (p, _) in paths() {
            assert!(seen.insert(p), "duplicate route {p}");
        }
    }

    #[test]
    fn native_paths_are_not_zstack_paths_and_compat_paths_are() {
        let zstack: std::collections::HashSet<&str> =
            include_str!("zstack_paths.txt").lines().filter(|l| !l.starts_with('#')).collect();
        assert!(zstack.contains("/vm/volumes/takesnapshot") && zstack.len() > 500, "the list is read");
        for r in NATIVE_ROUTES {
            assert!(!zstack.contains(r.path), "native path {} is a ZStack path", r.path);
        }
        for r in ZSTACK_ROUTES {
            assert!(zstack.contains(r.path), "{} is served as ZStack's but no ZStack plugin registers it", r.path);
        }
    }
}
