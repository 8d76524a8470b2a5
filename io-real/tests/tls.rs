//! TLS on real processes: a three-member cluster whose members talk to each other over mutual
//! TLS and serve clients over TLS. Certificates come from a CA made for the test (rcgen): each
//! member's names its addresses and `truba-member-N`.
//!
//! - Clients that trust the CA work; a plaintext client, or one that trusts another CA, is
//!   refused, and the command says why.
//! - A member that presents another member's certificate is refused by the others, with a log
//!   line naming the certificate's fault, while the two honest members go on serving.

#[allow(dead_code)] // each test file uses part of the shared harness
mod common;

use common::cluster::{Cluster, ClusterConfig};
use common::KIND;
use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const CLUSTER: ClusterConfig =
    ClusterConfig { dir_prefix: "truba-tls-", engine: "", kind: "lease_ms = 600000\n", stored: false };

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        let key = KeyPair::generate().expect("a CA key");
        let cert = params.self_signed(&key).expect("a CA certificate");
        Ca { cert, key }
    }

    /// A certificate for `names` and 127.0.0.1, good for serving and for dialing; written to
    /// `dir` as `stem.pem` and `stem.key`.
    fn issue(&self, dir: &Path, stem: &str, names: &[String]) -> (PathBuf, PathBuf) {
        let mut params = CertificateParams::new(names.to_vec()).expect("certificate parameters");
        params.subject_alt_names.push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().expect("a key");
        let cert = params.signed_by(&key, &self.cert, &self.key).expect("a certificate");
        let (cert_path, key_path) = (dir.join(format!("{stem}.pem")), dir.join(format!("{stem}.key")));
        std::fs::write(&cert_path, cert.pem()).expect("writing a certificate");
        std::fs::write(&key_path, key.serialize_pem()).expect("writing a key");
        (cert_path, key_path)
    }

    fn write(&self, dir: &Path, stem: &str) -> PathBuf {
        let path = dir.join(format!("{stem}.pem"));
        std::fs::write(&path, self.cert.pem()).expect("writing a CA certificate");
        path
    }
}

/// Adds a `[tls]` section to each member's file; `cert_of(i)` picks whose certificate member
/// `i` (0-based) presents.
fn with_tls(cluster: &Cluster, cert_of: impl Fn(usize) -> usize) -> PathBuf {
    let dir = cluster.dir.as_ref().expect("the cluster's directory").path().to_path_buf();
    let ca = Ca::new("truba test CA");
    let ca_path = ca.write(&dir, "ca");
    let certs: Vec<_> = (1..=3)
        .map(|id| ca.issue(&dir, &format!("member{id}"), &[format!("truba-member-{id}"), "localhost".into()]))
        .collect();
    for (i, node) in cluster.nodes.iter().enumerate() {
        let (cert, key) = &certs[cert_of(i)];
        let section = format!(
            "\n[tls]\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\n",
            cert.display(),
            key.display(),
            ca_path.display()
        );
        let mut text = std::fs::read_to_string(&node.config).expect("reading a member's file");
        text.push_str(&section);
        std::fs::write(&node.config, text).expect("writing a member's file");
    }
    ca_path
}

/// Runs `truba ARGS --addr ADDRS` with `tls` arguments: exit code, stdout, stderr.
async fn cli(addrs: &str, tls: &[&str], args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_truba"))
        .args(args)
        .args(["--addr", addrs, "--timeout", "3s"])
        .args(tls)
        .env_remove("RUST_LOG")
        .env_remove("TRUBA_ADDR")
        .env_remove("TRUBA_TLS_CA")
        .output()
        .await
        .expect("running truba");
    let text = |b: Vec<u8>| String::from_utf8(b).expect("utf-8 output");
    (out.status.code().unwrap_or(-1), text(out.stdout), text(out.stderr))
}

/// Opens a session through `addrs` until one is created (a leader is elected meanwhile);
/// the session id.
async fn new_session(cluster: &mut Cluster, addrs: &str, tls: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        cluster.check_alive();
        let (code, out, err) = cli(addrs, tls, &["new", "--kind", &KIND.to_string(), "--data", "over tls"]).await;
        if code == 0 {
            return out.trim().to_string();
        }
        assert!(Instant::now() < deadline, "no session created over TLS in 30 s: {err}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_over_tls_serves_clients_that_trust_its_ca_and_refuses_the_others() {
    let mut cluster = Cluster::new(&CLUSTER);
    let ca = with_tls(&cluster, |i| i);
    cluster.start_all();
    let addrs = cluster.addrs_from(0).join(",");
    let ca_arg = ca.display().to_string();
    let tls = ["--tls-ca", ca_arg.as_str()];
    let created = new_session(&mut cluster, &addrs, &tls).await;
    let handle = created.split_whitespace().next().expect("the new session's handle");
    let (code, out, err) = cli(&addrs, &tls, &["get", handle]).await;
    assert_eq!(code, 0, "get over TLS: {err}");
    assert!(out.contains("over tls"), "{out}");

    let (code, _, err) = cli(&addrs, &[], &["get", handle]).await;
    assert_ne!(code, 0, "a plaintext client is refused");
    assert!(!err.is_empty(), "and told why");
    let dir = cluster.dir.as_ref().expect("a directory").path().to_path_buf();
    let other = Ca::new("another CA").write(&dir, "other-ca");
    let other_arg = other.display().to_string();
    let (code, _, err) = cli(&addrs, &["--tls-ca", other_arg.as_str()], &["get", handle]).await;
    assert_ne!(code, 0, "a client that trusts another CA is refused");
    assert!(err.contains("certificate") || err.contains("Certificate"), "and told it is the certificate: {err}");
    cluster.check_alive();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_presenting_another_members_certificate_is_refused() {
    let mut cluster = Cluster::new(&CLUSTER);
    // Member 3 presents member 2's certificate (whose key it holds): a stolen or misissued one.
    let ca = with_tls(&cluster, |i| if i == 2 { 1 } else { i });
    cluster.start_all();
    let ca_arg = ca.display().to_string();
    let honest = cluster.addrs_from(0)[..2].join(",");
    new_session(&mut cluster, &honest, &["--tls-ca", ca_arg.as_str()]).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let refused = |log: &Path| {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .any(|l| l.contains("refusing a member connection") && l.contains("does not name truba-member-3"))
    };
    while !(refused(&cluster.nodes[0].log) || refused(&cluster.nodes[1].log)) {
        assert!(Instant::now() < deadline, "no honest member logged the refusal of member 3's certificate");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
