//! The engine's rules, enforced: no IO, no clock, no threads, no async runtime, no unseeded
//! randomness, no randomly seeded hash maps, no printing. Time, randomness (through the seeded
//! generator) and disk completions come in as inputs; everything else goes out as outputs.

use std::path::{Path, PathBuf};

/// Forbidden text in engine sources, with the reason shown when it is found.
const FORBIDDEN: &[(&str, &str)] = &[
    ("std::time", "the engine reads no clock: time comes in with every input"),
    ("SystemTime", "the engine reads no clock"),
    ("Instant::now", "the engine reads no clock"),
    ("std::fs", "the engine does no IO: disk work goes out as Output::Io"),
    ("std::net", "the engine does no IO: the network is the driver's"),
    ("std::io", "no io::Error or IO inside the engine; DiskError is the engine's own"),
    ("std::thread", "the engine is single-threaded"),
    ("std::env", "configuration comes in through EngineConfig"),
    ("std::process", "the engine never exits or spawns; it emits Output::Stopped"),
    ("tokio", "no async runtime in the engine"),
    ("async fn", "no async in the engine"),
    ("thread_rng", "randomness only from the engine's seeded ChaCha generator"),
    ("rand::random", "randomness only from the engine's seeded ChaCha generator"),
    ("OsRng", "randomness only from the engine's seeded ChaCha generator"),
    ("from_entropy", "randomness only from the engine's seeded ChaCha generator"),
    ("getrandom", "randomness only from the engine's seeded ChaCha generator"),
    ("HashMap", "use BTreeMap: a HashMap's random seed breaks determinism"),
    ("HashSet", "use BTreeSet: a HashSet's random seed breaks determinism"),
    ("RandomState", "no randomly seeded hashers"),
    ("println!", "the engine prints nothing; drivers log"),
    ("eprintln!", "the engine prints nothing; drivers log"),
    ("dbg!", "the engine prints nothing; drivers log"),
];

/// Dependencies the engine may have. Anything new must be checked against the rules first.
/// (`bytes` is reference-counted buffers only: ledger records are handed to readers without a
/// copy; it does no IO.)
const ALLOWED_DEPENDENCIES: &[&str] =
    &["serde", "postcard", "crc32fast", "rand_chacha", "rand", "thiserror", "xxhash-rust", "serde_bytes", "bytes"];

/// Lines of code (comments removed) that contain a forbidden pattern.
fn violations(source: &str) -> Vec<(usize, &'static str, &'static str)> {
    let mut found = Vec::new();
    for (n, line) in source.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        for (pattern, why) in FORBIDDEN {
            if code.contains(pattern) {
                found.push((n + 1, *pattern, *why));
            }
        }
    }
    found
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable source directory") {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn engine_sources_follow_the_rules() {
    let mut files = Vec::new();
    rust_files(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut files);
    assert!(files.len() >= 10, "expected the engine's sources, found {files:?}");
    let mut report = String::new();
    for file in &files {
        let source = std::fs::read_to_string(file).expect("readable source");
        for (line, pattern, why) in violations(&source) {
            report.push_str(&format!("{}:{line}: `{pattern}`: {why}\n", file.display()));
        }
    }
    assert!(report.is_empty(), "the engine breaks its rules:\n{report}");
}

#[test]
fn engine_dependencies_are_the_allowed_ones() {
    let manifest = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml")).unwrap();
    let deps = manifest.split("[dependencies]").nth(1).expect("a [dependencies] section");
    let deps = deps.split("\n[").next().unwrap_or("");
    for line in deps.lines().filter(|l| l.contains('=')) {
        let name = line.split(['=', '.']).next().unwrap().trim();
        assert!(ALLOWED_DEPENDENCIES.contains(&name), "engine dependency `{name}` is not on the allowed list");
    }
}

#[test]
fn the_scanner_catches_what_it_must() {
    let bad = "use std::collections::HashMap;\nlet t = std::time::Instant::now();\nlet r = rand::thread_rng();";
    let found: Vec<_> = violations(bad).into_iter().map(|(_, p, _)| p).collect();
    for p in ["HashMap", "std::time", "Instant::now", "thread_rng"] {
        assert!(found.contains(&p), "{p} not caught in {bad:?}");
    }
    assert!(violations("// a comment about std::fs is fine\nlet x = 1; // and HashMap here too").is_empty());
}

/// The files whose code applies committed entries (the state machine and what it owns).
/// Applying may consult the replicated state only: were it to read a node's own settings, two
/// replicas could apply the same log differently (see `config.rs`'s `ClusterConfig`).
const APPLY_SOURCES: &[&str] = &["sessions.rs", "sessions/apply.rs", "sessions/commit.rs", "stored.rs", "consumers.rs"];

/// Node-local configuration that applying must not see.
const NODE_LOCAL: &[(&str, &str)] = &[
    ("EngineConfig", "a node's own configuration; apply takes `Rules` (the replicated configuration)"),
    ("ConsensusConfig", "a node's own consensus settings"),
    ("Limits", "a node's own limits; apply sees `AppliedLimits`, which are replicated"),
    ("local_config", "a node's own kinds"),
];

/// Lines of code that name node-local configuration (`AppliedLimits` is the replicated one).
fn node_local_uses(source: &str) -> Vec<(usize, &'static str, &'static str)> {
    let mut found = Vec::new();
    for (n, line) in source.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("").replace("AppliedLimits", "");
        for (pattern, why) in NODE_LOCAL {
            if code.contains(pattern) {
                found.push((n + 1, *pattern, *why));
            }
        }
    }
    found
}

#[test]
fn applying_reads_no_node_local_settings() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut report = String::new();
    for file in APPLY_SOURCES {
        let source = std::fs::read_to_string(src.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        let source = source.split("#[cfg(test)]").next().unwrap_or("");
        for (line, pattern, why) in node_local_uses(source) {
            report.push_str(&format!("{file}:{line}: `{pattern}`: {why}\n"));
        }
    }
    assert!(report.is_empty(), "applying reads node-local settings:\n{report}");
}

#[test]
fn the_node_local_scanner_catches_what_it_must() {
    let bad = "fn f(cfg: &EngineConfig) {}\nlet l: &Limits = x;";
    let found: Vec<_> = node_local_uses(bad).into_iter().map(|(_, p, _)| p).collect();
    assert_eq!(found, ["EngineConfig", "Limits"]);
    assert!(node_local_uses("fn f(l: &AppliedLimits) {} // EngineConfig in a comment").is_empty());
}
