//! Replays the saved fuzz inputs (`fuzz/seeds/<target>/*`: the seeds, and every input that once
//! made a target fail), the generated seeds, and a local working corpus (`fuzz/corpus`, left
//! by long runs, not kept in git) where there is one, through the targets: an input that once
//! failed stays fixed, and `cargo test` checks the targets build and run.

use std::path::Path;
use truba_fuzz_targets::{seeds, TARGETS};

fn target(name: &str) -> truba_fuzz_targets::Target {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, f)| *f).expect("a known target")
}

#[test]
fn generated_seeds_run_clean() {
    let seeds = seeds::all();
    let saved = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds");
    for (t, name, bytes) in &seeds {
        let file = saved.join(t).join(name);
        let kept = std::fs::read(&file).unwrap_or_default();
        assert!(
            kept == *bytes,
            "{} is not what the seeds make now: run `cargo run -p truba-fuzz-targets --bin fuzz-seeds`",
            file.display()
        );
    }
    for (name, _) in TARGETS {
        assert!(seeds.iter().any(|(t, _, _)| *t == name), "target {name} has a seed");
    }
    for (t, name, bytes) in seeds {
        eprintln!("{t}/{name}: {} bytes", bytes.len());
        target(t)(&bytes);
    }
}

#[test]
fn saved_corpus_runs_clean() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds");
    let mut ran = 0;
    for (name, run) in TARGETS {
        let dir = root.join(name);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("corpus of {name} at {}: {e}", dir.display()))
            .map(|e| e.expect("a directory entry").path())
            .collect();
        files.sort();
        assert!(
            files.iter().any(|f| f.file_name().is_some_and(|n| n.to_string_lossy().starts_with("seed-"))),
            "target {name} has saved seeds"
        );
        if let Ok(local) = std::fs::read_dir(root.join("../corpus").join(name)) {
            files.extend(local.map(|e| e.expect("a directory entry").path()));
        }
        for file in files {
            run(&std::fs::read(&file).expect("a corpus file reads"));
            ran += 1;
        }
    }
    eprintln!("replayed {ran} saved inputs");
}

/// The seeds reach what they are meant to: a follower that took the leader's entries, a
/// leader that committed a client's session, sessions spilled to a source file.
#[test]
fn seeds_reach_deep_states() {
    let (dir, source) = seeds::spilled_dir();
    assert!(truba_engine::decode_source_file(&dir[source]).is_ok_and(|s| !s.is_empty()));
    assert!(dir.keys().any(|f| f.starts_with("snap-")), "the busy run took a snapshot");
    let seeds = seeds::all();
    let steps = |name: &str| {
        &seeds.iter().find(|(t, n, _)| *t == "member_messages" && *n == format!("seed-{name}")).expect("a seed").2
    };
    let follower = truba_fuzz_targets::member_messages_run(steps("follower")).expect("a replica");
    assert!(follower.engine.commit_index() >= truba_engine::Index(3), "the follower took and committed entries");
    let leader = truba_fuzz_targets::member_messages_run(steps("leader")).expect("a replica");
    assert!(leader.engine.is_leader(), "the leader setup elects member 0, and the seed keeps it leading");
    assert!(leader.engine.commit_index() >= truba_engine::Index(3), "the leader committed a client's session");
}
