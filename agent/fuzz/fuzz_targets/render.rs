//! Domain XML rendering: any StartVmCmd that decodes into the model renders to well-formed XML
//! with exactly one `<domain>` root, and rendering never panics.

#![no_main]

use kvmagent::wire::vm::StartVmCmd;
use kvmagent::domain::{render, DomainSettings};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(cmd) = serde_json::from_slice::<StartVmCmd>(data) else { return };
    let Ok(spec) = cmd.to_spec() else { return };
    let settings = DomainSettings { domain_type: "kvm".into(), ..DomainSettings::default() };
    if let Ok(xml) = render(&spec, &settings) {
        let doc = roxmltree::Document::parse(&xml).unwrap_or_else(|e| panic!("unparsable XML ({e}):\n{xml}"));
        assert_eq!(doc.root_element().tag_name().name(), "domain", "{xml}");
    }
});
