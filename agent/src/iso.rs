//! ISO 9660 images of a directory (cloud-init seeds): the distribution's `xorriso`, or a fake in
//! unit tests.

use std::path::Path;

use async_trait::async_trait;

use crate::process::ProcessError;
use crate::stop::Stop;

#[async_trait]
pub trait IsoWriter: Send + Sync {
    /// Writes an image labelled `label` holding the files of `dir` (Joliet and Rock Ridge names)
    /// to `out`.
    async fn write(&self, dir: &Path, label: &str, out: &Path, stop: &Stop) -> Result<(), ProcessError>;
}

pub struct Xorriso;

#[async_trait]
impl IsoWriter for Xorriso {
    async fn write(&self, dir: &Path, label: &str, out: &Path, stop: &Stop) -> Result<(), ProcessError> {
        let args = [
            "-as".as_ref(),
            "mkisofs".as_ref(),
            "-quiet".as_ref(),
            "-o".as_ref(),
            out.as_os_str(),
            "-V".as_ref(),
            label.as_ref(),
            "-J".as_ref(),
            "-R".as_ref(),
            dir.as_os_str(),
        ];
        crate::process::run::<&std::ffi::OsStr>("xorriso", &args, stop).await.map(|_| ())
    }
}

#[cfg(test)]
pub mod fake {
    use std::path::Path;
    use std::sync::Arc;

    use async_trait::async_trait;

    use super::IsoWriter;
    use crate::faults::Faults;
    use crate::process::ProcessError;
    use crate::stop::Stop;

    /// Writes, instead of an ISO, `label`, then every file of `dir` as `== <name> ==` and its
    /// content, so that tests can read what an image would hold. Fails as `faults` say (`xorriso`).
    pub struct FakeIso {
        pub faults: Arc<Faults>,
    }

    #[async_trait]
    impl IsoWriter for FakeIso {
        async fn write(&self, dir: &Path, label: &str, out: &Path, _stop: &Stop) -> Result<(), ProcessError> {
            let io = |source| ProcessError::Io { command: "fake xorriso".into(), source };
            if self.faults.enter("xorriso").await {
                return Err(io(std::io::Error::other("injected failure")));
            }
            let mut names: Vec<_> = std::fs::read_dir(dir).map_err(io)?.flatten().map(|e| e.path()).collect();
            names.sort();
            let mut text = format!("{label}\n");
            for p in names {
                let name = p.file_name().unwrap_or_default().to_string_lossy().into_owned();
                text.push_str(&format!("== {name} ==\n{}", std::fs::read_to_string(&p).map_err(io)?));
            }
            std::fs::write(out, text).map_err(io)
        }
    }
}
