//! The network protocol: postcard-encoded messages, each framed as
//! `len u32 LE | crc32 u32 LE | payload`, where the crc covers the payload.
//!
//! Clients send [`ClientMsg`] and receive [`ServerMsg`]. A client reads the ledger through
//! streams of its connection: it names each with a number of its own (unique among the
//! connection's open streams), receives the stream's items numbered from 1 in
//! [`ServerMsg::Stream`], and acknowledges them by number; entries travel as the ledger's own
//! bytes (the postcard encoding of a `LedgerEntry`), which the server never decodes. The pipe
//! pushes deliveries to handlers
//! with [`PipeToHandler`] and hears back [`HandlerToPipe`]. Members of a cluster exchange
//! [`PeerFrame`]s. A peer that sends a frame that is too
//! large, fails its checksum or does not decode gets an [`ServerMsg::Error`] and is disconnected.

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use truba_engine::{
    ClientId, Handle, Kind, Message, Outcome, Query, QueryReply, ReplicaId, Request, Seq, StatusView, StreamItem,
    StreamOpen, UnixSecs,
};

pub const FRAME_HEADER_LEN: usize = 8;
/// Default largest frame accepted (a 1 MiB record plus room for the envelope).
pub const FRAME_BYTES_MAX_DEFAULT: u32 = (1 << 20) + 4096;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientMsg {
    Request {
        client: ClientId,
        seq: Seq,
        request: Request,
    },
    Query {
        id: u64,
        query: Query,
    },
    /// Server-wide status (engine status plus disk use and connections).
    Status {
        id: u64,
    },
    /// Opens a stream of the ledger (a tail or a watch) on this connection. `stream` is the
    /// client's own number for it, unique among the connection's open streams.
    StreamOpen {
        stream: u64,
        open: StreamOpen,
    },
    /// Every item of the stream through `seq` is processed; `error` is a watcher's report that
    /// its processing failed (kept for operators; the stream goes on).
    StreamAck {
        stream: u64,
        seq: u64,
        error: Option<String>,
    },
    /// The client is done with the stream (closing the connection closes all of them).
    StreamClose {
        stream: u64,
    },
    /// A bearer token proving who the client is, for a node with `[auth]` (see `auth.rs`):
    /// sent once, right after the hello. A token the node does not know ends the connection.
    Authenticate {
        token: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerMsg {
    /// The first frame on every client connection, sent by the thread that runs the engine:
    /// a member that accepts connections but whose engine does not run (a paused process, a
    /// wedged thread) never sends it, so a client gives up on it within its connect timeout
    /// and tries the next member. It also says which member answers, the leader it knows of,
    /// and where clients reach every member, so a client given one address finds the others
    /// and follows a `NotLeader` hint straight to the leader.
    Hello(Hello),
    Reply {
        client: ClientId,
        seq: Seq,
        outcome: Outcome,
    },
    QueryReply {
        id: u64,
        reply: QueryReply,
    },
    Status {
        id: u64,
        status: ServerStatus,
    },
    /// The connection is being closed because of this.
    Error {
        error: WireError,
    },
    /// Item `seq` (from 1) of the client's stream `stream`. After an `End` the stream is closed
    /// and sends nothing more.
    Stream {
        stream: u64,
        seq: u64,
        item: StreamItem,
    },
    /// A message about stream `stream` was refused and changed nothing (a stream open under that
    /// number goes on as before).
    StreamRefused {
        stream: u64,
        refusal: StreamRefusal,
    },
    /// The server (not the engine) ended stream `stream`: it is closed and sends nothing more.
    /// The stream may be opened again, here or on another member, from where the reader got to.
    StreamEnded {
        stream: u64,
        reason: StreamEnd,
    },
}

/// Why a message about a stream was refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum StreamRefusal {
    #[error("a stream with this number is already open on this connection")]
    AlreadyOpen,
    #[error("no stream with this number is open on this connection (it ended, was closed, or never was)")]
    NotOpen,
    #[error("acknowledges item {seq}, but only {sent} items were sent")]
    AckBeyondSent { seq: u64, sent: u64 },
    #[error("a window of 0 events lets nothing through")]
    ZeroWindow,
    #[error("{0}")]
    PermissionDenied(truba_engine::RequestError),
}

/// Why the server ended a stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum StreamEnd {
    #[error("the server is shutting down; open the stream again on another member")]
    ShuttingDown,
    /// The connection's queue of stream items not yet written to its socket passed the server's
    /// limit: the client (or the network) does not read as fast as the items come. Items are
    /// never dropped, so the server ends the connection's streams instead.
    #[error("the connection fell behind: {queued_bytes} bytes of stream items waited to be written, over the limit of {max}")]
    ConnectionBehind { queued_bytes: u64, max: u64 },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerStatus {
    pub version: String,
    pub engine: StatusView,
    pub disk_bytes: u64,
    pub connections: u32,
    pub role: String,
}

/// The client protocol's version: what [`Hello`] opens with. It changes with any change to
/// [`ClientMsg`] or [`ServerMsg`] (the golden tests in `tests/formats.rs` catch one made by
/// accident). `ServerMsg::Hello` stays the first variant and `protocol` its first field, so
/// that a client of any version can read the version of any server.
pub const CLIENT_PROTOCOL_VERSION: u32 = 1;

/// What a member says first on every client connection (see [`ServerMsg::Hello`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// [`CLIENT_PROTOCOL_VERSION`] of the member's version.
    pub protocol: u32,
    /// The cluster's id (a member that joins learns it here).
    pub cluster: u64,
    pub member: ReplicaId,
    /// The leader the member knows of, if any.
    pub leader: Option<ReplicaId>,
    pub members: Vec<MemberAddr>,
}

/// Where clients reach one member of the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberAddr {
    pub id: ReplicaId,
    pub client: String,
}

/// Replication traffic: one consensus message from member `from`. Members connect to each
/// other's peer address; each direction of each pair has its own connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerFrame {
    pub from: ReplicaId,
    pub message: Message,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PipeToHandler {
    /// A stored session came due. The handler works on it through `servers` like any client,
    /// using `handle`, then answers with [`HandlerToPipe::Ack`].
    Deliver { kind: Kind, handle: Handle, due: UnixSecs, records: Vec<Vec<u8>>, servers: Vec<String> },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HandlerToPipe {
    /// `Err` means the handler failed: the pipe stores the session again for a later attempt.
    Ack { handle: Handle, result: Result<(), String> },
}

/// Why a peer's bytes were refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum WireError {
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    FrameTooLarge { len: u32, max: u32 },
    #[error("frame checksum mismatch")]
    BadChecksum,
    #[error("undecodable or unknown message: {0}")]
    Malformed(String),
    #[error("the server holds its limit of {max} connections")]
    TooManyConnections { max: u32 },
    #[error("more than {max} requests in flight on one connection")]
    TooManyInflight { max: u32 },
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("the credentials were not accepted")]
    BadCredentials,
}

/// Errors reading or writing frames.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Wire(#[from] WireError),
}

pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    let mut out = vec![0u8; FRAME_HEADER_LEN];
    out = postcard::to_extend(msg, out).expect("postcard encoding into memory cannot fail");
    let len = (out.len() - FRAME_HEADER_LEN) as u32;
    let crc = crc32fast::hash(&out[FRAME_HEADER_LEN..]);
    out[0..4].copy_from_slice(&len.to_le_bytes());
    out[4..8].copy_from_slice(&crc.to_le_bytes());
    out
}

/// Decodes the first frame in `buf` if it is all there: the message and the frame's length
/// (`Ok(None)`: more bytes are needed). For readers that keep their own buffer, so that a read
/// cut off half way (a cancelled future) loses nothing.
pub fn decode_frame<T: DeserializeOwned>(buf: &[u8], max: u32) -> Result<Option<(T, usize)>, WireError> {
    let Some(header) = buf.get(..FRAME_HEADER_LEN) else { return Ok(None) };
    let len = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
    let crc = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
    if len > max {
        return Err(WireError::FrameTooLarge { len, max });
    }
    let end = FRAME_HEADER_LEN + len as usize;
    let Some(payload) = buf.get(FRAME_HEADER_LEN..end) else { return Ok(None) };
    if crc32fast::hash(payload) != crc {
        return Err(WireError::BadChecksum);
    }
    let msg = postcard::from_bytes(payload).map_err(|e| WireError::Malformed(e.to_string()))?;
    Ok(Some((msg, end)))
}

/// Reads one frame and decodes it. `Ok(None)` at a clean end of stream (between frames).
/// The most a frame's buffer is given before its bytes arrive.
const FIRST_BUFFER_BYTES: usize = 64 * 1024;

pub async fn read<T: DeserializeOwned, R: AsyncRead + Unpin>(r: &mut R, max: u32) -> Result<Option<T>, FrameError> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    match r.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
    let crc = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
    if len > max {
        return Err(WireError::FrameTooLarge { len, max }.into());
    }
    // The buffer grows as the bytes arrive rather than being allocated whole on the header's
    // word: a header that announces the limit and is followed by a trickle (or nothing) costs
    // the server what was sent, not `max`.
    let mut payload = Vec::with_capacity((len as usize).min(FIRST_BUFFER_BYTES));
    (&mut *r).take(len as u64).read_to_end(&mut payload).await?;
    if payload.len() != len as usize {
        return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
    }
    if crc32fast::hash(&payload) != crc {
        return Err(WireError::BadChecksum.into());
    }
    let msg = postcard::from_bytes(&payload).map_err(|e| WireError::Malformed(e.to_string()))?;
    Ok(Some(msg))
}

pub async fn write<T: Serialize, W: AsyncWrite + Unpin>(w: &mut W, msg: &T) -> Result<(), FrameError> {
    w.write_all(&encode(msg)).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_damage_is_refused() {
        let msg = ClientMsg::Query { id: 7, query: Query::Status };
        let bytes = encode(&msg);
        let got: ClientMsg = read(&mut &bytes[..], 1024).await.unwrap().unwrap();
        assert_eq!(got, msg);

        let mut flipped = bytes.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(matches!(
            read::<ClientMsg, _>(&mut &flipped[..], 1024).await,
            Err(FrameError::Wire(WireError::BadChecksum))
        ));

        assert!(matches!(
            read::<ClientMsg, _>(&mut &bytes[..], 2).await,
            Err(FrameError::Wire(WireError::FrameTooLarge { .. }))
        ));

        let garbage = encode(&(250u8, 250u8, 250u8));
        assert!(matches!(
            read::<ClientMsg, _>(&mut &garbage[..], 1024).await,
            Err(FrameError::Wire(WireError::Malformed(_)))
        ));

        assert!(read::<ClientMsg, _>(&mut &[][..], 1024).await.unwrap().is_none());
    }

    /// A header that announces the largest frame allowed and then sends a few bytes and stops:
    /// the read fails as cut short (its buffer grew with what came, never to the announced size).
    #[tokio::test]
    async fn a_frame_cut_short_after_a_huge_header_is_refused() {
        let max: u32 = 512 * 1024 * 1024;
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&max.to_le_bytes());
        bytes.extend_from_slice(&0u32.to_le_bytes());
        bytes.extend_from_slice(&[7; 10]);
        match read::<ClientMsg, _>(&mut &bytes[..], max).await {
            Err(FrameError::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof),
            other => panic!("expected a frame cut short, got {other:?}"),
        }
    }

    /// Every stream message, from both ends, comes back as it was sent; entries are the
    /// ledger's bytes, carried untouched.
    #[tokio::test]
    async fn stream_messages_round_trip() {
        use truba_engine::{
            Audit, Event, Filter, Index, LedgerEntry, SessionBrief, SessionSnapshot, StreamError, TailFrom, Term, What,
        };
        let entry = LedgerEntry {
            index: Index(7),
            term: Term(2),
            audit: Audit { at: truba_engine::UnixMs(1_700_000_000_123), ..Audit::default() },
            events: vec![Event::pipe(What::Noop)],
        };
        let bytes = bytes::Bytes::from(postcard::to_allocvec(&entry).unwrap());
        let brief = SessionBrief {
            status: truba_engine::BriefStatus::Active { delivering: false },
            attempt: truba_engine::Attempt(0),
            failures: 0,
            records: 1,
            bytes: 3,
        };
        let client = [
            ClientMsg::StreamOpen {
                stream: 1,
                open: StreamOpen::Tail {
                    from: TailFrom::Index(Index(5)),
                    filter: Filter { kinds: vec![Kind(1), Kind(2)], internal: true, sessions_only: false },
                },
            },
            ClientMsg::StreamOpen {
                stream: u64::MAX,
                open: StreamOpen::Watch { kinds: vec![], resume_after: Some(Index(9)), window: Some(3) },
            },
            ClientMsg::StreamAck { stream: 1, seq: 42, error: Some("no such account".into()) },
            ClientMsg::StreamAck { stream: 1, seq: 43, error: None },
            ClientMsg::StreamClose { stream: 1 },
        ];
        for msg in client {
            let got: ClientMsg = read(&mut &encode(&msg)[..], 1 << 20).await.unwrap().unwrap();
            assert_eq!(got, msg);
        }
        let server = [
            ServerMsg::Stream {
                stream: 3,
                seq: 1,
                item: StreamItem::Entries { entries: vec![bytes.clone(), bytes.clone()], events: 2, through: Index(8) },
            },
            ServerMsg::Stream { stream: 3, seq: 2, item: StreamItem::Progress { through: Index(9) } },
            ServerMsg::Stream { stream: 3, seq: 3, item: StreamItem::ResyncStart { at: Index(4) } },
            ServerMsg::Stream {
                stream: 3,
                seq: 4,
                item: StreamItem::Resync {
                    sessions: vec![SessionSnapshot {
                        session: truba_engine::SessionId(3),
                        kind: Kind(1),
                        brief,
                        records: vec![b"abc".to_vec()],
                        last_failure: None,
                    }],
                },
            },
            ServerMsg::Stream { stream: 3, seq: 5, item: StreamItem::Synced { at: Index(4) } },
            ServerMsg::Stream {
                stream: 3,
                seq: 6,
                item: StreamItem::End(StreamError::Compacted { requested: Index(1), first_available: Index(3) }),
            },
            ServerMsg::StreamRefused { stream: 3, refusal: StreamRefusal::AckBeyondSent { seq: 9, sent: 6 } },
            ServerMsg::StreamRefused { stream: 4, refusal: StreamRefusal::NotOpen },
            ServerMsg::StreamEnded { stream: 3, reason: StreamEnd::ConnectionBehind { queued_bytes: 10, max: 5 } },
            ServerMsg::StreamEnded { stream: 3, reason: StreamEnd::ShuttingDown },
        ];
        for msg in server {
            let frame = encode(&msg);
            let got: ServerMsg = read(&mut &frame[..], 1 << 20).await.unwrap().unwrap();
            assert_eq!(got, msg);
            // The same through the buffered decoder, fed a byte short and then whole.
            assert_eq!(decode_frame::<ServerMsg>(&frame[..frame.len() - 1], 1 << 20), Ok(None));
            assert_eq!(decode_frame::<ServerMsg>(&frame, 1 << 20), Ok(Some((msg, frame.len()))));
        }
        let ServerMsg::Stream { item: StreamItem::Entries { entries, .. }, .. } = read::<ServerMsg, _>(
            &mut &encode(&ServerMsg::Stream {
                stream: 1,
                seq: 1,
                item: StreamItem::Entries { entries: vec![bytes.clone()], events: 1, through: Index(7) },
            })[..],
            1 << 20,
        )
        .await
        .unwrap()
        .unwrap() else {
            panic!("an entries item")
        };
        assert_eq!(entries[0], bytes, "the entry's bytes are carried as they are");
        assert_eq!(postcard::from_bytes::<LedgerEntry>(&entries[0]).unwrap(), entry);
    }

    #[test]
    fn the_buffered_decoder_refuses_what_read_refuses() {
        let frame = encode(&ClientMsg::StreamClose { stream: 1 });
        let mut flipped = frame.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert_eq!(decode_frame::<ClientMsg>(&flipped, 1024), Err(WireError::BadChecksum));
        assert!(matches!(decode_frame::<ClientMsg>(&frame, 1), Err(WireError::FrameTooLarge { .. })));
        assert_eq!(decode_frame::<ClientMsg>(&frame[..3], 1024), Ok(None));
        let garbage = encode(&(9u8, 250u8, 250u8));
        assert!(matches!(decode_frame::<ClientMsg>(&garbage, 1024), Err(WireError::Malformed(_))));
    }
}
