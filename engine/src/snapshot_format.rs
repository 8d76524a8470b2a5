//! How a state is laid out in a snapshot: a sequence of checksummed sections, each small enough
//! to hold in memory on its own, so that a snapshot can be read a piece at a time (a watcher's
//! resync streams one, see `resync.rs`) as well as whole (recovery, an install).
//!
//! Each section is framed `len u32 | crc u32 | postcard(Section)`, little endian, and they come
//! in this order: `Meta` (everything small, including each source's place and how much of it is
//! taken), `Dedup`, `Tombstones`, `Sessions` (the sessions held in memory), then for each source
//! in `Meta`'s order its `Spilled` entries and, if this replica still holds its records, its
//! `Held` sessions; and `End`, which counts the sections before it. The file around them (magic,
//! index, term, length and a checksum of everything) is `codec.rs`'s.

use crate::config::ClusterConfig;
use crate::consumers::ConsumerState;
use crate::op::UnixSecs;
use crate::sessions::{DedupEntry, Session, StateMachine};
use crate::stored::{PendingMerge, Source, Sources, Spilled};
use crate::types::{ClientId, Index, Kind, SessionId, SourceId};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub(crate) const SECTION_HEADER_LEN: usize = 8;
/// A section holds about this many bytes (one item more at most).
const SECTION_BYTES: usize = 1024 * 1024;
/// No section is larger than this (a section of one session at its kind's largest size fits);
/// a length field above it is damage.
pub(crate) const SECTION_BYTES_MAX: u32 = 256 * 1024 * 1024;

/// A source's place in the state, without its entries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SourceMeta {
    pub kind: Kind,
    pub id: SourceId,
    pub taken: u64,
    pub taken_offset: u64,
    pub ready: bool,
    pub entries: u64,
    /// The records of its sessions are in the snapshot (`Held` sections), not only in its file.
    pub held: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Meta {
    pub applied: Index,
    pub repeat_index: BTreeMap<Kind, (UnixSecs, Index, SessionId)>,
    pub sources: Vec<SourceMeta>,
    pub merges: Vec<PendingMerge>,
    /// Sessions held in memory (in the `Sessions` sections).
    pub sessions: u64,
    /// Consumers and their checkpoints (a few, by the limit on them).
    pub consumers: BTreeMap<String, ConsumerState>,
    /// The cluster's replicated configuration.
    pub config: ClusterConfig,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Section {
    Meta(Meta),
    Dedup(Vec<(ClientId, DedupEntry)>),
    Tombstones(Vec<(SessionId, Index)>),
    Sessions(Vec<(SessionId, Session)>),
    Spilled { source: SourceId, entries: Vec<Spilled> },
    Held { source: SourceId, sessions: Vec<(SessionId, Session)> },
    End { sections: u64 },
}

/// The same sections, borrowing from the state: encoded exactly as [`Section`] (serde encodes a
/// reference as what it refers to), without copying the sessions.
#[derive(Serialize)]
enum SectionRef<'a> {
    Meta(&'a Meta),
    Dedup(Vec<(ClientId, &'a DedupEntry)>),
    Tombstones(Vec<(SessionId, Index)>),
    Sessions(Vec<(SessionId, &'a Session)>),
    Spilled { source: SourceId, entries: &'a [Spilled] },
    Held { source: SourceId, sessions: Vec<(SessionId, &'a Session)> },
    End { sections: u64 },
}

/// Appends `section` to `out`, framed.
fn push(out: &mut Vec<u8>, section: &SectionRef) {
    let start = out.len();
    out.extend_from_slice(&[0u8; SECTION_HEADER_LEN]);
    let mut buf = postcard::to_extend(section, std::mem::take(out)).expect("postcard encoding into memory cannot fail");
    let len = (buf.len() - start - SECTION_HEADER_LEN) as u32;
    let crc = crc32fast::hash(&buf[start + SECTION_HEADER_LEN..]);
    buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    *out = buf;
}

/// The section at the start of `buf`: `Ok(Some((section, length)))`, `Ok(None)` if `buf` ends
/// inside it, `Err` if it is damaged.
pub(crate) fn section_at(buf: &[u8]) -> Result<Option<(Section, usize)>, String> {
    if buf.len() < SECTION_HEADER_LEN {
        return Ok(None);
    }
    let len = u32::from_le_bytes(buf[..4].try_into().expect("4 bytes"));
    let crc = u32::from_le_bytes(buf[4..8].try_into().expect("4 bytes"));
    if len > SECTION_BYTES_MAX {
        return Err(format!("a section claims {len} bytes"));
    }
    let end = SECTION_HEADER_LEN + len as usize;
    if buf.len() < end {
        return Ok(None);
    }
    let payload = &buf[SECTION_HEADER_LEN..end];
    if crc32fast::hash(payload) != crc {
        return Err("a section's checksum does not match".into());
    }
    let section = postcard::from_bytes(payload).map_err(|e| format!("undecodable section: {e}"))?;
    Ok(Some((section, end)))
}

/// Writes `items` (with their rough sizes) as sections of about `SECTION_BYTES` each, made by
/// `wrap`; returns how many.
fn chunked<'a, T: 'a>(
    out: &mut Vec<u8>,
    items: impl Iterator<Item = (T, usize)>,
    wrap: impl Fn(Vec<T>) -> SectionRef<'a>,
) -> u64 {
    let (mut batch, mut bytes, mut sections) = (Vec::new(), 0, 0);
    for (item, size) in items {
        batch.push(item);
        bytes += size;
        if bytes >= SECTION_BYTES {
            push(out, &wrap(std::mem::take(&mut batch)));
            (bytes, sections) = (0, sections + 1);
        }
    }
    if !batch.is_empty() {
        push(out, &wrap(batch));
        sections += 1;
    }
    sections
}

fn session_size(s: &Session) -> usize {
    s.bytes as usize + 64
}

/// Encodes `state` as sections, appended to `out`.
pub(crate) fn encode(state: &StateMachine, out: &mut Vec<u8>) {
    let src = &state.sources;
    let metas: Vec<SourceMeta> = src
        .kinds
        .iter()
        .flat_map(|(kind, list)| {
            list.iter().map(move |s| SourceMeta {
                kind: *kind,
                id: s.id,
                taken: s.taken,
                taken_offset: s.taken_offset,
                ready: s.ready,
                entries: s.entries.len() as u64,
                held: src.held.contains_key(&s.id),
            })
        })
        .collect();
    let meta = Meta {
        applied: state.applied,
        repeat_index: state.repeat_index.clone(),
        sources: metas.clone(),
        merges: src.merges.clone(),
        sessions: state.sessions.len() as u64,
        consumers: state.consumers.clone(),
        config: (*state.config).clone(),
    };
    push(out, &SectionRef::Meta(&meta));
    let mut sections = 1;
    sections += chunked(out, state.dedup.iter().map(|(c, e)| ((*c, e), 64)), SectionRef::Dedup);
    sections += chunked(out, state.tombstones.iter().map(|(s, i)| ((*s, *i), 16)), SectionRef::Tombstones);
    let sessions = state.sessions.iter().map(|(id, s)| ((*id, s), session_size(s)));
    sections += chunked(out, sessions, SectionRef::Sessions);
    for m in &metas {
        let source = src.source(m.kind, m.id).expect("a listed source exists");
        for entries in source.entries.chunks(SECTION_BYTES / 64) {
            push(out, &SectionRef::Spilled { source: m.id, entries });
            sections += 1;
        }
        if let Some(held) = src.held.get(&m.id) {
            let held = held.iter().map(|(id, s)| ((*id, s), session_size(s)));
            sections += chunked(out, held, |sessions| SectionRef::Held { source: m.id, sessions });
        }
    }
    push(out, &SectionRef::End { sections });
}

/// Builds a state from a snapshot's sections, checking that they are all there, in order.
pub(crate) fn decode(payload: &[u8]) -> Result<StateMachine, String> {
    let mut at = 0;
    let mut next = || -> Result<Section, String> {
        let (section, len) = section_at(&payload[at..])?.ok_or("the snapshot ends inside a section")?;
        at += len;
        Ok(section)
    };
    let Section::Meta(meta) = next()? else { return Err("the snapshot does not start with its meta section".into()) };
    let mut state = StateMachine {
        applied: meta.applied,
        repeat_index: meta.repeat_index,
        consumers: meta.consumers,
        ..StateMachine::default()
    };
    state.set_config(meta.config);
    let mut sections = 1;
    let mut section = next()?;
    while let Section::Dedup(items) = section {
        state.dedup.extend(items);
        (section, sections) = (next()?, sections + 1);
    }
    while let Section::Tombstones(items) = section {
        state.tombstones.extend(items);
        (section, sections) = (next()?, sections + 1);
    }
    while let Section::Sessions(items) = section {
        state.sessions.extend(items);
        (section, sections) = (next()?, sections + 1);
    }
    if state.sessions.len() as u64 != meta.sessions {
        return Err(format!("{} sessions where the meta section says {}", state.sessions.len(), meta.sessions));
    }
    let mut sources = Sources { merges: meta.merges, ..Sources::default() };
    for m in &meta.sources {
        let mut entries = Vec::new();
        while let Section::Spilled { source, entries: items } = &mut section {
            if *source != m.id {
                break;
            }
            entries.append(items);
            (section, sections) = (next()?, sections + 1);
        }
        if entries.len() as u64 != m.entries || m.taken > m.entries {
            return Err(format!(
                "source {} has {} entries where the meta section says {}",
                m.id.0,
                entries.len(),
                m.entries
            ));
        }
        if m.held {
            let mut held = Vec::new();
            while let Section::Held { source, sessions } = &mut section {
                if *source != m.id {
                    break;
                }
                held.append(sessions);
                (section, sections) = (next()?, sections + 1);
            }
            if held.len() != entries.len() {
                return Err(format!("source {} holds {} sessions for {} entries", m.id.0, held.len(), entries.len()));
            }
            sources.held.insert(m.id, held);
        }
        let source = Source::new(m.id, entries, m.taken, m.taken_offset, m.ready);
        sources.kinds.entry(m.kind).or_default().push(source);
    }
    match section {
        Section::End { sections: n } if n == sections => {}
        Section::End { sections: n } => return Err(format!("the snapshot ends after {sections} sections, not {n}")),
        other => return Err(format!("a section out of place: {}", section_name(&other))),
    }
    if at != payload.len() {
        return Err(format!("{} bytes after the end section", payload.len() - at));
    }
    state.sources = sources;
    Ok(state)
}

fn section_name(s: &Section) -> &'static str {
    match s {
        Section::Meta(_) => "meta",
        Section::Dedup(_) => "dedup",
        Section::Tombstones(_) => "tombstones",
        Section::Sessions(_) => "sessions",
        Section::Spilled { .. } => "spilled",
        Section::Held { .. } => "held",
        Section::End { .. } => "end",
    }
}
