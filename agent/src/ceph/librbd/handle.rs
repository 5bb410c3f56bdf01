//! Safe, owning wrappers of the librados cluster handle, a pool's I/O context and an open RBD
//! image: each closes what it holds when dropped, and each call answers the negative errno
//! librbd gave with the step that failed. The calls block; [`super::RbdLib`] runs them off the
//! async runtime.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::ffi::{self, Api};
use crate::qemu_img::nbd::coalesce;

/// A librados/librbd call that failed: what was being done and the (negative) errno.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fail {
    pub step: String,
    pub errno: i32,
}

pub type Res<T> = Result<T, Fail>;

/// `RBD_FEATURE_FAST_DIFF` of librbd.h: the image's object maps record which objects changed.
const FEATURE_FAST_DIFF: u64 = 1 << 4;

fn check(r: c_int, step: impl FnOnce() -> String) -> Res<c_int> {
    if r < 0 {
        Err(Fail { step: step(), errno: r })
    } else {
        Ok(r)
    }
}

/// Names reach C as NUL-terminated strings; one with a NUL inside is refused, not truncated.
fn cstr(s: &str) -> Res<CString> {
    CString::new(s).map_err(|_| Fail { step: format!("name {s:?} contains a NUL byte"), errno: -libc::EINVAL })
}

fn opt_cstr(s: Option<&str>) -> Res<Option<CString>> {
    s.map(cstr).transpose()
}

fn ptr_or_null(s: &Option<CString>) -> *const c_char {
    s.as_ref().map_or(std::ptr::null(), |c| c.as_ptr())
}

/// Copies a C string librbd owns (NULL reads as empty).
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string valid for the duration of the call.
unsafe fn owned(p: *const c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        // SAFETY: non-NULL and NUL-terminated per this function's contract.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

/// A connected librados cluster handle (`rados_t`); shut down when dropped.
pub struct Rados {
    raw: ffi::RadosT,
    api: &'static Api,
}

// SAFETY: librados' cluster handle is thread-safe: its calls lock internally, and the handle may
// be used from and dropped on any thread.
unsafe impl Send for Rados {}
// SAFETY: see `Send`; every method takes `&self` and librados serialises what needs it.
unsafe impl Sync for Rados {}

impl Rados {
    /// Reads `conf`, authenticates as `client.<id>` (with `keyring`, or the one `conf` names) and
    /// connects to the monitors.
    pub fn connect(
        api: &'static Api,
        conf: &Path,
        id: &str,
        keyring: Option<&Path>,
        options: &[(&str, &str)],
    ) -> Res<Rados> {
        let id_c = cstr(id)?;
        let mut raw: ffi::RadosT = std::ptr::null_mut();
        // SAFETY: `raw` is a valid out-pointer, `id_c` a NUL-terminated string alive for the call.
        check(unsafe { (api.rados_create)(&mut raw, id_c.as_ptr()) }, || format!("creating a client.{id} handle"))?;
        // From here `Drop` shuts the handle down on every early return.
        let rados = Rados { raw, api };
        let conf_c = cstr(&conf.to_string_lossy())?;
        // SAFETY: `rados.raw` was created above; `conf_c` is NUL-terminated.
        check(unsafe { (rados.api.rados_conf_read_file)(rados.raw, conf_c.as_ptr()) }, || {
            format!("reading {}", conf.display())
        })?;
        let keyring = keyring.map(|k| k.to_string_lossy().into_owned());
        for (k, v) in keyring.iter().map(|k| ("keyring", k.as_str())).chain(options.iter().copied()) {
            let (kc, vc) = (cstr(k)?, cstr(v)?);
            // SAFETY: handle created above, not yet connected; both strings NUL-terminated.
            check(unsafe { (rados.api.rados_conf_set)(rados.raw, kc.as_ptr(), vc.as_ptr()) }, || {
                format!("setting {k}")
            })?;
        }
        // SAFETY: a configured, unconnected handle.
        check(unsafe { (rados.api.rados_connect)(rados.raw) }, || {
            format!("connecting to the cluster of {} as client.{id}", conf.display())
        })?;
        Ok(rados)
    }
    /// Who this connection is in the cluster: the cluster's fsid, the client's address (what
    /// the OSDs list as watcher and the monitors blocklist) and its instance id.
    pub fn identity(&self) -> Res<ClientIdentity> {
        let mut fsid = [0 as c_char; 64];
        // SAFETY: connected handle; `fsid` is writable for its length, NUL-terminated on success.
        check(unsafe { (self.api.rados_cluster_fsid)(self.raw, fsid.as_mut_ptr(), fsid.len()) }, || {
            "reading the cluster's fsid".to_owned()
        })?;
        let mut addrs: *mut c_char = std::ptr::null_mut();
        // SAFETY: connected handle, valid out-pointer; librados allocates the string.
        check(unsafe { (self.api.rados_getaddrs)(self.raw, &mut addrs) }, || {
            "reading the client's address".to_owned()
        })?;
        // SAFETY: both NUL-terminated (fsid by librados, addrs allocated by it); addrs freed once.
        let (fsid, addr) = unsafe {
            let pair = (owned(fsid.as_ptr()), owned(addrs));
            (self.api.rados_buffer_free)(addrs);
            pair
        };
        // SAFETY: connected handle.
        let instance = unsafe { (self.api.rados_get_instance_id)(self.raw) };
        Ok(ClientIdentity { fsid, addr, instance })
    }

    /// Sends the JSON command `cmd` to the monitors; the status line they answer on success.
    pub fn mon_command(&self, cmd: &str) -> Res<String> {
        let cmd_c = cstr(cmd)?;
        let mut cmds = [cmd_c.as_ptr()];
        let (mut out, mut out_len, mut status, mut status_len) =
            (std::ptr::null_mut(), 0usize, std::ptr::null_mut(), 0usize);
        // SAFETY: connected handle; one NUL-terminated command; no input; valid out-pointers.
        let r = unsafe {
            (self.api.rados_mon_command)(
                self.raw,
                cmds.as_mut_ptr(),
                1,
                std::ptr::null(),
                0,
                &mut out,
                &mut out_len,
                &mut status,
                &mut status_len,
            )
        };
        // SAFETY: librados sets both buffers (or leaves them NULL); each is read by its length (it
        // need not be NUL-terminated) and freed once.
        let (output, status_line) = unsafe {
            let text = |p: *mut std::ffi::c_char, len: usize| {
                if p.is_null() {
                    String::new()
                } else {
                    String::from_utf8_lossy(std::slice::from_raw_parts(p.cast::<u8>(), len)).into_owned()
                }
            };
            let both = (text(out, out_len), text(status, status_len));
            (self.api.rados_buffer_free)(out);
            (self.api.rados_buffer_free)(status);
            both
        };
        check(r, || format!("monitor command {cmd}: {status_line}"))?;
        Ok(output)
    }

    /// The client addresses in the OSD map's blocklist.
    pub fn blocklisted(&self) -> Res<Vec<String>> {
        let out = self.mon_command(r#"{"prefix": "osd blocklist ls", "format": "json"}"#)?;
        Ok(crate::ceph::rbd::blocklisted_addrs(&out))
    }

    /// Waits until this client has the newest OSD map (so its next requests carry it).
    pub fn wait_for_latest_osdmap(&self) -> Res<()> {
        // SAFETY: connected handle.
        check(unsafe { (self.api.rados_wait_for_latest_osdmap)(self.raw) }, || {
            "waiting for the latest OSD map".to_owned()
        })
        .map(drop)
    }
}

/// A connected client as the cluster knows it.
#[derive(Debug, Clone)]
pub struct ClientIdentity {
    pub fsid: String,
    pub addr: String,
    pub instance: u64,
}

impl Drop for Rados {
    fn drop(&mut self) {
        // SAFETY: created by `rados_create`; every `IoCtx` holds an `Arc<Rados>`, so none is left.
        unsafe { (self.api.rados_shutdown)(self.raw) }
    }
}

/// Creation options of a new image; empty: the cluster's defaults, as `rbd` uses them.
struct ImageOptions {
    raw: ffi::ImageOptionsT,
    api: &'static Api,
}

impl ImageOptions {
    fn new(api: &'static Api) -> Self {
        let mut raw: ffi::ImageOptionsT = std::ptr::null_mut();
        // SAFETY: valid out-pointer; the call cannot fail.
        unsafe { (api.rbd_image_options_create)(&mut raw) };
        ImageOptions { raw, api }
    }
}

impl Drop for ImageOptions {
    fn drop(&mut self) {
        // SAFETY: created by `rbd_image_options_create`, destroyed once.
        unsafe { (self.api.rbd_image_options_destroy)(self.raw) }
    }
}

/// The I/O context of one pool (`rados_ioctx_t`); it keeps its cluster handle alive.
pub struct IoCtx {
    raw: ffi::IoCtxT,
    pool: String,
    cluster: Arc<Rados>,
}

// SAFETY: the agent never changes the context's state (snapshot, namespace, locator); librbd
// copies the context for every image and operation, so sharing it between threads is safe.
unsafe impl Send for IoCtx {}
// SAFETY: see `Send`.
unsafe impl Sync for IoCtx {}

impl IoCtx {
    pub fn open(cluster: &Arc<Rados>, pool: &str) -> Res<IoCtx> {
        let pool_c = cstr(pool)?;
        let mut raw: ffi::IoCtxT = std::ptr::null_mut();
        // SAFETY: connected handle, NUL-terminated pool name, valid out-pointer.
        check(unsafe { (cluster.api.rados_ioctx_create)(cluster.raw, pool_c.as_ptr(), &mut raw) }, || {
            format!("opening pool {pool}")
        })?;
        Ok(IoCtx { raw, pool: pool.to_owned(), cluster: cluster.clone() })
    }

    pub fn create(&self, name: &str, size: u64) -> Res<()> {
        let name_c = cstr(name)?;
        let opts = ImageOptions::new(self.api());
        // SAFETY: live context and options; NUL-terminated name.
        check(unsafe { (self.api().rbd_create4)(self.raw, name_c.as_ptr(), size, opts.raw) }, || {
            self.step("creating", name)
        })
        .map(drop)
    }

    /// A clone of `parent@snap` (in `parent_io`'s pool) named `name` in this pool.
    pub fn clone_snapshot(&self, parent_io: &IoCtx, parent: &str, snap: &str, name: &str) -> Res<()> {
        let (p, s, n) = (cstr(parent)?, cstr(snap)?, cstr(name)?);
        let opts = ImageOptions::new(self.api());
        // SAFETY: both contexts live, all strings NUL-terminated, options live for the call.
        let r =
            unsafe { (self.api().rbd_clone3)(parent_io.raw, p.as_ptr(), s.as_ptr(), self.raw, n.as_ptr(), opts.raw) };
        check(r, || format!("cloning {}/{parent}@{snap} to {}/{name}", parent_io.pool, self.pool)).map(drop)
    }

    pub fn remove(&self, name: &str) -> Res<()> {
        let name_c = cstr(name)?;
        // SAFETY: live context, NUL-terminated name.
        check(unsafe { (self.api().rbd_remove)(self.raw, name_c.as_ptr()) }, || self.step("removing", name)).map(drop)
    }

    /// Removes the RADOS object `oid` of the pool.
    pub fn remove_object(&self, oid: &str) -> Res<()> {
        let oid_c = cstr(oid)?;
        // SAFETY: live context, NUL-terminated object name.
        check(unsafe { (self.api().rados_remove)(self.raw, oid_c.as_ptr()) }, || self.step("removing the object", oid))
            .map(drop)
    }

    pub fn trash_move(&self, name: &str, delay_secs: u64) -> Res<()> {
        let name_c = cstr(name)?;
        // SAFETY: live context, NUL-terminated name.
        check(unsafe { (self.api().rbd_trash_move)(self.raw, name_c.as_ptr(), delay_secs) }, || {
            self.step("moving to the trash", name)
        })
        .map(drop)
    }

    fn step(&self, doing: &str, name: &str) -> String {
        format!("{doing} {}/{name}", self.pool)
    }

    fn api(&self) -> &'static Api {
        self.cluster.api
    }
}

impl Drop for IoCtx {
    fn drop(&mut self) {
        // SAFETY: created by `rados_ioctx_create`; every `Image` borrows it, so none is open.
        unsafe { (self.api().rados_ioctx_destroy)(self.raw) }
    }
}

/// What `rbd_stat` and `rbd_get_parent` say of an image.
pub struct Stat {
    pub size: u64,
    pub object_size: u64,
}

/// The parent snapshot of a clone.
pub struct ParentSpec {
    pub pool: String,
    pub image: String,
    pub snapshot: String,
}

/// An open image (`rbd_image_t`), at its head or at a snapshot; closed when dropped.
pub struct Image<'io> {
    raw: ffi::ImageT,
    spec: String,
    io: &'io IoCtx,
}

// SAFETY: an open librbd image may be used from any thread; the agent uses each from one thread.
unsafe impl Send for Image<'_> {}

/// Calls `F` for `librbd_progress_fn_t`; `F` answers whether to go on.
extern "C" fn progress_trampoline<F: Fn(u64, u64) -> bool + Sync>(offset: u64, total: u64, arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the `&F` the caller passed, alive until the librbd call returns.
    let f = unsafe { &*(arg as *const F) };
    if f(offset, total) {
        0
    } else {
        -libc::ECANCELED
    }
}

/// Calls `F` for each extent `rbd_diff_iterate2` reports.
extern "C" fn diff_trampoline<F: Fn(u64, u64, bool) + Sync>(
    offset: u64,
    len: usize,
    exists: c_int,
    arg: *mut c_void,
) -> c_int {
    // SAFETY: `arg` is the `&F` the caller passed, alive until the librbd call returns.
    let f = unsafe { &*(arg as *const F) };
    f(offset, len as u64, exists != 0);
    0
}

/// The callback and argument that make librbd call `f` with its progress.
fn progress_args<F: Fn(u64, u64) -> bool + Sync>(f: &F) -> (ffi::ProgressFn, *mut c_void) {
    (progress_trampoline::<F>, f as *const F as *mut c_void)
}

/// The callback and argument that make librbd call `f` for each extent.
fn diff_args<F: Fn(u64, u64, bool) + Sync>(f: &F) -> (ffi::DiffFn, *mut c_void) {
    (diff_trampoline::<F>, f as *const F as *mut c_void)
}

impl<'io> Image<'io> {
    /// Opens `name` (at `snap`, if given). Read-only opens register no watch, so they do not
    /// show up among the image's watchers and need no exclusive lock.
    pub fn open(io: &'io IoCtx, name: &str, snap: Option<&str>, read_only: bool) -> Res<Image<'io>> {
        let (name_c, snap_c) = (cstr(name)?, opt_cstr(snap)?);
        let spec = match snap {
            Some(s) => format!("{}/{name}@{s}", io.pool),
            None => format!("{}/{name}", io.pool),
        };
        let mut raw: ffi::ImageT = std::ptr::null_mut();
        let open = if read_only { io.api().rbd_open_read_only } else { io.api().rbd_open };
        // SAFETY: live context, NUL-terminated name, snapshot NUL-terminated or NULL, out-pointer valid.
        check(unsafe { open(io.raw, name_c.as_ptr(), &mut raw, ptr_or_null(&snap_c)) }, || format!("opening {spec}"))?;
        Ok(Image { raw, spec, io })
    }

    fn step(&self, doing: &str) -> String {
        format!("{doing} {}", self.spec)
    }

    fn api(&self) -> &'static Api {
        self.io.api()
    }

    pub fn stat(&self) -> Res<Stat> {
        // SAFETY: all-zero is a valid `rbd_image_info_t` (integers and char arrays).
        let mut info: ffi::ImageInfoT = unsafe { std::mem::zeroed() };
        // SAFETY: open image; `info` is writable and its size is passed.
        check(unsafe { (self.api().rbd_stat)(self.raw, &mut info, std::mem::size_of::<ffi::ImageInfoT>()) }, || {
            self.step("reading the size of")
        })?;
        Ok(Stat { size: info.size, object_size: info.obj_size })
    }

    /// The parent snapshot, or `None` for an image that is no clone.
    pub fn parent(&self) -> Res<Option<ParentSpec>> {
        // SAFETY: all-zero (NULL pointers) is a valid empty spec for librbd to fill.
        let (mut image, mut snap): (ffi::LinkedImageSpecT, ffi::SnapSpecT) =
            unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
        // SAFETY: open image; both out-structs writable.
        let r = unsafe { (self.api().rbd_get_parent)(self.raw, &mut image, &mut snap) };
        if r == -libc::ENOENT {
            return Ok(None);
        }
        check(r, || self.step("reading the parent of"))?;
        // SAFETY: filled by librbd on success: NUL-terminated strings, freed right after.
        let parent = unsafe {
            let p =
                ParentSpec { pool: owned(image.pool_name), image: owned(image.image_name), snapshot: owned(snap.name) };
            (self.api().rbd_linked_image_spec_cleanup)(&mut image);
            (self.api().rbd_snap_spec_cleanup)(&mut snap);
            p
        };
        Ok(Some(parent))
    }

    /// Grows to `size`; refuses to shrink (`-EINVAL`), as `rbd resize` does without
    /// `--allow-shrink`.
    pub fn grow(&self, size: u64) -> Res<()> {
        let go_on = |_: u64, _: u64| true;
        let (cb, arg) = progress_args(&go_on);
        // SAFETY: open image; the callback's argument lives for the call.
        let r = unsafe { (self.api().rbd_resize2)(self.raw, size, false, cb, arg) };
        check(r, || self.step("resizing")).map(drop)
    }

    /// Copies the parent's data in and cuts the link; `progress(done, total)` answers whether to
    /// go on (a `false` aborts with `-ECANCELED`).
    pub fn flatten<F: Fn(u64, u64) -> bool + Sync>(&self, progress: F) -> Res<()> {
        let (cb, arg) = progress_args(&progress);
        // SAFETY: open image; `progress` lives for the call and is only read through `&F`.
        let r = unsafe { (self.api().rbd_flatten_with_progress)(self.raw, cb, arg) };
        check(r, || self.step("flattening")).map(drop)
    }

    /// Copies this image with its snapshots and parent link to `name` in `dest`'s pool.
    pub fn deep_copy<F: Fn(u64, u64) -> bool + Sync>(&self, dest: &IoCtx, name: &str, progress: F) -> Res<()> {
        let name_c = cstr(name)?;
        let opts = ImageOptions::new(self.api());
        let (cb, arg) = progress_args(&progress);
        // SAFETY: open image, live destination context and options, NUL-terminated name; the
        // callback's argument lives for the call.
        let r =
            unsafe { (self.api().rbd_deep_copy_with_progress)(self.raw, dest.raw, name_c.as_ptr(), opts.raw, cb, arg) };
        check(r, || format!("deep-copying {} to {}/{name}", self.spec, dest.pool)).map(drop)
    }

    /// Calls `each(offset, length, exists)` for every extent changed since `from_snap` (since
    /// creation without one), whole objects at a time, with or without the parent's data.
    pub fn diff<F: Fn(u64, u64, bool) + Sync>(&self, from_snap: Option<&str>, with_parent: bool, each: F) -> Res<()> {
        let from_c = opt_cstr(from_snap)?;
        let size = self.stat()?.size;
        // An empty image has no extents, and librbd asserts (aborting the process) when asked
        // for the objects of one.
        if size == 0 {
            return Ok(());
        }
        let (cb, arg) = diff_args(&each);
        // SAFETY: open image; snapshot name NUL-terminated or NULL; the callback's argument lives
        // for the call.
        let r = unsafe {
            (self.api().rbd_diff_iterate2)(self.raw, ptr_or_null(&from_c), 0, size, u8::from(with_parent), 1, cb, arg)
        };
        check(r, || self.step("listing the allocated extents of")).map(drop)
    }

    /// Fills `buf` from `offset` of the image (of its snapshot, when opened at one).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Res<()> {
        // SAFETY: open image; `buf` is writable for its whole length.
        let r = unsafe { (self.api().rbd_read)(self.raw, offset, buf.len(), buf.as_mut_ptr().cast()) };
        let step = || format!("reading {} bytes at offset {offset} of {}", buf.len(), self.spec);
        match usize::try_from(r) {
            Ok(n) if n == buf.len() => Ok(()),
            // Past the end: the range is not inside the image.
            Ok(_) => Err(Fail { step: step(), errno: -libc::EINVAL }),
            Err(_) => Err(Fail { step: step(), errno: i32::try_from(r).unwrap_or(-libc::EIO) }),
        }
    }

    /// Calls `each(offset, length, exists)` for every byte range that changed since snapshot
    /// `from_snap`: exact ranges (not whole objects), for reading just those.
    pub fn changes_since<F: Fn(u64, u64, bool) + Sync>(&self, from_snap: &str, each: F) -> Res<()> {
        let from_c = cstr(from_snap)?;
        let size = self.stat()?.size;
        // librbd asserts (aborting the process) when asked for the objects of an empty image.
        if size == 0 {
            return Ok(());
        }
        if !self.has_fast_diff()? {
            return self.diff_range(&from_c, (0, size), false, &each);
        }
        // An exact diff asks the OSD for every object's snapshots (one request per 4 MiB of
        // disk); with fast-diff, the object maps name the changed objects without a request,
        // and only those are asked.
        let objects = Mutex::new(Vec::new());
        self.diff_range(&from_c, (0, size), true, &|offset, len, _| {
            objects.lock().unwrap_or_else(|e| e.into_inner()).push((offset, len));
        })?;
        for range in coalesce(&objects.into_inner().unwrap_or_else(|e| e.into_inner())) {
            self.diff_range(&from_c, range, false, &each)?;
        }
        Ok(())
    }

    /// `rbd_diff_iterate2` since `from` over `(offset, length)`, parent included; whole objects
    /// at a time or exact.
    fn diff_range<F: Fn(u64, u64, bool) + Sync>(
        &self,
        from: &CStr,
        (offset, len): (u64, u64),
        whole_objects: bool,
        each: &F,
    ) -> Res<()> {
        let (cb, arg) = diff_args(each);
        // SAFETY: open image; NUL-terminated snapshot name; the callback's argument lives for the call.
        let r = unsafe {
            (self.api().rbd_diff_iterate2)(self.raw, from.as_ptr(), offset, len, 1, u8::from(whole_objects), cb, arg)
        };
        check(r, || format!("listing what changed in {} since {}", self.spec, from.to_string_lossy())).map(drop)
    }

    fn has_fast_diff(&self) -> Res<bool> {
        let mut features = 0u64;
        // SAFETY: open image; `features` is writable.
        check(unsafe { (self.api().rbd_get_features)(self.raw, &mut features) }, || {
            self.step("reading the features of")
        })?;
        Ok(features & FEATURE_FAST_DIFF != 0)
    }

    /// One call on the snapshot `snap` of this image (create, remove, protect, unprotect).
    fn on_snap(
        &self,
        snap: &str,
        doing: &str,
        call: unsafe extern "C" fn(ffi::ImageT, *const c_char) -> c_int,
    ) -> Res<()> {
        let snap_c = cstr(snap)?;
        // SAFETY: open image, NUL-terminated snapshot name; `call` is one of librbd's
        // `rbd_snap_*(image, name)` functions.
        check(unsafe { call(self.raw, snap_c.as_ptr()) }, || format!("{doing} {}@{snap}", self.spec)).map(drop)
    }

    pub fn snap_create(&self, snap: &str) -> Res<()> {
        self.on_snap(snap, "creating snapshot", self.api().rbd_snap_create)
    }

    pub fn snap_remove(&self, snap: &str) -> Res<()> {
        self.on_snap(snap, "removing snapshot", self.api().rbd_snap_remove)
    }

    pub fn snap_protect(&self, snap: &str) -> Res<()> {
        self.on_snap(snap, "protecting snapshot", self.api().rbd_snap_protect)
    }

    pub fn snap_unprotect(&self, snap: &str) -> Res<()> {
        self.on_snap(snap, "unprotecting snapshot", self.api().rbd_snap_unprotect)
    }

    pub fn snap_is_protected(&self, snap: &str) -> Res<bool> {
        let snap_c = cstr(snap)?;
        let mut protected: c_int = 0;
        // SAFETY: open image, NUL-terminated name, writable out-int.
        check(unsafe { (self.api().rbd_snap_is_protected)(self.raw, snap_c.as_ptr(), &mut protected) }, || {
            format!("reading whether {}@{snap} is protected", self.spec)
        })?;
        Ok(protected != 0)
    }

    /// The image's (user) snapshots, oldest first.
    pub fn snaps(&self) -> Res<Vec<String>> {
        let mut max: c_int = 8;
        loop {
            // SAFETY: all-zero entries are valid (NULL names) for librbd to fill.
            let mut buf: Vec<ffi::SnapInfoT> = (0..max).map(|_| unsafe { std::mem::zeroed() }).collect();
            // SAFETY: `buf` holds `max` writable entries; librbd raises `max` and answers -ERANGE
            // when they are too few.
            let r = unsafe { (self.api().rbd_snap_list)(self.raw, buf.as_mut_ptr(), &mut max) };
            if r == -libc::ERANGE {
                continue;
            }
            check(r, || self.step("listing the snapshots of"))?;
            // SAFETY: on success the first `r` entries hold NUL-terminated names, freed by
            // `rbd_snap_list_end` after they are copied.
            let names = unsafe {
                let names = buf[..r as usize].iter().map(|s| owned(s.name)).collect();
                (self.api().rbd_snap_list_end)(buf.as_mut_ptr());
                names
            };
            return Ok(names);
        }
    }

    /// Images cloned from this snapshot (and not in the trash), as (pool, image).
    pub fn children(&self) -> Res<Vec<(String, String)>> {
        let mut max: usize = 8;
        loop {
            // SAFETY: all-zero entries are valid (NULL pointers) for librbd to fill.
            let mut buf: Vec<ffi::LinkedImageSpecT> = (0..max).map(|_| unsafe { std::mem::zeroed() }).collect();
            // SAFETY: `buf` holds `max` writable entries; librbd raises `max` on -ERANGE.
            let r = unsafe { (self.api().rbd_list_children3)(self.raw, buf.as_mut_ptr(), &mut max) };
            if r == -libc::ERANGE {
                continue;
            }
            check(r, || self.step("listing the clones of"))?;
            // SAFETY: on success the first `max` entries are filled; copied, then freed.
            let kids = unsafe {
                let kids =
                    buf[..max].iter().filter(|c| !c.trash).map(|c| (owned(c.pool_name), owned(c.image_name))).collect();
                (self.api().rbd_linked_image_spec_list_cleanup)(buf.as_mut_ptr(), max);
                kids
            };
            return Ok(kids);
        }
    }

    /// How many clients watch (have open) the image.
    /// The addresses of the clients watching the image.
    pub fn watchers(&self) -> Res<Vec<String>> {
        let mut max: usize = 8;
        loop {
            // SAFETY: all-zero entries are valid (NULL address) for librbd to fill.
            let mut buf: Vec<ffi::ImageWatcherT> = (0..max).map(|_| unsafe { std::mem::zeroed() }).collect();
            // SAFETY: `buf` holds `max` writable entries; librbd raises `max` on -ERANGE.
            let r = unsafe { (self.api().rbd_watchers_list)(self.raw, buf.as_mut_ptr(), &mut max) };
            if r == -libc::ERANGE {
                continue;
            }
            check(r, || self.step("listing the watchers of"))?;
            // SAFETY: on success the first `max` entries are filled (addresses strdup'ed, read
            // before the cleanup frees them).
            let addrs = (buf[..max].iter())
                .filter(|w| !w.addr.is_null())
                .map(|w| unsafe { std::ffi::CStr::from_ptr(w.addr) }.to_string_lossy().into_owned())
                .collect();
            unsafe { (self.api().rbd_watchers_list_cleanup)(buf.as_mut_ptr(), max) };
            return Ok(addrs);
        }
    }

    /// The image's header object (`rbd_header.<id>`, a format-2 image's).
    pub fn header_object(&self) -> Res<String> {
        let mut id = [0 as std::ffi::c_char; 64];
        // SAFETY: `id` is a writable buffer of the length given; librbd NUL-terminates it.
        check(unsafe { (self.api().rbd_get_id)(self.raw, id.as_mut_ptr(), id.len()) }, || {
            self.step("reading the id of")
        })?;
        // SAFETY: NUL-terminated by librbd within the buffer.
        let id = unsafe { std::ffi::CStr::from_ptr(id.as_ptr()) }.to_string_lossy().into_owned();
        Ok(format!("rbd_header.{id}"))
    }
}

impl Drop for Image<'_> {
    fn drop(&mut self) {
        // SAFETY: opened by `rbd_open*`, closed once; its context outlives it (borrowed).
        unsafe { (self.api().rbd_close)(self.raw) };
    }
}
