//! Domain XML rendering: any StartVmCmd that passes validation renders to well-formed XML
//! with exactly one `<domain>` root, and rendering never panics.

#![no_main]

use kvmagent::api::vm::StartVmCmd;
use kvmagent::domain::{render, validate, DomainSettings};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(cmd) = serde_json::from_slice::<StartVmCmd>(data) else { return };
    if validate(&cmd).is_err() {
        return;
    }
    let settings = DomainSettings { domain_type: "kvm".into(), ..DomainSettings::default() };
    if let Ok(xml) = render(&cmd, &settings) {
        let doc = roxmltree::Document::parse(&xml).unwrap_or_else(|e| panic!("unparsable XML ({e}):\n{xml}"));
        assert_eq!(doc.root_element().tag_name().name(), "domain", "{xml}");
    }
});
