//! The client crate stays free of the server: a program that only talks to a cluster builds
//! none of the server's, the disk's or the command line's dependencies.

#[test]
fn the_client_crate_depends_on_no_server_crate() {
    let manifest = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml")).expect("Cargo.toml");
    let dependencies = manifest.split("[dependencies]").nth(1).expect("a [dependencies] section");
    let dependencies = dependencies.split("\n[").next().unwrap_or_default();
    let names: Vec<&str> = dependencies
        .lines()
        .filter_map(|l| l.split(['=', '.']).next())
        .map(str::trim)
        .filter(|n| !n.is_empty() && !n.starts_with('#'))
        .collect();
    assert!(names.contains(&"truba-engine"), "the parse found the dependencies: {names:?}");
    for server_only in
        ["truba", "truba-sim", "clap", "toml", "hdrhistogram", "tracing-subscriber", "time", "serde_json"]
    {
        assert!(!names.contains(&server_only), "truba-client depends on {server_only}, which only the server needs");
    }
}
