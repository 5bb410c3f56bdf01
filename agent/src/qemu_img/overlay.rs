//! An empty qcow2 overlay written by the agent itself: the file `qemu-img create -f qcow2 -b
//! <backing> -F <fmt>` makes with default options, without a process per file (a linked clone
//! of 100 VMs spent most of its time starting `qemu-img`). Only that one layout: 64 KiB
//! clusters, 16-bit refcounts, version 3, an L1 table of at most one cluster (4 TiB). Anything
//! else is left to `qemu-img`.
//!
//! The layout, as qemu-img writes it: cluster 0 holds the header, its extensions (the backing
//! file's format, then the end marker) and the backing file's name; cluster 1 the refcount
//! table, pointing at the refcount block in cluster 2, which counts clusters 0-3 as used; the
//! L1 table starts cluster 3 and the file ends with it. (qemu-img also writes a table naming
//! the feature bits; it is informational and left out.)

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

const CLUSTER_BITS: u32 = 16;
const CLUSTER: u64 = 1 << CLUSTER_BITS;
/// Bytes of guest data one L1 entry maps: an L2 table of 8-byte entries, each a cluster.
const L1_ENTRY_SPAN: u64 = CLUSTER * (CLUSTER / 8);
const HEADER_LENGTH: usize = 112;
const BACKING_FORMAT_EXTENSION: u32 = 0xe279_2aca;
const REFCOUNT_TABLE: u64 = CLUSTER;
const REFCOUNT_BLOCK: u64 = 2 * CLUSTER;
const L1_TABLE: u64 = 3 * CLUSTER;

/// The L1 entries an image of `size` bytes needs, when this writer can make it: a size in
/// whole sectors, more than nothing, whose L1 table fits one cluster.
fn l1_entries(size: u64) -> Option<u64> {
    let entries = size.div_ceil(L1_ENTRY_SPAN);
    (size > 0 && size % 512 == 0 && entries * 8 <= CLUSTER).then_some(entries)
}

/// Where the backing file's name starts: after the header, the backing-format extension (its
/// data padded to 8 bytes) and the end-of-extensions marker.
fn backing_name_at(backing_fmt: &str) -> usize {
    HEADER_LENGTH + 8 + backing_fmt.len().next_multiple_of(8) + 8
}

/// Whether [`write`] can make this overlay: a backing name and format that fit the header's
/// first cluster as qemu-img allows them (a name of at most 1023 bytes).
pub fn can_write(backing: &str, backing_fmt: &str, size: u64) -> bool {
    let fits = backing_name_at(backing_fmt) + backing.len() <= CLUSTER as usize;
    l1_entries(size).is_some() && !backing.is_empty() && backing.len() <= 1023 && !backing_fmt.is_empty() && fits
}

/// The bytes of an empty overlay of `size` bytes on `backing` (a name as the header stores it:
/// relative names are resolved beside the overlay) of format `backing_fmt`. Callers check
/// [`can_write`] first.
fn bytes(backing: &str, backing_fmt: &str, size: u64) -> Vec<u8> {
    let entries = l1_entries(size).expect("checked by can_write");
    let mut file = vec![0u8; (L1_TABLE + entries * 8) as usize];
    let extensions = HEADER_LENGTH;
    let name_at = backing_name_at(backing_fmt);
    let mut h = Vec::with_capacity(HEADER_LENGTH);
    h.extend_from_slice(b"QFI\xfb");
    h.extend_from_slice(&3u32.to_be_bytes());
    h.extend_from_slice(&(name_at as u64).to_be_bytes());
    h.extend_from_slice(&(backing.len() as u32).to_be_bytes());
    h.extend_from_slice(&CLUSTER_BITS.to_be_bytes());
    h.extend_from_slice(&size.to_be_bytes());
    h.extend_from_slice(&0u32.to_be_bytes()); // no encryption
    h.extend_from_slice(&(entries as u32).to_be_bytes());
    h.extend_from_slice(&L1_TABLE.to_be_bytes());
    h.extend_from_slice(&REFCOUNT_TABLE.to_be_bytes());
    h.extend_from_slice(&1u32.to_be_bytes()); // refcount table clusters
    h.extend_from_slice(&0u32.to_be_bytes()); // snapshots
    h.extend_from_slice(&0u64.to_be_bytes()); // snapshot table offset
    h.extend_from_slice(&[0; 24]); // incompatible, compatible, autoclear feature bits
    h.extend_from_slice(&4u32.to_be_bytes()); // refcount order: 16-bit refcounts
    h.extend_from_slice(&(HEADER_LENGTH as u32).to_be_bytes());
    h.resize(HEADER_LENGTH, 0); // compression type zlib, padding
    file[..HEADER_LENGTH].copy_from_slice(&h);
    file[extensions..extensions + 4].copy_from_slice(&BACKING_FORMAT_EXTENSION.to_be_bytes());
    file[extensions + 4..extensions + 8].copy_from_slice(&(backing_fmt.len() as u32).to_be_bytes());
    file[extensions + 8..extensions + 8 + backing_fmt.len()].copy_from_slice(backing_fmt.as_bytes());
    // The end-of-extensions marker (type 0, length 0) is already zeros.
    file[name_at..name_at + backing.len()].copy_from_slice(backing.as_bytes());
    file[REFCOUNT_TABLE as usize..][..8].copy_from_slice(&REFCOUNT_BLOCK.to_be_bytes());
    for cluster in 0..4 {
        file[REFCOUNT_BLOCK as usize + cluster * 2..][..2].copy_from_slice(&1u16.to_be_bytes());
    }
    file
}

/// Writes the overlay to `dst` (created or truncated, mode 0644 as qemu-img makes it).
pub fn write(backing: &str, backing_fmt: &str, dst: &Path, size: u64) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o644).open(dst)?;
    f.write_all(&bytes(backing, backing_fmt, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qemu_img(args: &[&str]) -> String {
        let out = std::process::Command::new("qemu-img").args(args).output().unwrap();
        assert!(out.status.success(), "qemu-img {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `qemu-img info` without what names the file itself or measures its blocks.
    fn info(path: &Path) -> serde_json::Value {
        let mut v: serde_json::Value =
            serde_json::from_str(&qemu_img(&["info", "--output=json", path.to_str().unwrap()])).unwrap();
        for k in ["filename", "actual-size", "dirty-flag", "full-backing-filename", "children"] {
            v.as_object_mut().unwrap().remove(k);
        }
        v
    }

    #[test]
    fn the_overlay_is_the_one_qemu_img_makes_but_for_the_feature_name_table() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "1G"]);
        let gib = 1u64 << 30;
        let cases = [
            ("base.qcow2", 512),
            ("base.qcow2", L1_ENTRY_SPAN),
            ("base.qcow2", L1_ENTRY_SPAN + 512),
            (base.to_str().unwrap(), 3 * gib),
            ("base.qcow2", 4096 * gib),
        ];
        for (backing, size) in cases {
            let (ours, theirs) = (dir.path().join("ours.qcow2"), dir.path().join("theirs.qcow2"));
            assert!(can_write(backing, "qcow2", size), "{size}");
            write(backing, "qcow2", &ours, size).unwrap();
            let args = ["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", backing];
            qemu_img(&[&args[..], &[theirs.to_str().unwrap(), &size.to_string()]].concat());
            let (a, b) = (std::fs::read(&ours).unwrap(), std::fs::read(&theirs).unwrap());
            assert_eq!(a.len(), b.len(), "{size}: the file ends with the L1 table");
            assert_eq!(a[CLUSTER as usize..], b[CLUSTER as usize..], "{size}: refcounts and L1 table");
            // The header up to its extensions: all but where the backing name is (qemu-img
            // puts its feature table before it).
            assert_eq!((&a[..8], &a[16..HEADER_LENGTH]), (&b[..8], &b[16..HEADER_LENGTH]), "{size}");
            assert_eq!(info(&ours), info(&theirs), "{size}");
            qemu_img(&["check", ours.to_str().unwrap()]);
            assert_eq!(super::super::read_header(&ours).unwrap().backing_file.as_deref(), Some(backing));
        }
        // And it takes writes as any overlay does.
        let ours = dir.path().join("ours.qcow2");
        write("base.qcow2", "qcow2", &ours, gib).unwrap();
        let io = std::process::Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "write -P 0x11 1M 64k", ours.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(io.status.success());
        qemu_img(&["check", ours.to_str().unwrap()]);
    }

    #[test]
    fn sizes_and_names_it_cannot_write_are_left_to_qemu_img() {
        assert!(!can_write("b", "qcow2", 0), "empty");
        assert!(!can_write("b", "qcow2", 1000), "not whole sectors");
        assert!(can_write("b", "qcow2", 8192 * L1_ENTRY_SPAN), "4 TiB: an L1 table of one cluster");
        assert!(!can_write("b", "qcow2", 8192 * L1_ENTRY_SPAN + 512), "past one cluster");
        assert!(!can_write(&"n".repeat(1024), "qcow2", 512), "a name qemu refuses");
        assert!(!can_write("", "qcow2", 512) && !can_write("b", "", 512));
    }
}
