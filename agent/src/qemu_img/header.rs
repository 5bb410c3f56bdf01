//! Reading a qcow2 header to learn a file's format and backing file without trusting any
//! command (a file's content is the guest's, and so is anything that parses it).

use std::io::Read;
use std::path::{Path, PathBuf};

/// What the first bytes of a file say it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// `qcow2` or `raw`.
    pub format: &'static str,
    /// The backing file name as stored (may be relative to the image's directory).
    pub backing_file: Option<String>,
    /// qcow2 v3 "external data file": the image's data lives in another file, which QEMU opens
    /// by a name stored in the header.
    pub external_data: bool,
    /// The size the guest sees: the qcow2 header's, or a raw file's length (in whole sectors).
    pub virtual_size: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} has a damaged qcow2 header: {reason}")]
    Corrupt { path: PathBuf, reason: &'static str },
}

const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";
/// A backing file name is at most 1023 bytes (qemu's limit).
const MAX_BACKING_NAME: u32 = 1023;

/// Reads the format, virtual size and backing file name from the qcow2 header (magic, then the
/// backing file offset at byte 8 (u64 BE), its length at byte 16 (u32 BE), the size at byte 24
/// (u64 BE)); anything else is raw.
pub fn read_header(path: &Path) -> Result<Header, HeaderError> {
    let io = |source| HeaderError::Io { path: path.to_owned(), source };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut head = [0u8; 80];
    let n = read_full(&mut f, &mut head).map_err(io)?;
    if n < 4 || &head[..4] != QCOW2_MAGIC {
        // QEMU sees a raw file in whole 512-byte sectors.
        let virtual_size = f.metadata().map_err(io)?.len().div_ceil(512) * 512;
        return Ok(Header { format: "raw", backing_file: None, external_data: false, virtual_size });
    }
    if n < 32 {
        return Err(HeaderError::Corrupt { path: path.to_owned(), reason: "header shorter than 32 bytes" });
    }
    let virtual_size = u64::from_be_bytes(head[24..32].try_into().expect("8 bytes"));
    let version = u32::from_be_bytes(head[4..8].try_into().expect("4 bytes"));
    // v3 headers carry incompatible feature bits at byte 72; bit 2 is "external data file".
    let external_data =
        version >= 3 && n >= 80 && u64::from_be_bytes(head[72..80].try_into().expect("8 bytes")) & (1 << 2) != 0;
    let offset = u64::from_be_bytes(head[8..16].try_into().expect("8 bytes"));
    let len = u32::from_be_bytes(head[16..20].try_into().expect("4 bytes"));
    if offset == 0 || len == 0 {
        return Ok(Header { format: "qcow2", backing_file: None, external_data, virtual_size });
    }
    if len > MAX_BACKING_NAME {
        return Err(HeaderError::Corrupt { path: path.to_owned(), reason: "backing file name longer than 1023 bytes" });
    }
    use std::io::{Seek, SeekFrom};
    f.seek(SeekFrom::Start(offset)).map_err(io)?;
    let mut name = vec![0u8; len as usize];
    if read_full(&mut f, &mut name).map_err(io)? != name.len() {
        return Err(HeaderError::Corrupt {
            path: path.to_owned(),
            reason: "backing file name runs past the end of the file",
        });
    }
    let name = String::from_utf8(name)
        .map_err(|_| HeaderError::Corrupt { path: path.to_owned(), reason: "backing file name is not UTF-8" })?;
    Ok(Header { format: "qcow2", backing_file: Some(name), external_data, virtual_size })
}

fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// The format of the file at `path`, from its header.
pub fn sniff_format(path: &Path) -> Result<&'static str, HeaderError> {
    read_header(path).map(|h| h.format)
}
