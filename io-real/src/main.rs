//! `truba`: the server, and a command line for sessions, inspection, a demo handler and a
//! benchmark.

use clap::{ArgGroup, Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use truba::client::{ClientError, ClientOptions, Redriven, TailItem, WatchItem, WatchOptions};
use truba::config::Config;
use truba::net::{RealNet, Tls, TlsFiles};
use truba::server::{self, Env as _, RealEnv};
use truba::wire::ServerStatus;

/// The command line's connections: TCP, with TLS when `--tls-ca` is given.
type Pipe = truba::client::Pipe<RealNet>;
type Session = truba::client::Session<RealNet>;
type Consumer = truba::client::Consumer<RealNet>;
use truba_engine::{
    Attempt, Audit, BriefStatus, CommitOp, Event, FailureReason, Filter, Handle, Index, Kind, LedgerEntry, ReplicaId,
    Reply, RequestError, SessionBrief, SessionId, SessionSnapshot, SessionState, SessionView, TailFrom, What,
};

#[derive(Subcommand)]
enum AuthCommand {
    /// Prints the SHA-256 of a token (read from standard input, one line) in hex: what a
    /// principal's `token_sha256` holds. The token itself is never kept in a file.
    HashToken,
}

#[derive(Parser)]
#[command(
    name = "truba",
    version,
    about = "A replicated write-ahead log of sessions, with redelivery of unfinished ones"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct Conn {
    /// Server address(es), tried in order.
    #[arg(long, env = "TRUBA_ADDR", default_value = "127.0.0.1:7400", value_name = "HOST:PORT[,HOST:PORT...]")]
    addr: String,
    /// Print results as JSON.
    #[arg(long)]
    json: bool,
    /// Give up after this long in all (e.g. 500ms, 10s, 2m): members that are down or silent
    /// are retried until then. A request that timed out may or may not have been applied.
    #[arg(long, default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    timeout: Duration,
    /// How long to wait for one member to answer a new connection before trying the next.
    #[arg(long, default_value = "1s", value_parser = parse_duration, value_name = "DURATION")]
    connect_timeout: Duration,
    /// Connect with TLS, trusting servers whose certificates chain to this CA (PEM).
    #[arg(long, env = "TRUBA_TLS_CA", value_name = "PATH")]
    tls_ca: Option<PathBuf>,
    /// This client's certificate (PEM), for servers that take certificates as credentials.
    #[arg(long, env = "TRUBA_TLS_CERT", value_name = "PATH", requires = "tls_ca")]
    tls_cert: Option<PathBuf>,
    /// The key of --tls-cert (PEM).
    #[arg(long, env = "TRUBA_TLS_KEY", value_name = "PATH", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// A bearer token proving who this client is, for a cluster with `[auth]`.
    #[arg(long, env = "TRUBA_TOKEN", value_name = "TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The name the servers' certificates must carry, instead of the host dialed.
    #[arg(long, env = "TRUBA_TLS_SERVER_NAME", value_name = "NAME", requires = "tls_ca")]
    tls_server_name: Option<String>,
}

/// "250ms", "10s", "2m" or a plain number of seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let (digits, unit_ms) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1_000)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60_000)
    } else {
        (t, 1_000)
    };
    let n: u64 = digits.trim().parse().map_err(|_| format!("`{text}` is not a duration (like 500ms, 10s or 2m)"))?;
    match n.checked_mul(unit_ms) {
        Some(0) => Err("a timeout of zero would never let anything through".into()),
        Some(ms) if ms <= 24 * 3_600_000 => Ok(Duration::from_millis(ms)),
        _ => Err(format!("`{text}` is longer than a day")),
    }
}

impl Conn {
    fn net(&self) -> Result<RealNet, String> {
        let Some(ca) = &self.tls_ca else { return Ok(RealNet::plain()) };
        let files = TlsFiles {
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
            ca: ca.clone(),
            server_name: self.tls_server_name.clone(),
        };
        Ok(RealNet::with_tls(Tls::client(&files).map_err(|e| e.to_string())?))
    }

    fn options(&self) -> ClientOptions {
        // One attempt waits at most the whole timeout; a silent member is left after the
        // request timeout, so keep that well inside the overall one.
        let request_timeout = (self.timeout / 2).clamp(Duration::from_millis(100), Duration::from_secs(5));
        ClientOptions {
            connect_timeout: self.connect_timeout.min(self.timeout),
            request_timeout,
            retry_for: self.timeout,
            token: self.token.clone(),
            ..ClientOptions::default()
        }
    }
}

#[derive(Args, Clone)]
#[group(required = true, multiple = false)]
struct Data {
    /// The record, as text.
    #[arg(long)]
    data: Option<String>,
    /// Read the record from a file ("-" for standard input).
    #[arg(long)]
    file: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (defaults: ./truba-data, clients on 127.0.0.1:7400, one node).
    Serve {
        /// TOML configuration; see the README for every field.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override the configuration's data directory.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Override the configuration's listen address.
        #[arg(long)]
        listen: Option<String>,
        /// Join a running cluster through this member's client address (its cluster id is
        /// asked there at the first start). The file's `[cluster]` gives this node's id and, in
        /// `members`, its own peer and client addresses. The node serves as a learner once
        /// `truba member add` names it.
        #[arg(long, value_name = "HOST:PORT")]
        join: Option<String>,
    },
    /// Open a session of a kind; prints its handle (SESSION@ATTEMPT).
    New {
        /// The session's kind (a `[kinds.N]` section of the server's configuration).
        #[arg(long)]
        kind: u32,
        /// Optional first record, as text.
        #[arg(long, conflicts_with = "file")]
        data: Option<String>,
        /// Optional first record, from a file ("-" for standard input).
        #[arg(long)]
        file: Option<PathBuf>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Add one record at the end of a session.
    Append {
        /// SESSION or SESSION@ATTEMPT (without the attempt, the current one is looked up).
        session: String,
        #[command(flatten)]
        data: Data,
        #[command(flatten)]
        conn: Conn,
    },
    /// Drop all of a session's records and keep this one.
    Replace {
        /// SESSION or SESSION@ATTEMPT (without the attempt, the current one is looked up).
        session: String,
        #[command(flatten)]
        data: Data,
        #[command(flatten)]
        conn: Conn,
    },
    /// Finish a session: it is never redelivered.
    Delete {
        /// SESSION or SESSION@ATTEMPT (without the attempt, the current one is looked up).
        session: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Renew a session's lease without changing it (a long job keeps its session this way).
    KeepAlive {
        /// SESSION or SESSION@ATTEMPT (without the attempt, the current one is looked up).
        session: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Leave a session unfinished: redeliver it to its kind's handler after the timeout.
    Store {
        /// SESSION or SESSION@ATTEMPT (without the attempt, the current one is looked up).
        session: String,
        /// Seconds until redelivery (the kind's jitter is added).
        #[arg(long)]
        timeout: u32,
        #[command(flatten)]
        conn: Conn,
    },
    /// Show a session's state, deliveries, failures and records.
    Get {
        /// SESSION or SESSION@ATTEMPT (a handle as the other commands print it; the session is
        /// shown whatever its current attempt, with a note if that is not the one given).
        session: String,
        /// Read from the first member in --addr itself, a learner included, as it has applied
        /// the log: at once and without the leader, but possibly behind it (the member's
        /// applied index is printed). Without it, the read is linearizable (through the leader).
        #[arg(long)]
        stale: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Show the server's index, sessions and disk use; with several addresses or --cluster,
    /// every member's role, term, commit, applied index and lag.
    Status {
        /// Ask every member of the cluster, as the first member reached lists them (so one
        /// address is enough).
        #[arg(long)]
        cluster: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Sessions whose deliveries failed their kind's max_attempts in a row: list, inspect, redrive.
    #[command(subcommand)]
    Dead(DeadCommand),
    /// Show the ledger: what every committed entry did, one line an event (any member serves it).
    ///
    /// Without --follow it stops once it has shown everything up to the head as of its start.
    Tail {
        /// Where to start: an index, `oldest` (the oldest entry the member still holds) or `now`
        /// (only what happens from now on).
        #[arg(long, value_name = "INDEX|oldest|now")]
        from: String,
        /// Only events of sessions of this kind (repeat for several kinds).
        #[arg(long = "kind", value_name = "K")]
        kinds: Vec<u32>,
        /// Include internal events: keep-alives, refused and repeated requests, the pipe's own
        /// housekeeping (no-ops, spills, merges).
        #[arg(long)]
        internal: bool,
        /// Keep following new entries as they commit.
        #[arg(long)]
        follow: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Watch sessions: the live ones (a resync), then their changes as they commit, each
    /// acknowledged once printed. Runs until interrupted.
    Watch {
        /// Only sessions of this kind (repeat for several kinds).
        #[arg(long = "kind", value_name = "K")]
        kinds: Vec<u32>,
        /// Go on after this index (the last one a watcher acknowledged) without a resync, if the
        /// member still holds the changes after it.
        #[arg(long, value_name = "INDEX")]
        resume_after: Option<u64>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Named consumers and their checkpoints: open, commit, read, wait for, drop.
    #[command(subcommand)]
    Consumer(ConsumerCommand),
    /// The cluster's replicated configuration (kinds and the limits applying depends on):
    /// show it, or change it from a file.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// The cluster's members: list them with their roles and lag, add a learner, promote it once
    /// it has caught up, remove a member.
    #[command(subcommand)]
    Member(MemberCommand),
    /// Leadership: hand it to another voter.
    #[command(subcommand)]
    Leader(LeaderCommand),
    /// Credentials: `truba auth hash-token` prints the digest of a bearer token, for a
    /// principal's `token_sha256` in a node's `[auth]`.
    #[command(subcommand)]
    Auth(AuthCommand),
    /// A demo handler: prints every delivery and deletes the session.
    HandlerEcho {
        /// Address to listen on for the pipe's deliveries (the kind's `handler` address).
        #[arg(long, default_value = "127.0.0.1:7500")]
        listen: String,
    },
    /// Closed-loop appends from concurrent sessions; prints throughput and latency percentiles
    /// beside this machine's raw write+fsync rate.
    Bench(truba::bench::BenchArgs),
    /// Many stored sessions of one record each, all due at once, then redelivered to an echo
    /// handler this command serves: store rate, then deliveries per second.
    BenchStored(truba::bench_stored::BenchStoredArgs),
    /// The reading side: a tail catching up, tails following the head during the append load
    /// (with their lag), a watch's resync (with the server's RSS), a consumer's commits.
    BenchRead(truba::bench_read::BenchReadArgs),
}

#[derive(Subcommand)]
enum DeadCommand {
    /// List a kind's dead sessions, oldest first, one line each.
    List {
        /// The kind whose dead-letter set to list.
        #[arg(long)]
        kind: u32,
        /// Start after this session id (the last one of the previous page).
        #[arg(long, value_name = "SESSION")]
        after: Option<u64>,
        /// Most sessions to list (the server caps it at its engine.list_max, 1000 by default).
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
        limit: u32,
        #[command(flatten)]
        conn: Conn,
    },
    /// Show a dead session like `truba get`; fails if the session is not dead.
    Show {
        /// The session id.
        session: u64,
        #[command(flatten)]
        conn: Conn,
    },
    /// Move dead sessions back to the stored set, due at once, with their failure count cleared.
    #[command(group(ArgGroup::new("target").required(true).args(["session", "kind"])))]
    Redrive {
        /// The dead session to redrive.
        session: Option<u64>,
        /// Redrive every session of this kind that is dead when the command starts, in batches
        /// (progress on standard error).
        #[arg(long)]
        kind: Option<u32>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Delete a dead session without delivering it (a poison message). It is never delivered
    /// again; refused for a session that is not dead.
    Drop {
        /// The dead session to delete.
        session: u64,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Subcommand)]
enum MemberCommand {
    /// Every member with its role, addresses, and (from the leader) how far its log is behind.
    List {
        #[command(flatten)]
        conn: Conn,
    },
    /// Add a member as a learner: it replicates everything and votes on nothing. Start it with
    /// `truba serve --join` (before or after this command); promote it once it has caught up.
    Add {
        /// The new member's id (unused in this cluster so far).
        id: u32,
        /// Where the other members reach it.
        #[arg(long, value_name = "HOST:PORT")]
        peer: String,
        /// Where clients reach it.
        #[arg(long, value_name = "HOST:PORT")]
        client: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Make a learner a voter. Refused while it is behind; with --wait, retried until it has
    /// caught up or the timeout passes.
    Promote {
        id: u32,
        /// Keep trying while the learner catches up (within --timeout).
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Remove a member (a voter or a learner). The leader cannot remove itself: transfer
    /// leadership first.
    Remove {
        id: u32,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Subcommand)]
enum LeaderCommand {
    /// Hand leadership to a caught-up voter: the leader stops taking writes, brings it up to date
    /// and tells it to stand at once. Prints how long the cluster was without a leader.
    Transfer {
        /// The voter to lead.
        #[arg(long)]
        to: u32,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print the live configuration as TOML (the shape of a node's file), with its version and
    /// members; with --json, as JSON.
    Show {
        #[command(flatten)]
        conn: Conn,
    },
    /// Propose the kinds and replicated limits in FILE (a node's file, or `config show`'s
    /// output, edited): shows what changes, checks it, and commits it as one entry, refused
    /// whole if the configuration changed meanwhile or a removed kind still has sessions.
    Apply {
        /// TOML with `[kinds.N]` and `[engine]` tables; node-local settings in it are ignored
        /// (and listed).
        file: PathBuf,
        /// Show what would change and stop.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Subcommand)]
enum ConsumerCommand {
    /// Open a consumer (creating it if new); prints its epoch (which fences older openings)
    /// and its checkpoint.
    Open {
        /// The consumer's name (letters, digits, `.`, `-`, `_`, `/`).
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Commit a checkpoint, with session operations applied in the same entry (all or none).
    Commit {
        name: String,
        /// The epoch `truba consumer open` printed.
        #[arg(long)]
        epoch: u64,
        /// Everything through this index is processed.
        #[arg(long, value_name = "INDEX")]
        through: u64,
        /// Operations as JSON lines ("-" for standard input), one of:
        /// {"op":"new","kind":1,"records":["..."],"store_s":60},
        /// {"op":"append","handle":"17@0","record":"..."}, {"op":"replace","handle":"17@0","record":"..."},
        /// {"op":"delete","handle":"17@0"}, {"op":"store","handle":"17@0","timeout_s":60},
        /// {"op":"keep-alive","handle":"17@0"}.
        #[arg(long, value_name = "FILE|-")]
        ops: Option<PathBuf>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Show a consumer's epoch and checkpoint (read through the leader).
    Get {
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Wait until a consumer's checkpoint covers an index (it has processed it); fails after the
    /// timeout. Any member answers.
    Wait {
        name: String,
        #[arg(long, value_name = "INDEX")]
        index: u64,
        #[arg(long, default_value_t = 30_000)]
        timeout_ms: u64,
        #[command(flatten)]
        conn: Conn,
    },
    /// Remove a consumer and its checkpoint.
    Drop {
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let serving = matches!(cli.command, Command::Serve { .. });
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| if serving { "info".into() } else { "warn".into() });
    use std::io::IsTerminal as _;
    let ansi = std::io::stderr().is_terminal();
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init();
    // The server's engine, connections and handler pushes all run on one thread (disk work has a
    // thread of its own): every request and reply then stays on that thread instead of bouncing
    // between runtime workers. The load generator does the same unless told to use more threads.
    let runtime = match &cli.command {
        Command::Bench(b) if b.threads > 1 => {
            tokio::runtime::Builder::new_multi_thread().worker_threads(b.threads).enable_all().build()
        }
        _ => tokio::runtime::Builder::new_current_thread().enable_all().build(),
    };
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            eprintln!("truba: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("truba: {e}");
            ExitCode::FAILURE
        }
    }
}

type CliResult = Result<(), String>;

async fn run(command: Command) -> CliResult {
    match command {
        Command::Serve { config, data_dir, listen, join } => serve(config, data_dir, listen, join).await,
        Command::New { kind, data, file, conn } => {
            let pipe = connect(&conn).await?;
            let first = match (data, file) {
                (Some(d), _) => Some(d.into_bytes()),
                (None, Some(f)) => Some(read_file(&f)?),
                (None, None) => None,
            };
            let session = match first {
                Some(r) => pipe.new_with(kind, r).await,
                None => pipe.new(kind).await,
            }
            .map_err(err)?;
            let h = session.handle();
            print(
                &conn,
                &format!("{}@{}", h.session.0, h.attempt.0),
                serde_json::json!({"session": h.session.0, "attempt": h.attempt.0}),
            );
            Ok(())
        }
        Command::Append { session, data, conn } => {
            let (pipe, mut s) = open(&conn, &session).await?;
            s.append(record(&data)?).await.map_err(err)?;
            done(&conn, &pipe, s.handle())
        }
        Command::Replace { session, data, conn } => {
            let (pipe, mut s) = open(&conn, &session).await?;
            s.replace(record(&data)?).await.map_err(err)?;
            done(&conn, &pipe, s.handle())
        }
        Command::Delete { session, conn } => {
            let (pipe, s) = open(&conn, &session).await?;
            let h = s.handle();
            s.delete().await.map_err(err)?;
            done(&conn, &pipe, h)
        }
        Command::KeepAlive { session, conn } => {
            let (pipe, mut s) = open(&conn, &session).await?;
            s.keep_alive().await.map_err(err)?;
            done(&conn, &pipe, s.handle())
        }
        Command::Store { session, timeout, conn } => {
            let (_, s) = open(&conn, &session).await?;
            let h = s.handle();
            let due = s.store(timeout).await.map_err(err)?;
            let text = format!("stored {}@{}, due at {} (unix seconds)", h.session.0, h.attempt.0, due.0);
            print(
                &conn,
                &text,
                serde_json::json!({"session": h.session.0, "attempt": h.attempt.0, "due_unix_s": due.0}),
            );
            Ok(())
        }
        Command::Get { session, stale, conn } => get(&conn, &session, stale).await,
        Command::Status { cluster, conn } => status(&conn, cluster).await,
        Command::Dead(DeadCommand::List { kind, after, limit, conn }) => dead_list(&conn, kind, after, limit).await,
        Command::Dead(DeadCommand::Show { session, conn }) => dead_show(&conn, session).await,
        Command::Dead(DeadCommand::Redrive { session: Some(session), kind: None, conn }) => {
            redrive_session(&conn, session).await
        }
        Command::Dead(DeadCommand::Redrive { session: None, kind: Some(kind), conn }) => {
            redrive_kind(&conn, kind).await
        }
        Command::Dead(DeadCommand::Redrive { .. }) => Err("give either a SESSION or --kind, not both".into()),
        Command::Dead(DeadCommand::Drop { session, conn }) => drop_dead(&conn, session).await,
        Command::Tail { from, kinds, internal, follow, conn } => tail(&conn, &from, kinds, internal, follow).await,
        Command::Watch { kinds, resume_after, conn } => watch(&conn, kinds, resume_after).await,
        Command::Consumer(c) => consumer(c).await,
        Command::Member(command) => member(command).await,
        Command::Leader(LeaderCommand::Transfer { to, conn }) => leader_transfer(&conn, ReplicaId(to)).await,
        Command::Config(ConfigCommand::Show { conn }) => config_show(&conn).await,
        Command::Config(ConfigCommand::Apply { file, dry_run, conn }) => config_apply(&conn, &file, dry_run).await,
        Command::Auth(AuthCommand::HashToken) => {
            let mut token = String::new();
            std::io::stdin().read_line(&mut token).map_err(|e| format!("reading the token: {e}"))?;
            let token = token.trim_end_matches(['\n', '\r']);
            if token.is_empty() {
                return Err("no token on standard input".into());
            }
            println!("{}", truba::auth::hash_token(token));
            Ok(())
        }
        Command::HandlerEcho { listen } => truba::handler::serve(&listen, Echo).await.map_err(|e| e.to_string()),
        Command::Bench(args) => truba::bench::run(args).await,
        Command::BenchStored(args) => truba::bench_stored::run(args).await,
        Command::BenchRead(args) => truba::bench_read::run(args).await,
    }
}

async fn serve(
    config: Option<PathBuf>,
    data_dir: Option<PathBuf>,
    listen: Option<String>,
    join: Option<String>,
) -> CliResult {
    let mut config = match &config {
        Some(path) => Config::load(path).map_err(|e| e.to_string())?,
        None => Config::default(),
    };
    if let Some(contact) = join {
        let Some(c) = config.cluster.as_mut() else {
            return Err("--join needs a [cluster] section giving this node's id and addresses".into());
        };
        c.join = Some(contact);
    }
    if let Some(d) = data_dir {
        config.data_dir = d;
    }
    if let Some(l) = listen {
        config.listen = l;
    }
    let fs = truba::disk::DirFs::open(&config.data_dir).map_err(|e| e.to_string())?;
    let net = match &config.tls {
        Some(files) => RealNet::with_tls(Tls::node(files).map_err(|e| e.to_string())?),
        None => RealNet::plain(),
    };
    if !net.is_tls() {
        warn_if_exposed(&config);
    }
    let env = RealEnv::with_net(net);
    let listener = server::bind(&env.transport(), &config.listen).await.map_err(|e| e.to_string())?;
    tracing::info!(listen = config.listen, data_dir = %config.data_dir.display(), kinds = config.kinds.len(), "serving");
    server::run(config, env, Arc::new(fs), listener, shutdown_signal()).await.map_err(|e| e.to_string())
}

/// Plain TCP is for a node on loopback only: one that listens on another address without TLS
/// says so, loudly, for each such address.
fn warn_if_exposed(config: &Config) {
    let mut addrs = vec![("client", config.listen.clone())];
    if let Some(c) = &config.cluster {
        if let Some(me) = c.members.iter().find(|m| m.id == c.id) {
            addrs.push(("member", me.peer.clone()));
        }
    }
    for (port, addr) in addrs {
        let host = addr.rsplit_once(':').map_or(addr.as_str(), |(h, _)| h).trim_matches(|c| c == '[' || c == ']');
        let loopback = host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
        if !loopback {
            tracing::error!(
                port,
                %addr,
                "NO TLS: this node listens beyond loopback in plain text; anyone who reaches {addr} can read and change \
                 every session and, on the member port, pose as a member. Configure [tls] (cert, key, ca) in the node's file"
            );
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}

fn err(e: ClientError) -> String {
    e.to_string()
}

async fn connect(conn: &Conn) -> Result<Pipe, String> {
    Pipe::connect_with(conn.net()?, vec![conn.addr.clone()], conn.options()).await.map_err(err)
}

/// A session from "SID" or "SID@ATTEMPT". Without the attempt, the current one is looked up,
/// which skips fencing: fine for a person at a shell, not for a program.
async fn open(conn: &Conn, spec: &str) -> Result<(Pipe, Session), String> {
    let (sid, attempt) = parse_session_spec(spec)?;
    let pipe = connect(conn).await?;
    let attempt = match attempt {
        Some(a) => a,
        None => pipe.get(SessionId(sid)).await.map_err(err)?.handle.attempt.0,
    };
    let session = pipe.session(Handle { session: SessionId(sid), attempt: Attempt(attempt) });
    Ok((pipe, session))
}

fn parse_u64(s: &str, spec: &str) -> Result<u64, String> {
    s.parse().map_err(|_| format!("`{spec}` is not a session (expected SESSION or SESSION@ATTEMPT)"))
}

fn read_file(path: &PathBuf) -> Result<Vec<u8>, String> {
    if path.as_os_str() == "-" {
        use std::io::Read;
        let mut buf = Vec::new();
        std::io::stdin().read_to_end(&mut buf).map_err(|e| format!("reading standard input: {e}"))?;
        return Ok(buf);
    }
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

fn record(data: &Data) -> Result<Vec<u8>, String> {
    match (&data.data, &data.file) {
        (Some(d), _) => Ok(d.clone().into_bytes()),
        (None, Some(f)) => read_file(f),
        (None, None) => Err("give the record with --data or --file".into()),
    }
}

fn done(conn: &Conn, _pipe: &Pipe, h: Handle) -> CliResult {
    print(conn, "ok", serde_json::json!({"ok": true, "session": h.session.0, "attempt": h.attempt.0}));
    Ok(())
}

fn print(conn: &Conn, text: &str, json: serde_json::Value) {
    if conn.json {
        println!("{json}");
    } else {
        println!("{text}");
    }
}

fn show_record(r: &[u8]) -> String {
    match std::str::from_utf8(r) {
        Ok(s) if !s.chars().any(char::is_control) => format!("{s:?}"),
        _ => format!("<{} bytes>", r.len()),
    }
}

async fn get(conn: &Conn, spec: &str, stale: bool) -> CliResult {
    let (session, attempt) = parse_session_spec(spec)?;
    let v = if stale {
        // Exactly the first member given: a stale read is about that member's state.
        let first = conn.addr.split(',').next().unwrap_or_default().to_string();
        let options = ClientOptions { learn_members: false, ..conn.options() };
        let pipe = Pipe::connect_with(conn.net()?, vec![first.clone()], options).await.map_err(err)?;
        let v = pipe.get_local(SessionId(session)).await.map_err(err)?;
        if let Ok(s) = pipe.status().await {
            eprintln!(
                "stale read from {first} (member {}, {}), applied through {}; the cluster has committed at least that",
                s.engine.replica, s.role, s.engine.applied.0
            );
        }
        v
    } else {
        connect(conn).await?.get(SessionId(session)).await.map_err(err)?
    };
    if let Some(a) = attempt.filter(|a| *a != v.handle.attempt.0) {
        eprintln!("note: session {session} is at attempt {} now, not {a}", v.handle.attempt.0);
    }
    print_view(conn, &v);
    Ok(())
}

/// "SID" or "SID@ATTEMPT".
fn parse_session_spec(spec: &str) -> Result<(u64, Option<u32>), String> {
    match spec.split_once('@') {
        Some((s, a)) => {
            Ok((parse_u64(s, spec)?, Some(a.parse::<u32>().map_err(|_| format!("bad attempt in `{spec}`"))?)))
        }
        None => Ok((parse_u64(spec, spec)?, None)),
    }
}

/// A session's state by name, and its details as JSON.
fn state_of(state: &SessionState) -> (&'static str, serde_json::Value) {
    match state {
        SessionState::Active { lease_until, delivering } => {
            ("active", serde_json::json!({"lease_until_unix_ms": lease_until.0, "delivering": delivering}))
        }
        SessionState::Stored { due } => ("stored", serde_json::json!({"due_unix_s": due.0})),
        SessionState::Dead { since } => ("dead", serde_json::json!({"dead_since_index": since.0})),
    }
}

/// A failure reason for JSON output: its type and the handler's or the connection's message.
fn failure_json(reason: &Option<FailureReason>) -> serde_json::Value {
    match reason {
        None => serde_json::Value::Null,
        Some(FailureReason::Handler(m)) => serde_json::json!({"type": "handler", "message": m}),
        Some(FailureReason::Unreachable(m)) => serde_json::json!({"type": "unreachable", "message": m}),
        Some(FailureReason::LeaseExpired) => serde_json::json!({"type": "lease_expired", "message": null}),
    }
}

fn failure_text(reason: &Option<FailureReason>) -> String {
    reason.as_ref().map_or_else(|| "-".to_string(), |r| r.to_string())
}

fn print_view(conn: &Conn, v: &SessionView) {
    let (state, detail) = state_of(&v.state);
    if conn.json {
        let records: Vec<String> = v.records.iter().map(|r| String::from_utf8_lossy(r).into_owned()).collect();
        println!(
            "{}",
            serde_json::json!({"session": v.id.0, "kind": v.kind.0, "attempt": v.handle.attempt.0, "state": state,
                "detail": detail, "deliveries": v.deliveries, "failures": v.failures,
                "last_failure": failure_json(&v.last_failure), "bytes": v.bytes, "records": records,
                "source": v.source.map(|(s, n)| serde_json::json!({"id": s.0, "records": n}))})
        );
    } else {
        println!("session {}  kind {}  attempt {}  {state} {detail}", v.id.0, v.kind.0, v.handle.attempt.0);
        // A spilled session's records come from its source file; a server that could not read
        // them at once (too many reads under way) answers without them.
        let unread = v.source.is_some_and(|(_, n)| n > 0 && v.records.is_empty());
        let last_failure = match v.source {
            Some(_) if unread && v.failures > 0 => "kept in the source file".to_string(),
            _ => failure_text(&v.last_failure),
        };
        println!("deliveries {}  failures in a row {}  last failure: {last_failure}", v.deliveries, v.failures);
        if let Some((source, n)) = v.source {
            println!("{n} records, {} bytes, kept in source file src-{:020} until due", v.bytes, source.0);
            if unread {
                println!("  (records not read this time: ask again)");
                return;
            }
        } else {
            println!("{} records, {} bytes", v.records.len(), v.bytes);
        }
        for (i, r) in v.records.iter().enumerate() {
            println!("  [{i}] {}", show_record(r));
        }
    }
}

async fn dead_list(conn: &Conn, kind: u32, after: Option<u64>, limit: u32) -> CliResult {
    let pipe = connect(conn).await?;
    let page = pipe.dead_page(kind, after.map(SessionId), limit).await.map_err(err)?;
    // Whether more follow (the server may have capped the page below `limit`, and `total`
    // counts the pages before this one too): one more session after the last says so.
    let next = match page.sessions.last() {
        Some(last) if page.total > page.sessions.len() as u64 => {
            let more = pipe.dead_page(kind, Some(last.id), 1).await.map_err(err)?;
            (!more.sessions.is_empty()).then_some(last.id.0)
        }
        _ => None,
    };
    if conn.json {
        let sessions: Vec<_> = page
            .sessions
            .iter()
            .map(|d| {
                serde_json::json!({"session": d.id.0, "dead_since_index": d.since.0, "deliveries": d.deliveries,
                    "failures": d.failures, "records": d.records, "bytes": d.bytes,
                    "last_failure": failure_json(&d.last_failure)})
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({"kind": kind, "total": page.total, "sessions": sessions, "next_after": next})
        );
        return Ok(());
    }
    if !page.sessions.is_empty() {
        println!(
            "{:>12} {:>12} {:>10} {:>8} {:>8} {:>10}  last failure",
            "session", "since index", "deliveries", "failures", "records", "bytes"
        );
    }
    for d in &page.sessions {
        println!(
            "{:>12} {:>12} {:>10} {:>8} {:>8} {:>10}  {}",
            d.id.0,
            d.since.0,
            d.deliveries,
            d.failures,
            d.records,
            d.bytes,
            failure_text(&d.last_failure)
        );
    }
    let more = next.map(|n| format!(" (next page: --after {n})")).unwrap_or_default();
    println!("{} of {} dead sessions of kind {kind}{more}", page.sessions.len(), page.total);
    Ok(())
}

async fn dead_show(conn: &Conn, session: u64) -> CliResult {
    let pipe = connect(conn).await?;
    let v = pipe.get(SessionId(session)).await.map_err(err)?;
    match &v.state {
        SessionState::Dead { .. } => {
            print_view(conn, &v);
            Ok(())
        }
        SessionState::Active { delivering: true, .. } => Err(format!(
            "session {session} is not dead: it is active, being delivered (attempt {})",
            v.handle.attempt.0
        )),
        SessionState::Active { .. } => Err(format!("session {session} is not dead: it is active")),
        SessionState::Stored { due } => {
            Err(format!("session {session} is not dead: it is stored, due at {} (unix seconds)", due.0))
        }
    }
}

async fn redrive_session(conn: &Conn, session: u64) -> CliResult {
    let pipe = connect(conn).await?;
    let r = pipe.redrive_session(SessionId(session)).await.map_err(err)?;
    print(
        conn,
        &format!("redriven session {session}; {} sessions of its kind still dead", r.remaining),
        serde_json::json!({"session": session, "redriven": r.count, "remaining": r.remaining}),
    );
    Ok(())
}

async fn drop_dead(conn: &Conn, session: u64) -> CliResult {
    let pipe = connect(conn).await?;
    pipe.drop_dead(SessionId(session)).await.map_err(err)?;
    print(conn, &format!("dropped dead session {session}"), serde_json::json!({"session": session, "dropped": true}));
    Ok(())
}

/// Redrives a whole kind one batch (the server's `redrive_batch_max`) per request. It stops when
/// none remain, when a batch moves none, or once it has moved as many as were dead when it
/// started: sessions that fail again and die while it runs are left for the next run instead of
/// being chased for ever.
async fn redrive_kind(conn: &Conn, kind: u32) -> CliResult {
    let pipe = connect(conn).await?;
    let mut total = 0u64;
    let mut budget = None;
    let last = loop {
        let r: Redriven = pipe.redrive_kind(kind).await.map_err(|e| {
            if total == 0 {
                err(e)
            } else {
                format!("after redriving {total} sessions of kind {kind}: {e}")
            }
        })?;
        total += r.count as u64;
        let budget = *budget.get_or_insert(r.count as u64 + r.remaining);
        eprintln!("redriven {}, {} still dead", r.count, r.remaining);
        if r.remaining == 0 || r.count == 0 || total >= budget {
            break r;
        }
    };
    let still = if last.remaining > 0 { format!("; {} still dead", last.remaining) } else { String::new() };
    print(
        conn,
        &format!("redriven {total} sessions of kind {kind}{still}"),
        serde_json::json!({"kind": kind, "redriven": total, "remaining": last.remaining}),
    );
    Ok(())
}

/// One node's status, or every node's when several addresses are given (a cluster): role,
/// term, commit and applied index, and how far each lags behind the highest commit seen.
async fn status(conn: &Conn, cluster: bool) -> CliResult {
    let mut addrs: Vec<String> = conn.addr.split(',').map(|a| a.trim().to_string()).filter(|a| !a.is_empty()).collect();
    if cluster {
        let pipe = connect(conn).await?;
        let members = pipe.members();
        if !members.is_empty() && members.iter().all(|(_, a)| !a.is_empty()) {
            addrs = members.into_iter().map(|(_, a)| a).collect();
        }
    }
    if addrs.len() <= 1 && !cluster {
        let pipe = connect(conn).await?;
        let s = pipe.status().await.map_err(err)?;
        print_one(&s, conn.json);
        return Ok(());
    }
    let mut rows = Vec::new();
    for addr in &addrs {
        // Each member alone, and briefly: one that is down must not hold up the others' rows.
        let base = conn.options();
        let options =
            ClientOptions { learn_members: false, retry_for: base.retry_for.min(Duration::from_secs(2)), ..base };
        let s = match Pipe::connect_with(conn.net()?, vec![addr.clone()], options).await {
            Ok(pipe) => pipe.status().await.map_err(err),
            Err(e) => Err(err(e)),
        };
        rows.push((addr.clone(), s));
    }
    print_cluster(&rows, conn.json);
    if rows.iter().all(|(_, s)| s.is_err()) {
        return Err(format!("no node answered at {}", conn.addr));
    }
    Ok(())
}

fn print_one(s: &ServerStatus, json: bool) {
    if json {
        println!("{}", status_json(s));
        return;
    }
    let phase = if s.engine.serving { "serving" } else { "recovering" };
    println!("truba {}  {}  {phase}", s.version, s.role);
    println!("index    applied {}  commit {}  durable {}", s.engine.applied.0, s.engine.commit.0, s.engine.durable.0);
    println!(
        "sessions active {}  stored {} ({} in {} source files)  dead {}",
        s.engine.sessions_active,
        s.engine.sessions_stored,
        s.engine.sessions_spilled,
        s.engine.source_files,
        s.engine.sessions_dead
    );
    println!("disk     {} bytes   connections {}", s.disk_bytes, s.connections);
    println!("state    hash {:016x}", s.engine.state_hash);
}

/// A node's role as it reports it: its consensus role, or `learner` for a member that does not
/// vote (a learner is a follower that never stands), or `joining` before it knows any members.
fn role_of(e: &truba_engine::StatusView) -> String {
    let member = e.members.iter().find(|m| m.id == e.replica).map(|m| m.role);
    match member {
        Some(truba_engine::MemberRole::Learner) => "learner".into(),
        None if e.members.is_empty() => "joining".into(),
        None => "removed".into(),
        Some(truba_engine::MemberRole::Voter) => e.role.to_string(),
    }
}

fn status_json(s: &ServerStatus) -> serde_json::Value {
    let e = &s.engine;
    serde_json::json!({"version": s.version, "replica": e.replica.0, "role": role_of(e), "term": e.term.0,
        "leader": e.leader.map(|l| l.0), "serving": e.serving, "applied": e.applied.0, "commit": e.commit.0,
        "durable": e.durable.0, "last_index": e.last_index.0, "sessions_active": e.sessions_active,
        "sessions_stored": e.sessions_stored, "sessions_spilled": e.sessions_spilled, "source_files": e.source_files,
        "sessions_dead": e.sessions_dead, "disk_bytes": s.disk_bytes, "connections": s.connections,
        "state_hash": format!("{:016x}", e.state_hash)})
}

fn print_cluster(rows: &[(String, Result<ServerStatus, String>)], json: bool) {
    let top = rows.iter().filter_map(|(_, s)| s.as_ref().ok()).map(|s| s.engine.commit.0).max().unwrap_or(0);
    if json {
        let nodes: Vec<_> = rows
            .iter()
            .map(|(addr, s)| match s {
                Ok(s) => {
                    let mut v = status_json(s);
                    v["addr"] = addr.clone().into();
                    v["lag"] = top.saturating_sub(s.engine.applied.0).into();
                    v
                }
                Err(e) => serde_json::json!({"addr": addr, "error": e}),
            })
            .collect();
        println!("{}", serde_json::Value::Array(nodes));
        return;
    }
    println!(
        "{:<22} {:>7} {:<14} {:>6} {:>7} {:>10} {:>10} {:>8}",
        "node", "replica", "role", "term", "leader", "commit", "applied", "lag"
    );
    for (addr, s) in rows {
        match s {
            Ok(s) => {
                let e = &s.engine;
                let role = if e.serving { role_of(e) } else { "recovering".into() };
                let leader = e.leader.map(|l| l.to_string()).unwrap_or_else(|| "-".into());
                let lag = top.saturating_sub(e.applied.0);
                println!(
                    "{addr:<22} {:>7} {role:<14} {:>6} {leader:>7} {:>10} {:>10} {lag:>8}",
                    e.replica.to_string(),
                    e.term.0,
                    e.commit.0,
                    e.applied.0
                );
            }
            Err(e) => println!("{addr:<22} unreachable: {e}"),
        }
    }
}

/// The demo handler: prints each delivery and deletes the session.
struct Echo;

impl truba::handler::Handler for Echo {
    async fn handle(&self, data: truba::handler::RepeatData) -> Result<(), String> {
        let h = data.session.handle();
        println!(
            "delivery: session {}@{} kind {} due {} ({} records)",
            h.session.0,
            h.attempt.0,
            data.kind,
            data.due.0,
            data.records.len()
        );
        for (i, r) in data.records.iter().enumerate() {
            println!("  [{i}] {}", show_record(r));
        }
        data.session.delete().await.map_err(|e| e.to_string())?;
        println!("  deleted");
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The reading side: tail, watch, consumers.

/// A time in the ledger (milliseconds since the Unix epoch) as a UTC date, e.g.
/// 2026-12-02T12:45:27.123Z. The calendar arithmetic is the `time` crate's.
fn utc(ms: u64) -> String {
    match time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            t.millisecond()
        ),
        Err(_) => format!("{ms} ms after the epoch"),
    }
}

fn utc_s(secs: u64) -> String {
    utc(secs.saturating_mul(1000))
}

fn parse_from(from: &str) -> Result<TailFrom, String> {
    match from {
        "oldest" => Ok(TailFrom::Oldest),
        "now" => Ok(TailFrom::Next),
        i => i
            .parse::<u64>()
            .map(|i| TailFrom::Index(Index(i)))
            .map_err(|_| format!("--from `{from}`: expected an index, `oldest` or `now`")),
    }
}

async fn tail(conn: &Conn, from: &str, kinds: Vec<u32>, internal: bool, follow: bool) -> CliResult {
    let from = parse_from(from)?;
    let pipe = connect(conn).await?;
    // Without --follow: the head as of the start, on the member the pipe reached first (the
    // tail starts with the same one).
    let head = match follow {
        true => None,
        false => Some(pipe.status().await.map_err(err)?.engine.applied),
    };
    let nothing_left = match (head, from) {
        (Some(head), TailFrom::Index(i)) => i > head,
        (Some(head), TailFrom::Oldest) => head.0 == 0,
        (Some(_), TailFrom::Next) => true,
        (None, _) => false,
    };
    if nothing_left {
        return Ok(());
    }
    let filter = Filter { kinds: kinds.into_iter().map(Kind).collect(), internal, sessions_only: false };
    let mut t = pipe.tail(from, filter);
    loop {
        if let (Some(head), Some(at)) = (head, t.position()) {
            if at >= head {
                return Ok(());
            }
        }
        match t.next().await {
            None => return Ok(()),
            Some(Err(e)) => return Err(err(e)),
            Some(Ok(TailItem::Progress { .. })) => {}
            Some(Ok(TailItem::Entry(entry))) => print_entry(&entry, conn.json),
        }
    }
}

fn print_entry(entry: &LedgerEntry, json: bool) {
    for event in &entry.events {
        if json {
            let mut v = serde_json::json!({"index": entry.index.0, "term": entry.term.0,
                "at": utc(entry.audit.at.0), "at_unix_ms": entry.audit.at.0,
                "session": event.session.map(|s| s.0), "kind": event.kind.map(|k| k.0),
                "what": event.what.name(), "before": event.before.as_ref().map(brief_json),
                "after": event.after.as_ref().map(brief_json), "audit": audit_json(&entry.audit)});
            if let (serde_json::Value::Object(o), serde_json::Value::Object(fields)) = (&mut v, what_json(&event.what))
            {
                o.extend(fields);
            }
            println!("{v}");
        } else {
            println!("{}", event_line(entry.index, Some(entry.audit.at.0), event));
        }
    }
}

/// One event, for people: when (if known), the entry, what, the session, the details, and the
/// session's state before and after.
fn event_line(index: Index, at_ms: Option<u64>, e: &Event) -> String {
    let whom = match (e.session, e.kind) {
        (Some(s), Some(k)) => format!("  session {} kind {}", s.0, k.0),
        (Some(s), None) => format!("  session {}", s.0),
        _ => String::new(),
    };
    let detail = what_text(&e.what);
    let detail = if detail.is_empty() { detail } else { format!("  {detail}") };
    let states = if e.session.is_some() {
        format!("  [{} -> {}]", brief_text(e.before.as_ref()), brief_text(e.after.as_ref()))
    } else {
        String::new()
    };
    let at = at_ms.map(|ms| format!("{}  ", utc(ms))).unwrap_or_default();
    format!("{at}#{:<8} {:<20}{whom}{detail}{states}", index.0, e.what.name())
}

fn what_text(w: &What) -> String {
    match w {
        What::Created { records } => {
            let shown: Vec<String> = records.iter().map(|r| show_record(r)).collect();
            match shown.len() {
                0 => "no records".into(),
                _ => shown.join(" "),
            }
        }
        What::Appended { record } | What::Replaced { record } => show_record(record),
        What::Stored { due } | What::Taken { due } | What::LeaseExpired { due } | What::Redriven { due } => {
            format!("due {}", utc_s(due.0))
        }
        What::DeliveryFailed { reason, due } => format!("{reason}; due {}", utc_s(due.0)),
        What::DeadLettered { reason } => reason.to_string(),
        What::ConsumerOpened { consumer, epoch } => format!("consumer {consumer} epoch {epoch}"),
        What::CheckpointCommitted { consumer, epoch, through } => {
            format!("consumer {consumer} epoch {epoch} through {}", through.0)
        }
        What::ConsumerDropped { consumer } => format!("consumer {consumer}"),
        What::Refused { request, error } => format!("{request}: {error}"),
        What::Repeated { request } => request.clone(),
        What::NoEffect { entry } => entry.clone(),
        What::Spilled { source, sessions } => format!("source {} ({sessions} sessions)", source.0),
        What::Merging { source, older, newer } => format!("source {} from {} and {}", source.0, older.0, newer.0),
        What::SourceReady { source } => format!("source {}", source.0),
        What::Configured { version } => format!("configuration version {version}"),
        What::MembersChanged { version, change } => format!("{change}; configuration version {version}"),
        What::Dropped | What::Deleted | What::Renewed | What::Noop | What::Reserved => String::new(),
    }
}

/// The fields of what happened, for JSON output.
fn what_json(w: &What) -> serde_json::Value {
    let text = |r: &[u8]| String::from_utf8_lossy(r).into_owned();
    let due = |d: &truba_engine::UnixSecs| serde_json::json!({"due": utc_s(d.0), "due_unix_s": d.0});
    match w {
        What::Created { records } => {
            serde_json::json!({"records": records.iter().map(|r| text(r)).collect::<Vec<_>>()})
        }
        What::Appended { record } | What::Replaced { record } => serde_json::json!({"record": text(record)}),
        What::Stored { due: d }
        | What::Taken { due: d }
        | What::LeaseExpired { due: d }
        | What::Redriven { due: d } => due(d),
        What::DeliveryFailed { reason, due: d } => {
            let mut v = due(d);
            v["reason"] = failure_json(&Some(reason.clone()));
            v
        }
        What::DeadLettered { reason } => serde_json::json!({"reason": failure_json(&Some(reason.clone()))}),
        What::ConsumerOpened { consumer, epoch } => serde_json::json!({"consumer": consumer, "epoch": epoch}),
        What::CheckpointCommitted { consumer, epoch, through } => {
            serde_json::json!({"consumer": consumer, "epoch": epoch, "through": through.0})
        }
        What::ConsumerDropped { consumer } => serde_json::json!({"consumer": consumer}),
        What::Refused { request, error } => serde_json::json!({"request": request, "error": error.to_string()}),
        What::Repeated { request } => serde_json::json!({"request": request}),
        What::NoEffect { entry } => serde_json::json!({"entry": entry}),
        What::Spilled { source, sessions } => serde_json::json!({"source": source.0, "sessions": sessions}),
        What::Merging { source, older, newer } => {
            serde_json::json!({"source": source.0, "older": older.0, "newer": newer.0})
        }
        What::SourceReady { source } => serde_json::json!({"source": source.0}),
        What::Configured { version } => serde_json::json!({"version": version}),
        What::MembersChanged { version, change } => {
            serde_json::json!({"version": version, "change": change.to_string()})
        }
        What::Dropped | What::Deleted | What::Renewed | What::Noop | What::Reserved => serde_json::json!({}),
    }
}

fn brief_text(b: Option<&SessionBrief>) -> String {
    let Some(b) = b else { return "-".into() };
    let status = match b.status {
        BriefStatus::Active { delivering: false } => "active".to_string(),
        BriefStatus::Active { delivering: true } => "delivering".to_string(),
        BriefStatus::Stored { due } => format!("stored until {}", utc_s(due.0)),
        BriefStatus::Dead { since } => format!("dead since #{}", since.0),
    };
    format!("{status}, attempt {}, {} records", b.attempt.0, b.records)
}

fn brief_json(b: &SessionBrief) -> serde_json::Value {
    let mut v = serde_json::json!({"attempt": b.attempt.0, "failures": b.failures, "records": b.records,
        "bytes": b.bytes});
    match b.status {
        BriefStatus::Active { delivering } => {
            v["status"] = "active".into();
            v["delivering"] = delivering.into();
        }
        BriefStatus::Stored { due } => {
            v["status"] = "stored".into();
            v["due"] = utc_s(due.0).into();
            v["due_unix_s"] = due.0.into();
        }
        BriefStatus::Dead { since } => {
            v["status"] = "dead".into();
            v["dead_since_index"] = since.0.into();
        }
    }
    v
}

fn audit_json(a: &Audit) -> serde_json::Value {
    serde_json::json!({"at": utc(a.at.0), "at_unix_ms": a.at.0, "client": a.client.map(|c| c.0),
        "seq": a.seq.map(|s| s.0), "attempt": a.attempt.map(|t| t.0), "principal": a.principal})
}

fn snapshot_json(s: &SessionSnapshot) -> serde_json::Value {
    let records: Vec<String> = s.records.iter().map(|r| String::from_utf8_lossy(r).into_owned()).collect();
    serde_json::json!({"type": "session", "session": s.session.0, "kind": s.kind.0, "state": brief_json(&s.brief),
        "records": records, "last_failure": failure_json(&s.last_failure)})
}

async fn watch(conn: &Conn, kinds: Vec<u32>, resume_after: Option<u64>) -> CliResult {
    let pipe = connect(conn).await?;
    let options = WatchOptions {
        kinds: kinds.into_iter().map(Kind).collect(),
        resume_after: resume_after.map(Index),
        window: None,
    };
    let mut w = pipe.watch(options);
    while let Some(item) = w.next().await {
        let json = conn.json;
        match item.map_err(err)? {
            WatchItem::ResyncStart { at } if json => {
                println!("{}", serde_json::json!({"type": "resync_start", "at": at.0}))
            }
            WatchItem::ResyncStart { at } => println!("resync as of index {}", at.0),
            WatchItem::Session(s) if json => println!("{}", snapshot_json(&s)),
            WatchItem::Session(s) => {
                let records: Vec<String> = s.records.iter().map(|r| show_record(r)).collect();
                println!(
                    "session {} kind {}  {}  {}",
                    s.session.0,
                    s.kind.0,
                    brief_text(Some(&s.brief)),
                    records.join(" ")
                );
            }
            WatchItem::Synced { at } if json => println!("{}", serde_json::json!({"type": "synced", "at": at.0})),
            WatchItem::Synced { at } => println!("synced at index {}; changes follow", at.0),
            WatchItem::Change(c) => {
                let event = Event {
                    session: Some(c.session),
                    kind: Some(c.kind),
                    what: c.what.clone(),
                    before: c.before.clone(),
                    after: c.after.clone(),
                };
                if json {
                    let mut v = serde_json::json!({"type": "change", "index": c.index.0, "session": c.session.0,
                        "kind": c.kind.0, "what": c.what.name(), "before": c.before.as_ref().map(brief_json),
                        "after": c.after.as_ref().map(brief_json), "at": utc(c.audit.at.0),
                        "audit": audit_json(&c.audit)});
                    if let (serde_json::Value::Object(o), serde_json::Value::Object(f)) = (&mut v, what_json(&c.what)) {
                        o.extend(f);
                    }
                    println!("{v}");
                } else {
                    println!("{}", event_line(c.index, Some(c.audit.at.0), &event));
                }
            }
        }
        w.done(Ok(())).await;
    }
    Ok(())
}

/// One operation of `truba consumer commit --ops`, as a JSON line.
#[derive(serde::Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
enum OpLine {
    New {
        kind: u32,
        #[serde(default)]
        records: Vec<String>,
        store_s: Option<u32>,
    },
    Append {
        handle: String,
        record: String,
    },
    Replace {
        handle: String,
        record: String,
    },
    Delete {
        handle: String,
    },
    Store {
        handle: String,
        timeout_s: u32,
    },
    KeepAlive {
        handle: String,
    },
}

fn parse_handle(spec: &str) -> Result<Handle, String> {
    let bad = || format!("`{spec}` is not a handle (expected SESSION@ATTEMPT)");
    let (s, a) = spec.split_once('@').ok_or_else(bad)?;
    Ok(Handle { session: SessionId(s.parse().map_err(|_| bad())?), attempt: Attempt(a.parse().map_err(|_| bad())?) })
}

fn parse_ops(text: &str) -> Result<Vec<CommitOp>, String> {
    let mut ops = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let op: OpLine = serde_json::from_str(line).map_err(|e| format!("operation on line {}: {e}", n + 1))?;
        let at = |h: &str| parse_handle(h).map_err(|e| format!("operation on line {}: {e}", n + 1));
        ops.push(match op {
            OpLine::New { kind, records, store_s } => CommitOp::New {
                kind: Kind(kind),
                records: records.into_iter().map(String::into_bytes).collect(),
                store_s,
            },
            OpLine::Append { handle, record } => CommitOp::Append { handle: at(&handle)?, record: record.into_bytes() },
            OpLine::Replace { handle, record } => {
                CommitOp::Replace { handle: at(&handle)?, record: record.into_bytes() }
            }
            OpLine::Delete { handle } => CommitOp::Delete { handle: at(&handle)? },
            OpLine::Store { handle, timeout_s } => CommitOp::Store { handle: at(&handle)?, timeout_s },
            OpLine::KeepAlive { handle } => CommitOp::KeepAlive { handle: at(&handle)? },
        });
    }
    Ok(ops)
}

fn reply_json(r: &Reply) -> serde_json::Value {
    match r {
        Reply::Created { handle } => serde_json::json!({"created": handle.to_string()}),
        Reply::Stored { due } => serde_json::json!({"stored": true, "due": utc_s(due.0), "due_unix_s": due.0}),
        Reply::Done => serde_json::json!({"done": true}),
        other => serde_json::json!({"reply": format!("{other:?}")}),
    }
}

async fn member(command: MemberCommand) -> CliResult {
    use truba_engine::{MemberAddrs, MemberChange};
    let changed = |conn: &Conn, what: String, version: u64| {
        print(conn, &format!("{what}; configuration version {version}"), serde_json::json!({"version": version}))
    };
    match command {
        MemberCommand::List { conn } => member_list(&conn).await,
        MemberCommand::Add { id, peer, client, conn } => {
            let pipe = connect(&conn).await?;
            let addrs = MemberAddrs { peer, client };
            addrs.validate().map_err(|e| format!("member {id}: {e}"))?;
            let version =
                pipe.change_members(MemberChange::AddLearner(ReplicaId(id)), Some(addrs)).await.map_err(err)?;
            changed(
                &conn,
                format!("added {id} as a learner (promote it once `truba member list` shows it caught up)"),
                version,
            );
            Ok(())
        }
        MemberCommand::Promote { id, wait, conn } => {
            let pipe = connect(&conn).await?;
            let until = std::time::Instant::now() + conn.timeout;
            loop {
                match pipe.change_members(MemberChange::Promote(ReplicaId(id)), None).await {
                    Ok(version) => {
                        changed(&conn, format!("promoted {id} to voter"), version);
                        return Ok(());
                    }
                    Err(ClientError::Refused(e @ RequestError::LearnerBehind { .. }))
                        if wait && std::time::Instant::now() < until =>
                    {
                        eprintln!("{e}; waiting");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    Err(e) => return Err(err(e)),
                }
            }
        }
        MemberCommand::Remove { id, conn } => {
            let pipe = connect(&conn).await?;
            let version = pipe.change_members(MemberChange::Remove(ReplicaId(id)), None).await.map_err(err)?;
            changed(&conn, format!("removed {id}"), version);
            Ok(())
        }
    }
}

/// The configuration's members, with the leader's view of each one's log.
async fn member_list(conn: &Conn) -> CliResult {
    let pipe = connect(conn).await?;
    let config = pipe.config().await.map_err(err)?;
    // The configuration query went to the leader; so does this, if it still leads.
    let status = pipe.status().await.ok().filter(|s| s.engine.role == truba_engine::RoleName::Leader);
    let commit = status.as_ref().map(|s| s.engine.commit.0);
    let matched = |id: ReplicaId| {
        status.as_ref()?.engine.members.iter().find(|m| m.id == id).and_then(|m| m.matched).map(|i| i.0)
    };
    let leader = status.as_ref().map(|s| s.engine.replica);
    let mut rows = Vec::new();
    let mut json = Vec::new();
    for (id, role) in &config.members {
        let addrs = config.addrs.get(id);
        let role = match role {
            truba_engine::MemberRole::Voter if Some(*id) == leader => "leader",
            truba_engine::MemberRole::Voter => "voter",
            truba_engine::MemberRole::Learner => "learner",
        };
        let lag = match (commit, matched(*id)) {
            (Some(c), Some(m)) => c.saturating_sub(m).to_string(),
            _ => "?".into(),
        };
        let peer = addrs.map_or("(from its file)", |a| a.peer.as_str());
        let client = addrs.map_or("(from its file)", |a| a.client.as_str());
        rows.push(format!(
            "{:<6} {:<8} {:>8} {:>10}  {peer:<22} {client}",
            id.0,
            role,
            matched(*id).map_or("?".into(), |m| m.to_string()),
            lag
        ));
        json.push(serde_json::json!({"id": id.0, "role": role, "matched": matched(*id), "lag": commit.zip(matched(*id)).map(|(c, m)| c.saturating_sub(m)), "peer": addrs.map(|a| &a.peer), "client": addrs.map(|a| &a.client)}));
    }
    let head = format!("{:<6} {:<8} {:>8} {:>10}  {:<22} client", "member", "role", "matched", "lag", "peer");
    let text = format!("configuration version {}\n{head}\n{}", config.version, rows.join("\n"));
    print(conn, &text, serde_json::json!({"version": config.version, "commit": commit, "members": json}));
    Ok(())
}

/// Hands leadership to `to` and waits (within the timeout) until it leads; prints how long the
/// cluster took.
async fn leader_transfer(conn: &Conn, to: ReplicaId) -> CliResult {
    let pipe = connect(conn).await?;
    let config = pipe.config().await.map_err(err)?;
    let addr = config.addrs.get(&to).map(|a| a.client.clone());
    let started = std::time::Instant::now();
    pipe.transfer_leader(to).await.map_err(err)?;
    let until = started + conn.timeout;
    // Ask the new leader itself whether it leads (its address from the configuration, else
    // whichever member the pipe reaches).
    let target = match addr {
        Some(a) => Some(Pipe::connect_with(conn.net()?, vec![a], conn.options()).await.map_err(err)?),
        None => None,
    };
    loop {
        let status = match &target {
            Some(p) => p.status().await,
            None => pipe.status().await,
        };
        if let Ok(s) = status {
            if s.engine.role == truba_engine::RoleName::Leader && s.engine.replica == to {
                // A linearizable read through it answers once it has committed an entry of its
                // term: from then on it takes writes.
                let via = target.as_ref().unwrap_or(&pipe);
                via.config().await.map_err(err)?;
                let ms = started.elapsed().as_millis() as u64;
                let text = format!("{to} leads term {} and serves ({ms} ms after the request)", s.engine.term.0);
                print(conn, &text, serde_json::json!({"leader": to.0, "term": s.engine.term.0, "ms": ms}));
                return Ok(());
            }
        }
        if std::time::Instant::now() >= until {
            return Err(format!(
                "{to} did not take over within {} ms (see `truba status --cluster`)",
                conn.timeout.as_millis()
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn config_show(conn: &Conn) -> CliResult {
    let pipe = connect(conn).await?;
    let config = pipe.config().await.map_err(err)?;
    if conn.json {
        println!("{}", serde_json::to_string_pretty(&config).map_err(|e| e.to_string())?);
    } else {
        print!("{}", truba::cluster_config::render(&config));
    }
    Ok(())
}

async fn config_apply(conn: &Conn, file: &PathBuf, dry_run: bool) -> CliResult {
    let text = String::from_utf8(read_file(file)?).map_err(|_| format!("{} is not UTF-8 text", file.display()))?;
    let proposed = truba::cluster_config::parse(&text, file).map_err(|e| e.to_string())?;
    truba_engine::ClusterConfig::validate(&proposed.kinds, &proposed.limits)
        .map_err(|e| format!("{}: {e}", file.display()))?;
    if !proposed.ignored.is_empty() {
        eprintln!("node-local settings in {} are ignored: {}", file.display(), proposed.ignored.join(", "));
    }
    let pipe = connect(conn).await?;
    let current = pipe.config().await.map_err(err)?;
    let changes = truba::cluster_config::diff(&current, &proposed);
    let report = |version: u64, applied: bool| {
        let json = serde_json::json!({"version": version, "applied": applied, "changes": changes});
        let text = match (applied, changes.is_empty()) {
            (_, true) => format!("nothing to change: the configuration is at version {version}"),
            (false, false) => format!("would change version {version}:\n  {}", changes.join("\n  ")),
            (true, false) => format!("configuration version {version}:\n  {}", changes.join("\n  ")),
        };
        print(conn, &text, json);
    };
    if changes.is_empty() || dry_run {
        report(current.version, false);
        return Ok(());
    }
    let version = pipe.configure(current.version, proposed.kinds, proposed.limits).await.map_err(err)?;
    report(version, true);
    Ok(())
}

async fn consumer(command: ConsumerCommand) -> CliResult {
    match command {
        ConsumerCommand::Open { name, conn } => {
            let pipe = connect(&conn).await?;
            let c = Consumer::open(&pipe, &name).await.map_err(err)?;
            let text = format!("consumer {name} opened at epoch {}; checkpoint {}", c.epoch(), c.checkpoint().0);
            let json = serde_json::json!({"consumer": name, "epoch": c.epoch(), "checkpoint": c.checkpoint().0});
            print(&conn, &text, json);
        }
        ConsumerCommand::Commit { name, epoch, through, ops, conn } => {
            let ops = match ops {
                Some(path) => parse_ops(&String::from_utf8_lossy(&read_file(&path)?))?,
                None => Vec::new(),
            };
            let pipe = connect(&conn).await?;
            let mut c = Consumer::at_epoch(&pipe, &name, epoch);
            let results = c.commit(Index(through), ops).await.map_err(err)?;
            if conn.json {
                let results: Vec<_> = results.iter().map(reply_json).collect();
                println!("{}", serde_json::json!({"consumer": name, "checkpoint": through, "results": results}));
            } else {
                println!("committed consumer {name} through {through}");
                for r in &results {
                    if let Reply::Created { handle } = r {
                        println!("  created {handle}");
                    }
                }
            }
        }
        ConsumerCommand::Get { name, conn } => {
            let pipe = connect(&conn).await?;
            let c = pipe.checkpoint(&name).await.map_err(err)?;
            let text = format!("consumer {name} epoch {} checkpoint {}", c.epoch, c.through.0);
            print(&conn, &text, serde_json::json!({"consumer": name, "epoch": c.epoch, "checkpoint": c.through.0}));
        }
        ConsumerCommand::Wait { name, index, timeout_ms, conn } => {
            let pipe = connect(&conn).await?;
            let c = pipe.read_through(&name, Index(index), Duration::from_millis(timeout_ms)).await.map_err(err)?;
            let text = format!("consumer {name} has processed index {index} (checkpoint {})", c.through.0);
            print(&conn, &text, serde_json::json!({"consumer": name, "epoch": c.epoch, "checkpoint": c.through.0}));
        }
        ConsumerCommand::Drop { name, conn } => {
            let pipe = connect(&conn).await?;
            pipe.consumer_drop(&name).await.map_err(err)?;
            print(&conn, &format!("dropped consumer {name}"), serde_json::json!({"consumer": name, "dropped": true}));
        }
    }
    Ok(())
}
