//! Real processes: a member whose files rot while it is down repairs from its peers instead of
//! stopping for good.
//!
//! A three-member cluster takes sessions and snapshots often. A follower is killed (SIGKILL);
//! one bit of its newest snapshot and one copy of its hard state are flipped on disk; it starts
//! again, says what it found, keeps the damaged snapshot aside, has the leader install a
//! snapshot, and the three converge on one applied index and state hash with every session
//! there, read from the repaired member's own state. Then it is killed again and both copies of
//! its hard state are damaged: it says it will never vote again, and still replicates.
//!
//! And a crafted frame on the leader's member port (issue 14's 25-byte frame, after a proper
//! hello): the leader drops it, logs it with the peer named, and goes on leading. Without the
//! engine's message checks the leader process panics (an overflow on the frame's hint).
//!
//! `cargo test -p truba --test repair`.

#[allow(dead_code)] // each test file uses part of the shared harness
mod common;

use common::cluster::{dir_names, Cluster, ClusterConfig};
use common::truba_cli;
use std::path::Path;
use std::time::{Duration, Instant};

const CLUSTER: ClusterConfig = ClusterConfig {
    dir_prefix: "truba-repair-",
    engine: "snapshot_every_entries = 20\nsegment_bytes_max = 8192\n",
    kind: "lease_ms = 600000\n",
    stored: false,
};
const SESSIONS: usize = 60;
/// Where the hard state file keeps its two copies (4 KiB apart).
const HARD_STATE_COPIES: [usize; 2] = [0, 4096];

fn flip(file: &Path, at: usize) {
    let mut bytes = std::fs::read(file).expect("reading the file to damage");
    bytes[at] ^= 0x10;
    std::fs::write(file, bytes).expect("writing the damaged file");
}

async fn wait_for_log(log: &Path, text: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let found = std::fs::read_to_string(log).unwrap_or_default();
        if found.contains(text) {
            return;
        }
        assert!(Instant::now() < deadline, "the log never said {text:?}:\n{found}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_repairs_a_rotten_snapshot_and_hard_state_from_its_peers() {
    let mut cluster = Cluster::new(&CLUSTER);
    cluster.start_all();
    let leader = cluster.wait_leader(Duration::from_secs(20)).await;
    let addrs = cluster.addrs_from(0).join(",");
    let mut handles = Vec::new();
    for i in 0..SESSIONS {
        let (code, out, err) = truba_cli(&addrs, &["new", "--kind", "1", "--data", &format!("record {i}")]).await;
        assert_eq!(code, 0, "{err}");
        handles.push(out.trim().to_string());
    }
    cluster.wait_converged(Duration::from_secs(20)).await;
    let f = (leader + 1) % 3;
    let data = cluster.nodes[f].data.clone();
    let snapshot = dir_names(&data).into_iter().rfind(|n| n.starts_with("snap-") && n.ends_with(".snap"));
    let snapshot = snapshot.expect("the follower took a snapshot");

    // Rot while it is down: the snapshot's middle and the first copy of the hard state.
    cluster.nodes[f].kill9();
    let len = std::fs::metadata(data.join(&snapshot)).expect("the snapshot").len() as usize;
    flip(&data.join(&snapshot), len / 2);
    flip(&data.join("hardstate"), HARD_STATE_COPIES[0] + 10);
    cluster.start(f);
    let log = cluster.nodes[f].log.clone();
    wait_for_log(&log, &format!("snapshot {snapshot} is damaged"), Duration::from_secs(20)).await;
    wait_for_log(&log, "copy 0 of the hard state was damaged", Duration::from_secs(5)).await;
    cluster.wait_converged(Duration::from_secs(30)).await;
    let names = dir_names(&data);
    assert!(names.contains(&format!("damaged-{snapshot}")), "the damaged snapshot is kept aside: {names:?}");
    let client = cluster.nodes[f].client.clone();
    for (i, handle) in handles.iter().enumerate() {
        let (code, out, err) = truba_cli(&client, &["get", handle, "--stale"]).await;
        assert_eq!(code, 0, "{err}");
        assert!(out.contains(&format!("record {i}")), "session {handle} on the repaired member: {out}");
    }

    // Both copies lost: it never votes again, and still follows the log.
    cluster.nodes[f].kill9();
    flip(&data.join("hardstate"), HARD_STATE_COPIES[0] + 3);
    flip(&data.join("hardstate"), HARD_STATE_COPIES[1] + 20);
    cluster.start(f);
    wait_for_log(&log, "never votes or stands again", Duration::from_secs(20)).await;
    let (code, out, err) = truba_cli(&addrs, &["new", "--kind", "1", "--data", "after"]).await;
    assert_eq!(code, 0, "{err}");
    cluster.wait_converged(Duration::from_secs(30)).await;
    let (code, got, err) = truba_cli(&client, &["get", out.trim(), "--stale"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(got.contains("after"), "{got}");
}

/// The frame that brought a leader down (issue 14): after a proper member hello, an
/// `AppendReply` at the leader's term whose hint is the largest index. The leader drops it,
/// logs it with the peer named, and goes on leading and taking writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crafted_member_frame_is_dropped_and_the_leader_goes_on() {
    use tokio::io::AsyncWriteExt;
    use truba::identity::{ClusterId, Identity, PeerHello};
    use truba::wire::{encode, PeerFrame};
    use truba_engine::{Index, Message, ReplicaId};

    let mut cluster = Cluster::new(&CLUSTER);
    cluster.start_all();
    let leader = cluster.wait_leader(Duration::from_secs(20)).await;
    let sts = cluster.statuses().await;
    let term = sts[leader].as_ref().expect("the leader answers").engine.term;
    let node = &cluster.nodes[leader];
    let identity = std::fs::read_to_string(node.data.join("cluster-identity")).expect("the identity file");
    let cluster_id = identity.lines().find_map(|l| l.strip_prefix("cluster ")).expect("a cluster line");
    let cluster_id = ClusterId(u64::from_str_radix(cluster_id, 16).expect("hex"));
    // The leader's peer address, from its own configuration's member list.
    let config = std::fs::read_to_string(&node.config).expect("the node's configuration");
    let line = config.lines().find(|l| l.contains(&format!("id = {},", node.id))).expect("the member line");
    let peer = line.split("peer = \"").nth(1).and_then(|rest| rest.split('"').next()).expect("a peer address");
    let sender = ReplicaId((node.id % 3) + 1);

    let mut stream = tokio::net::TcpStream::connect(peer).await.expect("the member port");
    let hello = PeerHello::new(Identity { cluster: cluster_id, member: sender }, "");
    let message =
        Message::AppendReply { term, ok: false, matched: Index(0), hint: Index(u64::MAX), round: 0, sources: Index(0) };
    stream.write_all(&encode(&hello)).await.expect("sending the hello");
    stream.write_all(&encode(&PeerFrame { from: sender, message })).await.expect("sending the frame");
    stream.flush().await.expect("flushing");

    wait_for_log(&node.log.clone(), "dropped a member's message that fails its checks", Duration::from_secs(10)).await;
    assert!(cluster.nodes[leader].exited().is_none(), "the leader is still running");
    let addrs = cluster.addrs_from(0).join(",");
    let (code, _, err) = truba_cli(&addrs, &["new", "--kind", "1", "--data", "still here"]).await;
    assert_eq!(code, 0, "{err}");
    let sts = cluster.statuses().await;
    assert!(sts[leader].as_ref().is_some_and(|s| s.engine.role == truba_engine::RoleName::Leader));
}
