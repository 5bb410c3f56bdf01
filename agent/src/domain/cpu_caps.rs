//! Whether this host can give a guest the CPU its spec asks for, from libvirt's domain
//! capabilities: a mode the host lacks is refused before the domain is defined, with what the
//! host offers instead.

use crate::error::{AgentError, AgentResult};
use crate::model::CpuMode;

/// What the domain capabilities offer: the supported modes and the usable named models.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct CpuOffer {
    pub modes: Vec<String>,
    pub models: Vec<String>,
}

pub fn cpu_offer(domcaps: &str) -> AgentResult<CpuOffer> {
    let doc = roxmltree::Document::parse(domcaps)
        .map_err(|e| AgentError::failed("cannot read libvirt's domain capabilities", e.to_string()))?;
    let mut offer = CpuOffer::default();
    let cpu = doc.root_element().children().find(|n| n.has_tag_name("cpu"));
    for mode in cpu.iter().flat_map(|c| c.children()).filter(|n| n.has_tag_name("mode")) {
        if mode.attribute("supported") != Some("yes") {
            continue;
        }
        let name = mode.attribute("name").unwrap_or_default();
        offer.modes.push(name.to_owned());
        if name == "custom" {
            offer.models.extend(
                (mode.children())
                    .filter(|m| m.has_tag_name("model") && m.attribute("usable") == Some("yes"))
                    .filter_map(|m| m.text().map(str::to_owned)),
            );
        }
    }
    Ok(offer)
}

/// Refuses `mode` unless `offer` has it, naming what this host offers.
pub fn check_cpu_mode(mode: &CpuMode, offer: &CpuOffer) -> AgentResult<()> {
    let offered = offer.modes.iter().any(|m| m == mode.libvirt_mode())
        && mode.model().map_or(true, |name| offer.models.iter().any(|m| m == name));
    if offered {
        return Ok(());
    }
    let what = match mode.model() {
        Some(name) => format!("CPU model {name}"),
        None => format!("CPU mode {}", mode.libvirt_mode()),
    };
    Err(AgentError::invalid(format!(
        "this host cannot give the guest {what}: it offers the modes {:?} and the models {:?}; choose one of those \
         (under TCG there is no host-passthrough)",
        offer.modes, offer.models
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCG: &str = "<domainCapabilities><cpu><mode name='host-passthrough' supported='no'/>\
        <mode name='host-model' supported='yes'><model fallback='forbid'>EPYC</model></mode>\
        <mode name='custom' supported='yes'><model usable='yes' vendor='unknown'>qemu64</model>\
        <model usable='no' vendor='Intel'>Skylake-Server</model></mode></cpu></domainCapabilities>";

    #[test]
    fn modes_and_models_the_host_offers_pass_and_others_are_refused_with_the_offer() {
        let offer = cpu_offer(TCG).unwrap();
        assert_eq!(
            offer,
            CpuOffer { modes: vec!["host-model".into(), "custom".into()], models: vec!["qemu64".into()] }
        );
        check_cpu_mode(&CpuMode::HostModel, &offer).unwrap();
        check_cpu_mode(&CpuMode::Custom("qemu64".into()), &offer).unwrap();
        let e = check_cpu_mode(&CpuMode::HostPassthrough, &offer).unwrap_err().to_string();
        assert!(e.contains("CPU mode host-passthrough") && e.contains("\"host-model\""), "{e}");
        let e = check_cpu_mode(&CpuMode::Custom("Skylake-Server".into()), &offer).unwrap_err().to_string();
        assert!(e.contains("CPU model Skylake-Server") && e.contains("\"qemu64\""), "{e}");
        assert!(cpu_offer("not xml").is_err());
    }
}
