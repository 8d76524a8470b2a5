//! Who a server is: the cluster it belongs to, its member id, and the member protocol's
//! version, checked at start against its data directory and on every member connection.
//!
//! - The **cluster id** is fixed when a cluster is bootstrapped: a hash of the configuration's
//!   `cluster.token` (like etcd's `initial-cluster-token`; "truba" when absent) and the member
//!   ids. Two clusters configured alike but meant to be apart get different tokens.
//! - The **data directory** records the cluster id and member id in [`IDENTITY_FILE`] the first
//!   time a server starts on it (written to a temporary name, fsynced, renamed, and the
//!   directory fsynced). A later start on a directory of another cluster or another member is
//!   refused before anything is read: serving another member's log would let one member vote
//!   twice, and another cluster's log would be taken for this one's history. A directory written
//!   before identities existed (it has a log but no identity file) is adopted.
//! - Every **member connection** opens with a [`PeerHello`] (magic bytes, protocol version,
//!   cluster id, member id) in a frame of at most [`PEER_HELLO_BYTES_MAX`] bytes. A connection
//!   from another cluster, an incompatible version, an unknown member or one claiming to be this
//!   member is closed before any of its messages reaches the engine, with one log line per
//!   member and reason; every later frame on the connection must carry the member id the hello
//!   gave.

use crate::config::Config;
use crate::disk::Fs;
use serde::{Deserialize, Serialize};
use std::fmt;
use truba_engine::ReplicaId;

/// The version of the member protocol (the messages members exchange). Members of different
/// versions refuse each other's connections; see the README on upgrades.
pub const PROTOCOL_VERSION: u32 = 2;
/// The file in the data directory that names its cluster and member.
pub const IDENTITY_FILE: &str = "cluster-identity";
/// First bytes of every member connection.
pub const PEER_MAGIC: [u8; 8] = *b"truba-m1";
/// The largest hello frame read from a connection that has not yet said who it is.
pub const PEER_HELLO_BYTES_MAX: u32 = 512;
/// The token of a cluster whose configuration names none.
const TOKEN_DEFAULT: &str = "truba";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ClusterId(pub u64);

impl fmt::Display for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// A data directory's owner: the cluster and the member.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    pub cluster: ClusterId,
    pub member: ReplicaId,
}

/// The first frame on a member connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerHello {
    pub magic: [u8; 8],
    pub protocol: u32,
    pub cluster: ClusterId,
    pub member: ReplicaId,
    /// Where the sender takes member connections (its peer address): a member that does not
    /// know it yet (one that is joining) answers there.
    pub addr: String,
}

impl PeerHello {
    pub fn new(identity: Identity, addr: &str) -> PeerHello {
        let (cluster, member) = (identity.cluster, identity.member);
        PeerHello { magic: PEER_MAGIC, protocol: PROTOCOL_VERSION, cluster, member, addr: addr.to_string() }
    }

    /// Why a connection with this hello is refused, if it is; `members` are the other members
    /// (empty on a member that is joining and knows none yet: any member of its cluster may
    /// then connect, the leader first of all).
    pub fn refusal(&self, ours: Identity, members: &[ReplicaId]) -> Option<String> {
        if self.magic != PEER_MAGIC {
            return Some("it does not speak the member protocol".into());
        }
        if self.protocol != PROTOCOL_VERSION {
            return Some(format!(
                "it speaks member protocol version {}, this member {PROTOCOL_VERSION}",
                self.protocol
            ));
        }
        if self.cluster != ours.cluster {
            return Some(format!("it belongs to cluster {}, this member to cluster {}", self.cluster, ours.cluster));
        }
        if self.member == ours.member {
            return Some(format!("it claims to be this member ({})", ours.member));
        }
        if !members.is_empty() && !members.contains(&self.member) {
            return Some(format!("member {} is not in this cluster", self.member));
        }
        None
    }
}

/// The identity a configuration describes: its cluster id as bootstrapped, and its member id.
pub fn configured(config: &Config) -> Identity {
    debug_assert!(!config.joins(), "a joining member's cluster id comes from the cluster (see `joined`)");
    let (me, mut voters) = config.membership();
    voters.sort();
    let token = config.cluster.as_ref().and_then(|c| c.token.as_deref()).unwrap_or(TOKEN_DEFAULT);
    let ids: Vec<u32> = voters.iter().map(|v| v.0).collect();
    let bytes = postcard::to_allocvec(&(token, ids)).expect("encoding into memory cannot fail");
    Identity { cluster: ClusterId(xxhash_rust::xxh3::xxh3_64_with_seed(&bytes, 0x7472_7562_6120_6964)), member: me }
}

/// A joining member's identity: the one its data directory records (the member id must be the
/// configured one), else the cluster id `ask` fetches from a member of the cluster.
pub async fn joined<F, Fut>(fs: &dyn Fs, member: ReplicaId, ask: F) -> Result<Identity, IdentityError>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<ClusterId, String>>,
{
    match fs.read(IDENTITY_FILE) {
        Ok(bytes) => {
            let found = parse(&bytes).map_err(IdentityError::Unreadable)?;
            if found.member != member {
                return Err(IdentityError::Foreign {
                    found_cluster: found.cluster,
                    found_member: found.member.0,
                    cluster: found.cluster,
                    member: member.0,
                });
            }
            Ok(found)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let cluster = ask().await.map_err(IdentityError::Join)?;
            Ok(Identity { cluster, member })
        }
        Err(e) => Err(IdentityError::Unreadable(e.to_string())),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot join: {0}")]
    Join(String),
    #[error(
        "the data directory belongs to cluster {found_cluster} (member {found_member}), but this configuration \
         describes cluster {cluster} (member {member}): refusing to start on another cluster's or member's data \
         (check data_dir, cluster.id, cluster.members and cluster.token)"
    )]
    Foreign { found_cluster: ClusterId, found_member: u32, cluster: ClusterId, member: u32 },
    #[error("the data directory's {IDENTITY_FILE} cannot be read: {0}")]
    Unreadable(String),
    #[error("cannot record the data directory's identity in {IDENTITY_FILE}: {0}")]
    Write(String),
}

/// Checks the data directory's identity against `expected`, recording it on first start.
pub fn check_data_dir(fs: &dyn Fs, expected: Identity) -> Result<(), IdentityError> {
    match fs.read(IDENTITY_FILE) {
        Ok(bytes) => {
            let found = parse(&bytes).map_err(IdentityError::Unreadable)?;
            if found != expected {
                return Err(IdentityError::Foreign {
                    found_cluster: found.cluster,
                    found_member: found.member.0,
                    cluster: expected.cluster,
                    member: expected.member.0,
                });
            }
            return Ok(());
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(IdentityError::Unreadable(e.to_string())),
    }
    // A directory with files already (a log written before identities existed) is adopted.
    let names = fs.list().map_err(|e| IdentityError::Unreadable(e.to_string()))?;
    let adopted = names.iter().any(|n| !n.ends_with(".tmp") && n != "LOCK");
    let tmp = format!("{IDENTITY_FILE}.tmp");
    let write = || -> std::io::Result<()> {
        fs.write_at(&tmp, 0, render(expected).as_bytes())?;
        fs.sync(&tmp)?;
        fs.rename(&tmp, IDENTITY_FILE)?;
        fs.sync_dir()
    };
    write().map_err(|e| IdentityError::Write(e.to_string()))?;
    tracing::info!(cluster = %expected.cluster, member = %expected.member, adopted, "recorded the data directory's identity");
    Ok(())
}

fn render(id: Identity) -> String {
    format!("truba-identity 1\ncluster {}\nmember {}\n", id.cluster, id.member.0)
}

fn parse(bytes: &[u8]) -> Result<Identity, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "it is not text".to_string())?;
    let mut lines = text.lines();
    if lines.next() != Some("truba-identity 1") {
        return Err("it does not start with `truba-identity 1`".into());
    }
    let field = |line: Option<&str>, key: &str| -> Result<String, String> {
        line.and_then(|l| l.strip_prefix(key))
            .and_then(|v| v.strip_prefix(' '))
            .map(str::to_string)
            .ok_or_else(|| format!("no `{key}` line"))
    };
    let cluster = field(lines.next(), "cluster")?;
    let member = field(lines.next(), "member")?;
    let cluster = u64::from_str_radix(&cluster, 16).map_err(|_| format!("bad cluster id `{cluster}`"))?;
    let member = member.parse::<u32>().map_err(|_| format!("bad member id `{member}`"))?;
    Ok(Identity { cluster: ClusterId(cluster), member: ReplicaId(member) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::DirFs;

    fn id(cluster: u64, member: u32) -> Identity {
        Identity { cluster: ClusterId(cluster), member: ReplicaId(member) }
    }

    #[test]
    fn a_data_directory_is_claimed_once_and_refused_to_others() {
        let dir = tempfile::tempdir().unwrap();
        let fs = DirFs::open(dir.path()).unwrap();
        check_data_dir(&fs, id(0xabc, 2)).unwrap();
        check_data_dir(&fs, id(0xabc, 2)).expect("the same identity starts again");
        let e = check_data_dir(&fs, id(0xdef, 2)).unwrap_err().to_string();
        assert!(e.contains("belongs to cluster 0000000000000abc (member 2)"), "{e}");
        assert!(e.contains("describes cluster 0000000000000def (member 2)"), "{e}");
        let e = check_data_dir(&fs, id(0xabc, 3)).unwrap_err().to_string();
        assert!(e.contains("(member 3)"), "{e}");
        assert_eq!(fs.read(IDENTITY_FILE).unwrap(), b"truba-identity 1\ncluster 0000000000000abc\nmember 2\n");
    }

    #[test]
    fn a_damaged_identity_file_is_an_error_not_a_new_identity() {
        let dir = tempfile::tempdir().unwrap();
        let fs = DirFs::open(dir.path()).unwrap();
        fs.write_at(IDENTITY_FILE, 0, b"truba-identity 1\ncluster zz\nmember 2\n").unwrap();
        let e = check_data_dir(&fs, id(1, 2)).unwrap_err().to_string();
        assert!(e.contains("bad cluster id `zz`"), "{e}");
        assert_eq!(parse(b"hello").unwrap_err(), "it does not start with `truba-identity 1`");
    }

    #[test]
    fn the_cluster_id_depends_on_the_token_and_the_member_ids_only() {
        let text = |token: &str, me: u32, peer3: &str| {
            format!(
                "[kinds.1]\n[cluster]\nid = {me}\n{token}members = [\n\
                 {{ id = 1, peer = \"a:1\", client = \"a:2\" }},\n\
                 {{ id = 2, peer = \"b:1\", client = \"b:2\" }},\n\
                 {{ id = 3, peer = \"{peer3}\", client = \"c:2\" }},\n]\n"
            )
        };
        let cfg = |t: String| Config::parse(&t, std::path::Path::new("t.toml")).unwrap();
        let a = configured(&cfg(text("", 1, "c:1")));
        assert_eq!(a.member, ReplicaId(1));
        assert_eq!(configured(&cfg(text("", 2, "c:9"))).cluster, a.cluster, "every member, whatever the addresses");
        assert_ne!(configured(&cfg(text("token = \"orders\"\n", 1, "c:1"))).cluster, a.cluster);
        assert_ne!(configured(&Config::default()).cluster, a.cluster, "a single node is a cluster of its own");
    }

    #[test]
    fn hellos_from_elsewhere_are_refused_with_the_reason() {
        let ours = id(7, 1);
        let members = [ReplicaId(2), ReplicaId(3)];
        let hello = |i| PeerHello::new(i, "h:1");
        assert_eq!(hello(id(7, 2)).refusal(ours, &members), None);
        let refusal = |h: PeerHello| h.refusal(ours, &members).unwrap();
        assert!(refusal(hello(id(8, 2))).contains("belongs to cluster 0000000000000008"));
        assert!(refusal(hello(id(7, 4))).contains("member r4 is not in this cluster"));
        assert!(refusal(hello(id(7, 1))).contains("claims to be this member"));
        assert!(refusal(PeerHello { protocol: 1, ..hello(id(7, 2)) }).contains("version 1"));
        assert!(refusal(PeerHello { magic: *b"GET / HT", ..hello(id(7, 2)) }).contains("member protocol"));
        // A joining member knows no members yet: any member of its cluster may connect.
        assert_eq!(hello(id(7, 4)).refusal(ours, &[]), None);
        assert!(hello(id(8, 4)).refusal(ours, &[]).is_some(), "but not one of another cluster");
    }
}
