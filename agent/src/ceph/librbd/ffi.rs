//! The few librados and librbd C functions the agent calls (`rados/librados.h`,
//! `rbd/librbd.h` of Ceph 16), declared by hand. Only [`super::handle`] calls them.

use std::ffi::{c_char, c_int, c_void};

pub type RadosT = *mut c_void;
pub type IoCtxT = *mut c_void;
pub type ImageT = *mut c_void;
pub type ImageOptionsT = *mut c_void;

/// `librbd_progress_fn_t`: a non-zero return aborts the operation.
pub type ProgressFn = extern "C" fn(offset: u64, total: u64, arg: *mut c_void) -> c_int;
/// The `rbd_diff_iterate2` callback.
pub type DiffFn = extern "C" fn(offset: u64, len: usize, exists: c_int, arg: *mut c_void) -> c_int;

/// `rbd_image_info_t`.
#[repr(C)]
pub struct ImageInfoT {
    pub size: u64,
    pub obj_size: u64,
    pub num_objs: u64,
    pub order: c_int,
    pub block_name_prefix: [c_char; 24],
    pub parent_pool: i64,
    pub parent_name: [c_char; 96],
}

/// `rbd_linked_image_spec_t`.
#[repr(C)]
pub struct LinkedImageSpecT {
    pub pool_id: i64,
    pub pool_name: *mut c_char,
    pub pool_namespace: *mut c_char,
    pub image_id: *mut c_char,
    pub image_name: *mut c_char,
    pub trash: bool,
}

/// `rbd_snap_spec_t` (the namespace type is a C enum: an int).
#[repr(C)]
pub struct SnapSpecT {
    pub id: u64,
    pub namespace_type: c_int,
    pub name: *mut c_char,
}

/// `rbd_snap_info_t`.
#[repr(C)]
pub struct SnapInfoT {
    pub id: u64,
    pub size: u64,
    pub name: *const c_char,
}

/// `rbd_image_watcher_t`.
#[repr(C)]
pub struct ImageWatcherT {
    pub addr: *mut c_char,
    pub id: i64,
    pub cookie: u64,
}

#[link(name = "rados")]
extern "C" {
    pub fn rados_create(cluster: *mut RadosT, id: *const c_char) -> c_int;
    pub fn rados_conf_read_file(cluster: RadosT, path: *const c_char) -> c_int;
    pub fn rados_conf_set(cluster: RadosT, option: *const c_char, value: *const c_char) -> c_int;
    pub fn rados_connect(cluster: RadosT) -> c_int;
    pub fn rados_shutdown(cluster: RadosT);
    pub fn rados_ioctx_create(cluster: RadosT, pool: *const c_char, ioctx: *mut IoCtxT) -> c_int;
    pub fn rados_ioctx_destroy(ioctx: IoCtxT);
    pub fn rados_remove(io: IoCtxT, oid: *const c_char) -> c_int;
    pub fn rados_cluster_fsid(cluster: RadosT, buf: *mut c_char, len: usize) -> c_int;
    pub fn rados_getaddrs(cluster: RadosT, addrs: *mut *mut c_char) -> c_int;
    pub fn rados_get_instance_id(cluster: RadosT) -> u64;
    pub fn rados_wait_for_latest_osdmap(cluster: RadosT) -> c_int;
    pub fn rados_mon_command(
        cluster: RadosT,
        cmd: *mut *const c_char,
        cmdlen: usize,
        inbuf: *const c_char,
        inbuflen: usize,
        outbuf: *mut *mut c_char,
        outbuflen: *mut usize,
        outs: *mut *mut c_char,
        outslen: *mut usize,
    ) -> c_int;
    pub fn rados_buffer_free(buf: *mut c_char);
}

#[link(name = "rbd")]
extern "C" {
    pub fn rbd_image_options_create(opts: *mut ImageOptionsT);
    pub fn rbd_image_options_destroy(opts: ImageOptionsT);

    pub fn rbd_create4(io: IoCtxT, name: *const c_char, size: u64, opts: ImageOptionsT) -> c_int;
    pub fn rbd_clone3(
        p_ioctx: IoCtxT,
        p_name: *const c_char,
        p_snapname: *const c_char,
        c_ioctx: IoCtxT,
        c_name: *const c_char,
        c_opts: ImageOptionsT,
    ) -> c_int;
    pub fn rbd_remove(io: IoCtxT, name: *const c_char) -> c_int;
    pub fn rbd_get_id(image: ImageT, id: *mut c_char, id_len: usize) -> c_int;
    pub fn rbd_trash_move(io: IoCtxT, name: *const c_char, delay: u64) -> c_int;

    pub fn rbd_open(io: IoCtxT, name: *const c_char, image: *mut ImageT, snap: *const c_char) -> c_int;
    pub fn rbd_open_read_only(io: IoCtxT, name: *const c_char, image: *mut ImageT, snap: *const c_char) -> c_int;
    pub fn rbd_close(image: ImageT) -> c_int;

    pub fn rbd_stat(image: ImageT, info: *mut ImageInfoT, infosize: usize) -> c_int;
    pub fn rbd_get_parent(image: ImageT, parent_image: *mut LinkedImageSpecT, parent_snap: *mut SnapSpecT) -> c_int;
    pub fn rbd_linked_image_spec_cleanup(image: *mut LinkedImageSpecT);
    pub fn rbd_linked_image_spec_list_cleanup(images: *mut LinkedImageSpecT, num: usize);
    pub fn rbd_snap_spec_cleanup(snap: *mut SnapSpecT);
    pub fn rbd_resize2(image: ImageT, size: u64, allow_shrink: bool, cb: ProgressFn, arg: *mut c_void) -> c_int;
    pub fn rbd_deep_copy_with_progress(
        image: ImageT,
        dest_io: IoCtxT,
        dest_name: *const c_char,
        dest_opts: ImageOptionsT,
        cb: ProgressFn,
        arg: *mut c_void,
    ) -> c_int;
    pub fn rbd_flatten_with_progress(image: ImageT, cb: ProgressFn, arg: *mut c_void) -> c_int;
    pub fn rbd_diff_iterate2(
        image: ImageT,
        fromsnapname: *const c_char,
        ofs: u64,
        len: u64,
        include_parent: u8,
        whole_object: u8,
        cb: DiffFn,
        arg: *mut c_void,
    ) -> c_int;

    pub fn rbd_snap_create(image: ImageT, name: *const c_char) -> c_int;
    pub fn rbd_snap_remove(image: ImageT, name: *const c_char) -> c_int;
    pub fn rbd_snap_protect(image: ImageT, name: *const c_char) -> c_int;
    pub fn rbd_snap_unprotect(image: ImageT, name: *const c_char) -> c_int;
    pub fn rbd_snap_is_protected(image: ImageT, name: *const c_char, is_protected: *mut c_int) -> c_int;
    pub fn rbd_snap_list(image: ImageT, snaps: *mut SnapInfoT, max_snaps: *mut c_int) -> c_int;
    pub fn rbd_snap_list_end(snaps: *mut SnapInfoT);

    pub fn rbd_list_children3(image: ImageT, images: *mut LinkedImageSpecT, max_images: *mut usize) -> c_int;
    pub fn rbd_watchers_list(image: ImageT, watchers: *mut ImageWatcherT, max_watchers: *mut usize) -> c_int;
    pub fn rbd_watchers_list_cleanup(watchers: *mut ImageWatcherT, num: usize);
}
