//! Server configuration: TOML, every field optional, with defaults that run a single node on
//! loopback (`truba serve` with no arguments).

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use truba_engine::{ConsensusConfig, EngineConfig, Kind, KindConfig, Limits, ReplicaId};

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the log, snapshots and torn-write copies live.
    pub data_dir: PathBuf,
    /// Address clients (and handlers working on deliveries) connect to.
    pub listen: String,
    /// Addresses handed to handlers to reach this server; defaults to `listen`.
    pub advertise: Option<Vec<String>>,
    pub server: ServerLimits,
    /// The engine's limits (batch sizes, snapshots, segments, sessions ...).
    pub engine: Limits,
    /// `[kinds.N]`: each kind's handler address and behaviour.
    #[serde(deserialize_with = "kinds_by_number")]
    pub kinds: BTreeMap<u32, KindSection>,
    /// `[cluster]`: this node's id and every voter of its cluster. Absent: a single node.
    pub cluster: Option<ClusterSection>,
    /// Election timeouts, heartbeats and replication flow control (cluster only).
    pub consensus: ConsensusConfig,
    /// `[tls]`: this node's certificate, key and trusted CA. Absent: plain TCP, for a node that
    /// listens on loopback only (it warns at start otherwise).
    pub tls: Option<crate::net::TlsFiles>,
    /// `[auth]`: who may do what on the client port (see `auth.rs`). Absent: everyone may do
    /// everything.
    pub auth: Option<crate::auth::AuthSection>,
}

/// A replicated cluster of 1, 3 or 5 voters; every node's file lists the same members.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// This node's member id.
    pub id: u32,
    pub members: Vec<Member>,
    /// Tells apart clusters with the same member ids (like etcd's `initial-cluster-token`): with
    /// the member ids it makes the cluster id, fixed in each data directory at its first start.
    /// Every member's file must give the same token. Default "truba".
    #[serde(default)]
    pub token: Option<String>,
    /// A member that joins a running cluster: a client address of one of its members, asked for
    /// the cluster's id at the first start. `members` then needs list only this member (its
    /// peer and client addresses); the cluster tells it the rest. Set by `truba serve --join`.
    #[serde(default)]
    pub join: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    pub id: u32,
    /// Where the other members reach this one (replication traffic).
    pub peer: String,
    /// Where clients and handlers reach this one (its `listen` address, as others see it).
    pub client: String,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerLimits {
    pub connections_max: u32,
    pub frame_bytes_max: u32,
    /// Requests one connection may have waiting for answers.
    pub inflight_per_connection_max: u32,
    /// How long the pipe waits for a handler to acknowledge a delivery. A handler still working
    /// after it is not failed: the pipe stops waiting and the session's lease decides (a long
    /// job renews it; one that hangs lets it run out, which is a failed delivery).
    pub handler_timeout_ms: u64,
    /// A connection with no request waiting that sends nothing for this long is closed (clients
    /// reconnect by themselves); it reclaims the slots of peers that vanished without a word.
    pub idle_timeout_ms: u64,
    /// Largest frame accepted from another member (an installed snapshot travels in one).
    pub peer_frame_bytes_max: u32,
    /// Messages queued for one member while its connection is busy or down; beyond it they
    /// are dropped (the protocol resends what matters).
    pub peer_queue_max: u32,
    /// Bytes of stream items queued for one connection and not yet written to its socket. The
    /// engine's windows bound each stream (so keep this above `engine.tail_window_bytes_max`:
    /// the client library opens one stream a connection); a connection whose streams together
    /// pass it has them ended with a clear reason (its reader opens them again), never an item
    /// dropped.
    pub stream_queue_bytes_max: u64,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            connections_max: 1024,
            frame_bytes_max: crate::wire::FRAME_BYTES_MAX_DEFAULT,
            inflight_per_connection_max: 1024,
            handler_timeout_ms: 30_000,
            idle_timeout_ms: 300_000,
            peer_frame_bytes_max: 512 * 1024 * 1024,
            peer_queue_max: 8192,
            stream_queue_bytes_max: 64 * 1024 * 1024,
        }
    }
}

#[derive(Clone, Debug)]
pub struct KindSection {
    /// Where this kind's handler listens (the pipe connects to it).
    pub handler: Option<String>,
    pub config: KindConfig,
}

/// `[kinds.N]` tables: `handler` is taken out and the rest must be exactly `KindConfig`'s fields
/// (serde's `flatten` would silently accept misspelt keys).
fn kinds_by_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BTreeMap<u32, KindSection>, D::Error> {
    use serde::de::Error;
    let by_name = BTreeMap::<String, toml::Table>::deserialize(d)?;
    by_name
        .into_iter()
        .map(|(k, mut table)| {
            let n = k.parse::<u32>().map_err(|_| D::Error::custom(format!("kind `{k}` is not a number")))?;
            let handler = match table.remove("handler") {
                None => None,
                Some(toml::Value::String(s)) => Some(s),
                Some(_) => return Err(D::Error::custom(format!("kinds.{k}.handler must be a \"host:port\" string"))),
            };
            let config = KindConfig::deserialize(toml::Value::Table(table))
                .map_err(|e| D::Error::custom(format!("kinds.{k}: {}", e.message())))?;
            Ok((n, KindSection { handler, config }))
        })
        .collect()
}

impl Default for Config {
    fn default() -> Self {
        let mut kinds = BTreeMap::new();
        kinds.insert(
            1,
            KindSection {
                handler: Some("127.0.0.1:7500".into()),
                config: KindConfig { default_delay_s: 60, ..Default::default() },
            },
        );
        Config {
            data_dir: PathBuf::from("./truba-data"),
            listen: "127.0.0.1:7400".into(),
            advertise: None,
            server: ServerLimits::default(),
            engine: Limits::default(),
            kinds,
            cluster: None,
            consensus: ConsensusConfig::default(),
            tls: None,
            auth: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("config {path}: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("config {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::Read { path: path.into(), reason: e.to_string() })?;
        Config::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let c = Config::parse_replicated(text, path)?;
        c.validate_local().map_err(|reason| ConfigError::Invalid { path: path.into(), reason })?;
        Ok(c)
    }

    /// Reads a file and checks only what the cluster's replicated configuration takes from it
    /// (its kinds and engine limits): what `truba config apply` reads, where this node's own
    /// sections are ignored.
    pub fn parse_replicated(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let c: Config = toml::from_str(text)
            .map_err(|e| ConfigError::Parse { path: path.into(), reason: e.message().to_string() })?;
        c.validate_replicated().map_err(|reason| ConfigError::Invalid { path: path.into(), reason })?;
        Ok(c)
    }

    /// This node's own settings, and how they fit the kinds it serves.
    fn validate_local(&self) -> Result<(), String> {
        let frame_need = self.kinds.values().map(|k| k.config.record_bytes_max).max().unwrap_or(0) as u64 + 1024;
        if (self.server.frame_bytes_max as u64) < frame_need {
            return Err(format!(
                "server.frame_bytes_max ({}) is too small for the largest record_bytes_max (needs {frame_need})",
                self.server.frame_bytes_max
            ));
        }
        if let Some(c) = &self.cluster {
            c.validate()?;
        }
        if let Some(a) = &self.auth {
            crate::auth::Authority::new(a)?;
        }
        let t = &self.consensus;
        if t.election_timeout_ms_min == 0 || t.election_timeout_ms_min > t.election_timeout_ms_max {
            return Err("consensus: need 0 < election_timeout_ms_min <= election_timeout_ms_max".into());
        }
        if t.heartbeat_ms == 0 || t.heartbeat_ms >= t.election_timeout_ms_min {
            return Err("consensus.heartbeat_ms must be positive and below election_timeout_ms_min".into());
        }
        Ok(())
    }

    fn validate_replicated(&self) -> Result<(), String> {
        if self.kinds.is_empty() {
            return Err("no [kinds.N] section: sessions need at least one kind".into());
        }
        for (n, k) in &self.kinds {
            if k.config.handler_slots == 0 {
                return Err(format!("kinds.{n}.handler_slots must be at least 1"));
            }
            // A zero base would redeliver a failing session at once, over and over: the backoff
            // exists to give a failing handler time to recover.
            if k.config.backoff_base_s == 0 {
                return Err(format!("kinds.{n}.backoff_base_s must be at least 1"));
            }
            if k.config.backoff_cap_s < k.config.backoff_base_s {
                return Err(format!(
                    "kinds.{n}.backoff_cap_s ({}) must be at least backoff_base_s ({})",
                    k.config.backoff_cap_s, k.config.backoff_base_s
                ));
            }
        }
        if self.engine.batch_entries_max == 0 || self.engine.pending_requests_max == 0 {
            return Err("engine.batch_entries_max and engine.pending_requests_max must be positive".into());
        }
        let e = &self.engine;
        if e.source_io_chunk_bytes < 4096 || e.source_read_ahead_bytes < 4096 {
            return Err("engine.source_io_chunk_bytes and engine.source_read_ahead_bytes must be at least 4096".into());
        }
        if e.sources_per_kind_max == 0 {
            return Err("engine.sources_per_kind_max must be at least 1".into());
        }
        Ok(())
    }

    /// Whether this node joins a running cluster instead of starting one.
    pub fn joins(&self) -> bool {
        self.cluster.as_ref().is_some_and(|c| c.join.is_some())
    }

    /// The members' addresses this file names, by id.
    pub fn member_addrs(&self) -> BTreeMap<ReplicaId, truba_engine::MemberAddrs> {
        let Some(c) = &self.cluster else { return BTreeMap::new() };
        c.members
            .iter()
            .map(|m| (ReplicaId(m.id), truba_engine::MemberAddrs { peer: m.peer.clone(), client: m.client.clone() }))
            .collect()
    }

    /// This node's id and the cluster's voters (a single node is member 0 of a cluster of one).
    pub fn membership(&self) -> (ReplicaId, Vec<ReplicaId>) {
        match &self.cluster {
            None => (ReplicaId(0), vec![ReplicaId(0)]),
            Some(c) => (ReplicaId(c.id), c.members.iter().map(|m| ReplicaId(m.id)).collect()),
        }
    }

    /// The other members: id and peer address.
    pub fn peers(&self) -> Vec<(ReplicaId, String)> {
        let Some(c) = &self.cluster else { return Vec::new() };
        c.members.iter().filter(|m| m.id != c.id).map(|m| (ReplicaId(m.id), m.peer.clone())).collect()
    }

    /// This node's peer address, if it is in a cluster.
    pub fn peer_listen(&self) -> Option<String> {
        let c = self.cluster.as_ref()?;
        c.members.iter().find(|m| m.id == c.id).map(|m| m.peer.clone())
    }

    pub fn engine_config(&self) -> EngineConfig {
        EngineConfig {
            kinds: self.kinds.iter().map(|(n, k)| (Kind(*n), k.config.clone())).collect(),
            limits: self.engine.clone(),
            consensus: self.consensus.clone(),
            mutations: Default::default(),
        }
    }

    /// Addresses handed to handlers: the configured ones, else every member's client address
    /// (a handler then follows the leader like any client), else `listen`.
    /// Where clients reach each member (told to every client connection in its `Hello`).
    pub fn client_addrs(&self) -> Vec<(ReplicaId, String)> {
        match &self.cluster {
            Some(c) => c.members.iter().map(|m| (ReplicaId(m.id), m.client.clone())).collect(),
            None => {
                let addr = self.advertise.as_ref().and_then(|a| a.first().cloned());
                vec![(ReplicaId(0), addr.unwrap_or_else(|| self.listen.clone()))]
            }
        }
    }

    pub fn advertised(&self) -> Vec<String> {
        if let Some(a) = &self.advertise {
            return a.clone();
        }
        match &self.cluster {
            Some(c) => c.members.iter().map(|m| m.client.clone()).collect(),
            None => vec![self.listen.clone()],
        }
    }
}

impl ClusterSection {
    fn validate(&self) -> Result<(), String> {
        let n = self.members.len();
        if self.join.is_some() {
            // A joining member starts as a learner; the cluster's own membership decides the rest.
            if !self.members.iter().any(|m| m.id == self.id) {
                return Err(format!("cluster.members must give this member's ({}) peer and client addresses", self.id));
            }
        } else if ![1, 3, 5].contains(&n) {
            return Err(format!("cluster.members: a cluster has 1, 3 or 5 voters, not {n}"));
        }
        let ids: std::collections::BTreeSet<u32> = self.members.iter().map(|m| m.id).collect();
        if ids.len() != n {
            return Err("cluster.members: member ids must be distinct".into());
        }
        if !ids.contains(&self.id) {
            return Err(format!("cluster.id {} is not one of cluster.members", self.id));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_config_parses_and_typos_are_refused() {
        let text = r#"
            data_dir = "/tmp/x"
            listen = "127.0.0.1:9000"
            [server]
            connections_max = 10
            [engine]
            snapshot_every_entries = 1000
            [kinds.3]
            handler = "127.0.0.1:9100"
            default_delay_s = 5
            jitter_window_s = 2
        "#;
        let c = Config::parse(text, Path::new("t.toml")).unwrap();
        assert_eq!(c.kinds[&3].handler.as_deref(), Some("127.0.0.1:9100"));
        assert_eq!(c.kinds[&3].config.default_delay_s, 5);
        assert_eq!(c.engine.snapshot_every_entries, 1000);

        let typo = "[kinds.1]\ndefault_dely_s = 5\n";
        let e = Config::parse(typo, Path::new("t.toml")).unwrap_err().to_string();
        assert!(e.contains("default_dely_s"), "{e}");
        let bad_chunk = "[engine]\nsource_io_chunk_bytes = 0\n[kinds.1]\n";
        let e = Config::parse(bad_chunk, Path::new("t.toml")).unwrap_err().to_string();
        assert!(e.contains("source_io_chunk_bytes"), "{e}");
        let bad_kind = "[kinds.one]\n";
        assert!(Config::parse(bad_kind, Path::new("t.toml")).unwrap_err().to_string().contains("not a number"));
    }

    #[test]
    fn backoff_and_max_attempts_are_read_and_checked() {
        let text = "[kinds.2]\nbackoff_base_s = 5\nbackoff_cap_s = 300\nmax_attempts = 0\n";
        let c = Config::parse(text, Path::new("t.toml")).unwrap();
        let k = &c.kinds[&2].config;
        assert_eq!((k.backoff_base_s, k.backoff_cap_s, k.max_attempts), (5, 300, 0));
        let defaults = &Config::parse("[kinds.2]\n", Path::new("t.toml")).unwrap().kinds[&2].config;
        let d = KindConfig::default();
        assert_eq!(
            (defaults.backoff_base_s, defaults.backoff_cap_s, defaults.max_attempts),
            (d.backoff_base_s, d.backoff_cap_s, d.max_attempts)
        );

        let zero = "[kinds.2]\nbackoff_base_s = 0\n";
        let e = Config::parse(zero, Path::new("t.toml")).unwrap_err().to_string();
        assert_eq!(e, "config t.toml: kinds.2.backoff_base_s must be at least 1");
        let inverted = "[kinds.2]\nbackoff_base_s = 60\nbackoff_cap_s = 30\n";
        let e = Config::parse(inverted, Path::new("t.toml")).unwrap_err().to_string();
        assert_eq!(e, "config t.toml: kinds.2.backoff_cap_s (30) must be at least backoff_base_s (60)");
        let e = Config::parse("[kinds.2]\nmax_attempts = -1\n", Path::new("t.toml")).unwrap_err().to_string();
        assert!(e.contains("kinds.2"), "{e}");
    }

    #[test]
    fn a_cluster_section_is_checked() {
        let members = |n: u32| {
            (1..=n)
                .map(|i| {
                    format!("{{ id = {i}, peer = \"127.0.0.1:{}\", client = \"127.0.0.1:{}\" }}", 7410 + i, 7400 + i)
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let ok = format!("[cluster]\nid = 2\nmembers = [{}]\n", members(3));
        let c = Config::parse(&ok, Path::new("t.toml")).unwrap();
        assert_eq!(c.membership(), (ReplicaId(2), vec![ReplicaId(1), ReplicaId(2), ReplicaId(3)]));
        assert_eq!(c.peers().len(), 2);
        assert_eq!(c.peer_listen().as_deref(), Some("127.0.0.1:7412"));
        assert_eq!(c.advertised(), vec!["127.0.0.1:7401", "127.0.0.1:7402", "127.0.0.1:7403"]);
        let four = format!("[cluster]\nid = 1\nmembers = [{}]\n", members(4));
        assert!(Config::parse(&four, Path::new("t.toml")).unwrap_err().to_string().contains("1, 3 or 5"));
        let stranger = format!("[cluster]\nid = 9\nmembers = [{}]\n", members(3));
        assert!(Config::parse(&stranger, Path::new("t.toml")).unwrap_err().to_string().contains("not one of"));
        let slow = "[consensus]\nheartbeat_ms = 500\n";
        assert!(Config::parse(slow, Path::new("t.toml")).unwrap_err().to_string().contains("heartbeat_ms"));
    }

    #[test]
    fn the_default_runs_one_node_on_loopback() {
        let c = Config::default();
        assert_eq!(c.listen, "127.0.0.1:7400");
        assert!(c.validate_replicated().is_ok() && c.validate_local().is_ok());
    }
}
