//! The persistent dirty bitmaps of a qcow2 file, read from its bitmap directory without
//! starting `qemu-img info` (a backup point lists them for every volume, twice).
//!
//! Only the layout QEMU writes is read: a version 3 header with the bitmaps autoclear bit set,
//! the bitmaps extension in the first cluster, a directory of at most [`MAX_DIRECTORY`] bytes,
//! entries with known flags. Anything else answers `None`, and the caller asks `qemu-img`.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use super::bitmaps::Bitmap;
use super::nbd::Extent;

const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";
/// Header extension type of the bitmaps extension.
const BITMAPS_EXTENSION: u32 = 0x2385_2875;
/// Autoclear feature bit 0: the bitmaps extension is valid (a program without bitmap support
/// that wrote the file cleared it).
const AUTOCLEAR_BITMAPS: u64 = 1;
const FLAG_IN_USE: u32 = 1;
const FLAG_AUTO: u32 = 1 << 1;
/// Larger directories (thousands of bitmaps) are left to qemu-img.
const MAX_DIRECTORY: u64 = 1 << 20;
/// The header and its extensions are read from at most this much of the first cluster.
const MAX_HEADER: usize = 64 << 10;

fn be_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn be_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn be_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

/// One entry of the bitmap directory.
struct Entry {
    name: String,
    flags: u32,
    kind: u8,
    granularity_bits: u8,
    table_offset: u64,
    table_size: u32,
}

impl Entry {
    fn bitmap(&self) -> Bitmap {
        let flags = [(FLAG_IN_USE, "in-use"), (FLAG_AUTO, "auto")]
            .iter()
            .filter(|(bit, _)| self.flags & bit != 0)
            .map(|(_, f)| f.to_string())
            .collect();
        Bitmap { name: self.name.clone(), flags }
    }
}

/// A qcow2 file's bitmap directory, with what reading a bitmap's data needs.
struct Directory {
    file: std::fs::File,
    cluster: u64,
    virtual_size: u64,
    entries: Vec<Entry>,
}

fn open(path: &Path) -> Option<Directory> {
    let mut file = std::fs::File::open(path).ok()?;
    let mut head = Vec::with_capacity(MAX_HEADER);
    (&mut file).take(MAX_HEADER as u64).read_to_end(&mut head).ok()?;
    if head.get(..4)? != QCOW2_MAGIC || be_u32(&head, 4)? != 3 {
        return None;
    }
    let cluster = 1usize.checked_shl(be_u32(&head, 20)?)?;
    let virtual_size = be_u64(&head, 24)?;
    let extensions_end = cluster.min(head.len());
    let mut at = be_u32(&head, 100)? as usize;
    let (count, size, offset) = loop {
        let (kind, len) = (be_u32(&head, at)?, be_u32(&head, at + 4)? as usize);
        if kind == 0 {
            return Some(Directory { file, cluster: cluster as u64, virtual_size, entries: Vec::new() });
        }
        let data = at + 8;
        if data + len > extensions_end {
            return None;
        }
        if kind == BITMAPS_EXTENSION {
            if len < 24 || be_u32(&head, data + 4)? != 0 {
                return None;
            }
            break (be_u32(&head, data)?, be_u64(&head, data + 8)?, be_u64(&head, data + 16)?);
        }
        at = data + len.div_ceil(8) * 8;
    };
    if be_u64(&head, 88)? & AUTOCLEAR_BITMAPS == 0 || size > MAX_DIRECTORY {
        return None;
    }
    let mut dir = vec![0u8; size as usize];
    file.seek(SeekFrom::Start(offset)).ok()?;
    file.read_exact(&mut dir).ok()?;
    let mut entries = Vec::with_capacity(count as usize);
    let mut at = 0usize;
    for _ in 0..count {
        let flags = be_u32(&dir, at + 12)?;
        let (name_len, extra) = (be_u16(&dir, at + 18)? as usize, be_u32(&dir, at + 20)? as usize);
        if flags & !(FLAG_IN_USE | FLAG_AUTO) != 0 {
            return None;
        }
        let name_at = at.checked_add(24)?.checked_add(extra)?;
        let name = std::str::from_utf8(dir.get(name_at..name_at + name_len)?).ok()?.to_owned();
        entries.push(Entry {
            name,
            flags,
            kind: *dir.get(at + 16)?,
            granularity_bits: *dir.get(at + 17)?,
            table_offset: be_u64(&dir, at)?,
            table_size: be_u32(&dir, at + 8)?,
        });
        at = (name_at + name_len).div_ceil(8) * 8;
    }
    (at == dir.len()).then_some(Directory { file, cluster: cluster as u64, virtual_size, entries })
}

/// The bitmaps of qcow2 file `path` as `qemu-img info` lists them, or `None` when the file is
/// not in the layout this reads (or cannot be read): then `qemu-img` is asked.
pub fn read(path: &Path) -> Option<Vec<Bitmap>> {
    open(path).map(|d| d.entries.iter().map(Entry::bitmap).collect())
}

/// The byte ranges of qcow2 file `path` that its consistent bitmap `name` marks dirty, in
/// offset order, each a whole number of the bitmap's granules (the last cut at the disk's
/// end); `None` when the bitmap is not one this reads (missing, in use, disabled, not in the
/// layout QEMU writes): then the caller asks QEMU.
pub fn dirty_extents(path: &Path, name: &str) -> Option<Vec<Extent>> {
    let mut d = open(path)?;
    let e = d.entries.iter().find(|e| e.name == name)?;
    // Type 1 is a dirty tracking bitmap; granules are 512 B to 2 GiB.
    if e.flags != FLAG_AUTO || e.kind != 1 || !(9..=31).contains(&e.granularity_bits) {
        return None;
    }
    let granule = 1u64 << e.granularity_bits;
    let bits_per_cluster = d.cluster * 8;
    let bits = d.virtual_size.div_ceil(granule);
    if u64::from(e.table_size) != bits.div_ceil(bits_per_cluster) || e.table_size > MAX_TABLE {
        return None;
    }
    let mut table = vec![0u8; e.table_size as usize * 8];
    d.file.seek(SeekFrom::Start(e.table_offset)).ok()?;
    d.file.read_exact(&mut table).ok()?;
    let mut runs = Runs::default();
    let mut data = vec![0u8; d.cluster as usize];
    for (i, entry) in table.chunks_exact(8).enumerate() {
        let entry = u64::from_be_bytes(entry.try_into().ok()?);
        let first = i as u64 * bits_per_cluster;
        let count = bits_per_cluster.min(bits - first);
        match (entry & TABLE_OFFSET, entry & !TABLE_OFFSET) {
            (_, reserved) if reserved & !1 != 0 => return None,
            // No cluster: all of it clean, or (bit 0) all of it dirty.
            (0, all) => runs.span(first, count, all == 1),
            (at, _) => {
                d.file.seek(SeekFrom::Start(at)).ok()?;
                d.file.read_exact(&mut data).ok()?;
                // Bit j of byte k is granule 8k + j of the cluster's span; whole bytes of
                // one value at once.
                let mut bit = 0;
                while bit < count {
                    let byte = data[(bit / 8) as usize];
                    if bit % 8 == 0 && count - bit >= 8 && (byte == 0 || byte == 0xff) {
                        runs.span(first + bit, 8, byte == 0xff);
                        bit += 8;
                    } else {
                        runs.span(first + bit, 1, byte & (1 << (bit % 8)) != 0);
                        bit += 1;
                    }
                }
            }
        }
    }
    let end = d.virtual_size;
    Some(
        runs.done()
            .into_iter()
            .map(|(b, n)| (b * granule, (b + n).saturating_mul(granule).min(end) - b * granule))
            .collect(),
    )
}

/// Bits of the offset of a bitmap table entry's cluster (bits 9 to 55).
const TABLE_OFFSET: u64 = 0x00ff_ffff_ffff_fe00;
/// Tables of more entries (a bitmap of over 32 TiB at 64 KiB clusters per 1 MiB of table) are
/// left to QEMU.
const MAX_TABLE: u32 = 1 << 20;

/// Runs of set bits, fed in bit order.
#[derive(Default)]
struct Runs {
    done: Vec<(u64, u64)>,
    open: Option<(u64, u64)>,
}

impl Runs {
    fn span(&mut self, first: u64, count: u64, set: bool) {
        match (self.open.as_mut(), set) {
            (Some((_, n)), true) => *n += count,
            (None, true) => self.open = Some((first, count)),
            (Some(_), false) => self.done.extend(self.open.take()),
            (None, false) => {}
        }
    }

    fn done(mut self) -> Vec<(u64, u64)> {
        self.done.extend(self.open.take());
        self.done
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::os::unix::fs::FileExt;

    use super::*;
    use crate::stop::Stop;

    fn qemu_img(args: &[&str]) {
        let out = std::process::Command::new("qemu-img").args(args).output().unwrap();
        assert!(out.status.success(), "qemu-img {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Both lists as sets of (name, flags), the order of neither being meaningful.
    fn as_set(list: &[Bitmap]) -> BTreeSet<(String, BTreeSet<String>)> {
        list.iter().map(|b| (b.name.clone(), b.flags.iter().cloned().collect())).collect()
    }

    async fn same_as_qemu_img(path: &Path) -> Vec<Bitmap> {
        let ours = read(path).expect("a layout this reads");
        let theirs = super::super::bitmaps::list(path, &Stop::new()).await.unwrap();
        assert_eq!(as_set(&ours), as_set(&theirs), "{}", path.display());
        ours
    }

    #[tokio::test]
    async fn the_bitmaps_read_from_the_directory_are_those_qemu_img_lists() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("a.qcow2");
        let p = img.to_str().unwrap();
        qemu_img(&["create", "-q", "-f", "qcow2", p, "64M"]);
        assert!(same_as_qemu_img(&img).await.is_empty());

        let long = "n".repeat(1023);
        qemu_img(&["bitmap", "--add", p, "kvmagent-backup-g-0"]);
        qemu_img(&["bitmap", "--add", "--disable", p, "off"]);
        qemu_img(&["bitmap", "--add", "-g", "1M", p, &long]);
        qemu_img(&["bitmap", "--add", p, "x"]);
        assert_eq!(same_as_qemu_img(&img).await.len(), 4);
        qemu_img(&["bitmap", "--remove", p, "x"]);
        let list = same_as_qemu_img(&img).await;
        assert!(list.iter().any(|b| b.name == "off" && !b.is_consistent()), "{list:?}");
        assert!(list.iter().any(|b| b.name == long && b.is_consistent()), "{list:?}");

        // A bitmap a QEMU that died left in use: its entry's flags word gains bit 0.
        // (Earlier directories stay behind in freed clusters: the entry is looked for in the
        // one the extension points to.)
        let bytes = std::fs::read(&img).unwrap();
        let ext = bytes[..4096].windows(4).position(|w| w == BITMAPS_EXTENSION.to_be_bytes()).unwrap();
        let dir_at = be_u64(&bytes, ext + 8 + 16).unwrap() as usize;
        let entry = dir_at + bytes[dir_at..].windows(19).position(|w| w == b"kvmagent-backup-g-0").unwrap() - 24;
        let flags = u32::from_be_bytes(bytes[entry + 12..entry + 16].try_into().unwrap()) | FLAG_IN_USE;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&img)
            .unwrap()
            .write_all_at(&flags.to_be_bytes(), entry as u64 + 12)
            .unwrap();
        let list = same_as_qemu_img(&img).await;
        assert!(list.iter().any(|b| b.name == "kvmagent-backup-g-0" && !b.is_consistent()), "{list:?}");
    }

    #[test]
    fn a_layout_it_does_not_read_is_left_to_qemu_img() {
        let dir = tempfile::tempdir().unwrap();
        let v2 = dir.path().join("v2.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", "-o", "compat=0.10", v2.to_str().unwrap(), "1M"]);
        assert!(read(&v2).is_none());
        let raw = dir.path().join("raw");
        std::fs::write(&raw, vec![0u8; 4096]).unwrap();
        assert!(read(&raw).is_none());
        assert!(read(&dir.path().join("missing")).is_none());

        // Bitmaps a program without bitmap support wrote over (the autoclear bit cleared).
        let img = dir.path().join("cleared.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", img.to_str().unwrap(), "1M"]);
        qemu_img(&["bitmap", "--add", img.to_str().unwrap(), "b"]);
        assert_eq!(read(&img).map(|l| l.len()), Some(1));
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.write_all_at(&0u64.to_be_bytes(), 88).unwrap();
        assert!(read(&img).is_none());
        // A truncated directory.
        let mut bytes = std::fs::read(&img).unwrap();
        bytes[88..96].copy_from_slice(&1u64.to_be_bytes());
        let at = bytes[..4096].windows(4).position(|w| w == BITMAPS_EXTENSION.to_be_bytes()).unwrap();
        bytes[at + 8 + 8..at + 8 + 16].copy_from_slice(&8u64.to_be_bytes());
        std::fs::write(&img, &bytes).unwrap();
        assert!(read(&img).is_none());
    }
}
