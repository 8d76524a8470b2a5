//! The cluster's replicated configuration as an operator sees it: printed as TOML in the same
//! shape as a node's file (`[engine]` for the replicated limits, `[kinds.N]`), read back from
//! such a file, and compared setting by setting. `truba config show|apply` is built on these.
//!
//! Only the settings that applying depends on are replicated: every kind's settings and the
//! limits in [`AppliedLimits`]. A kind's `handler` address and every other `[engine]` limit stay
//! each node's own; a file given to `config apply` may hold them (a node's own file is fine),
//! and they are listed as ignored.

use crate::config::{Config, ConfigError};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;
use truba_engine::{AppliedLimits, ClusterConfig, ConfigChange, Kind, KindConfig, MemberRole};

/// What a file proposes: the kinds and the replicated limits, and the settings it holds that
/// the cluster does not replicate (ignored, but worth telling the operator about).
#[derive(Clone, Debug, PartialEq)]
pub struct Proposed {
    pub kinds: BTreeMap<Kind, KindConfig>,
    pub limits: AppliedLimits,
    pub ignored: Vec<String>,
}

/// Reads a proposed configuration from TOML shaped like a node's file.
pub fn parse(text: &str, path: &Path) -> Result<Proposed, ConfigError> {
    // This node's own sections are ignored here (see below), so only what the cluster takes
    // from the file is checked: a frame size that does not fit this node's file is no reason
    // to refuse the cluster a configuration.
    let config = Config::parse_replicated(text, path)?;
    let table: toml::Table =
        toml::from_str(text).map_err(|e| ConfigError::Parse { path: path.into(), reason: e.message().into() })?;
    let replicated: Vec<&str> = AppliedLimits::from(&config.engine).named().iter().map(|(n, _)| *n).collect();
    let mut ignored = Vec::new();
    for (key, value) in &table {
        match (key.as_str(), value) {
            ("engine", toml::Value::Table(t)) => {
                ignored.extend(t.keys().filter(|k| !replicated.contains(&k.as_str())).map(|k| format!("engine.{k}")))
            }
            ("kinds", toml::Value::Table(kinds)) => {
                for (n, kind) in kinds {
                    if kind.as_table().is_some_and(|t| t.contains_key("handler")) {
                        ignored.push(format!("kinds.{n}.handler"));
                    }
                }
            }
            (other, _) => ignored.push(other.to_string()),
        }
    }
    if !table.contains_key("kinds") {
        return Err(ConfigError::Invalid {
            path: path.into(),
            reason: "no [kinds.N] section: the file must list every kind the cluster is to have".into(),
        });
    }
    let kinds = config.kinds.iter().map(|(n, k)| (Kind(*n), k.config.clone())).collect();
    Ok(Proposed { kinds, limits: AppliedLimits::from(&config.engine), ignored })
}

#[derive(Serialize)]
struct Shown<'a> {
    engine: BTreeMap<&'static str, u64>,
    kinds: BTreeMap<String, &'a KindConfig>,
}

/// The configuration as TOML that [`parse`] reads back (a header of comments says its version
/// and members).
pub fn render(config: &ClusterConfig) -> String {
    let members: Vec<String> = config
        .members
        .iter()
        .map(|(id, role)| match role {
            MemberRole::Voter => format!("{} (voter)", id.0),
            MemberRole::Learner => format!("{} (learner)", id.0),
        })
        .collect();
    let shown = Shown {
        engine: config.limits.named().into_iter().collect(),
        kinds: config.kinds.iter().map(|(k, c)| (k.0.to_string(), c)).collect(),
    };
    let body = toml::to_string(&shown).expect("a configuration is plain tables of numbers");
    format!(
        "# The cluster's configuration, version {}; members: {}.\n\
         # Change it with `truba config apply FILE` (a copy of this, edited).\n\n{body}",
        config.version,
        members.join(", ")
    )
}

/// What applying `proposed` would change in `current`, one line a setting (`+` added, `-`
/// removed, `~` changed); empty if nothing.
pub fn diff(current: &ClusterConfig, proposed: &Proposed) -> Vec<String> {
    let line = |change: ConfigChange| match change {
        ConfigChange::KindAdded(k) => format!("+ kind {} (new)", k.0),
        ConfigChange::KindRemoved(k) => format!("- kind {} (removed)", k.0),
        ConfigChange::KindSetting { kind, name, from, to } => format!("~ kind {}: {name} {from} -> {to}", kind.0),
        ConfigChange::Limit { name, from, to } => format!("~ engine.{name} {from} -> {to}"),
    };
    current.changes(&proposed.kinds, &proposed.limits).into_iter().map(line).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use truba_engine::{EngineConfig, ReplicaId};

    fn live() -> ClusterConfig {
        let mut cfg = EngineConfig::default();
        cfg.kinds.insert(Kind(2), KindConfig { lease_ms: 5_000, ..KindConfig::default() });
        ClusterConfig::bootstrap(&cfg, &[ReplicaId(1), ReplicaId(2), ReplicaId(3)])
    }

    #[test]
    fn what_show_prints_reads_back_as_the_same_configuration_with_nothing_to_change() {
        let c = live();
        let text = render(&c);
        assert!(text.starts_with("# The cluster's configuration, version 1; members: 1 (voter), 2 (voter), 3 (voter)."));
        let p = parse(&text, Path::new("shown.toml")).unwrap();
        assert_eq!((&p.kinds, p.limits), (&c.kinds, c.limits));
        assert!(p.ignored.is_empty(), "{:?}", p.ignored);
        assert!(diff(&c, &p).is_empty());
    }

    /// Found by the `config` fuzz target: a cluster whose records may be larger than a node's
    /// default frame took a configuration `show` printed but `apply` refused, for a frame size
    /// that is this node's own setting (and ignored by `apply`).
    #[test]
    fn large_records_read_back_although_the_default_frame_is_smaller() {
        let mut c = live();
        let big = KindConfig { record_bytes_max: 8 << 20, session_bytes_max: 16 << 20, ..KindConfig::default() };
        c.kinds.insert(Kind(3), big);
        let p = parse(&render(&c), Path::new("shown.toml")).unwrap();
        assert_eq!(p.kinds, c.kinds);
    }

    #[test]
    fn the_diff_names_every_setting_added_removed_or_changed() {
        let c = live();
        let twice = render(&c) + "\n[kinds.1]\n";
        assert!(parse(&twice, Path::new("x.toml")).is_err(), "a duplicated table is refused");
        let mut edited = render(&c).replace("lease_ms = 5000", "lease_ms = 9000");
        edited = edited.replace("[engine]\n", "[engine]\nsegment_bytes_max = 1048576\n");
        edited = edited.replace("sessions_max = 1000000", "sessions_max = 10");
        edited.push_str("\n[kinds.7]\nhandler = \"127.0.0.1:9\"\n");
        let p = parse(&edited, Path::new("edited.toml")).unwrap();
        assert_eq!(
            diff(&c, &p),
            ["~ kind 2: lease_ms 5000 -> 9000", "+ kind 7 (new)", "~ engine.sessions_max 1000000 -> 10"]
        );
        assert_eq!(p.ignored, ["engine.segment_bytes_max", "kinds.7.handler"]);
        let mut gone = p.clone();
        gone.kinds.remove(&Kind(2));
        assert!(diff(&c, &gone).contains(&"- kind 2 (removed)".to_string()));
    }

    #[test]
    fn a_file_without_kinds_or_with_a_typo_is_refused_with_the_reason() {
        let e = parse("[engine]\nsessions_max = 5\n", Path::new("a.toml")).unwrap_err().to_string();
        assert!(e.contains("no [kinds.N] section"), "{e}");
        let e = parse("[kinds.1]\nlease_msec = 5\n", Path::new("b.toml")).unwrap_err().to_string();
        assert!(e.contains("lease_msec"), "{e}");
    }
}
