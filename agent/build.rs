//! Names the sources a build is made from by a hash of them (`KVMAGENT_SOURCE_ID`): the
//! binary prints it in `--version`, and the host tests refuse an agent binary built from other
//! sources than theirs (a `target/*/kvmagent` left from before a change tests nothing new).

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

/// What goes into the binary: the crate's sources and manifest, and the templates and API
/// document they include.
const INPUTS: &[&str] = &["src", "Cargo.toml", "openapi.json", "../libvirt-templates"];

fn files(path: &Path, out: &mut Vec<PathBuf>) {
    match std::fs::read_dir(path) {
        Ok(entries) => entries.flatten().for_each(|e| files(&e.path(), out)),
        Err(_) => out.push(path.to_owned()),
    }
}

fn main() {
    let mut all = Vec::new();
    for input in INPUTS {
        println!("cargo:rerun-if-changed={input}");
        files(Path::new(input), &mut all);
    }
    all.sort();
    // SipHash with fixed keys: the same sources give the same id within one toolchain.
    let mut h = DefaultHasher::new();
    for f in &all {
        f.hash(&mut h);
        std::fs::read(f).unwrap_or_default().hash(&mut h);
    }
    println!("cargo:rustc-env=KVMAGENT_SOURCE_ID={:016x}", h.finish());
}
