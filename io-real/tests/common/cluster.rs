//! The harness of the tests that run a `truba` cluster of three real processes
//! (`cluster_kill.rs`, `cluster_sources.rs`): free ports, each member's config, starting, killing
//! and restarting members, asking each member for its own status, and waiting until they agree on
//! a leader, settle or converge.
//!
//! The tests differ in their engine limits and in the settings of their one kind, which they pass
//! in a [`ClusterConfig`]; the rest of every member's config is the same for both.

use super::{log_tail, spawn_serve, XorShift, KIND};
use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};
use truba::client::{ClientOptions, Pipe};
use truba::net::Tcp;
use truba::wire::ServerStatus;
use truba_engine::RoleName;

/// Members of the cluster.
pub const NODES: usize = 3;

// ---------------------------------------------------------------------------------------------
// Ports.

/// `n` distinct free ports on 127.0.0.1. Taken below the kernel's ephemeral range when it can be
/// read: a member is down for a while between kill and restart, and an outgoing connection must
/// not be given its port meanwhile. Each is checked by binding it (all at once, so they differ).
pub fn free_ports(n: usize) -> Vec<u16> {
    let ephemeral_lo = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|lo| lo.parse::<u16>().ok()));
    if let Some(lo) = ephemeral_lo.filter(|lo| *lo > 12_000) {
        let (from, to) = (10_000u64, lo as u64 - 1);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        let mut rng = XorShift::new(nanos as u64 ^ ((std::process::id() as u64) << 32));
        for _ in 0..200 {
            let mut held = Vec::new();
            let mut ports = Vec::new();
            while ports.len() < n {
                let port = rng.range(from, to) as u16;
                if ports.contains(&port) {
                    continue;
                }
                match std::net::TcpListener::bind(("127.0.0.1", port)) {
                    Ok(l) => {
                        held.push(l);
                        ports.push(port);
                    }
                    Err(_) => break,
                }
            }
            if ports.len() == n {
                return ports;
            }
        }
    }
    // Fallback: whatever the kernel hands out.
    let held: Vec<_> =
        (0..n).map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("binding a free port")).collect();
    held.iter().map(|l| l.local_addr().expect("local address").port()).collect()
}

// ---------------------------------------------------------------------------------------------
// The member processes.

pub struct Node {
    /// Member id (index + 1).
    pub id: u32,
    pub config: PathBuf,
    pub data: PathBuf,
    pub log: PathBuf,
    /// Where clients reach it.
    pub client: String,
    pub child: Option<Child>,
    pub starts: u32,
}

impl Node {
    pub fn start(&mut self, bin: &Path) {
        assert!(self.child.is_none(), "node {} is already running", self.id);
        self.starts += 1;
        let marker = format!("starting node {} (start {})", self.id, self.starts);
        self.child = Some(spawn_serve(bin, &self.config, &self.log, &marker));
    }

    /// SIGKILL, then reap the process.
    pub fn kill9(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("the node is running");
        if let Ok(log) = OpenOptions::new().append(true).open(&self.log) {
            let _ = writeln!(&log, "===== test: SIGKILL node {} =====", self.id);
        }
        child.kill().expect("sending SIGKILL");
        child.wait().expect("waiting for the killed node")
    }

    /// SIGTERM; the exit status if the process ends within `within`.
    pub async fn terminate(&mut self, within: Duration) -> Option<ExitStatus> {
        super::terminate(&mut self.child, within).await
    }

    /// The exit status, if the process ended by itself.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }
}

/// What differs between the clusters the tests run.
pub struct ClusterConfig<'a> {
    /// The start of the temporary directory's name ("truba-cluster-kill-").
    pub dir_prefix: &'a str,
    /// Every member's `[engine]` section: TOML lines, each ending in a newline.
    pub engine: &'a str,
    /// Every member's `[kinds.1]` section (for [`KIND`], the one kind the tests use): TOML lines,
    /// each ending in a newline.
    pub kind: &'a str,
    /// The test is about stored sessions and their source files: status lines then show the
    /// stored figures, and a failure lists each member's data directory as well as its log.
    pub stored: bool,
}

pub struct Cluster {
    pub bin: PathBuf,
    pub nodes: Vec<Node>,
    /// Kept (not removed) if the test fails, so the data directories and logs can be looked at.
    pub dir: Option<tempfile::TempDir>,
    /// [`ClusterConfig::stored`].
    pub stored: bool,
}

impl Cluster {
    /// Writes the three members' configs (nothing runs yet).
    pub fn new(cfg: &ClusterConfig) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix(cfg.dir_prefix)
            .tempdir_in(std::env::temp_dir())
            .expect("creating a temporary directory");
        let ports = free_ports(2 * NODES);
        let client = |i: usize| format!("127.0.0.1:{}", ports[i]);
        let peer = |i: usize| format!("127.0.0.1:{}", ports[NODES + i]);
        let members: Vec<String> = (0..NODES)
            .map(|i| format!("  {{ id = {}, peer = \"{}\", client = \"{}\" }},", i + 1, peer(i), client(i)))
            .collect();
        let mut nodes = Vec::new();
        for i in 0..NODES {
            let id = i as u32 + 1;
            let data = dir.path().join(format!("node{id}"));
            let config = dir.path().join(format!("node{id}.toml"));
            let text = format!(
                r#"data_dir = "{data}"
listen = "{listen}"

[engine]
{engine}
[cluster]
id = {id}
members = [
{members}
]

[kinds.{KIND}]
{kind}"#,
                data = data.display(),
                listen = client(i),
                engine = cfg.engine,
                members = members.join("\n"),
                kind = cfg.kind,
            );
            std::fs::write(&config, text).expect("writing a config");
            nodes.push(Node {
                id,
                config,
                data,
                log: dir.path().join(format!("node{id}.log")),
                client: client(i),
                child: None,
                starts: 0,
            });
        }
        Cluster { bin: PathBuf::from(env!("CARGO_BIN_EXE_truba")), nodes, dir: Some(dir), stored: cfg.stored }
    }

    /// Starts every member.
    pub fn start_all(&mut self) {
        for i in 0..self.nodes.len() {
            self.start(i);
        }
    }

    pub fn start(&mut self, i: usize) {
        let bin = self.bin.clone();
        self.nodes[i].start(&bin);
    }

    pub fn running(&self, i: usize) -> bool {
        self.nodes[i].child.is_some()
    }

    /// Every member's client address, starting with member `first`.
    pub fn addrs_from(&self, first: usize) -> Vec<String> {
        (0..NODES).map(|k| self.nodes[(first + k) % NODES].client.clone()).collect()
    }

    /// Fails if a member the test did not stop has exited.
    pub fn check_alive(&mut self) {
        for n in &mut self.nodes {
            if let Some(status) = n.exited() {
                n.child = None;
                panic!("node {} exited by itself: {status}", n.id);
            }
        }
    }

    /// Polls until member `i` accepts connections (it recovers after that).
    pub async fn wait_accepting(&mut self, i: usize, within: Duration) -> Instant {
        let deadline = Instant::now() + within;
        loop {
            if tokio::net::TcpStream::connect(&self.nodes[i].client).await.is_ok() {
                return Instant::now();
            }
            self.check_alive();
            assert!(Instant::now() < deadline, "node {} did not accept connections within {within:?}", i + 1);
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Every running member's own status (`None` for members down or not answering).
    pub async fn statuses(&mut self) -> Vec<Option<ServerStatus>> {
        self.check_alive();
        let addr = |i: usize| self.running(i).then(|| self.nodes[i].client.clone());
        let q = |a: Option<String>| async move {
            match a {
                Some(a) => node_status(&a).await,
                None => None,
            }
        };
        const _: () = assert!(NODES == 3);
        let (a, b, c) = tokio::join!(q(addr(0)), q(addr(1)), q(addr(2)));
        vec![a, b, c]
    }

    /// Waits until every member runs and serves, and all agree on one leader. That leader.
    pub async fn wait_leader(&mut self, within: Duration) -> usize {
        let deadline = Instant::now() + within;
        loop {
            let sts = self.statuses().await;
            if let Some((l, _)) = agreed_leader(&sts).filter(|_| sts.iter().all(|s| s.is_some())) {
                return l;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster did not agree on a leader within {within:?}:\n{}",
                self.show_statuses(&sts)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until every member runs and serves, all agree on one leader, and every member has
    /// applied what the leader had committed when it was first seen. The leader, its term, and
    /// when that was.
    pub async fn wait_settled(&mut self, within: Duration) -> (usize, u64, Instant) {
        let deadline = Instant::now() + within;
        let mut target: Option<(usize, u64, u64)> = None;
        loop {
            let sts = self.statuses().await;
            let all_up = (0..NODES).all(|i| self.running(i));
            match (all_up, agreed_leader(&sts)) {
                (true, Some((l, term))) => {
                    let (tl, tterm, commit) =
                        *target.get_or_insert((l, term, sts[l].as_ref().expect("the leader answered").engine.commit.0));
                    if (tl, tterm) != (l, term) {
                        target = None; // the leader changed: start over
                    } else if sts.iter().all(|s| s.as_ref().is_some_and(|s| s.engine.applied.0 >= commit)) {
                        return (l, term, Instant::now());
                    }
                }
                _ => target = None,
            }
            assert!(
                Instant::now() < deadline,
                "the cluster did not settle (all serving, one leader, caught up) within {within:?}:\n{}",
                self.show_statuses(&sts)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the members still running agree on a leader other than `old`, in a term above
    /// `old_term`. The new leader, its term, and when it was seen.
    pub async fn wait_new_leader(&mut self, old: usize, old_term: u64, within: Duration) -> (usize, u64, Instant) {
        let deadline = Instant::now() + within;
        loop {
            let sts = self.statuses().await;
            if let Some((l, term)) = agreed_leader(&sts) {
                if l != old && term > old_term {
                    return (l, term, Instant::now());
                }
            }
            assert!(
                Instant::now() < deadline,
                "no new leader within {within:?} of killing node {} (leader in term {old_term}):\n{}",
                old + 1,
                self.show_statuses(&sts)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits until every running member serves with the same applied index (equal to its commit)
    /// and state hash, and it stays so for a moment. That index and hash, and the statuses then.
    pub async fn wait_converged(&mut self, within: Duration) -> (u64, u64, Vec<ServerStatus>) {
        let deadline = Instant::now() + within;
        let mut same_since: Option<(Instant, u64, u64)> = None;
        loop {
            let sts = self.statuses().await;
            let all: Vec<&ServerStatus> = sts.iter().flatten().filter(|s| s.engine.serving).collect();
            let first = all.first().map(|s| (s.engine.applied.0, s.engine.state_hash));
            let running = (0..NODES).filter(|&i| self.running(i)).count();
            let agree = all.len() == running
                && all.iter().all(|s| {
                    Some((s.engine.applied.0, s.engine.state_hash)) == first && s.engine.commit == s.engine.applied
                });
            match (agree, first, same_since) {
                (true, Some((a, h)), Some((since, a0, h0))) if (a, h) == (a0, h0) => {
                    if since.elapsed() >= Duration::from_millis(300) {
                        return (a, h, sts.into_iter().flatten().collect());
                    }
                }
                (true, Some((a, h)), _) => same_since = Some((Instant::now(), a, h)),
                _ => same_since = None,
            }
            assert!(
                Instant::now() < deadline,
                "the running members did not converge on one applied index and state hash within {within:?}:\n{}",
                self.show_statuses(&sts)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// One line a member (`None`: down or not answering), in member order; with the stored
    /// figures if the test is about them ([`ClusterConfig::stored`]).
    pub fn show_statuses(&self, sts: &[Option<ServerStatus>]) -> String {
        sts.iter()
            .enumerate()
            .map(|(i, s)| match s {
                None => format!("  node {}: down or not answering", i + 1),
                Some(s) => {
                    let e = &s.engine;
                    let stored = if self.stored {
                        format!(
                            "; stored {} (spilled {}) in {} source files; active {}",
                            e.sessions_stored, e.sessions_spilled, e.source_files, e.sessions_active
                        )
                    } else {
                        String::new()
                    };
                    format!(
                        "  node {}: {} {} term {} leader {} commit {} applied {} last {} hash {:016x}{stored}",
                        i + 1,
                        if e.serving { "serving" } else { "recovering" },
                        e.role,
                        e.term.0,
                        e.leader.map_or("-".to_string(), |l| l.0.to_string()),
                        e.commit.0,
                        e.applied.0,
                        e.last_index.0,
                        e.state_hash
                    )
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut child) = n.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if std::thread::panicking() {
            for n in &self.nodes {
                eprintln!("----- last lines of node {}'s log ({}) -----", n.id, n.log.display());
                eprintln!("{}", log_tail(&n.log, 60));
                if self.stored {
                    eprintln!("----- node {}'s data directory -----\n{}", n.id, show_dir(&n.data));
                }
            }
            eprintln!("----- end of the logs -----");
            if let Some(dir) = self.dir.take() {
                eprintln!("data directories and logs kept at {}", dir.keep().display());
            }
        }
    }
}

/// One member's own status, asked of it alone.
pub async fn node_status(addr: &str) -> Option<ServerStatus> {
    let options = ClientOptions {
        request_timeout: Duration::from_millis(500),
        retry_for: Duration::from_secs(1),
        learn_members: false,
        ..Default::default()
    };
    let pipe = Pipe::connect_with(Tcp, vec![addr.to_string()], options).await.ok()?;
    pipe.status().await.ok()
}

/// The leader every member that answered agrees on, and its term: one member serves as leader
/// and every other answering member serves in the same term with it as leader.
fn agreed_leader(sts: &[Option<ServerStatus>]) -> Option<(usize, u64)> {
    let answered: Vec<&ServerStatus> = sts.iter().flatten().collect();
    if answered.len() <= NODES / 2 {
        return None; // not a majority
    }
    let leader = answered.iter().find(|s| s.engine.serving && s.engine.role == RoleName::Leader)?;
    let (id, term) = (leader.engine.replica, leader.engine.term);
    let agree = answered.iter().all(|s| s.engine.serving && s.engine.term == term && s.engine.leader == Some(id));
    agree.then_some((id.0 as usize - 1, term.0))
}

/// Statuses in member order, `None` where a member did not answer.
pub fn by_position(sts: &[ServerStatus]) -> Vec<Option<ServerStatus>> {
    (0..NODES).map(|i| sts.iter().find(|s| s.engine.replica.0 as usize == i + 1).cloned()).collect()
}

// ---------------------------------------------------------------------------------------------
// Data directories.

/// The names in a data directory, sorted (empty if it cannot be read).
pub fn dir_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

/// Every name in a data directory with its length, one a line.
pub fn show_dir(dir: &Path) -> String {
    dir_names(dir)
        .iter()
        .map(|n| {
            let len = std::fs::metadata(dir.join(n)).map_or(-1, |m| m.len() as i64);
            format!("  {n} ({len} bytes)")
        })
        .collect::<Vec<_>>()
        .join("\n")
}
