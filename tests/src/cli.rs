//! Running the operator's command line (`kvmagent call`, `vm`, `smoke`) against a test agent.

use std::process::{Output, Stdio};

use anyhow::{Context, Result};

use crate::{agent_binary, Host};

impl Host {
    /// The agent's configuration file, which the command line reads for port and token.
    pub fn config_path(&self) -> std::path::PathBuf {
        self.dir.path().join("kvmagent.toml")
    }

    /// `kvmagent ARGS --config <this agent's config>`, to completion.
    pub async fn cli(&self, args: &[&str], stdin: Option<&str>) -> Result<Output> {
        let mut cmd = self.cli_command(args);
        cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
        let mut child = cmd.spawn().context("starting kvmagent")?;
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            use tokio::io::AsyncWriteExt;
            pipe.write_all(text.as_bytes()).await?;
        }
        Ok(child.wait_with_output().await?)
    }

    /// The command, stdout and stderr piped, not started.
    pub fn cli_command(&self, args: &[&str]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(agent_binary());
        cmd.args(args).arg("--config").arg(self.config_path());
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
        cmd
    }
}

/// stdout and stderr as text, for assertions and their messages.
pub fn texts(out: &Output) -> (String, String) {
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}
