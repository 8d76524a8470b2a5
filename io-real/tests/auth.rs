//! Credentials and permissions on a real process: a node whose `[auth]` grants one principal
//! writes and reads of kind 1, another the operator's verbs, and anonymous connections nothing.
//! Each refusal is a `PermissionDenied` naming the principal, changes nothing, and is logged;
//! an unknown token ends the connection; the ledger's audit records who wrote what; and a
//! connection that has proven nothing may not send a large frame.

#[allow(dead_code)] // each test file uses part of the shared harness
mod common;

use common::cluster::free_ports;
use common::spawn_serve;
use std::time::{Duration, Instant};

const ORDERS_TOKEN: &str = "orders-s3cret";
const OPS_TOKEN: &str = "ops-s3cret";

/// Runs `truba ARGS --addr ADDR [--token TOKEN]`: exit code, stdout, stderr.
async fn cli(addr: &str, token: Option<&str>, args: &[&str]) -> (i32, String, String) {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_truba"));
    command.args(args).args(["--addr", addr, "--timeout", "3s"]);
    if let Some(t) = token {
        command.args(["--token", t]);
    }
    let out = command
        .env_remove("RUST_LOG")
        .env_remove("TRUBA_ADDR")
        .env_remove("TRUBA_TOKEN")
        .output()
        .await
        .expect("running truba");
    let text = |b: Vec<u8>| String::from_utf8(b).expect("utf-8 output");
    (out.status.code().unwrap_or(-1), text(out.stdout), text(out.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn principals_may_do_what_they_are_granted_and_nothing_else() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let addr = format!("127.0.0.1:{}", free_ports(1)[0]);
    let config = dir.path().join("node.toml");
    let text = format!(
        r#"data_dir = "{data}"
listen = "{addr}"

[kinds.1]
[kinds.2]

[auth]
anonymous = []

[[auth.principals]]
name = "orders"
token_sha256 = "{orders}"
grants = ["write:1", "read:1"]

[[auth.principals]]
name = "ops"
token_sha256 = "{ops}"
grants = ["operate:*", "read:*"]
"#,
        data = dir.path().join("data").display(),
        orders = truba::auth::hash_token(ORDERS_TOKEN),
        ops = truba::auth::hash_token(OPS_TOKEN),
    );
    std::fs::write(&config, text).expect("writing the config");
    let log = dir.path().join("node.log");
    let mut child = Some(spawn_serve(std::path::Path::new(env!("CARGO_BIN_EXE_truba")), &config, &log, "auth"));

    // The first session, once the node serves.
    let deadline = Instant::now() + Duration::from_secs(20);
    let handle = loop {
        let (code, out, err) = cli(&addr, Some(ORDERS_TOKEN), &["new", "--kind", "1", "--data", "order 1"]).await;
        if code == 0 {
            break out.split_whitespace().next().expect("a handle").to_string();
        }
        assert!(Instant::now() < deadline, "the node never took orders' session: {err}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    let (code, _, err) = cli(&addr, None, &["new", "--kind", "1", "--data", "x"]).await;
    assert_ne!(code, 0);
    assert!(err.contains("permission denied: anonymous may not write sessions of kind 1"), "{err}");
    let (code, _, err) = cli(&addr, Some(ORDERS_TOKEN), &["new", "--kind", "2", "--data", "x"]).await;
    assert_ne!(code, 0);
    assert!(err.contains("permission denied: orders may not write sessions of kind 2"), "{err}");
    let (code, out, err) = cli(&addr, Some(ORDERS_TOKEN), &["get", &handle]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("order 1"), "{out}");
    let (code, _, err) = cli(&addr, Some(ORDERS_TOKEN), &["config", "show"]).await;
    assert_ne!(code, 0);
    assert!(err.contains("orders may not operate"), "{err}");
    let (code, out, err) = cli(&addr, Some(OPS_TOKEN), &["config", "show"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("[kinds.2]"), "{out}");
    let (code, _, err) = cli(&addr, Some(OPS_TOKEN), &["delete", &handle]).await;
    assert_ne!(code, 0, "ops may not write");
    assert!(err.contains("ops may not write sessions of kind 1"), "{err}");
    let (code, _, err) = cli(&addr, Some("a guess"), &["get", &handle]).await;
    assert_ne!(code, 0);
    assert!(err.contains("credentials were not accepted"), "{err}");

    // The refused delete changed nothing, and the audit names who created the session.
    let (code, out, err) = cli(&addr, Some(ORDERS_TOKEN), &["get", &handle]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("order 1"), "{out}");
    let (code, out, err) = cli(&addr, Some(OPS_TOKEN), &["tail", "--from", "oldest", "--json"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(r#""principal":"orders""#), "the audit records the principal: {out}");
    let logged = std::fs::read_to_string(&log).expect("the node's log");
    assert!(logged.contains("refusing a request") && logged.contains("principal=\"anonymous\""), "{logged}");

    // A stranger's connection may not send a large frame before it proves who it is.
    let mut stranger = tokio::net::TcpStream::connect(&addr).await.expect("connecting");
    let hello = truba::wire::read::<truba::wire::ServerMsg, _>(&mut stranger, 1 << 20).await.expect("a hello");
    assert!(matches!(hello, Some(truba::wire::ServerMsg::Hello(_))), "{hello:?}");
    let mut header = 100_000u32.to_le_bytes().to_vec();
    header.extend_from_slice(&[0; 4]);
    tokio::io::AsyncWriteExt::write_all(&mut stranger, &header).await.expect("writing a header");
    let answer = truba::wire::read::<truba::wire::ServerMsg, _>(&mut stranger, 1 << 20).await.expect("an answer");
    let too_large = truba::wire::WireError::FrameTooLarge { len: 100_000, max: 16 * 1024 };
    assert_eq!(answer, Some(truba::wire::ServerMsg::Error { error: too_large }));

    common::terminate(&mut child, Duration::from_secs(10)).await;
}
