//! The network protocol: postcard-encoded messages, each framed as
//! `len u32 LE | crc32 u32 LE | payload`, where the crc covers the payload.
//!
//! Clients send [`ClientMsg`] and receive [`ServerMsg`]. The pipe pushes deliveries to handlers
//! with [`PipeToHandler`] and hears back [`HandlerToPipe`]. Members of a cluster exchange
//! [`PeerFrame`]s. A peer that sends a frame that is too
//! large, fails its checksum or does not decode gets an [`ServerMsg::Error`] and is disconnected.

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use truba_engine::{
    ClientId, Handle, Kind, Message, Outcome, Query, QueryReply, ReplicaId, Request, Seq, StatusView, UnixSecs,
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
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerMsg {
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
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerStatus {
    pub version: String,
    pub engine: StatusView,
    pub disk_bytes: u64,
    pub connections: u32,
    pub role: String,
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

/// Reads one frame and decodes it. `Ok(None)` at a clean end of stream (between frames).
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
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload).await?;
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
}
