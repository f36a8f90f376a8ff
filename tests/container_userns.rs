//! Container uids are not host uids: the engine remaps user namespaces
//! (`airlock setup` starts dockerd with `--userns-remap=default`), so root and
//! the sandbox user (uid 1000) inside a sandbox are unprivileged, unnamed uids
//! on the host, under runc and under runsc. The engine is required and must
//! remap: without it every test here fails, loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "container/mod.rs"]
mod container;
use container::*;

use std::os::unix::fs::MetadataExt;

use airlock::container::{ContainerRuntime, SANDBOX_UID, UserMapping};

/// The engine's remapping; fails the test when it does not remap.
async fn mapping() -> UserMapping {
    let (engine, _) = engine_and_image().await;
    engine.user_mapping().unwrap_or_else(|| {
        panic!("{} (`airlock setup` starts dockerd with --userns-remap=default)", airlock::container::NO_REMAP_ADVICE)
    })
}

fn in_range(mapping: &UserMapping, uid: u32, gid: u32) -> bool {
    (mapping.first_uid..mapping.first_uid + mapping.uid_count).contains(&uid)
        && (mapping.first_gid..mapping.first_gid + mapping.gid_count).contains(&gid)
}

/// The host uid map of the process that does the sandbox's file work: the
/// container's first process under runc; under runsc, the gofer (gVisor's
/// sentry keeps a user namespace of its own, remapping or not).
async fn host_uid_map(sandbox: &TestSandbox, runtime: ContainerRuntime) -> String {
    let id = sandbox.sandbox.container_id().to_string();
    let pid = if runtime == ContainerRuntime::Runc {
        let inspected = sandbox
            .sandbox
            .engine()
            .docker()
            .inspect_container(&id, None::<bollard::query_parameters::InspectContainerOptions>)
            .await
            .unwrap();
        u32::try_from(inspected.state.unwrap().pid.unwrap()).unwrap()
    } else {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
            .find(|pid| {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let cmdline = String::from_utf8_lossy(&cmdline);
                cmdline.starts_with("runsc-gofer") && cmdline.contains(&id)
            })
            .unwrap_or_else(|| panic!("no runsc gofer for {id}"))
    };
    std::fs::read_to_string(format!("/proc/{pid}/uid_map")).unwrap()
}

fn is_identity(uid_map: &str) -> bool {
    uid_map.split_whitespace().collect::<Vec<_>>() == ["0", "0", "4294967295"]
}

async fn uids_in_the_workspace_are_remapped(runtime: ContainerRuntime) {
    let mapping = mapping().await;
    let sandbox = TestSandbox::new(runtime).await;
    let as_root = sandbox.bash_as_root("touch /workspace/by-root && mkdir /workspace/dir-by-root").await;
    assert!(as_root.success(), "{as_root:?}");
    let as_user = sandbox.bash("touch /workspace/by-user && id -u").await;
    assert!(as_user.success(), "{as_user:?}");
    assert_eq!(as_user.stdout_text().trim(), SANDBOX_UID.to_string(), "commands run as the sandbox user");

    for (name, container_uid) in [("by-root", 0), ("dir-by-root", 0), ("by-user", SANDBOX_UID)] {
        let meta = std::fs::symlink_metadata(sandbox.path(name)).unwrap();
        let (uid, gid) = (meta.uid(), meta.gid());
        assert!(uid != 0 && uid != SANDBOX_UID && gid != 0 && gid != SANDBOX_UID, "{name} is {uid}:{gid} on the host");
        assert!(in_range(&mapping, uid, gid), "{name} is {uid}:{gid}, outside {mapping:?}");
        assert_eq!(Some((uid, gid)), mapping.host_ids(container_uid, container_uid), "{name}");
    }

    // Under runc the container's own view shows the remapping; gVisor's
    // kernel shows its own identity map inside, so the host view is checked for both.
    if runtime == ContainerRuntime::Runc {
        let inside = sandbox.bash("cat /proc/self/uid_map").await;
        assert!(!is_identity(&inside.stdout_text()), "uid_map inside: {}", inside.stdout_text());
        assert!(inside.stdout_text().contains(&mapping.first_uid.to_string()), "{}", inside.stdout_text());
    }
    let host_map = host_uid_map(&sandbox, runtime).await;
    assert!(!is_identity(&host_map), "the container's processes run with the host's uids: {host_map}");
    let first = host_map.split_whitespace().collect::<Vec<_>>();
    assert_eq!(first.get(1).copied(), Some(mapping.first_uid.to_string().as_str()), "{host_map}");
}

async fn the_host_hands_files_to_the_remapped_user(runtime: ContainerRuntime) {
    let mapping = mapping().await;
    let sandbox = TestSandbox::new(runtime).await;
    // Written by the host (root), as the files API or an isolate would before a handover.
    std::fs::write(sandbox.path("from-host"), "host\n").unwrap();
    assert_eq!(std::fs::metadata(sandbox.path("from-host")).unwrap().uid(), 0);
    sandbox.sandbox.hand_workspace_to_user().unwrap();
    let owner = sandbox.sandbox.workspace_owner().unwrap().unwrap();
    assert_eq!(Some((owner.uid, owner.gid)), mapping.host_ids(SANDBOX_UID, SANDBOX_UID));
    for name in ["", "from-host"] {
        let meta = std::fs::symlink_metadata(sandbox.path(name)).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (owner.uid, owner.gid), "{name:?} after the handover");
    }
    // Inside, it is the sandbox user's: it can change it.
    let out = sandbox.bash("echo sandbox >> /workspace/from-host && stat -c %u:%g /workspace/from-host 2>/dev/null || python3 -c \"import os; s=os.stat('/workspace/from-host'); print(f'{s.st_uid}:{s.st_gid}')\"").await;
    assert!(out.success(), "{out:?}");
    assert_eq!(out.stdout_text().trim(), format!("{SANDBOX_UID}:{SANDBOX_UID}"));
    assert_eq!(std::fs::read_to_string(sandbox.path("from-host")).unwrap(), "host\nsandbox\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uids_in_the_workspace_are_remapped_under_runc() {
    uids_in_the_workspace_are_remapped(ContainerRuntime::Runc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uids_in_the_workspace_are_remapped_under_runsc() {
    uids_in_the_workspace_are_remapped(ContainerRuntime::Runsc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_hands_files_to_the_remapped_user_under_runc() {
    the_host_hands_files_to_the_remapped_user(ContainerRuntime::Runc).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_hands_files_to_the_remapped_user_under_runsc() {
    the_host_hands_files_to_the_remapped_user(ContainerRuntime::Runsc).await;
}
