//! The few librados and librbd C functions the agent calls (`rados/librados.h`,
//! `rbd/librbd.h` of Ceph 16), declared by hand and resolved at run time: the libraries (and
//! libceph-common, boost and libstdc++ they bring, some 12 MiB resident) are loaded when the
//! first Ceph call is made, not when the agent starts, so hosts without Ceph neither need them
//! installed nor carry them. Only [`super::handle`] calls them.
//!
//! To call another function, add its C declaration to the library's block of
//! [`ceph_functions!`] below; it is then `api.<name>` on the [`Api`] table.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::OnceLock;

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

/// A Ceph client library that could not be loaded, or lacks a function the agent calls.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "{reason}; install the Ceph client libraries (Debian: librbd1 and librados2) to reach RBD through librbd, \
    or set client = \"cli\" in [ceph] to use the rbd command line"
)]
pub struct LoadError {
    reason: String,
}

/// A shared library opened with `dlopen` and never closed: the [`Api`] built from it lives as
/// long as the process, and Ceph's libraries are not made to be unloaded (a retry after a
/// failed load opens them again, which only counts one more reference).
struct Library(*mut c_void);

impl Library {
    fn open(file: &str, package: &'static str) -> Result<Library, LoadError> {
        let file_c = CString::new(file).expect("library names hold no NUL");
        // SAFETY: a NUL-terminated name; the library's initialisers are Ceph's own.
        let handle = unsafe { libc::dlopen(file_c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if handle.is_null() {
            return Err(LoadError { reason: format!("cannot load {file} (package {package}): {}", dl_error()) });
        }
        Ok(Library(handle))
    }

    /// The address of the function `name`.
    fn function(&self, name: &str, package: &'static str) -> Result<*mut c_void, LoadError> {
        let name_c = CString::new(name).expect("function names hold no NUL");
        // SAFETY: an open library handle and a NUL-terminated name.
        let address = unsafe { libc::dlsym(self.0, name_c.as_ptr()) };
        if address.is_null() {
            let reason = format!("{} (package {package}, older than Ceph 16?)", dl_error());
            return Err(LoadError { reason });
        }
        Ok(address)
    }
}

/// The text of the last `dlopen`/`dlsym` failure of this thread.
fn dl_error() -> String {
    // SAFETY: dlerror returns NULL or a NUL-terminated message valid until the next dl call on
    // this thread, copied at once.
    let message = unsafe { libc::dlerror() };
    if message.is_null() {
        "no such symbol".to_owned()
    } else {
        // SAFETY: non-NULL, NUL-terminated (see above).
        unsafe { CStr::from_ptr(message) }.to_string_lossy().into_owned()
    }
}

/// Declares the [`Api`] table: per library (file name to load, Debian package that holds it),
/// its functions' C signatures, each resolved by its own name.
macro_rules! ceph_functions {
    ($( $file:literal, $package:literal {
        $( fn $name:ident ( $( $arg:ident : $ty:ty ),* $(,)? ) $( -> $ret:ty )? ; )*
    } )*) => {
        /// librados' and librbd's functions, resolved; one table for the process ([`Api::get`]).
        pub struct Api {
            $( $( pub $name: unsafe extern "C" fn( $( $ty ),* ) $( -> $ret )?, )* )*
        }

        impl Api {
            fn load() -> Result<Api, LoadError> {
                $(
                    let lib = Library::open($file, $package)?;
                    $(
                        let $name = lib.function(stringify!($name), $package)?;
                        // SAFETY: `$name` is the library's function of that name, whose C
                        // declaration (Ceph 16's) is the signature written here.
                        let $name = unsafe {
                            std::mem::transmute::<*mut c_void, unsafe extern "C" fn( $( $ty ),* ) $( -> $ret )?>($name)
                        };
                    )*
                )*
                Ok(Api { $( $( $name, )* )* })
            }
        }
    };
}

static API: OnceLock<Api> = OnceLock::new();

impl Api {
    /// The table, loading the libraries on the first call. A failed load is not kept: once the
    /// packages are installed, the next call loads them without a restart of the agent.
    pub fn get() -> Result<&'static Api, LoadError> {
        if let Some(api) = API.get() {
            return Ok(api);
        }
        // Two first callers may both load; dlopen counts references, and one table is kept.
        let api = Api::load()?;
        Ok(API.get_or_init(|| api))
    }
}

ceph_functions! {
    "librados.so.2", "librados2" {
        fn rados_create(cluster: *mut RadosT, id: *const c_char) -> c_int;
        fn rados_conf_read_file(cluster: RadosT, path: *const c_char) -> c_int;
        fn rados_conf_set(cluster: RadosT, option: *const c_char, value: *const c_char) -> c_int;
        fn rados_connect(cluster: RadosT) -> c_int;
        fn rados_shutdown(cluster: RadosT);
        fn rados_ioctx_create(cluster: RadosT, pool: *const c_char, ioctx: *mut IoCtxT) -> c_int;
        fn rados_ioctx_destroy(ioctx: IoCtxT);
        fn rados_remove(io: IoCtxT, oid: *const c_char) -> c_int;
        fn rados_cluster_fsid(cluster: RadosT, buf: *mut c_char, len: usize) -> c_int;
        fn rados_getaddrs(cluster: RadosT, addrs: *mut *mut c_char) -> c_int;
        fn rados_get_instance_id(cluster: RadosT) -> u64;
        fn rados_wait_for_latest_osdmap(cluster: RadosT) -> c_int;
        fn rados_mon_command(
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
        fn rados_buffer_free(buf: *mut c_char);
    }

    "librbd.so.1", "librbd1" {
        fn rbd_image_options_create(opts: *mut ImageOptionsT);
        fn rbd_image_options_destroy(opts: ImageOptionsT);

        fn rbd_create4(io: IoCtxT, name: *const c_char, size: u64, opts: ImageOptionsT) -> c_int;
        fn rbd_clone3(
            p_ioctx: IoCtxT,
            p_name: *const c_char,
            p_snapname: *const c_char,
            c_ioctx: IoCtxT,
            c_name: *const c_char,
            c_opts: ImageOptionsT,
        ) -> c_int;
        fn rbd_remove(io: IoCtxT, name: *const c_char) -> c_int;
        fn rbd_get_id(image: ImageT, id: *mut c_char, id_len: usize) -> c_int;
        fn rbd_trash_move(io: IoCtxT, name: *const c_char, delay: u64) -> c_int;

        fn rbd_open(io: IoCtxT, name: *const c_char, image: *mut ImageT, snap: *const c_char) -> c_int;
        fn rbd_open_read_only(io: IoCtxT, name: *const c_char, image: *mut ImageT, snap: *const c_char) -> c_int;
        fn rbd_close(image: ImageT) -> c_int;

        fn rbd_stat(image: ImageT, info: *mut ImageInfoT, infosize: usize) -> c_int;
        fn rbd_get_features(image: ImageT, features: *mut u64) -> c_int;
        fn rbd_read(image: ImageT, ofs: u64, len: usize, buf: *mut c_char) -> isize;
        fn rbd_get_parent(image: ImageT, parent_image: *mut LinkedImageSpecT, parent_snap: *mut SnapSpecT) -> c_int;
        fn rbd_linked_image_spec_cleanup(image: *mut LinkedImageSpecT);
        fn rbd_linked_image_spec_list_cleanup(images: *mut LinkedImageSpecT, num: usize);
        fn rbd_snap_spec_cleanup(snap: *mut SnapSpecT);
        fn rbd_resize2(image: ImageT, size: u64, allow_shrink: bool, cb: ProgressFn, arg: *mut c_void) -> c_int;
        fn rbd_deep_copy_with_progress(
            image: ImageT,
            dest_io: IoCtxT,
            dest_name: *const c_char,
            dest_opts: ImageOptionsT,
            cb: ProgressFn,
            arg: *mut c_void,
        ) -> c_int;
        fn rbd_flatten_with_progress(image: ImageT, cb: ProgressFn, arg: *mut c_void) -> c_int;
        fn rbd_diff_iterate2(
            image: ImageT,
            fromsnapname: *const c_char,
            ofs: u64,
            len: u64,
            include_parent: u8,
            whole_object: u8,
            cb: DiffFn,
            arg: *mut c_void,
        ) -> c_int;

        fn rbd_snap_create(image: ImageT, name: *const c_char) -> c_int;
        fn rbd_snap_remove(image: ImageT, name: *const c_char) -> c_int;
        fn rbd_snap_protect(image: ImageT, name: *const c_char) -> c_int;
        fn rbd_snap_unprotect(image: ImageT, name: *const c_char) -> c_int;
        fn rbd_snap_is_protected(image: ImageT, name: *const c_char, is_protected: *mut c_int) -> c_int;
        fn rbd_snap_list(image: ImageT, snaps: *mut SnapInfoT, max_snaps: *mut c_int) -> c_int;
        fn rbd_snap_list_end(snaps: *mut SnapInfoT);

        fn rbd_list_children3(image: ImageT, images: *mut LinkedImageSpecT, max_images: *mut usize) -> c_int;
        fn rbd_watchers_list(image: ImageT, watchers: *mut ImageWatcherT, max_watchers: *mut usize) -> c_int;
        fn rbd_watchers_list_cleanup(watchers: *mut ImageWatcherT, num: usize);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_library_says_which_packages_to_install() {
        let e = Library::open("libkvmagent-no-such-library.so.1", "librbd1").err().expect("no such library");
        let text = e.to_string();
        assert!(text.contains("cannot load libkvmagent-no-such-library.so.1 (package librbd1)"), "{text}");
        assert!(text.contains("install the Ceph client libraries (Debian: librbd1 and librados2)"), "{text}");
        assert!(text.contains("client = \"cli\""), "{text}");
    }

    #[test]
    fn a_library_without_a_function_is_refused_by_its_name() {
        let libc = Library::open("libc.so.6", "libc6").expect("libc loads");
        assert!(!libc.function("malloc", "libc6").expect("libc has malloc").is_null());
        let text = libc.function("rbd_no_such_function", "libc6").expect_err("no such function").to_string();
        assert!(text.contains("rbd_no_such_function") && text.contains("package libc6"), "{text}");
    }
}
