//! The real server in-process (real TCP on loopback, real files in a temporary directory),
//! driven through the client library and raw sockets.

use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use truba::client::{ClientError, ClientOptions, Pipe};
use truba::config::{Config, KindSection};
use truba::handler::{self, RepeatData};
use truba::net::{Tcp, Transport};
use truba::server::{self, RealEnv};
use truba::wire::{self, ClientMsg, ServerMsg, WireError};
use truba_engine::{KindConfig, Query, RequestError, SessionId, SessionState};

struct Running {
    addr: String,
    stop: Option<oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<Result<(), server::ServerError>>,
}

impl Running {
    async fn stop(mut self) {
        let _ = self.stop.take().expect("running").send(());
        let r = tokio::time::timeout(Duration::from_secs(10), self.done).await.expect("shutdown within 10 s");
        r.expect("server task").expect("clean shutdown");
    }
}

fn config(dir: &std::path::Path, handler: Option<String>) -> Config {
    let mut c = Config { data_dir: dir.to_path_buf(), listen: "127.0.0.1:0".into(), ..Config::default() };
    c.kinds.clear();
    let kind = KindConfig {
        default_delay_s: 1,
        jitter_window_s: 0,
        lease_ms: 60_000,
        record_bytes_max: 4096,
        ..Default::default()
    };
    c.kinds.insert(1, KindSection { handler, config: kind });
    c.server.handler_timeout_ms = 2_000;
    c
}

async fn start(mut c: Config) -> Running {
    let listener = server::bind(&Tcp, "127.0.0.1:0").await.unwrap();
    let addr = Tcp.local_addr(&listener).unwrap().to_string();
    c.listen = addr.clone();
    let fs = truba::disk::DirFs::open(&c.data_dir).unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let done = tokio::spawn(server::run(c, RealEnv, Arc::new(fs), listener, async {
        let _ = stopped.await;
    }));
    Running { addr, stop: Some(stop), done }
}

fn options() -> ClientOptions {
    ClientOptions { request_timeout: Duration::from_secs(2), retry_for: Duration::from_secs(10), ..Default::default() }
}

async fn pipe(addr: &str) -> Pipe {
    Pipe::connect_with(Tcp, vec![addr.to_string()], options()).await.unwrap()
}

/// Records every delivery it gets, then deletes the session.
struct Recorder(mpsc::UnboundedSender<(u64, u32, Vec<Vec<u8>>)>);

impl handler::Handler for Recorder {
    async fn handle(&self, data: RepeatData) -> Result<(), String> {
        let h = data.session.handle();
        let _ = self.0.send((h.session.0, h.attempt.0, data.records.clone()));
        data.session.delete().await.map_err(|e| e.to_string())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_session_reaches_its_handler_which_finishes_it() {
    let dir = tempfile::tempdir().unwrap();
    let handler_listener = Tcp.bind("127.0.0.1:0").await.unwrap();
    let handler_addr = Tcp.local_addr(&handler_listener).unwrap().to_string();
    let (tx, mut deliveries) = mpsc::unbounded_channel();
    tokio::spawn(handler::serve_with(Tcp, handler_listener, Recorder(tx)));
    let server = start(config(dir.path(), Some(handler_addr))).await;
    let p = pipe(&server.addr).await;

    let mut s = p.new_with(1, b"reserve".to_vec()).await.unwrap();
    s.append(b"charge".to_vec()).await.unwrap();
    s.replace(b"charged".to_vec()).await.unwrap();
    s.append(b"ship".to_vec()).await.unwrap();
    let id = s.id();
    let view = p.get(id).await.unwrap();
    assert_eq!(view.records, vec![b"charged".to_vec(), b"ship".to_vec()]);
    let due = s.store(0).await.unwrap();
    assert!(due.0 > 1_700_000_000, "a repeat time in unix seconds");

    let (sid, attempt, records) =
        tokio::time::timeout(Duration::from_secs(10), deliveries.recv()).await.expect("delivered in time").unwrap();
    assert_eq!((sid, attempt), (id.0, 1));
    assert_eq!(records, vec![b"charged".to_vec(), b"ship".to_vec()]);
    // The handler deleted it: the session is gone for good.
    let deleted = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match p.get(id).await {
                Err(ClientError::Refused(RequestError::SessionDeleted(_))) => break,
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    });
    deleted.await.expect("the handler's delete lands");
    // The old handle is fenced off.
    let stale = p.session(truba_engine::Handle { session: id, attempt: truba_engine::Attempt(0) });
    assert!(matches!(stale.delete().await, Err(ClientError::Refused(RequestError::SessionDeleted(_)))));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_handler_never_loses_the_session() {
    let dir = tempfile::tempdir().unwrap();
    // A port nothing listens on.
    let nobody = Tcp.bind("127.0.0.1:0").await.unwrap();
    let nobody_addr = Tcp.local_addr(&nobody).unwrap().to_string();
    drop(nobody);
    let server = start(config(dir.path(), Some(nobody_addr))).await;
    let p = pipe(&server.addr).await;
    let mut s = p.new(1).await.unwrap();
    s.append(b"work".to_vec()).await.unwrap();
    let id = s.id();
    s.store(0).await.unwrap();
    // Each failed push stores it again (default delay 1 s): the attempt climbs, the records stay.
    let redelivered = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let v = p.get(id).await.unwrap();
            if v.handle.attempt.0 >= 2 {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let v = redelivered.await.expect("redelivery attempts continue");
    assert_eq!(v.records, vec![b"work".to_vec()]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bytes_are_refused_and_other_clients_carry_on() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path(), None)).await;
    let p = pipe(&server.addr).await;
    let mut s = p.new(1).await.unwrap();

    // Garbage: a frame whose checksum does not match.
    let mut raw = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    raw.write_all(&[5, 0, 0, 0, 1, 2, 3, 4, 9, 9, 9, 9, 9]).await.unwrap();
    let reply: Option<ServerMsg> = wire::read(&mut raw, 1 << 20).await.unwrap();
    assert_eq!(reply, Some(ServerMsg::Error { error: WireError::BadChecksum }));
    let mut rest = Vec::new();
    assert_eq!(raw.read_to_end(&mut rest).await.unwrap(), 0, "then the connection is closed");

    // An oversized frame header.
    let mut raw = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    raw.write_all(&u32::MAX.to_le_bytes()).await.unwrap();
    raw.write_all(&[0; 4]).await.unwrap();
    let reply: Option<ServerMsg> = wire::read(&mut raw, 1 << 20).await.unwrap();
    assert!(matches!(reply, Some(ServerMsg::Error { error: WireError::FrameTooLarge { .. } })), "{reply:?}");

    // A well-formed frame of an unknown message type.
    let mut raw = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    raw.write_all(&wire::encode(&(77u32, 1u8))).await.unwrap();
    let reply: Option<ServerMsg> = wire::read(&mut raw, 1 << 20).await.unwrap();
    assert!(matches!(reply, Some(ServerMsg::Error { error: WireError::Malformed(_) })), "{reply:?}");

    // A record over the kind's limit: a typed refusal that changes nothing.
    let before = p.get(s.id()).await.unwrap();
    let e = s.append(vec![0u8; 5000]).await.unwrap_err();
    assert!(e.is_limit(), "{e}");
    assert_eq!(p.get(s.id()).await.unwrap(), before);

    // Meanwhile the good client is unaffected.
    s.append(b"still here".to_vec()).await.unwrap();
    assert_eq!(p.get(s.id()).await.unwrap().records, vec![b"still here".to_vec()]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path(), None);
    c.server.connections_max = 2;
    let server = start(c).await;
    let a = pipe(&server.addr).await;
    let _b = pipe(&server.addr).await;
    a.status().await.unwrap(); // both connections are registered by now
    let mut third = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    let reply: Option<ServerMsg> = wire::read(&mut third, 1 << 20).await.unwrap();
    assert_eq!(reply, Some(ServerMsg::Error { error: WireError::TooManyConnections { max: 2 } }));
    a.status().await.unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_on_the_same_directory_keeps_everything_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path(), None);
    c.engine.snapshot_every_entries = 50;
    c.engine.segment_bytes_max = 4096;
    let server = start(c.clone()).await;
    let p = pipe(&server.addr).await;
    let mut expected = Vec::new();
    for i in 0..20u32 {
        let mut s = p.new(1).await.unwrap();
        let records: Vec<Vec<u8>> = (0..i % 7).map(|j| format!("s{i}-r{j}").into_bytes()).collect();
        for r in &records {
            s.append(r.clone()).await.unwrap();
        }
        let id = s.id();
        if i % 3 == 0 {
            s.delete().await.unwrap();
            expected.push((id, None));
        } else {
            expected.push((id, Some(records)));
        }
    }
    let before = p.status().await.unwrap().engine;
    let hash = before.state_hash;
    drop(p);
    server.stop().await;

    let server = start(c).await;
    let p = pipe(&server.addr).await;
    // Until recovery is done a session query is refused as not ready (and retried by the client).
    // Then it leads a new term, whose first entry is a no-op: everything before it is the same.
    let mut after = p.status().await.unwrap().engine;
    for _ in 0..1000 {
        if after.serving && after.applied > before.applied {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        after = p.status().await.unwrap().engine;
    }
    assert_eq!(after.applied, before.applied.next(), "the same log after restart, plus the new term's no-op");
    assert_eq!(after.term.0, before.term.0 + 1);
    assert_ne!(after.state_hash, hash, "the state hash covers the applied index");
    for (id, records) in expected {
        match records {
            None => assert!(matches!(p.get(id).await, Err(ClientError::Refused(RequestError::SessionDeleted(_))))),
            Some(r) => {
                let v = p.get(id).await.unwrap();
                assert_eq!(v.records, r);
                assert!(matches!(v.state, SessionState::Active { .. }));
            }
        }
    }
    assert!(p.get(SessionId(10_000)).await.unwrap_err().is_unknown());
    // Queries work on a raw connection too.
    let mut raw = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    wire::write(&mut raw, &ClientMsg::Query { id: 5, query: Query::Status }).await.unwrap();
    let reply: Option<ServerMsg> = wire::read(&mut raw, 1 << 20).await.unwrap();
    assert!(matches!(reply, Some(ServerMsg::QueryReply { id: 5, .. })), "{reply:?}");
    server.stop().await;
}
