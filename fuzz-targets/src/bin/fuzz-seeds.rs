//! Writes every target's seed inputs under `fuzz/seeds/<target>/` (run from the workspace
//! root, or give the seeds directory as the only argument).

use std::path::PathBuf;

fn main() {
    let root = std::env::args().nth(1).map(PathBuf::from).unwrap_or_else(|| PathBuf::from("fuzz/seeds"));
    let mut written = 0;
    for (target, name, bytes) in truba_fuzz_targets::seeds::all() {
        let dir = root.join(target);
        if let Err(e) = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(dir.join(&name), &bytes)) {
            eprintln!("error: cannot write a seed of {target} under {}: {e}", dir.display());
            std::process::exit(1);
        }
        written += 1;
    }
    println!("wrote {written} seeds under {}", root.display());
}
