//! `kvmagent vm ...`: the native operations as commands with options, each built into the
//! native command body and sent through `kvmagent call`.

use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use super::CliError;

#[derive(Debug, clap::Subcommand)]
pub enum VmCommand {
    /// Create a VM (`/vm/create`) from a JSON command in a file (`-` for stdin).
    Create {
        #[arg(long)]
        data: PathBuf,
    },
    /// Clone a VM into N new VMs (`/vm/clone`) and print their inventories.
    Clone {
        /// The source VM's uuid.
        vm: String,
        /// How many clones (default: one per --names entry, else 1).
        #[arg(long)]
        count: Option<usize>,
        /// The clones' names, comma-separated (default `<vm prefix>-clone-<i>`).
        #[arg(long, value_delimiter = ',')]
        names: Vec<String>,
        /// `linked` (overlays, the default) or `copy` (flat copies).
        #[arg(long)]
        mode: Option<String>,
        /// Also clone the data volumes.
        #[arg(long)]
        full: bool,
        /// `InstantStart` (default), `CreateStopped` or `JustCreate`.
        #[arg(long)]
        strategy: Option<String>,
    },
    /// Cut a VM's volumes loose from their backing chains (`/vm/flatten`).
    Flatten {
        vm: String,
        /// Only say how many bytes flattening would add.
        #[arg(long)]
        dry_run: bool,
        /// The root volume only (default: every volume).
        #[arg(long)]
        root_only: bool,
    },
    /// Take a snapshot group of every volume of a VM (`/vm/snapshotgroup/take`).
    Snapshot {
        vm: String,
        #[arg(long)]
        name: Option<String>,
    },
}

impl VmCommand {
    /// The native path and body this command sends.
    pub fn request(&self) -> Result<(&'static str, Value), CliError> {
        Ok(match self {
            VmCommand::Create { data } => ("/vm/create", read_body(data)?),
            VmCommand::Clone { vm, count, names, mode, full, strategy } => {
                ("/vm/clone", clone_body(vm, *count, names, mode.as_deref(), *full, strategy.as_deref())?)
            }
            VmCommand::Flatten { vm, dry_run, root_only } => {
                ("/vm/flatten", json!({"vmUuid": vm, "dryRun": dry_run, "full": !root_only}))
            }
            VmCommand::Snapshot { vm, name } => {
                let mut body = json!({"vmUuid": vm});
                if let Some(n) = name {
                    body["name"] = n.as_str().into();
                }
                ("/vm/snapshotgroup/take", body)
            }
        })
    }
}

/// A JSON command body from `file`, or stdin for `-`.
pub fn read_body(file: &Path) -> Result<Value, CliError> {
    let text = if file == Path::new("-") {
        std::io::read_to_string(std::io::stdin()).map_err(|e| CliError::Usage(format!("reading stdin: {e}")))?
    } else {
        std::fs::read_to_string(file).map_err(|e| CliError::Usage(format!("reading {}: {e}", file.display())))?
    };
    serde_json::from_str(&text).map_err(|e| CliError::Usage(format!("{} is not JSON: {e}", file.display())))
}

fn clone_body(
    vm: &str,
    count: Option<usize>,
    names: &[String],
    mode: Option<&str>,
    full: bool,
    strategy: Option<&str>,
) -> Result<Value, CliError> {
    let names: Vec<String> = match (count, names.len()) {
        (Some(0), _) => return Err(CliError::Usage("--count must be at least 1".into())),
        (Some(n), 0) => (1..=n).map(|i| format!("{}-clone-{i}", short(vm))).collect(),
        (Some(n), given) if n != given => {
            return Err(CliError::Usage(format!("--count {n} but --names gives {given} names")))
        }
        (_, 0) => vec![format!("{}-clone-1", short(vm))],
        _ => names.to_vec(),
    };
    let mut body = Map::new();
    body.insert("vmUuid".into(), vm.into());
    body.insert("names".into(), json!(names));
    body.insert("full".into(), full.into());
    if let Some(m) = mode {
        body.insert("mode".into(), m.into());
    }
    if let Some(s) = strategy {
        body.insert("strategy".into(), s.into());
    }
    Ok(Value::Object(body))
}

/// The first eight characters of a uuid, for default names.
fn short(vm: &str) -> String {
    vm.chars().take(8).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clone(count: Option<usize>, names: &[&str]) -> Result<Value, CliError> {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        VmCommand::Clone { vm: "0123456789abcdef".into(), count, names, mode: None, full: false, strategy: None }
            .request()
            .map(|(_, body)| body)
    }

    #[test]
    fn clone_names_follow_count_or_the_list() {
        assert_eq!(clone(Some(2), &[]).unwrap()["names"], json!(["01234567-clone-1", "01234567-clone-2"]));
        assert_eq!(clone(None, &["a", "b"]).unwrap()["names"], json!(["a", "b"]));
        assert_eq!(clone(None, &[]).unwrap()["names"], json!(["01234567-clone-1"]));
        assert!(clone(Some(3), &["a"]).is_err());
        assert!(clone(Some(0), &[]).is_err());
    }

    #[test]
    fn flatten_options_map_to_the_native_fields() {
        let (path, body) = VmCommand::Flatten { vm: "v".into(), dry_run: true, root_only: true }.request().unwrap();
        assert_eq!(path, "/vm/flatten");
        assert_eq!(body, json!({"vmUuid": "v", "dryRun": true, "full": false}));
    }
}
