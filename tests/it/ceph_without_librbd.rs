//! A host whose librbd cannot be loaded (the agent runs in its own mount namespace where the
//! library file is empty): the agent starts, since it does not link Ceph's libraries, and an RBD
//! call fails in-band saying what to install, changing nothing.

use std::os::unix::fs::PermissionsExt;

use kvmagent_host_tests::ceph::{agent_config, info};
use kvmagent_host_tests::{agent_binary, uuid, Host};
use serde_json::json;

/// A launcher that runs the agent with `library` replaced by an empty file.
fn without(library: &str, dir: &std::path::Path) -> std::path::PathBuf {
    let real = std::fs::canonicalize(library).expect("the library is installed on the test host");
    let launcher = dir.join("kvmagent-without-librbd");
    let script = format!(
        "#!/bin/sh\nexec unshare --mount --propagation private sh -c 'mount --bind /dev/null \"$0\" && exec \"$@\"' {} {} \"$@\"\n",
        real.display(),
        agent_binary().display()
    );
    std::fs::write(&launcher, script).unwrap();
    std::fs::set_permissions(&launcher, std::fs::Permissions::from_mode(0o755)).unwrap();
    launcher
}

#[tokio::test]
async fn without_librbd_the_agent_starts_and_rbd_calls_say_what_to_install() {
    let dir = tempfile::tempdir().unwrap();
    let launcher = without("/usr/lib/x86_64-linux-gnu/librbd.so.1", dir.path());
    // The only test of this binary: the harness starts the agent through the launcher.
    std::env::set_var("KVMAGENT_BIN", &launcher);
    let h = Host::start_with(&agent_config()).await.unwrap();

    let image = format!("img-{}", uuid());
    let body = json!({"installPath": format!("ceph://rbd/{image}"), "size": 1 << 20});
    let r = h.call("/ceph/primarystorage/volume/createempty", &body).await.unwrap();
    assert_eq!(r["success"], json!(false), "{r}");
    let error = r.to_string();
    assert!(error.contains("cannot load librbd.so.1 (package librbd1)"), "{error}");
    assert!(error.contains("install the Ceph client libraries (Debian: librbd1 and librados2)"), "{error}");
    assert!(info(&format!("rbd/{image}")).is_none(), "no image was made");

    // Still serving, and the next call fails the same way (nothing half-loaded is kept).
    let r = h.call("/ceph/primarystorage/volume/createempty", &body).await.unwrap();
    assert!(r.to_string().contains("cannot load librbd.so.1"), "{r}");
}
