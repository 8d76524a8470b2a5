//! Real processes: a cluster whose membership changes while it serves.
//!
//! Three members start; sessions are written. A fourth process starts on an empty data directory
//! with `truba serve --join` (its file names only its own addresses), is added as a learner with
//! `truba member add`, catches up, and is promoted with `truba member promote --wait`.
//! Leadership is handed to it with `truba leader transfer`, member 1 is removed with
//! `truba member remove` and stopped, and the cluster of 2, 3 and 4 goes on: the old sessions
//! are read back through the new member, and new ones are written.
//!
//! `cargo test -p truba --test membership`.

#[allow(dead_code)] // each test file uses part of the shared harness
mod common;

use common::cluster::{free_ports, node_status, Cluster, ClusterConfig};
use common::{spawn_serve_with, truba_cli, KIND};
use std::time::{Duration, Instant};
use truba_engine::RoleName;

const CLUSTER: ClusterConfig =
    ClusterConfig { dir_prefix: "truba-membership-", engine: "", kind: "lease_ms = 600000\n", stored: false };

/// The fourth member's process, killed when the test ends, whether it passes or not.
struct Node4(Option<std::process::Child>);

impl Drop for Node4 {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

async fn cli_ok(addrs: &str, args: &[&str]) -> String {
    let (code, out, err) = truba_cli(addrs, args).await;
    assert_eq!(code, 0, "truba {args:?} failed: {err}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_joins_is_promoted_takes_over_and_an_old_one_leaves() {
    let mut cluster = Cluster::new(&CLUSTER);
    cluster.start_all();
    cluster.wait_leader(Duration::from_secs(20)).await;
    let addrs = cluster.addrs_from(0).join(",");
    let mut handles = Vec::new();
    for i in 0..20 {
        let h = cli_ok(&addrs, &["new", "--kind", &KIND.to_string(), "--data", &format!("before-{i}")]).await;
        handles.push(h.trim().to_string());
    }

    // The fourth member: its own addresses only, and the address of a member to join through.
    let dir = cluster.dir.as_ref().expect("the cluster's directory").path().to_path_buf();
    let ports = free_ports(2);
    let (client4, peer4) = (format!("127.0.0.1:{}", ports[0]), format!("127.0.0.1:{}", ports[1]));
    let config4 = dir.join("node4.toml");
    let text = format!(
        "data_dir = \"{}\"\nlisten = \"{client4}\"\n[cluster]\nid = 4\nmembers = [ {{ id = 4, peer = \"{peer4}\", client = \
         \"{client4}\" }} ]\n[kinds.{KIND}]\nlease_ms = 600000\n",
        dir.join("node4").display()
    );
    std::fs::write(&config4, text).unwrap();
    let log4 = dir.join("node4.log");
    let contact = cluster.nodes[0].client.clone();
    let join = ["--join", contact.as_str()];
    let node4 = Node4(Some(spawn_serve_with(&cluster.bin, &config4, &log4, "starting node 4", &join)));

    let out = cli_ok(&addrs, &["member", "add", "4", "--peer", &peer4, "--client", &client4]).await;
    assert!(out.contains("added 4 as a learner"), "{out}");
    let listed = cli_ok(&addrs, &["member", "list"]).await;
    assert!(listed.lines().any(|l| l.starts_with("4 ") && l.contains("learner") && l.contains(&peer4)), "{listed}");

    // It catches up as a learner, and serves reads of its own state.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, shown, err) = truba_cli(&client4, &["get", &handles[19], "--stale"]).await;
        if code == 0 {
            assert!(shown.contains("before-19"), "{shown}");
            assert!(err.contains("stale read from") && err.contains("member r4"), "{err}");
            break;
        }
        assert!(Instant::now() < deadline, "node 4 never served a stale read: {err}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A linearizable read, answered by the learner through the leader's read index.
    let shown = cli_ok(&client4, &["get", &handles[0]]).await;
    assert!(shown.contains("before-0"), "{shown}");
    let shown = cli_ok(&addrs, &["status", "--cluster"]).await;
    assert!(shown.lines().any(|l| l.starts_with(&client4) && l.contains("learner")), "{shown}");
    let (_, mine, _) = truba_cli(&client4, &["status"]).await;
    assert!(mine.contains("learner following"), "{mine}");

    // Then it is promoted.
    let out = cli_ok(&addrs, &["member", "promote", "4", "--wait", "--timeout", "30s"]).await;
    assert!(out.contains("promoted 4 to voter"), "{out}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = node_status(&client4).await;
        if s.as_ref().is_some_and(|s| s.engine.applied.0 >= handles.len() as u64 && s.engine.members.len() == 4) {
            break;
        }
        assert!(Instant::now() < deadline, "node 4 did not catch up: {s:?}\n{}", common::log_tail(&log4, 30));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Leadership moves to it.
    let out = cli_ok(&addrs, &["leader", "transfer", "--to", "4"]).await;
    assert!(out.contains("4 leads term"), "{out}");
    let s = node_status(&client4).await.expect("node 4 answers");
    assert_eq!(s.engine.role, RoleName::Leader);

    // Member 1 leaves; the others go on without it.
    let all = format!("{client4},{addrs}");
    let out = cli_ok(&all, &["member", "remove", "1"]).await;
    assert!(out.contains("removed 1"), "{out}");
    cluster.nodes[0].terminate(Duration::from_secs(10)).await;
    let rest = format!("{client4},{},{}", cluster.nodes[1].client, cluster.nodes[2].client);
    let listed = cli_ok(&rest, &["member", "list"]).await;
    assert!(!listed.lines().any(|l| l.starts_with("1 ")), "{listed}");
    assert_eq!(listed.lines().filter(|l| l.contains("voter") || l.contains("leader")).count(), 3, "{listed}");
    for h in &handles {
        let shown = cli_ok(&client4, &["get", h]).await;
        assert!(shown.contains("before-"), "{shown}");
    }
    let h = cli_ok(&rest, &["new", "--kind", &KIND.to_string(), "--data", "after"]).await;
    assert!(!h.trim().is_empty());

    // Node 4 restarts on its own data, with the same command line; the member it joined through
    // is gone, which does not matter: it asks only when its data directory is empty.
    drop(node4);
    let node4 = Node4(Some(spawn_serve_with(&cluster.bin, &config4, &log4, "restarting node 4", &join)));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = node_status(&client4).await;
        if s.as_ref().is_some_and(|s| s.engine.serving && s.engine.members.len() == 3) {
            break;
        }
        assert!(Instant::now() < deadline, "node 4 did not serve again: {s:?}\n{}", common::log_tail(&log4, 30));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cli_ok(&rest, &["new", "--kind", &KIND.to_string(), "--data", "after-restart"]).await;
    drop(node4);
}
