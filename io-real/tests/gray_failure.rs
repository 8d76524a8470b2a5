//! Real processes: a three-member cluster with one follower paused by SIGSTOP, so that its
//! kernel still accepts connections for it but nothing answers (a gray failure: a member that
//! looks up to a connect and is silent after it). The command line is run as a user would, with
//! the paused member listed first in `--addr`.
//!
//! Before clients waited for the member's hello, every `truba new` sent its request to the paused
//! member and waited the whole request timeout, again and again, and failed after 30 s although
//! two members were serving. Now a new connection waits for the member's hello, and tries the
//! next member beside it after a stagger of 250 ms (happy eyeballs): the bound asserted on each
//! command is that stagger plus `SLACK` for the process start and the request itself. Given the
//! paused member alone, a command fails after its `--timeout`, saying no hello came. A command given only a follower's
//! address reaches the leader by the follower's hint and the addresses every member tells in its
//! hello.
//!
//! `cargo test -p truba --test gray_failure -- --nocapture` prints the times.

#[allow(dead_code)] // each test file uses part of the shared harness
mod common;

use common::cluster::{Cluster, ClusterConfig, NODES};
use common::{ms, truba_cli, KIND};
use std::time::{Duration, Instant};

const CLUSTER: ClusterConfig =
    ClusterConfig { dir_prefix: "truba-gray-failure-", engine: "", kind: "lease_ms = 600000\n", stored: false };
/// Room for starting the process, the request, and a redirection to the leader.
const SLACK: Duration = Duration::from_millis(1_000);
/// The client library's `CONNECT_STAGGER`.
const STAGGER: Duration = Duration::from_millis(250);

/// [`truba_cli`], and how long it took.
async fn truba(addr: &str, args: &[&str]) -> (i32, String, String, Duration) {
    let started = Instant::now();
    let (code, out, err) = truba_cli(addr, args).await;
    (code, out, err, started.elapsed())
}

fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill").args([sig, &pid.to_string()]).status().expect("running kill");
    assert!(ok.success(), "kill {sig} {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_member_listed_first_costs_a_command_one_connect_timeout() {
    let mut cluster = Cluster::new(&CLUSTER);
    cluster.start_all();
    let leader = cluster.wait_leader(Duration::from_secs(20)).await;
    let paused = (leader + 1) % NODES;
    let other = (leader + 2) % NODES;
    let pid = cluster.nodes[paused].child.as_ref().expect("running").id();
    signal(pid, "-STOP");

    // Every member, the paused one first (the order a user would write them in).
    let all = cluster.addrs_from(paused).join(",");
    let mut slowest = Duration::ZERO;
    let kind = KIND.to_string();
    for n in 0..3 {
        let (code, out, err, took) = truba(&all, &["new", "--kind", &kind, "--data", "first"]).await;
        assert_eq!(code, 0, "new {n}: {err}");
        let handle = out.trim().to_string();
        slowest = slowest.max(took);
        let (code, _, err, took2) = truba(&all, &["append", &handle, "--data", "second"]).await;
        assert_eq!(code, 0, "append {n}: {err}");
        slowest = slowest.max(took2);
        eprintln!("  new {}, append {} with member {} paused and listed first", ms(took), ms(took2), paused + 1);
    }
    assert!(slowest <= STAGGER + SLACK, "a command took {}", ms(slowest));

    // Only a follower's address: its hello names the others and its refusal names the leader.
    let (code, out, err, took) = truba(&cluster.nodes[other].client, &["new", "--kind", &kind]).await;
    eprintln!("  new through follower {} alone: {}", other + 1, ms(took));
    assert_eq!(code, 0, "new through one member: {err}");
    assert!(!out.trim().is_empty());

    // The paused member alone: a clear error within the timeout asked for, not a hang.
    let (code, _, err, took) = truba(
        &cluster.nodes[paused].client,
        &["new", "--kind", &kind, "--timeout", "2s", "--connect-timeout", "300ms"],
    )
    .await;
    assert_ne!(code, 0, "nothing can serve through a paused member alone");
    assert!(err.contains("no hello within 300 ms"), "{err}");
    assert!(took < Duration::from_secs(2) + SLACK, "took {}", ms(took));

    // One address is enough for every member's row, the paused one's an error.
    let (code, out, err, _) = truba(&cluster.nodes[other].client, &["status", "--cluster", "--json"]).await;
    assert_eq!(code, 0, "{err}");
    let rows: serde_json::Value = serde_json::from_str(&out).expect("JSON rows");
    let rows = rows.as_array().expect("an array of members");
    assert_eq!(rows.len(), NODES, "{out}");
    let roles: Vec<&str> = rows.iter().filter_map(|r| r["role"].as_str()).collect();
    assert_eq!(roles.iter().filter(|r| **r == "leader").count(), 1, "{out}");
    let paused_row = rows.iter().find(|r| r["addr"] == cluster.nodes[paused].client.as_str()).expect("its row");
    assert!(paused_row["error"].is_string(), "{out}");

    signal(pid, "-CONT");
    cluster.wait_leader(Duration::from_secs(20)).await;
    for node in &mut cluster.nodes {
        node.terminate(Duration::from_secs(10)).await;
    }
}
