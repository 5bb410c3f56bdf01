//! The CPU a guest sees.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum CpuMode {
    /// The named model closest to the host's CPU, with the host's extra features.
    HostModel,
    /// The host's CPU exactly (needs hardware virtualisation).
    HostPassthrough,
    /// This named model exactly; refused rather than degraded when the host cannot run it.
    Custom(String),
}

impl CpuMode {
    /// libvirt's `<cpu mode>`.
    pub fn libvirt_mode(&self) -> &'static str {
        match self {
            CpuMode::HostModel => "host-model",
            CpuMode::HostPassthrough => "host-passthrough",
            CpuMode::Custom(_) => "custom",
        }
    }

    pub fn model(&self) -> Option<&str> {
        match self {
            CpuMode::Custom(m) => Some(m),
            _ => None,
        }
    }
}
