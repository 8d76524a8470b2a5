//! The real server in-process (real TCP on loopback, real files in a temporary directory),
//! driven through the client library and raw sockets.

#[allow(dead_code)] // each test file uses part of the shared harness
mod common;

use common::truba_cli as truba;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use truba::client::{ClientError, ClientOptions, Pipe, Redriven};
use truba::config::{Config, KindSection};
use truba::handler::{self, RepeatData};
use truba::net::{Tcp, Transport};
use truba::server::{self, RealEnv};
use truba::wire::{self, ClientMsg, ServerMsg, WireError};
use truba_engine::{FailureReason, Kind, KindConfig, Query, RequestError, SessionId, SessionState, SessionView};

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
    let listener = server::bind(&truba::net::RealNet::plain(), "127.0.0.1:0").await.unwrap();
    let addr = truba::net::RealNet::plain().local_addr(&listener).unwrap().to_string();
    c.listen = addr.clone();
    let fs = truba::disk::DirFs::open(&c.data_dir).unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let done = tokio::spawn(server::run(c, RealEnv::default(), Arc::new(fs), listener, async {
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
    // Each failed push stores it again (backoff of 1 s): the attempt climbs, the records stay.
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
    let mut raw = raw_connect(&server.addr).await;
    raw.write_all(&[5, 0, 0, 0, 1, 2, 3, 4, 9, 9, 9, 9, 9]).await.unwrap();
    let reply: Option<ServerMsg> = wire::read(&mut raw, 1 << 20).await.unwrap();
    assert_eq!(reply, Some(ServerMsg::Error { error: WireError::BadChecksum }));
    let mut rest = Vec::new();
    assert_eq!(raw.read_to_end(&mut rest).await.unwrap(), 0, "then the connection is closed");

    // An oversized frame header.
    let mut raw = raw_connect(&server.addr).await;
    raw.write_all(&u32::MAX.to_le_bytes()).await.unwrap();
    raw.write_all(&[0; 4]).await.unwrap();
    let reply: Option<ServerMsg> = wire::read(&mut raw, 1 << 20).await.unwrap();
    assert!(matches!(reply, Some(ServerMsg::Error { error: WireError::FrameTooLarge { .. } })), "{reply:?}");

    // A well-formed frame of an unknown message type.
    let mut raw = raw_connect(&server.addr).await;
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
    let mut raw = raw_connect(&server.addr).await;
    wire::write(&mut raw, &ClientMsg::Query { id: 5, query: Query::Status }).await.unwrap();
    let reply: Option<ServerMsg> = wire::read(&mut raw, 1 << 20).await.unwrap();
    assert!(matches!(reply, Some(ServerMsg::QueryReply { id: 5, .. })), "{reply:?}");
    server.stop().await;
}

/// Fails every delivery with "boom" until `ok` is set; then deletes each session it gets.
struct Switch {
    ok: Arc<AtomicBool>,
    seen: mpsc::UnboundedSender<(u64, u32)>,
}

impl handler::Handler for Switch {
    async fn handle(&self, data: RepeatData) -> Result<(), String> {
        let h = data.session.handle();
        let _ = self.seen.send((h.session.0, h.attempt.0));
        if !self.ok.load(Ordering::SeqCst) {
            return Err("boom".into());
        }
        data.session.delete().await.map_err(|e| e.to_string())
    }
}

/// A `Switch` handler on a port of its own: its address, its switch and what it was handed.
async fn switch_handler() -> (String, Arc<AtomicBool>, mpsc::UnboundedReceiver<(u64, u32)>) {
    let listener = Tcp.bind("127.0.0.1:0").await.unwrap();
    let addr = Tcp.local_addr(&listener).unwrap().to_string();
    let ok = Arc::new(AtomicBool::new(false));
    let (seen, rx) = mpsc::unbounded_channel();
    tokio::spawn(handler::serve_with(Tcp, listener, Switch { ok: ok.clone(), seen }));
    (addr, ok, rx)
}

/// Kind 1 gives up after `max_attempts` failed deliveries, 1 s apart, without jitter.
fn dead_letter_config(dir: &std::path::Path, handler: Option<String>, max_attempts: u32) -> Config {
    let mut c = config(dir, handler);
    let kind = &mut c.kinds.get_mut(&1).unwrap().config;
    kind.max_attempts = max_attempts;
    kind.backoff_base_s = 1;
    kind.backoff_cap_s = 1;
    kind.jitter_window_s = 0;
    c
}

/// An address nothing listens on.
async fn nobody() -> String {
    let l = Tcp.bind("127.0.0.1:0").await.unwrap();
    Tcp.local_addr(&l).unwrap().to_string()
}

/// Polls the session until `done` says so, for at most 20 s.
async fn wait_for(p: &Pipe, id: SessionId, what: &str, done: impl Fn(&Result<SessionView, ClientError>) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let r = p.get(id).await;
        if done(&r) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "session {id}: still not {what} after 20 s: {r:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn is_dead(r: &Result<SessionView, ClientError>) -> bool {
    matches!(r, Ok(SessionView { state: SessionState::Dead { .. }, .. }))
}

fn is_deleted(r: &Result<SessionView, ClientError>) -> bool {
    matches!(r, Err(e) if e.is_deleted())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_handler_dead_letters_the_session_and_a_redrive_brings_it_back() {
    let dir = tempfile::tempdir().unwrap();
    let (handler_addr, ok, mut seen) = switch_handler().await;
    let server = start(dead_letter_config(dir.path(), Some(handler_addr), 3)).await;
    let p = pipe(&server.addr).await;

    let mut s = p.new_with(1, b"step 1".to_vec()).await.unwrap();
    let id = s.id();
    let old = s.handle();
    p.session(old).store(0).await.unwrap();
    wait_for(&p, id, "dead", is_dead).await;

    let v = p.get(id).await.unwrap();
    assert_eq!((v.deliveries, v.failures, v.handle.attempt.0), (3, 3, 3));
    match &v.last_failure {
        Some(FailureReason::Handler(m)) => assert!(m.contains("boom"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(v.records, vec![b"step 1".to_vec()]);
    let attempts: Vec<(u64, u32)> = std::iter::from_fn(|| seen.try_recv().ok()).collect();
    assert_eq!(attempts, vec![(id.0, 1), (id.0, 2), (id.0, 3)], "three deliveries, then no more");

    let page = p.dead_page(1, None, 100).await.unwrap();
    assert_eq!(page.total, 1);
    assert_eq!(page.sessions.len(), 1);
    let d = &page.sessions[0];
    assert_eq!((d.id, d.deliveries, d.failures, d.records, d.bytes), (id, 3, 3, 1, 6));
    assert_eq!(d.last_failure, v.last_failure);
    assert_eq!(p.status().await.unwrap().engine.sessions_dead, 1);

    // Neither the creator's handle nor the last delivery's moves a dead session.
    let e = s.append(b"late".to_vec()).await.unwrap_err();
    assert!(e.is_dead() || e.is_stale(), "{e}");
    let mut current = p.session(v.handle);
    let e = current.append(b"late".to_vec()).await.unwrap_err();
    assert!(e.is_dead(), "{e}");
    assert_eq!(p.get(id).await.unwrap().records, vec![b"step 1".to_vec()], "refusals change nothing");

    // A redrive of anything but a dead session is refused.
    let live = p.new(1).await.unwrap();
    let e = p.redrive_session(live.id()).await.unwrap_err();
    assert_eq!(e, ClientError::Refused(RequestError::NotDead(live.id())));
    assert!(p.redrive_session(SessionId(1_000_000)).await.unwrap_err().is_unknown());
    assert_eq!(
        p.redrive_kind(9).await.unwrap_err(),
        ClientError::Refused(RequestError::UnknownKind(truba_engine::Kind(9)))
    );

    // The handler recovers; the redriven session goes out at once and is finished.
    ok.store(true, Ordering::SeqCst);
    assert_eq!(p.redrive_session(id).await.unwrap(), Redriven { count: 1, remaining: 0 });
    wait_for(&p, id, "deleted", is_deleted).await;
    let next = tokio::time::timeout(Duration::from_secs(1), seen.recv()).await.unwrap().unwrap();
    assert_eq!(next, (id.0, 4), "one more delivery, at the next attempt");
    assert_eq!(p.dead_page(1, None, 100).await.unwrap().total, 0);
    assert_eq!(p.status().await.unwrap().engine.sessions_dead, 0);
    assert!(p.redrive_session(id).await.unwrap_err().is_deleted());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_or_missing_handler_is_recorded_as_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = dead_letter_config(dir.path(), Some(nobody().await), 1);
    // Kind 2 has no handler at all.
    let no_handler = c.kinds[&1].config.clone();
    c.kinds.insert(2, KindSection { handler: None, config: no_handler });
    let server = start(c).await;
    let p = pipe(&server.addr).await;

    let mut ids = Vec::new();
    for kind in [1, 2] {
        let s = p.new_with(kind, b"work".to_vec()).await.unwrap();
        ids.push(s.id());
        s.store(0).await.unwrap();
    }
    for (kind, id) in [1, 2].into_iter().zip(ids) {
        wait_for(&p, id, "dead", is_dead).await;
        let v = p.get(id).await.unwrap();
        assert_eq!((v.deliveries, v.failures), (1, 1), "max_attempts = 1: one failed delivery is enough");
        match &v.last_failure {
            Some(FailureReason::Unreachable(m)) if kind == 2 => assert!(m.contains("no handler"), "{m}"),
            Some(FailureReason::Unreachable(m)) => assert!(m.contains("connect"), "{m}"),
            other => panic!("kind {kind}: {other:?}"),
        }
        let page = p.dead_page(kind, None, 10).await.unwrap();
        assert_eq!(page.sessions.iter().map(|d| d.id).collect::<Vec<_>>(), vec![id]);
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kind_is_listed_page_by_page_and_redriven_batch_by_batch() {
    let dir = tempfile::tempdir().unwrap();
    let (handler_addr, ok, _seen) = switch_handler().await;
    let mut c = dead_letter_config(dir.path(), Some(handler_addr), 1);
    c.engine.redrive_batch_max = 2;
    let server = start(c).await;
    let p = pipe(&server.addr).await;

    let mut ids = Vec::new();
    for i in 0..5u8 {
        let s = p.new_with(1, vec![b'a' + i]).await.unwrap();
        ids.push(s.id());
        s.store(0).await.unwrap();
    }
    for id in &ids {
        wait_for(&p, *id, "dead", is_dead).await;
    }
    assert_eq!(p.status().await.unwrap().engine.sessions_dead, 5);

    // Pages of two, oldest first, each starting after the last id of the one before.
    let mut listed = Vec::new();
    let mut after = None;
    loop {
        let page = p.dead_page(1, after, 2).await.unwrap();
        assert_eq!(page.total, 5);
        assert!(page.sessions.len() <= 2);
        let Some(last) = page.sessions.last() else { break };
        after = Some(last.id);
        listed.extend(page.sessions.iter().map(|d| d.id));
    }
    let all = p.dead_page(1, None, 100).await.unwrap();
    let oldest_first: Vec<SessionId> = all.sessions.iter().map(|d| d.id).collect();
    assert!(all.sessions.windows(2).all(|w| (w[0].since, w[0].id) < (w[1].since, w[1].id)), "oldest first");
    assert_eq!(listed, oldest_first);
    let mut sorted = listed.clone();
    sorted.sort();
    assert_eq!(sorted, ids, "every dead session once");
    match p.dead_page(2, None, 10).await {
        Err(ClientError::Refused(RequestError::UnknownKind(k))) => assert_eq!(k, Kind(2)),
        other => panic!("listing an unconfigured kind: {other:?}"),
    }
    // A page cannot go on from a session that is no longer dead (here: one that never was).
    let alive = p.new(1).await.unwrap().id();
    match p.dead_page(1, Some(alive), 10).await {
        Err(ClientError::Refused(RequestError::NotDead(id))) => assert_eq!(id, alive),
        other => panic!("paging after a live session: {other:?}"),
    }

    ok.store(true, Ordering::SeqCst);
    let mut batches = Vec::new();
    loop {
        let r = p.redrive_kind(1).await.unwrap();
        batches.push(r);
        if r.remaining == 0 || r.count == 0 {
            break;
        }
    }
    assert_eq!(
        batches,
        vec![
            Redriven { count: 2, remaining: 3 },
            Redriven { count: 2, remaining: 1 },
            Redriven { count: 1, remaining: 0 }
        ]
    );
    for id in &ids {
        wait_for(&p, *id, "deleted", is_deleted).await;
    }
    assert_eq!(p.dead_page(1, None, 100).await.unwrap().total, 0);
    assert_eq!(p.redrive_kind(1).await.unwrap(), Redriven { count: 0, remaining: 0 });
    server.stop().await;
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_line_lists_shows_and_redrives_dead_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let (handler_addr, ok, _seen) = switch_handler().await;
    let mut c = dead_letter_config(dir.path(), Some(handler_addr), 1);
    c.engine.redrive_batch_max = 1;
    let server = start(c).await;
    let addr = server.addr.as_str();
    let p = pipe(addr).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let s = p.new_with(1, b"job".to_vec()).await.unwrap();
        ids.push(s.id().0);
        s.store(0).await.unwrap();
    }
    for id in &ids {
        wait_for(&p, SessionId(*id), "dead", is_dead).await;
    }
    let live = p.new(1).await.unwrap();

    // Oldest death first: the sessions' deliveries run concurrently, so that is not id order.
    let (rc, out, _) = truba(addr, &["dead", "list", "--kind", "1", "--json"]).await;
    assert_eq!(rc, 0);
    let v = json(&out);
    assert_eq!(v["total"], 3);
    assert_eq!(v["next_after"], serde_json::Value::Null);
    let order: Vec<u64> = v["sessions"].as_array().unwrap().iter().map(|d| d["session"].as_u64().unwrap()).collect();
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(sorted, ids);
    assert_eq!(v["sessions"][0]["last_failure"], serde_json::json!({"type": "handler", "message": "boom"}));

    let (rc, out, err) = truba(addr, &["dead", "list", "--kind", "1"]).await;
    assert_eq!(rc, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 5, "header, three sessions, footer: {out}");
    for (line, id) in lines[1..4].iter().zip(&order) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(fields[0], id.to_string(), "{line}");
        assert_eq!(&fields[2..6], &["1", "1", "1", "3"], "deliveries, failures, records, bytes: {line}");
        assert!(line.ends_with("the handler failed: boom"), "{line}");
    }
    assert_eq!(lines[4], "3 of 3 dead sessions of kind 1");
    let (rc, out, _) = truba(addr, &["dead", "list", "--kind", "1", "--limit", "2"]).await;
    assert_eq!(rc, 0);
    assert!(out.ends_with(&format!("2 of 3 dead sessions of kind 1 (next page: --after {})\n", order[1])), "{out}");
    let (_, out, _) = truba(addr, &["dead", "list", "--kind", "1", "--after", &order[1].to_string()]).await;
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(lines[1].trim_start().starts_with(&format!("{} ", order[2])), "{out}");

    // `get` and `status` show the failures and the dead count.
    let (rc, out, _) = truba(addr, &["get", &ids[0].to_string(), "--json"]).await;
    assert_eq!(rc, 0);
    let v = json(&out);
    assert_eq!(
        (v["state"].as_str(), v["deliveries"].as_u64(), v["failures"].as_u64()),
        (Some("dead"), Some(1), Some(1))
    );
    assert_eq!(v["last_failure"]["type"], "handler");
    let (_, out, _) = truba(addr, &["get", &ids[0].to_string()]).await;
    assert!(out.contains("deliveries 1  failures in a row 1  last failure: the handler failed: boom"), "{out}");
    // A handle works too, as in every other command; an old attempt gets a note, not a refusal.
    let (rc, by_handle, _) = truba(addr, &["get", &format!("{}@1", ids[0])]).await;
    assert_eq!((rc, &by_handle), (0, &out));
    let (rc, _, err) = truba(addr, &["get", &format!("{}@9", ids[0])]).await;
    assert_eq!(rc, 0);
    assert!(err.contains(&format!("session {} is at attempt 1 now, not 9", ids[0])), "{err}");
    let (rc, _, err) = truba(addr, &["get", "7@x"]).await;
    assert_eq!((rc, err.as_str()), (1, "truba: bad attempt in `7@x`\n"));
    let (_, out, _) = truba(addr, &["status"]).await;
    assert!(out.contains("dead 3"), "{out}");
    let (_, out, _) = truba(addr, &["status", "--json"]).await;
    assert_eq!(json(&out)["sessions_dead"], 3);

    // `dead show` shows dead sessions only.
    let (rc, out, _) = truba(addr, &["dead", "show", &ids[0].to_string()]).await;
    assert_eq!(rc, 0);
    assert!(out.starts_with(&format!("session {}  kind 1  attempt 1  dead", ids[0])), "{out}");
    let (rc, out, err) = truba(addr, &["dead", "show", &live.id().0.to_string()]).await;
    assert_eq!((rc, out.as_str()), (1, ""));
    assert_eq!(err, format!("truba: session {} is not dead: it is active\n", live.id().0));

    // Redrive one, then the rest of the kind a batch (of one) at a time.
    ok.store(true, Ordering::SeqCst);
    let (rc, out, err) = truba(addr, &["dead", "redrive", &ids[0].to_string()]).await;
    assert_eq!(rc, 0, "{err}");
    assert_eq!(out, format!("redriven session {}; 2 sessions of its kind still dead\n", ids[0]));
    let (rc, out, err) = truba(addr, &["dead", "redrive", "--kind", "1"]).await;
    assert_eq!(rc, 0, "{err}");
    assert_eq!(err, "redriven 1, 1 still dead\nredriven 1, 0 still dead\n");
    assert_eq!(out, "redriven 2 sessions of kind 1\n");
    for id in &ids {
        wait_for(&p, SessionId(*id), "deleted", is_deleted).await;
    }
    let (_, out, _) = truba(addr, &["dead", "list", "--kind", "1"]).await;
    assert_eq!(out, "0 of 0 dead sessions of kind 1\n");

    // Errors: one line, non-zero exit.
    let (rc, _, err) = truba(addr, &["dead", "redrive", &live.id().0.to_string()]).await;
    assert_eq!((rc, err), (1, format!("truba: refused: session {} is not in a dead-letter set\n", live.id().0)));
    let (rc, _, err) = truba(addr, &["dead", "redrive", "--kind", "7"]).await;
    assert_eq!((rc, err.as_str()), (1, "truba: refused: unknown kind 7\n"));
    let (rc, _, err) = truba(addr, &["dead", "redrive"]).await;
    assert_eq!(rc, 2, "neither a session nor a kind: {err}");

    // keep-alive renews a live session's lease; a dead session refuses it.
    let (rc, out, err) = truba(addr, &["keep-alive", &live.id().0.to_string()]).await;
    assert_eq!((rc, out.as_str()), (0, "ok\n"), "{err}");

    // A poison session is dropped, never delivered again; a live one cannot be.
    ok.store(false, Ordering::SeqCst);
    let poison = p.new_with(1, b"poison".to_vec()).await.unwrap();
    let poison_id = poison.id();
    poison.store(0).await.unwrap();
    wait_for(&p, poison_id, "dead", is_dead).await;
    let (rc, _, err) = truba(addr, &["keep-alive", &format!("{}@1", poison_id.0)]).await;
    let refusal = format!(
        "truba: refused: session {} is in its kind's dead-letter set; an operator may redrive it\n",
        poison_id.0
    );
    assert_eq!((rc, err), (1, refusal));
    let (rc, out, err) = truba(addr, &["dead", "drop", &poison_id.0.to_string()]).await;
    assert_eq!((rc, out), (0, format!("dropped dead session {}\n", poison_id.0)), "{err}");
    assert!(is_deleted(&p.get(poison_id).await));
    let (rc, _, err) = truba(addr, &["dead", "drop", &live.id().0.to_string()]).await;
    assert_eq!((rc, err), (1, format!("truba: refused: session {} is not in a dead-letter set\n", live.id().0)));
    server.stop().await;
}

/// Works for 2 s on each delivery, longer than the kind's 700 ms lease, renewing the lease every
/// 200 ms if `renew`; then deletes the session and reports the attempt and how that went.
struct LongJob {
    renew: bool,
    seen: mpsc::UnboundedSender<(u32, Result<(), String>)>,
}

impl handler::Handler for LongJob {
    async fn handle(&self, data: RepeatData) -> Result<(), String> {
        let lease = self.renew.then(|| data.session.keep_alive_every(Duration::from_millis(200)));
        tokio::time::sleep(Duration::from_secs(2)).await;
        drop(lease);
        let attempt = data.session.handle().attempt.0;
        let result = data.session.delete().await.map_err(|e| e.to_string());
        let _ = self.seen.send((attempt, result.clone()));
        result
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_job_that_renews_its_lease_is_not_redelivered_under_its_feet() {
    for renew in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let listener = Tcp.bind("127.0.0.1:0").await.unwrap();
        let handler_addr = Tcp.local_addr(&listener).unwrap().to_string();
        let (seen, mut done) = mpsc::unbounded_channel();
        let handler = tokio::spawn(handler::serve_with(Tcp, listener, LongJob { renew, seen }));
        let mut c = dead_letter_config(dir.path(), Some(handler_addr), 0);
        c.kinds.get_mut(&1).unwrap().config.lease_ms = 700;
        let server = start(c).await;
        let p = pipe(&server.addr).await;
        let s = p.new_with(1, b"long job".to_vec()).await.unwrap();
        let id = s.id();
        s.store(0).await.unwrap();
        let (attempt, result) = tokio::time::timeout(Duration::from_secs(10), done.recv()).await.unwrap().unwrap();
        if renew {
            assert_eq!((attempt, result), (1, Ok(())), "renewed: the first delivery finishes the job");
            wait_for(&p, id, "deleted", is_deleted).await;
        } else {
            assert_eq!(attempt, 1);
            let refused = result.expect_err("without renewals the lease runs out mid-job and the delete is fenced");
            assert!(refused.contains("stale") || refused.contains("stored"), "{refused}");
            let v = p.get(id).await.unwrap();
            assert!(v.deliveries >= 2, "redelivered meanwhile: {v:?}");
            assert_eq!(v.last_failure, Some(FailureReason::LeaseExpired));
        }
        server.stop().await;
        handler.abort();
    }
}

/// A raw connection to the server, past the `Hello` every client connection opens with.
async fn raw_connect(addr: &str) -> tokio::net::TcpStream {
    let mut raw = tokio::net::TcpStream::connect(addr).await.unwrap();
    let hello: Option<ServerMsg> = wire::read(&mut raw, 1 << 20).await.unwrap();
    assert!(matches!(hello, Some(ServerMsg::Hello { .. })), "{hello:?}");
    raw
}
