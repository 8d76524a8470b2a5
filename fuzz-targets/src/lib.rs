//! # truba-fuzz-targets
//!
//! The bodies of truba's fuzz targets, one function each, taking the fuzzer's bytes. The
//! libFuzzer crate in `../fuzz` calls them (`cargo fuzz run <target>`, on the stable toolchain
//! with `-s none`), and this crate's own test replays every saved input under `../fuzz/corpus`
//! and the generated seeds, so `cargo test` keeps every input the fuzzer ever saved passing.
//!
//! What each target reaches, and why it is shaped so:
//! - [`frames`]: the client, member and handler frame decoders, on the bytes as sent and with a
//!   header made to fit (random bytes almost never pass a crc32, so without it the fuzzer
//!   would only ever test the checksum). Whatever decodes must encode back to itself.
//! - [`member_messages`]: an engine, a follower or a leader of three, fed any sequence of member
//!   messages, client requests, ticks and restarts. It must never panic, and its invariants
//!   (checked after every step by the engine itself) must hold.
//! - [`client_requests`]: a lone replica fed any requests, queries and failed deliveries.
//! - [`log_recovery`]: the segment scan, and a replica recovering from a crafted segment, with
//!   the bytes as they are or as record payloads framed with valid checksums.
//! - [`snapshot_recovery`]: a replica recovering from a crafted snapshot file.
//! - [`source_file`]: the source file decoder, and a replica whose spilled sessions' source
//!   file is replaced by the crafted one, reading it when they come due.
//! - [`config`]: the TOML a `truba config apply` reads, and the replicated configuration as a
//!   snapshot or a bootstrap entry carries it.

mod node;
pub mod seeds;

pub use node::{exec, Dir, Node, Setup};

use serde::de::DeserializeOwned;
use serde::Serialize;
use std::fmt::Debug;
use truba::identity::PeerHello;
use truba::wire::{ClientMsg, HandlerToPipe, Hello, PeerFrame, PipeToHandler, ServerMsg};
use truba_engine::codec::{encode_raw_record, encode_segment_header, encode_snapshot, segment_name, snapshot_name};
use truba_engine::{
    ClientId, ClusterConfig, FailureReason, Handle, Index, Input, Message, Query, ReplicaId, Request, Seq, Term,
};

/// Inputs one run of a target feeds at most, so that a long input cannot make one run slow.
const STEPS_MAX: usize = 256;

/// The fuzzer's bytes, read front to back.
pub struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(data: &'a [u8]) -> Reader<'a> {
        Reader { rest: data }
    }

    pub fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.rest.split_first()?;
        self.rest = rest;
        Some(b)
    }

    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (taken, rest) = self.rest.split_at(n.min(self.rest.len()));
        self.rest = rest;
        taken
    }

    /// A value in postcard's encoding (the wire's), if the bytes hold one.
    pub fn take<T: DeserializeOwned>(&mut self) -> Option<T> {
        let (value, rest) = postcard::take_from_bytes(self.rest).ok()?;
        self.rest = rest;
        Some(value)
    }

    pub fn rest(self) -> &'a [u8] {
        self.rest
    }
}

// ---- frames ---------------------------------------------------------------------------------

/// The largest frame a connection takes by default.
const FRAME_MAX: u32 = truba::wire::FRAME_BYTES_MAX_DEFAULT;

pub fn frames(data: &[u8]) {
    decode_every_frame(data);
    let mut framed = Vec::with_capacity(truba::wire::FRAME_HEADER_LEN + data.len());
    framed.extend_from_slice(&(data.len() as u32).to_le_bytes());
    framed.extend_from_slice(&crc32fast::hash(data).to_le_bytes());
    framed.extend_from_slice(data);
    decode_every_frame(&framed);
}

fn decode_every_frame(buf: &[u8]) {
    round_trip::<ClientMsg>(buf);
    round_trip::<ServerMsg>(buf);
    round_trip::<Hello>(buf);
    round_trip::<PipeToHandler>(buf);
    round_trip::<HandlerToPipe>(buf);
    if let Some(hello) = round_trip::<PeerHello>(buf) {
        let ours = truba::identity::Identity { cluster: hello.cluster, member: ReplicaId(0) };
        let _ = hello.refusal(ours, &[ReplicaId(1), ReplicaId(2)]);
    }
    if let Some(frame) = round_trip::<PeerFrame>(buf) {
        // What the member port does with a frame before the engine sees it.
        let _ = frame.message.check();
        let _ = frame.message.name();
    }
}

/// Decodes a frame of `T`; whatever decodes must encode to a frame that decodes to it again.
fn round_trip<T: Serialize + DeserializeOwned + PartialEq + Debug>(buf: &[u8]) -> Option<T> {
    let (msg, used) = truba::wire::decode_frame::<T>(buf, FRAME_MAX).ok()??;
    assert!(used <= buf.len(), "a frame cannot be longer than the bytes it came in");
    let again = truba::wire::encode(&msg);
    let (back, len) = truba::wire::decode_frame::<T>(&again, u32::MAX)
        .expect("an encoded frame decodes")
        .expect("an encoded frame is whole");
    assert_eq!(len, again.len());
    assert_eq!(back, msg, "a decoded frame encodes back to itself");
    Some(msg)
}

// ---- engines fed crafted inputs --------------------------------------------------------------

/// First byte: even, a follower; odd, a leader (and the engine's seed). Then steps, each an
/// opcode byte and what it needs: a member message (from member 0, 1, 2 or a stranger, 7), a
/// tick after some milliseconds, a client request, or a crash and restart.
pub fn member_messages(data: &[u8]) {
    member_messages_run(data);
}

/// [`member_messages`], returning the replica it drove (for tests of the seeds).
pub fn member_messages_run(data: &[u8]) -> Option<Node> {
    let mut r = Reader::new(data);
    let first = r.byte()?;
    let setup = if first & 1 == 0 { Setup::Follower } else { Setup::Leader };
    let mut node = Node::new(setup, u64::from(first >> 1));
    let mut seq = 0;
    for _ in 0..STEPS_MAX {
        let Some(op) = r.byte() else { break };
        match op % 8 {
            0..=4 => {
                let from = ReplicaId([0, 1, 2, 7][usize::from(op >> 3) % 4]);
                let Some(message) = r.take::<Message>() else { break };
                node.input(Input::Message { from, message });
            }
            5 => node.advance_ms(u64::from(r.byte().unwrap_or(0)) * 4),
            6 => {
                let Some(request) = r.take::<Request>() else { break };
                seq += 1;
                node.input(Input::Request { client: ClientId(u64::from(op >> 3)), seq: Seq(seq), request });
            }
            _ => node.restart(),
        }
    }
    Some(node)
}

/// A lone replica. Steps: a request (client from the opcode, then its sequence number and the
/// request), a query, a tick, a failed delivery, or a crash and restart.
pub fn client_requests(data: &[u8]) {
    let mut r = Reader::new(data);
    let mut node = Node::new(Setup::Lone, 0);
    let mut query_id = 0;
    for _ in 0..STEPS_MAX {
        let Some(op) = r.byte() else { break };
        match op % 8 {
            0..=3 => {
                let client = ClientId(u64::from(op >> 3));
                let (Some(seq), Some(request)) = (r.take::<u64>(), r.take::<Request>()) else { break };
                node.input(Input::Request { client, seq: Seq(seq), request });
            }
            4 => {
                let Some(query) = r.take::<Query>() else { break };
                query_id += 1;
                node.input(Input::Query { id: query_id, query });
            }
            5 => node.advance_ms(u64::from(r.byte().unwrap_or(0)) * 16),
            6 => {
                let Some((handle, reason)) = r.take::<(Handle, FailureReason)>() else { break };
                node.input(Input::DeliveryFailed { handle, reason });
            }
            _ => node.restart(),
        }
    }
}

// ---- files -----------------------------------------------------------------------------------

/// A replica (lone if the first byte is even, else a member of three) recovers a directory
/// holding one log segment. Second byte even: the rest is the segment's bytes as they are.
/// Odd: the rest is records (a term byte, a length, a payload), framed with valid checksums
/// and a valid chain after a valid header, so the payloads' decoding is what gets tested.
pub fn log_recovery(data: &[u8]) {
    let mut r = Reader::new(data);
    let (Some(setup), Some(mode)) = (r.byte(), r.byte()) else { return };
    let segment = if mode & 1 == 0 { r.rest().to_vec() } else { framed_segment(r) };
    if let Some(scan) = truba_engine::codec::scan_segment(&segment) {
        assert!(scan.valid_end as usize <= segment.len(), "the valid records lie inside the file");
    }
    let dir = Dir::from([(segment_name(Index(1)), segment)]);
    let setup = if setup & 1 == 0 { Setup::Lone } else { Setup::Follower };
    Node::on_dir(setup, 0, dir).advance_ms(1000);
}

fn framed_segment(mut r: Reader<'_>) -> Vec<u8> {
    let mut out = encode_segment_header(Index(1), 0);
    let (mut prev_crc, mut index) = (0, 1);
    while let Some(term) = r.byte() {
        let len = r.take::<u16>().unwrap_or(0);
        let payload = r.bytes(usize::from(len));
        prev_crc = encode_raw_record(prev_crc, Term(u64::from(term)), Index(index), payload, &mut out);
        index += 1;
    }
    out
}

/// A replica recovers a directory holding one snapshot file. First byte: lone or member (bit
/// 0), and the file's bytes as they are (bit 1) or a payload sealed with a valid header at the
/// index and term given next.
pub fn snapshot_recovery(data: &[u8]) {
    let mut r = Reader::new(data);
    let Some(mode) = r.byte() else { return };
    let (name, file) = if mode & 2 == 0 {
        (snapshot_name(Index(1)), r.rest().to_vec())
    } else {
        let (Some(index), Some(term)) = (r.take::<u64>(), r.take::<u64>()) else { return };
        (snapshot_name(Index(index)), encode_snapshot(Index(index), Term(term), r.rest()))
    };
    let setup = if mode & 1 == 0 { Setup::Lone } else { Setup::Follower };
    Node::on_dir(setup, 0, Dir::from([(name, file)])).advance_ms(1000);
}

/// The source file decoder on the bytes, then a replica whose one source file (of sessions
/// spilled in a seeded run) is replaced by them: it recovers, and the sessions come due, so it
/// reads the file. First byte: bit 0 set recomputes every frame's checksum first, so that the
/// frames' contents are what gets tested.
pub fn source_file(data: &[u8]) {
    let mut r = Reader::new(data);
    let Some(mode) = r.byte() else { return };
    let mut file = r.rest().to_vec();
    if mode & 1 == 1 {
        reseal_source_frames(&mut file);
    }
    let _ = truba_engine::decode_source_file(&file);
    let (mut dir, name) = seeds::spilled_dir().clone();
    dir.insert(name, file);
    let mut node = Node::on_dir(Setup::Lone, 0, dir);
    for _ in 0..4 {
        node.advance_ms(seeds::SPILLED_DUE_MS / 2);
    }
}

/// A source file's layout: a 24-byte header, then frames of `len u32 | crc32 u32 | payload`.
fn reseal_source_frames(file: &mut [u8]) {
    const HEADER: usize = 24;
    let mut at = HEADER;
    while at + 8 <= file.len() {
        let len = u32::from_le_bytes(file[at..at + 4].try_into().expect("4 bytes")) as usize;
        let Some(end) = at.checked_add(8 + len).filter(|&end| end <= file.len()) else { return };
        let crc = crc32fast::hash(&file[at + 8..end]);
        file[at + 4..at + 8].copy_from_slice(&crc.to_le_bytes());
        at = end;
    }
}

/// First byte even: the rest is TOML for `truba config apply`; odd: a replicated
/// configuration in postcard's encoding. A configuration that validates must show as TOML
/// that reads back to the same kinds and limits.
pub fn config(data: &[u8]) {
    let mut r = Reader::new(data);
    let Some(mode) = r.byte() else { return };
    if mode & 1 == 0 {
        let text = String::from_utf8_lossy(r.rest());
        if let Ok(proposed) = truba::cluster_config::parse(&text, std::path::Path::new("fuzz.toml")) {
            let _ = truba::cluster_config::diff(&ClusterConfig::default(), &proposed);
        }
        return;
    }
    let Some(config) = r.take::<ClusterConfig>() else { return };
    let _ = config.changes(&ClusterConfig::default().kinds, &ClusterConfig::default().limits);
    if ClusterConfig::validate(&config.kinds, &config.limits).is_err() {
        return;
    }
    let shown = truba::cluster_config::render(&config);
    let read = truba::cluster_config::parse(&shown, std::path::Path::new("shown.toml"))
        .expect("a shown configuration reads back");
    assert_eq!(read.kinds, config.kinds, "kinds survive show and apply");
    assert_eq!(read.limits, config.limits, "limits survive show and apply");
}

/// A target's body: it takes the fuzzer's bytes and panics on a failure.
pub type Target = fn(&[u8]);

/// Every target by name, as the corpus directories are named.
pub const TARGETS: [(&str, Target); 7] = [
    ("frames", frames),
    ("member_messages", member_messages),
    ("client_requests", client_requests),
    ("log_recovery", log_recovery),
    ("snapshot_recovery", snapshot_recovery),
    ("source_file", source_file),
    ("config", config),
];
