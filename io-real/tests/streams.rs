//! The reading side over the network, on the real server in-process (real TCP on loopback, real
//! files in a temporary directory): stream messages at the edge (bad ones refused, changing
//! nothing), tails, watches and consumers through the client library, and the command line.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use truba::client::{ClientError, ClientOptions, Consumer, Pipe, Records, TailItem, WatchItem, WatchOptions};
use truba::config::{Config, KindSection};
use truba::net::{Tcp, Transport};
use truba::server::{self, RealEnv};
use truba::wire::{self, ClientMsg, ServerMsg, StreamEnd, StreamRefusal, WireError};
use truba_engine::{
    CommitOp, Filter, Index, Kind, KindConfig, LedgerEntry, Reply, RequestError, SessionId, StreamError, StreamItem,
    StreamOpen, TailFrom,
};

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

fn config(dir: &std::path::Path) -> Config {
    let mut c = Config { data_dir: dir.to_path_buf(), listen: "127.0.0.1:0".into(), ..Config::default() };
    c.kinds.clear();
    for kind in [1, 2] {
        let config = KindConfig { jitter_window_s: 0, lease_ms: 60_000, record_bytes_max: 4096, ..Default::default() };
        c.kinds.insert(kind, KindSection { handler: None, config });
    }
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

/// A raw client connection speaking the wire protocol.
struct Raw(TcpStream);

impl Raw {
    /// Connects and reads the `Hello` every client connection opens with.
    async fn connect(addr: &str) -> Raw {
        let mut raw = Raw(TcpStream::connect(addr).await.unwrap());
        let hello = raw.recv().await;
        assert!(matches!(hello, Some(ServerMsg::Hello { .. })), "{hello:?}");
        raw
    }

    async fn send(&mut self, msg: &ClientMsg) {
        wire::write(&mut self.0, msg).await.unwrap();
    }

    /// The next message, within 5 s (`None`: the server closed the connection).
    async fn recv(&mut self) -> Option<ServerMsg> {
        tokio::time::timeout(Duration::from_secs(5), wire::read(&mut self.0, 64 << 20))
            .await
            .expect("an answer within 5 s")
            .unwrap_or(None)
    }

    /// Nothing arrives within `d`.
    async fn quiet(&mut self, d: Duration) -> bool {
        let mut byte = [0u8; 1];
        tokio::time::timeout(d, self.0.peek(&mut byte)).await.is_err()
    }
}

/// A tail from the head's first item: a progress mark that says where the head is (the stream
/// is open: `true`), or the refusal for want of a place (`false`).
async fn opened_from_head(c: &mut Raw, n: u64) -> bool {
    match c.recv().await {
        Some(ServerMsg::Stream { stream, seq: 1, item: StreamItem::Progress { .. } }) if stream == n => true,
        Some(ServerMsg::Stream { stream, seq: 1, item: StreamItem::End(StreamError::TooManyStreams { .. }) })
            if stream == n =>
        {
            false
        }
        other => panic!("stream {n} from the head: expected a progress mark or a refusal, got {other:?}"),
    }
}

fn tail_all(from: TailFrom) -> StreamOpen {
    StreamOpen::Tail { from, filter: Filter { kinds: vec![], internal: true, sessions_only: false } }
}

async fn sessions(p: &Pipe, kind: u32, n: usize) -> Vec<SessionId> {
    let mut ids = Vec::new();
    for i in 0..n {
        let mut s = p.new_with(kind, format!("first {i}").into_bytes()).await.unwrap();
        s.append(format!("second {i}").into_bytes()).await.unwrap();
        ids.push(s.id());
    }
    ids
}

// ---------------------------------------------------------------------------------------------
// At the edge.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_stream_messages_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    let p = pipe(&server.addr).await;
    sessions(&p, 1, 3).await;
    let mut raw = Raw::connect(&server.addr).await;

    // An acknowledgement or a close of a stream that is not open.
    raw.send(&ClientMsg::StreamAck { stream: 9, seq: 1, error: None }).await;
    assert_eq!(raw.recv().await, Some(ServerMsg::StreamRefused { stream: 9, refusal: StreamRefusal::NotOpen }));
    raw.send(&ClientMsg::StreamClose { stream: 9 }).await;
    assert_eq!(raw.recv().await, Some(ServerMsg::StreamRefused { stream: 9, refusal: StreamRefusal::NotOpen }));

    // A window of 0.
    let zero = StreamOpen::Watch { kinds: vec![], resume_after: None, window: Some(0) };
    raw.send(&ClientMsg::StreamOpen { stream: 2, open: zero }).await;
    assert_eq!(raw.recv().await, Some(ServerMsg::StreamRefused { stream: 2, refusal: StreamRefusal::ZeroWindow }));

    // A stream, and the same number again: refused, and the first goes on.
    raw.send(&ClientMsg::StreamOpen { stream: 1, open: tail_all(TailFrom::Index(Index(1))) }).await;
    let Some(ServerMsg::Stream { stream: 1, seq: 1, item: StreamItem::Entries { through, .. } }) = raw.recv().await
    else {
        panic!("the tail's first item")
    };
    raw.send(&ClientMsg::StreamOpen { stream: 1, open: tail_all(TailFrom::Next) }).await;
    assert_eq!(raw.recv().await, Some(ServerMsg::StreamRefused { stream: 1, refusal: StreamRefusal::AlreadyOpen }));
    // An acknowledgement of items never sent.
    raw.send(&ClientMsg::StreamAck { stream: 1, seq: 5, error: None }).await;
    let refusal = StreamRefusal::AckBeyondSent { seq: 5, sent: 1 };
    assert_eq!(raw.recv().await, Some(ServerMsg::StreamRefused { stream: 1, refusal }));
    // An unknown kind, refused by the engine as the stream's one item.
    let unknown =
        StreamOpen::Tail { from: TailFrom::Next, filter: Filter { kinds: vec![Kind(7)], ..Filter::default() } };
    raw.send(&ClientMsg::StreamOpen { stream: 3, open: unknown }).await;
    let ended = ServerMsg::Stream { stream: 3, seq: 1, item: StreamItem::End(StreamError::UnknownKind(Kind(7))) };
    assert_eq!(raw.recv().await, Some(ended));
    // The first stream is still there: the next entry comes to it.
    raw.send(&ClientMsg::StreamAck { stream: 1, seq: 1, error: None }).await;
    sessions(&p, 1, 1).await;
    match raw.recv().await {
        Some(ServerMsg::Stream { stream: 1, seq: 2, item: StreamItem::Entries { entries, .. } }) => {
            let e: LedgerEntry = postcard::from_bytes(&entries[0]).unwrap();
            assert_eq!(e.index, through.next());
        }
        other => panic!("the next entry, got {other:?}"),
    }

    // A stream message that does not decode: an error frame, and the connection is closed.
    let mut bad = wire::encode(&ClientMsg::StreamClose { stream: 1 });
    let n = bad.len();
    bad[n - 1] = 0xff; // an unknown variant's varint, with its checksum made good again
    let crc = crc32fast::hash(&bad[wire::FRAME_HEADER_LEN..]);
    bad[4..8].copy_from_slice(&crc.to_le_bytes());
    let mut broken = Raw::connect(&server.addr).await;
    broken.send(&ClientMsg::StreamOpen { stream: 1, open: tail_all(TailFrom::Next) }).await;
    broken.0.write_all(&bad).await.unwrap();
    loop {
        match broken.recv().await {
            Some(ServerMsg::Error { error: WireError::Malformed(_) }) => break,
            Some(ServerMsg::Stream { stream: 1, item: StreamItem::Progress { .. }, .. }) => {} // the tail's start
            other => panic!("expected a malformed-frame error, got {other:?}"),
        }
    }
    let mut rest = Vec::new();
    assert_eq!(broken.0.read_to_end(&mut rest).await.unwrap(), 0, "then the connection is closed");

    // None of it changed anything: the pipe carries on, and the ledger shows no trace of it.
    let status = p.status().await.unwrap();
    let mut t = p.tail(TailFrom::Index(Index(1)), Filter { internal: true, ..Filter::default() });
    let mut whats = Vec::new();
    while t.position().is_none_or(|at| at < status.engine.applied) {
        if let Some(Ok(TailItem::Entry(e))) = t.next().await {
            whats.extend(e.events.iter().map(|ev| ev.what.name()));
        }
    }
    assert_eq!(whats.iter().filter(|w| **w == "created").count(), 4);
    assert!(whats.iter().all(|w| ["noop", "configured", "created", "appended"].contains(w)), "{whats:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_connection_closes_its_streams_and_an_open_stream_keeps_a_connection() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.engine.streams_max = 2;
    c.server.idle_timeout_ms = 200;
    let server = start(c).await;
    let p = pipe(&server.addr).await;
    sessions(&p, 1, 1).await; // serving

    // Two tails from the start: their first items say they are open (connections are served
    // concurrently, so `b` must not ask before then).
    let mut a = Raw::connect(&server.addr).await;
    for n in [1, 2] {
        a.send(&ClientMsg::StreamOpen { stream: n, open: tail_all(TailFrom::Index(Index(1))) }).await;
        assert!(matches!(a.recv().await, Some(ServerMsg::Stream { stream, seq: 1, .. }) if stream == n));
    }
    let mut b = Raw::connect(&server.addr).await;
    b.send(&ClientMsg::StreamOpen { stream: 1, open: tail_all(TailFrom::Next) }).await;
    let full = ServerMsg::Stream { stream: 1, seq: 1, item: StreamItem::End(StreamError::TooManyStreams { max: 2 }) };
    assert_eq!(b.recv().await, Some(full), "the server's two streams are taken");

    // Open streams keep `a` open well past the idle timeout; `b`, with none, is closed.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let mut rest = Vec::new();
    assert_eq!(b.0.read_to_end(&mut rest).await.unwrap(), 0, "an idle connection is closed");
    sessions(&p, 1, 1).await;
    for n in [1, 2] {
        assert!(matches!(a.recv().await, Some(ServerMsg::Stream { stream, seq: 2, .. }) if stream == n));
    }

    // `a` goes away: its streams are closed, and their places are free again.
    drop(a);
    let mut c2 = Raw::connect(&server.addr).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut n = 10;
    loop {
        n += 1;
        c2.send(&ClientMsg::StreamOpen { stream: n, open: tail_all(TailFrom::Next) }).await;
        if opened_from_head(&mut c2, n).await {
            break; // open and waiting for entries
        }
        assert!(tokio::time::Instant::now() < deadline, "the closed connection's streams were not freed");
    }
    c2.send(&ClientMsg::StreamOpen { stream: n + 1, open: tail_all(TailFrom::Next) }).await;
    assert!(opened_from_head(&mut c2, n + 1).await, "both places are free");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_ends_streams_with_a_clear_reason() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    sessions(&pipe(&server.addr).await, 1, 1).await; // serving
    let mut raw = Raw::connect(&server.addr).await;
    raw.send(&ClientMsg::StreamOpen { stream: 4, open: tail_all(TailFrom::Next) }).await;
    let watch = StreamOpen::Watch { kinds: vec![], resume_after: None, window: None };
    raw.send(&ClientMsg::StreamOpen { stream: 5, open: watch }).await;
    let mut first_items = Vec::new();
    while first_items.len() < 2 || !raw.quiet(Duration::from_millis(100)).await {
        match raw.recv().await {
            Some(ServerMsg::Stream { stream, seq: 1, .. }) => first_items.push(stream),
            Some(ServerMsg::Stream { .. }) => {}
            other => panic!("the streams' first items, got {other:?}"),
        }
    }
    first_items.sort();
    assert_eq!(first_items, [4, 5], "the tail's progress mark and the watch's resync");
    let stopping = tokio::spawn(server.stop());
    let mut ended = Vec::new();
    loop {
        match raw.recv().await {
            Some(ServerMsg::StreamEnded { stream, reason: StreamEnd::ShuttingDown }) => ended.push(stream),
            Some(ServerMsg::Error { error: WireError::ShuttingDown }) => break,
            other => panic!("expected the streams' ends, then the closing frame: {other:?}"),
        }
    }
    ended.sort();
    assert_eq!(ended, [4, 5], "every stream is told, before the connection's closing frame");
    stopping.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// The engine bounds each stream by its window; a connection whose streams together queue more
/// than `stream_queue_bytes_max` for its socket (here one stream whose window is far larger) has
/// them ended with that reason, and everything it was given before is whole and in order.
async fn a_connection_past_its_stream_queue_limit_has_its_streams_ended_never_an_item_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.kinds.get_mut(&1).unwrap().config.record_bytes_max = 64_000;
    c.engine.streams_max = 1;
    c.engine.tail_window_bytes_max = 64 << 20;
    c.server.stream_queue_bytes_max = 256 * 1024;
    let server = start(c).await;
    let p = pipe(&server.addr).await;
    // Some 5 MB of entries, twenty times the queue's limit.
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let p = p.clone();
            tokio::spawn(async move {
                for i in 0..10 {
                    p.new_with(1, format!("{w}/{i} {:>60000}", "").into_bytes()).await.unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    let mut slow = Raw::connect(&server.addr).await;
    slow.send(&ClientMsg::StreamOpen { stream: 1, open: tail_all(TailFrom::Index(Index(1))) }).await;
    // Its first item says it holds the server's one stream place (connections are served
    // concurrently); after that it reads nothing for a while.
    let mut next_index = 1;
    let mut next_seq = 1;
    let mut first = slow.recv().await;
    assert!(matches!(first, Some(ServerMsg::Stream { stream: 1, seq: 1, .. })), "{first:?}");
    // Once the slow connection's stream is ended, the server's one stream place is free again.
    let mut other = Raw::connect(&server.addr).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    for n in 1.. {
        other.send(&ClientMsg::StreamOpen { stream: n, open: tail_all(TailFrom::Next) }).await;
        if opened_from_head(&mut other, n).await {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the slow connection's stream was never ended");
    }
    // Everything the slow reader is given is in order with no gap, then the reason.
    loop {
        let msg = match first.take() {
            Some(msg) => Some(msg),
            None => slow.recv().await,
        };
        match msg {
            Some(ServerMsg::Stream { stream: 1, seq, item: StreamItem::Entries { entries, .. } }) => {
                assert_eq!(seq, next_seq);
                next_seq += 1;
                for e in entries {
                    let e: LedgerEntry = postcard::from_bytes(&e).unwrap();
                    assert_eq!(e.index.0, next_index, "no entry dropped");
                    next_index += 1;
                }
            }
            Some(ServerMsg::StreamEnded { stream: 1, reason: StreamEnd::ConnectionBehind { queued_bytes, max } }) => {
                assert!(queued_bytes > max && max == 256 * 1024);
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(slow.quiet(Duration::from_millis(100)).await, "nothing more for the ended stream");
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Through the client library.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tail_shows_every_entry_in_order_and_acknowledges_as_the_application_reads() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    // A small window: the tail must acknowledge as it goes to see everything.
    c.engine.tail_window_bytes_max = 2_000;
    c.engine.stream_batch_bytes_max = 500;
    let server = start(c).await;
    let p = pipe(&server.addr).await;
    let ids = sessions(&p, 1, 30).await;
    let kind2 = sessions(&p, 2, 5).await;
    let head = p.status().await.unwrap().engine.applied;

    let mut t = p.tail(TailFrom::Index(Index(1)), Filter::default());
    let mut seen = Vec::new();
    while t.position().is_none_or(|at| at < head) {
        match t.next().await.expect("the tail goes on") {
            Ok(TailItem::Entry(e)) => seen.push(e),
            Ok(TailItem::Progress { .. }) => {}
            Err(e) => panic!("{e}"),
        }
    }
    let indexes: Vec<u64> = seen.iter().map(|e| e.index.0).collect();
    assert!(indexes.windows(2).all(|w| w[0] < w[1]), "in order, each once: {indexes:?}");
    let created: Vec<SessionId> = seen
        .iter()
        .flat_map(|e| e.events.iter())
        .filter(|ev| ev.what.name() == "created")
        .filter_map(|ev| ev.session)
        .collect();
    assert_eq!(created, ids.iter().chain(&kind2).copied().collect::<Vec<_>>());
    assert!(seen.iter().flat_map(|e| &e.events).all(|ev| !ev.what.is_internal()), "no internal events unasked");

    // New entries come as they commit; a kind filter keeps to its kind.
    let mut only2 = p.tail(TailFrom::Next, Filter { kinds: vec![Kind(2)], ..Filter::default() });
    // The tail opens on its first `next`: ask for it before writing.
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        while got.len() < 4 {
            if let Some(Ok(TailItem::Entry(e))) = only2.next().await {
                got.extend(e.events.into_iter().map(|ev| (ev.kind, ev.what.name())));
            }
        }
        got
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    sessions(&p, 1, 2).await;
    sessions(&p, 2, 2).await;
    let got = tokio::time::timeout(Duration::from_secs(10), reader).await.unwrap().unwrap();
    assert!(got.iter().all(|(k, _)| *k == Some(Kind(2))), "{got:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tail_from_an_index_past_the_head_fails_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    let p = pipe(&server.addr).await;
    let mut t = p.tail(TailFrom::Index(Index(1_000)), Filter::default());
    match t.next().await {
        Some(Err(ClientError::Stream(StreamError::BeyondHead { .. }))) => {}
        other => panic!("{other:?}"),
    }
    assert!(t.next().await.is_none(), "the tail ended");
    server.stop().await;
}

/// The sessions a watcher holds: kind and records.
type Held = BTreeMap<SessionId, (Kind, Vec<Vec<u8>>)>;

fn apply(held: &mut Held, item: &WatchItem) {
    match item {
        WatchItem::ResyncStart { .. } => held.clear(),
        WatchItem::Session(s) => {
            held.insert(s.session, (s.kind, s.records.clone()));
        }
        WatchItem::Synced { .. } => {}
        WatchItem::Change(c) => match &c.after {
            None => {
                held.remove(&c.session);
            }
            Some(_) => {
                let h = held.entry(c.session).or_insert((c.kind, Vec::new()));
                match c.records() {
                    Records::Added(rs) => h.1.extend(rs.iter().cloned()),
                    Records::Replaced(r) => h.1 = vec![r.to_vec()],
                    Records::Unchanged => {}
                }
            }
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_resyncs_then_follows_changes_and_resumes_after_what_it_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    let p = pipe(&server.addr).await;
    let ids = sessions(&p, 1, 5).await;
    let mut w = p.watch(WatchOptions { window: Some(3), ..WatchOptions::default() });
    let mut held = Held::new();
    // Before the first snapshot the resync is of the empty state at index 0, and the sessions
    // come as changes after it.
    while held.len() < 5 || held.values().any(|(_, records)| records.len() < 2) {
        let item = w.next().await.unwrap().unwrap();
        apply(&mut held, &item);
        w.done(Ok(())).await;
    }
    assert_eq!(held[&ids[0]].1, vec![b"first 0".to_vec(), b"second 0".to_vec()]);
    // Changes: a replace, a delete, a new session.
    let mut s0 = p.session(p.get(ids[0]).await.unwrap().handle);
    s0.replace(b"only".to_vec()).await.unwrap();
    p.session(p.get(ids[1]).await.unwrap().handle).delete().await.unwrap();
    let more = sessions(&p, 1, 1).await;
    let mut changes = 0;
    while changes < 4 {
        let item = w.next().await.unwrap().unwrap();
        if let WatchItem::Change(c) = &item {
            changes += 1;
            assert!(c.index > Index(0));
        }
        apply(&mut held, &item);
        // The failure text is the server's to keep; the watch goes on.
        w.done(if changes == 2 { Err("could not index it".into()) } else { Ok(()) }).await;
    }
    assert_eq!(held[&ids[0]].1, vec![b"only".to_vec()]);
    assert!(!held.contains_key(&ids[1]));
    assert_eq!(held[&more[0]].1, vec![b"first 0".to_vec(), b"second 0".to_vec()]);
    let after = w.acknowledged().expect("synced");
    drop(w);

    // A new watcher that kept that state resumes after it: no resync, only what followed.
    sessions(&p, 2, 1).await;
    let mut w = p.watch(WatchOptions { resume_after: Some(after), ..WatchOptions::default() });
    let mut got = Vec::new();
    while got.len() < 2 {
        let item = w.next().await.unwrap().unwrap();
        assert!(matches!(item, WatchItem::Change(_)), "a resume shows changes only: {item:?}");
        apply(&mut held, &item);
        got.push(item);
        w.done(Ok(())).await;
    }
    assert_eq!(held.len(), 6, "the kind-2 session created meanwhile is there too");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_reads_from_its_checkpoint_and_commits_with_its_effects() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    let p = pipe(&server.addr).await;
    let inputs = sessions(&p, 1, 4).await;
    let mut c = Consumer::open(&p, "copier").await.unwrap();
    assert_eq!(c.checkpoint(), Index(0));
    let mut events = c.events(Filter { kinds: vec![Kind(1)], ..Filter::default() });
    let mut copied = Vec::new();
    while copied.len() < 2 {
        if let Some(Ok(TailItem::Entry(e))) = events.next().await {
            for ev in e.events.iter().filter(|ev| ev.what.name() == "created") {
                let op = CommitOp::New {
                    kind: Kind(2),
                    records: vec![format!("copy of {}", ev.session.unwrap()).into_bytes()],
                    store_s: None,
                };
                let results = c.commit(e.index, vec![op]).await.unwrap();
                assert!(matches!(results[..], [Reply::Created { .. }]));
                copied.push(ev.session.unwrap());
            }
        }
    }
    let checkpoint = c.checkpoint();
    assert_eq!(p.checkpoint("copier").await.unwrap().through, checkpoint);
    let covered = p.read_through("copier", checkpoint, Duration::from_secs(1)).await.unwrap();
    assert_eq!(covered.through, checkpoint);
    let later = Index(checkpoint.0 + 1);
    let e = p.read_through("copier", later, Duration::from_millis(300)).await.unwrap_err();
    assert_eq!(e, ClientError::Refused(RequestError::TimedOut { ms: 300 }));

    // Opened again (a restart): the old epoch is fenced, and the events resume after the checkpoint.
    let mut again = Consumer::open(&p, "copier").await.unwrap();
    assert_eq!(again.checkpoint(), checkpoint);
    let stale = c.commit(checkpoint, vec![]).await.unwrap_err();
    assert!(matches!(stale, ClientError::Refused(RequestError::StaleEpoch { .. })), "{stale}");
    let mut events = again.events(Filter { kinds: vec![Kind(1)], ..Filter::default() });
    let next = loop {
        if let Some(Ok(TailItem::Entry(e))) = events.next().await {
            if let Some(ev) = e.events.iter().find(|ev| ev.what.name() == "created") {
                break ev.session.unwrap();
            }
        }
    };
    assert_eq!(next, inputs[2], "the first input after the checkpoint");
    again.commit(again.checkpoint(), vec![]).await.unwrap();
    p.consumer_drop("copier").await.unwrap();
    let gone = p.checkpoint("copier").await.unwrap_err();
    assert_eq!(gone, ClientError::Refused(RequestError::UnknownConsumer("copier".into())));
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// The command line.

async fn truba(addr: &str, args: &[&str], stdin: Option<&str>) -> (i32, String, String) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_truba"));
    cmd.args(args).args(["--addr", addr]).env_remove("RUST_LOG").env_remove("TRUBA_ADDR");
    cmd.stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("running truba");
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).await.unwrap();
    drop(input);
    let out = child.wait_with_output().await.unwrap();
    let text = |b: Vec<u8>| String::from_utf8(b).expect("utf-8 output");
    (out.status.code().unwrap_or(-1), text(out.stdout), text(out.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_line_tails_and_runs_consumers() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(config(dir.path())).await;
    let p = pipe(&server.addr).await;
    let ids = sessions(&p, 1, 2).await;
    let addr = &server.addr;

    // Without --follow it stops at the head; --json is one object an event. (Index 1 is the
    // first leader's no-op and 2 the cluster's configuration: the sessions start at 3.)
    let (code, out, err) = truba(addr, &["tail", "--from", "3", "--json"], None).await;
    assert_eq!(code, 0, "{err}");
    let events: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let whats: Vec<&str> = events.iter().map(|e| e["what"].as_str().unwrap()).collect();
    assert_eq!(whats, ["created", "appended", "created", "appended"]);
    assert_eq!(events[0]["session"], ids[0].0);
    assert_eq!(events[0]["records"][0], "first 0");
    assert_eq!(events[1]["record"], "second 0");
    assert_eq!(events[1]["after"]["records"], 2);
    assert!(events[0]["before"].is_null() && events[0]["audit"]["client"].is_u64());
    let at = events[0]["at"].as_str().unwrap();
    assert!(at.len() == 24 && at.ends_with('Z') && at.as_bytes()[10] == b'T', "a UTC date: {at}");
    let (code, out, _) = truba(addr, &["tail", "--from", "oldest", "--internal", "--kind", "1"], None).await;
    assert_eq!(code, 0);
    assert!(out.lines().count() == 4 && out.contains("\"second 1\""), "{out}");
    let (code, _, err) = truba(addr, &["tail", "--from", "soon"], None).await;
    assert_eq!((code, err.lines().count()), (1, 1), "{err}");
    let (code, _, err) = truba(addr, &["tail", "--from", "1", "--kind", "9"], None).await;
    assert_eq!(code, 1);
    assert!(err.contains("unknown kind 9"), "{err}");

    // A consumer: open, commit with operations, read, wait, drop.
    let (code, out, _) = truba(addr, &["consumer", "open", "cli", "--json"], None).await;
    assert_eq!(code, 0);
    let opened: serde_json::Value = serde_json::from_str(&out).unwrap();
    let epoch = opened["epoch"].as_u64().unwrap().to_string();
    let handle = p.get(ids[0]).await.unwrap().handle.to_string();
    let ops = format!(
        "{{\"op\":\"new\",\"kind\":2,\"records\":[\"made\"]}}\n{{\"op\":\"append\",\"handle\":\"{handle}\",\"record\":\"more\"}}\n"
    );
    let through = p.status().await.unwrap().engine.applied.0.to_string();
    let args = ["consumer", "commit", "cli", "--epoch", &epoch, "--through", &through, "--ops", "-"];
    let (code, out, err) = truba(addr, &args, Some(&ops)).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("committed consumer cli through") && out.contains("created"), "{out}");
    assert_eq!(p.get(ids[0]).await.unwrap().records.len(), 3);
    let (code, out, _) = truba(addr, &["consumer", "get", "cli"], None).await;
    assert_eq!(code, 0);
    assert!(out.contains(&format!("checkpoint {through}")), "{out}");
    let (code, _, _) = truba(addr, &["consumer", "wait", "cli", "--index", &through], None).await;
    assert_eq!(code, 0);
    let far = (through.parse::<u64>().unwrap() + 50).to_string();
    let (code, _, err) = truba(addr, &["consumer", "wait", "cli", "--index", &far, "--timeout-ms", "200"], None).await;
    assert_eq!(code, 1);
    assert!(err.contains("did not cover"), "{err}");
    let args = ["consumer", "commit", "cli", "--epoch", &epoch, "--through", "1", "--ops", "-"];
    let (code, _, err) = truba(addr, &args, Some("{\"op\":\"explode\"}\n")).await;
    assert_eq!(code, 1);
    assert!(err.contains("line 1"), "{err}");
    let (code, _, _) = truba(addr, &["consumer", "drop", "cli"], None).await;
    assert_eq!(code, 0);
    let (code, _, err) = truba(addr, &["consumer", "get", "cli"], None).await;
    assert_eq!(code, 1);
    assert!(err.contains("no consumer"), "{err}");
    server.stop().await;
}
