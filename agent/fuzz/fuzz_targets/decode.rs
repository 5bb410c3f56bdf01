//! Command decoding, as the server does it: the body is parsed, then decoded into each typed
//! command. Any input must give a value or an error, never a panic.

#![no_main]

use kvmagent::wire::{ceph, decode, host, localstorage, native, parse_body, vm};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fn all(v: &Value) {
    macro_rules! each {
        ($($t:ty),* $(,)?) => { $( let _ = decode::<$t>(v); )* };
    }
    each!(
        vm::StartVmCmd, vm::StopVmCmd, vm::DestroyVmCmd, vm::TakeSnapshotCmd, vm::MergeSnapshotCmd,
        vm::CreateCephSecretCmd, host::ConnectCmd, host::PingCmd, host::CancelCmd,
        localstorage::InitCmd, localstorage::CheckBitsCmd, localstorage::CreateVolumeFromCacheCmd,
        localstorage::CreateEmptyVolumeCmd, localstorage::VolumePathCmd, localstorage::DeleteBitsCmd,
        localstorage::CreateWithBackingCmd, localstorage::CreateTemplateCmd, localstorage::ReinitImageCmd,
        localstorage::OfflineMergeCmd, localstorage::EstimateTemplateSizeCmd,
        ceph::CreateEmptyCmd, ceph::CopyCmd, ceph::PathCmd, ceph::InstallPathCmd, ceph::SnapshotCmd,
        native::CreateVmCmd, native::ChangeImageCmd, native::CloneVmCmd, native::FlattenVmCmd,
        native::TakeSnapshotGroupCmd, native::CreateFromSnapshotCmd, native::BackupVmCmd,
        native::CreateFromBackupCmd,
    );
}

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = parse_body(data) {
        all(&v);
    }
});
