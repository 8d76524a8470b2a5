//! Real processes: a three-member cluster and the things that do not belong to it.
//!
//! - A connection to a member's peer port from another cluster (a hello with another cluster
//!   id), followed by a heartbeat of a much higher term, again and again: the cluster keeps
//!   its leader and term (nothing reached an engine), and the member logs one refusal line, not
//!   one per connection.
//! - Bytes of another protocol on the peer port are closed and logged once per address.
//! - A member started on its own data directory with a configuration of another cluster (another
//!   `cluster.token`) refuses to start, saying whose directory it is.
//!
//! `cargo test -p truba --test identity`.

#[allow(dead_code)] // each test file uses part of the shared harness
mod common;

use common::cluster::{Cluster, ClusterConfig};
use common::spawn_serve;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use truba::config::Config;
use truba::identity::{ClusterId, Identity, PeerHello};
use truba::wire::{self, PeerFrame};
use truba_engine::{Index, Message, ReplicaId, Term};

const CLUSTER: ClusterConfig =
    ClusterConfig { dir_prefix: "truba-identity-", engine: "", kind: "lease_ms = 600000\n", stored: false };
const ATTEMPTS: usize = 5;

fn log_text(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_of_another_cluster_are_refused_at_the_door_and_at_start() {
    let mut cluster = Cluster::new(&CLUSTER);
    cluster.start_all();
    let leader = cluster.wait_leader(Duration::from_secs(20)).await;
    let before = cluster.statuses().await;
    let term = before[leader].as_ref().expect("the leader answers").engine.term;

    // A stranger: member 2 of another cluster, knocking on member 1's door.
    let config = Config::load(&cluster.nodes[0].config).expect("member 1's config");
    let peer = config.peer_listen().expect("member 1 has a peer address");
    let ours = truba::identity::configured(&config);
    let stranger = Identity { cluster: ClusterId(ours.cluster.0 ^ 1), member: ReplicaId(2) };
    // A heartbeat of a much higher term: a member that took it would adopt the term and follow.
    let vote = Message::Append {
        term: Term(term.0 + 100),
        prev_index: Index(0),
        prev_term: Term(0),
        commit: Index(0),
        round: 0,
        entries: Vec::new(),
    };
    for _ in 0..ATTEMPTS {
        let Ok(mut s) = tokio::net::TcpStream::connect(&peer).await else { continue };
        let _ = s.write_all(&wire::encode(&PeerHello::new(stranger, "127.0.0.1:1"))).await;
        let _ = s.write_all(&wire::encode(&PeerFrame { from: ReplicaId(2), message: vote.clone() })).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Bytes that are no member protocol at all, twice: closed, and logged once.
    for _ in 0..2 {
        if let Ok(mut s) = tokio::net::TcpStream::connect(&peer).await {
            let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = cluster.statuses().await;
    for (i, s) in after.iter().enumerate() {
        let s = s.as_ref().unwrap_or_else(|| panic!("member {} does not answer", i + 1));
        assert_eq!(s.engine.term, term, "member {}: the stranger's heartbeat reached an engine", i + 1);
        assert_eq!(s.engine.leader, Some(ReplicaId(leader as u32 + 1)), "member {}", i + 1);
    }
    let log = log_text(&cluster.nodes[0].log);
    let refusals: Vec<&str> = log.lines().filter(|l| l.contains("refusing a member connection")).collect();
    assert_eq!(refusals.len(), 1, "one line for {ATTEMPTS} attempts:\n{}", refusals.join("\n"));
    assert!(refusals[0].contains(&format!("it belongs to cluster {}", stranger.cluster)), "{}", refusals[0]);
    let garbage = log.lines().filter(|l| l.contains("did not open with a member hello")).count();
    assert_eq!(garbage, 1, "{log}");

    // Member 3 restarted with another cluster's configuration on its own data directory.
    let node = &mut cluster.nodes[2];
    node.terminate(Duration::from_secs(10)).await.expect("member 3 stops on SIGTERM");
    let text = std::fs::read_to_string(&node.config).unwrap();
    let other = node.config.with_file_name("node3-other-cluster.toml");
    std::fs::write(&other, text.replace("[cluster]\n", "[cluster]\ntoken = \"another\"\n")).unwrap();
    let mut child = spawn_serve(&cluster.bin, &other, &node.log, "member 3 with another cluster's config");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "member 3 served another cluster's data directory");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(!status.success(), "{status}");
    let log = log_text(&node.log);
    assert!(log.contains("the data directory belongs to cluster"), "{log}");
    assert!(log.contains("refusing to start"), "{log}");

    // With its own configuration it starts and rejoins.
    cluster.start(2);
    cluster.wait_leader(Duration::from_secs(20)).await;
    for node in &mut cluster.nodes {
        node.terminate(Duration::from_secs(10)).await;
    }
}
