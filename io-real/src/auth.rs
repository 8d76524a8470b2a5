//! Credentials and permissions on the client port.
//!
//! A node whose file has an `[auth]` section checks every request, query and stream against
//! the permissions of whoever sent it:
//! - A client proves who it is with a bearer token, sent once after the hello
//!   (`ClientMsg::Authenticate`) and kept in the file only as its SHA-256 digest, or with a TLS
//!   client certificate that carries a principal's `cert_name`.
//! - A connection that proves nothing is `anonymous`, with the grants the file gives it (none by
//!   default).
//!
//! A grant is a verb on a kind (`"write:1"`) or on every kind (`"read:*"`):
//! - `write`: new, append, replace, delete, store and keep-alive;
//! - `read`: get, and tail and watch;
//! - `consume`: consumers' open, commit and checkpoint;
//! - `operate`: the dead-letter commands, membership and configuration (on every kind: `operate:*`).
//!
//! A refusal is `RequestError::PermissionDenied`, answered before the request reaches the log,
//! so it changes nothing; it is logged with the principal. The principal of every accepted
//! request is recorded in its log entry, which the ledger's audit shows.
//!
//! Without `[auth]` every connection may do everything, as before: for a node on loopback.

use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use truba_engine::{CommitOp, Kind, Query, RedriveTarget, Request, RequestError, SessionId, StreamOpen};

/// What a principal may be granted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verb {
    Write,
    Read,
    Consume,
    Operate,
}

impl Verb {
    fn name(self) -> &'static str {
        match self {
            Verb::Write => "write",
            Verb::Read => "read",
            Verb::Consume => "consume",
            Verb::Operate => "operate",
        }
    }

    fn parse(text: &str) -> Option<Verb> {
        Some(match text {
            "write" => Verb::Write,
            "read" => Verb::Read,
            "consume" => Verb::Consume,
            "operate" => Verb::Operate,
            _ => return None,
        })
    }
}

/// A verb on one kind, or on every kind (`None`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Grant {
    pub verb: Verb,
    pub kind: Option<Kind>,
}

impl Grant {
    /// `"verb:kind"` or `"verb:*"`.
    pub fn parse(text: &str) -> Result<Grant, String> {
        let bad =
            || format!("grant {text:?} is not \"verb:kind\" or \"verb:*\" (verbs: write, read, consume, operate)");
        let (verb, kind) = text.split_once(':').ok_or_else(bad)?;
        let verb = Verb::parse(verb.trim()).ok_or_else(bad)?;
        let kind = match kind.trim() {
            "*" => None,
            k => Some(Kind(k.parse().map_err(|_| bad())?)),
        };
        Ok(Grant { verb, kind })
    }
}

/// Who a connection proved to be, and what it may do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    pub name: String,
    pub grants: BTreeSet<Grant>,
}

impl Principal {
    fn allows(&self, verb: Verb, kind: Option<Kind>) -> bool {
        self.grants.iter().any(|g| g.verb == verb && (g.kind.is_none() || g.kind == kind && kind.is_some()))
    }
}

/// The `[auth]` section of a node's file.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSection {
    /// Grants of connections that prove nothing.
    #[serde(default)]
    pub anonymous: Vec<String>,
    #[serde(default)]
    pub principals: Vec<PrincipalSection>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrincipalSection {
    pub name: String,
    /// The SHA-256 of its bearer token, in hex (`truba auth hash-token` prints it).
    pub token_sha256: Option<String>,
    /// A DNS name its TLS client certificate carries.
    pub cert_name: Option<String>,
    pub grants: Vec<String>,
}

/// The longest bearer token taken (a longer one is refused without hashing it).
pub const TOKEN_BYTES_MAX: usize = 4096;

/// The hex SHA-256 of a token, as the configuration keeps it.
pub fn hash_token(token: &str) -> String {
    Sha256::digest(token.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// The checked `[auth]` section: principals by token digest and by certificate name.
#[derive(Clone, Debug)]
pub struct Authority {
    anonymous: Principal,
    by_token: BTreeMap<String, Principal>,
    by_cert: Vec<(String, Principal)>,
}

impl Authority {
    pub fn new(section: &AuthSection) -> Result<Authority, String> {
        let grants = |list: &[String]| list.iter().map(|g| Grant::parse(g)).collect::<Result<BTreeSet<_>, _>>();
        let anonymous = Principal { name: "anonymous".into(), grants: grants(&section.anonymous)? };
        let (mut by_token, mut by_cert, mut names) = (BTreeMap::new(), Vec::new(), BTreeSet::new());
        for p in &section.principals {
            if p.name.is_empty() || p.name == "anonymous" || !names.insert(p.name.clone()) {
                return Err(format!("auth.principals: name {:?} is empty, reserved or repeated", p.name));
            }
            let principal = Principal { name: p.name.clone(), grants: grants(&p.grants)? };
            if let Some(digest) = &p.token_sha256 {
                let digest = digest.to_ascii_lowercase();
                if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(format!("auth.principals {:?}: token_sha256 must be 64 hex digits", p.name));
                }
                if by_token.insert(digest, principal.clone()).is_some() {
                    return Err(format!("auth.principals {:?}: its token is another principal's too", p.name));
                }
            }
            if let Some(name) = &p.cert_name {
                by_cert.push((name.clone(), principal.clone()));
            }
            if p.token_sha256.is_none() && p.cert_name.is_none() {
                return Err(format!("auth.principals {:?}: needs token_sha256 or cert_name", p.name));
            }
        }
        Ok(Authority { anonymous, by_token, by_cert })
    }

    pub fn anonymous(&self) -> &Principal {
        &self.anonymous
    }

    /// The principal whose token this is.
    pub fn by_token(&self, token: &str) -> Option<&Principal> {
        if token.len() > TOKEN_BYTES_MAX {
            return None;
        }
        self.by_token.get(&hash_token(token))
    }

    /// The principal a TLS client certificate (DER) names, if any.
    pub fn by_certificate(&self, cert: &[u8]) -> Option<&Principal> {
        let der = rustls::pki_types::CertificateDer::from(cert);
        let parsed = webpki::EndEntityCert::try_from(&der).ok()?;
        self.by_cert.iter().find_map(|(name, p)| {
            let name = rustls::pki_types::ServerName::try_from(name.clone()).ok()?;
            parsed.verify_is_valid_for_subject_name(&name).is_ok().then_some(p)
        })
    }
}

/// What a request needs: a verb, on the kind it names, on the kind of the session it names
/// (looked up in the state), or on every kind.
enum Needs {
    Kind(Kind),
    Session(SessionId),
    AnyKind,
}

fn request_needs(request: &Request) -> Vec<(Verb, Needs)> {
    use Needs::*;
    match request {
        Request::New { kind, .. } => vec![(Verb::Write, Kind(*kind))],
        Request::Append { handle, .. }
        | Request::Replace { handle, .. }
        | Request::Delete { handle }
        | Request::Store { handle, .. }
        | Request::KeepAlive { handle } => vec![(Verb::Write, Session(handle.session))],
        Request::Redrive { target: RedriveTarget::Kind(kind) } => vec![(Verb::Operate, Kind(*kind))],
        Request::Redrive { target: RedriveTarget::Session(id) } | Request::DropDead { session: id } => {
            vec![(Verb::Operate, Session(*id))]
        }
        Request::ConsumerOpen { .. } => vec![(Verb::Consume, AnyKind)],
        Request::ConsumerCommit(commit) => {
            // A commit writes: each of its operations needs write on its session's kind.
            let mut needs = vec![(Verb::Consume, AnyKind)];
            for op in &commit.ops {
                needs.push(match op {
                    CommitOp::New { kind, .. } => (Verb::Write, Kind(*kind)),
                    other => match other.as_request().and_then(|r| r.session()) {
                        Some(id) => (Verb::Write, Session(id)),
                        None => (Verb::Write, AnyKind),
                    },
                });
            }
            needs
        }
        Request::ConsumerDrop { .. }
        | Request::Configure { .. }
        | Request::ChangeMembers { .. }
        | Request::TransferLeader { .. } => vec![(Verb::Operate, AnyKind)],
    }
}

fn query_needs(query: &Query) -> Option<(Verb, Needs)> {
    Some(match query {
        Query::Session(id) | Query::SessionLocal(id) => (Verb::Read, Needs::Session(*id)),
        // Liveness and roles: what `truba status` and clients finding the leader need.
        Query::Status => return None,
        Query::Dead { kind, .. } => (Verb::Operate, Needs::Kind(*kind)),
        Query::Checkpoint { .. } | Query::ReadThrough { .. } => (Verb::Consume, Needs::AnyKind),
        Query::Config => (Verb::Operate, Needs::AnyKind),
    })
}

fn check(
    principal: &Principal,
    needs: impl IntoIterator<Item = (Verb, Needs)>,
    kind_of: impl Fn(SessionId) -> Option<Kind>,
) -> Result<(), RequestError> {
    for (verb, need) in needs {
        let kind = match need {
            Needs::Kind(k) => Some(k),
            Needs::Session(id) => kind_of(id),
            Needs::AnyKind => None,
        };
        let allowed = match (need, kind) {
            // A session of unknown kind (none such, or deleted) is left to the engine to
            // answer, if the principal may do this on some kind at all.
            (Needs::Session(_), None) => principal.grants.iter().any(|g| g.verb == verb),
            // `None` here (every kind) needs a grant on every kind.
            (_, kind) => principal.allows(verb, kind),
        };
        if !allowed {
            return Err(RequestError::PermissionDenied {
                principal: principal.name.clone(),
                verb: verb.name().into(),
                kind,
            });
        }
    }
    Ok(())
}

/// Whether `principal` may make `request`; `kind_of` looks up a session's kind in the state.
pub fn check_request(
    principal: &Principal,
    request: &Request,
    kind_of: impl Fn(SessionId) -> Option<Kind>,
) -> Result<(), RequestError> {
    check(principal, request_needs(request), kind_of)
}

pub fn check_query(
    principal: &Principal,
    query: &Query,
    kind_of: impl Fn(SessionId) -> Option<Kind>,
) -> Result<(), RequestError> {
    check(principal, query_needs(query), kind_of)
}

/// Reading the ledger needs read on every kind the stream shows (a filter of no kinds shows
/// them all).
pub fn check_stream(principal: &Principal, open: &StreamOpen) -> Result<(), RequestError> {
    let kinds = match open {
        StreamOpen::Tail { filter, .. } => &filter.kinds,
        StreamOpen::Watch { kinds, .. } => kinds,
    };
    let needs: Vec<_> = if kinds.is_empty() {
        vec![(Verb::Read, Needs::AnyKind)]
    } else {
        kinds.iter().map(|k| (Verb::Read, Needs::Kind(*k))).collect()
    };
    check(principal, needs, |_| None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use truba_engine::{Attempt, Handle};

    fn principal(grants: &[&str]) -> Principal {
        Principal { name: "p".into(), grants: grants.iter().map(|g| Grant::parse(g).unwrap()).collect() }
    }

    #[test]
    fn grants_are_per_verb_and_kind() {
        let p = principal(&["write:1", "read:*"]);
        let handle = Handle { session: SessionId(9), attempt: Attempt(0) };
        let kind_of = |id: SessionId| (id == SessionId(9)).then_some(Kind(2));
        assert!(check_request(&p, &Request::New { kind: Kind(1), record: None }, kind_of).is_ok());
        let e = check_request(&p, &Request::New { kind: Kind(2), record: None }, kind_of).unwrap_err();
        assert_eq!(e.to_string(), "permission denied: p may not write sessions of kind 2");
        assert!(check_request(&p, &Request::Delete { handle }, kind_of).is_err(), "session 9 is of kind 2");
        assert!(check_query(&p, &Query::Session(SessionId(9)), kind_of).is_ok());
        assert!(check_request(&p, &Request::TransferLeader { to: truba_engine::ReplicaId(1) }, kind_of).is_err());
        assert!(check_query(&p, &Query::Status, kind_of).is_ok(), "status is open to all");
        let write_1 = principal(&["write:1"]);
        let tail_all = StreamOpen::Watch { kinds: vec![], resume_after: None, window: None };
        assert!(check_stream(&write_1, &tail_all).is_err());
        assert!(check_stream(&p, &tail_all).is_ok());
    }

    #[test]
    fn the_section_is_checked_and_tokens_are_found_by_their_digest() {
        let section = AuthSection {
            anonymous: vec!["read:1".into()],
            principals: vec![PrincipalSection {
                name: "orders".into(),
                token_sha256: Some(hash_token("s3cret")),
                cert_name: None,
                grants: vec!["write:1".into()],
            }],
        };
        let a = Authority::new(&section).unwrap();
        assert_eq!(a.by_token("s3cret").map(|p| p.name.as_str()), Some("orders"));
        assert!(a.by_token("guess").is_none());
        assert!(a.anonymous().allows(Verb::Read, Some(Kind(1))));
        let mut bad = section.clone();
        bad.principals[0].grants = vec!["delete:1".into()];
        assert!(Authority::new(&bad).unwrap_err().contains("verb:kind"));
        let mut twice = section.clone();
        twice.principals.push(twice.principals[0].clone());
        assert!(Authority::new(&twice).unwrap_err().contains("repeated"));
        assert_eq!(hash_token("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }
}
