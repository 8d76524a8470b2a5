//! Real processes: the cluster's configuration is replicated state, shown and changed with
//! `truba config show|apply`, and followed by a member whose own file says otherwise.
//!
//! A three-member cluster starts with kind 1 only. `config apply` adds kind 2 (with a lease of
//! its own); a session of kind 2 is created; the member that led is restarted with its file
//! unchanged (it knows no kind 2) and, once it leads again or serves reads, kind 2's session is
//! there and its log says where its file differs. Removing kind 2 while it has a session is
//! refused with the reason; a second apply based on an old version is refused too.
//!
//! `cargo test -p truba --test cluster_config`.

#[allow(dead_code)] // each test file uses part of the shared harness
mod common;

use common::cluster::{Cluster, ClusterConfig};
use common::truba_cli;
use std::time::Duration;

const CLUSTER: ClusterConfig =
    ClusterConfig { dir_prefix: "truba-config-", engine: "", kind: "lease_ms = 600000\n", stored: false };

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_configuration_is_changed_through_the_log_and_outlives_a_members_own_file() {
    let mut cluster = Cluster::new(&CLUSTER);
    cluster.start_all();
    let leader = cluster.wait_leader(Duration::from_secs(20)).await;
    let addrs = cluster.addrs_from(0).join(",");
    let dir = cluster.dir.as_ref().expect("the cluster's directory").path().to_path_buf();

    let (code, shown, err) = truba_cli(&addrs, &["config", "show"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(shown.contains("version 1; members: 1 (voter), 2 (voter), 3 (voter)"), "{shown}");
    assert!(shown.contains("[kinds.1]") && shown.contains("lease_ms = 600000"), "{shown}");
    let (code, _, err) = truba_cli(&addrs, &["new", "--kind", "2"]).await;
    assert_ne!(code, 0);
    assert!(err.contains("unknown kind 2"), "{err}");

    // Add kind 2: first a dry run, then for real.
    let file = dir.join("with-kind-2.toml");
    std::fs::write(&file, format!("{shown}\n[kinds.2]\nlease_ms = 45000\nhandler = \"127.0.0.1:9\"\n")).unwrap();
    let path = file.to_str().unwrap();
    let (code, out, err) = truba_cli(&addrs, &["config", "apply", path, "--dry-run"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("would change version 1") && out.contains("+ kind 2 (new)"), "{out}");
    assert!(err.contains("kinds.2.handler"), "the node-local handler is said to be ignored: {err}");
    let (code, out, err) = truba_cli(&addrs, &["config", "apply", path]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("configuration version 2"), "{out}");
    let (code, out, _) = truba_cli(&addrs, &["config", "apply", path]).await;
    assert_eq!(code, 0);
    assert!(out.contains("nothing to change"), "{out}");

    let (code, handle, err) = truba_cli(&addrs, &["new", "--kind", "2", "--data", "kept"]).await;
    assert_eq!(code, 0, "{err}");
    let handle = handle.trim().to_string();

    // The leader restarts with its own file, which has no kind 2: it follows the cluster.
    cluster.nodes[leader].kill9();
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.start(leader);
    cluster.wait_accepting(leader, Duration::from_secs(20)).await;
    let (code, out, err) = truba_cli(&addrs, &["get", &handle, "--timeout", "20s"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("kept"), "{out}");
    let (code, _, err) = truba_cli(&cluster.nodes[leader].client, &["append", &handle, "--data", "more"]).await;
    assert_eq!(code, 0, "appended through the restarted member (it forwards or points to the leader): {err}");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let log = std::fs::read_to_string(&cluster.nodes[leader].log).unwrap_or_default();
        if log.contains("kind 2: in the cluster, not configured there") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the restarted member never said its file differs:\n{log}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Removing kind 2 while it has a session is refused, and changes nothing.
    let (code, _, err) = truba_cli(&addrs, &["config", "apply", cluster.nodes[0].config.to_str().unwrap()]).await;
    assert_ne!(code, 0);
    assert!(err.contains("kind 2 still has 1 sessions"), "{err}");
    let (_, shown, _) = truba_cli(&addrs, &["config", "show", "--json"]).await;
    let json: serde_json::Value = serde_json::from_str(&shown).expect("JSON");
    assert_eq!(json["version"], 2);
    assert_eq!(json["kinds"]["2"]["lease_ms"], 45000);
}
