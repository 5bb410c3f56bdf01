//! The operator's command line against a running agent: `kvmagent call`, the `kvmagent vm ...`
//! shorthands for the native operations, and `kvmagent smoke`.

pub mod call;
pub mod output;
pub mod smoke;
pub mod transport;
pub mod vm;

use std::path::PathBuf;
use std::process::ExitCode;

use crate::config::Config;
pub use transport::Target;

/// The configuration the packaged service runs with; read when `--config` is not given.
pub const DEFAULT_CONFIG: &str = "/etc/kvmagent/kvmagent.toml";

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error(
        "cannot reach the agent at {url}: {reason}; is it running (systemctl status kvmagent), and is --url right?"
    )]
    Transport { url: String, reason: String },
    #[error("the agent refused {path} ({status}): {message}")]
    Refused { path: String, status: u16, message: String },
}

impl CliError {
    /// Usage and transport problems exit 2; a failed command's result exits 1 (see `call`).
    pub fn exit(&self) -> ExitCode {
        eprintln!("kvmagent: {self}");
        ExitCode::from(2)
    }
}

/// How to reach the agent, from the command line's options.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct Connect {
    /// The agent's base URL (default: from the config's server.listen, https with server.tls).
    #[arg(long, global = true)]
    pub url: Option<String>,
    /// The agent's configuration, for its port, token and TLS (default /etc/kvmagent/kvmagent.toml
    /// when it exists).
    #[arg(long, short, global = true)]
    pub config: Option<PathBuf>,
    /// PEM CA certificate(s) to trust for TLS (default: exactly the agent's own
    /// server.tls.cert, read from the config).
    #[arg(long, global = true)]
    pub ca: Option<PathBuf>,
    /// PEM certificate (chain) to present when the agent asks for a client certificate
    /// (`server.tls.client_ca`); with --key.
    #[arg(long, global = true, requires = "key")]
    pub cert: Option<PathBuf>,
    /// The private key of --cert.
    #[arg(long, global = true, requires = "cert")]
    pub key: Option<PathBuf>,
}

impl Connect {
    pub fn load_config(&self) -> Result<Config, CliError> {
        let path = self.config.clone().or_else(|| Some(PathBuf::from(DEFAULT_CONFIG)).filter(|p| p.exists()));
        Config::load(path.as_deref()).map_err(|e| CliError::Usage(e.to_string()))
    }

    pub fn target(&self, config: &Config) -> Result<Target, CliError> {
        let tls_cert = config.server.tls.as_ref().map(|t| t.cert.as_path());
        let base = match &self.url {
            Some(u) => u.trim_end_matches('/').to_owned(),
            None => {
                let mut addr = config.server.listen;
                if addr.ip().is_unspecified() {
                    addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
                }
                format!("{}://{addr}", if tls_cert.is_some() { "https" } else { "http" })
            }
        };
        let tls = if base.starts_with("https://") {
            use crate::http::tls::Trust;
            let trust = match (self.ca.as_deref(), tls_cert) {
                (Some(ca), _) => Trust::Ca(ca),
                (None, Some(cert)) => Trust::Pinned(cert),
                (None, None) => {
                    return Err(CliError::Usage(format!("{base} is https: give --ca with the agent's CA certificate")))
                }
            };
            let client = match (self.cert.as_deref(), self.key.as_deref()) {
                (Some(cert), Some(key)) => Some(crate::http::tls::ClientCert { cert, key }),
                _ => None,
            };
            Some(crate::http::tls::connector(trust, client).map_err(|e| CliError::Usage(e.to_string()))?)
        } else if base.starts_with("http://") {
            None
        } else {
            return Err(CliError::Usage(format!("--url {base}: give http://host:port or https://host:port")));
        };
        Ok(Target { base, token: config.server.token.clone(), tls })
    }
}

/// A runtime for one command-line action.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime")
}
