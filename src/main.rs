//! The `cdn-edge` command line: parse arguments, load config, call into the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use cdn_edge::admin_client::AdminClient;
use cdn_edge::config::{self, Config, KeyMaterial, Log, LogFormat};
use cdn_edge::ops::fill::follow::{self, FollowError};
use cdn_edge::server::{EdgeServer, StartMode};
use cdn_edge::{auth, demo, demo_site, systemd};
use ring::signature::KeyPair as _;

/// Characters a token keeps unencoded: RFC 3986 unreserved.
const TOKEN_ENCODE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

#[derive(Parser)]
#[command(name = "cdn-edge", version, about = "Edge CDN node for video services")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the edge.
    Serve {
        /// Configuration file (TOML).
        #[arg(long, short = 'c', default_value = "conf/edge.toml")]
        conf: PathBuf,
        /// Take over the listeners of the running edge: start this, then send the running
        /// process SIGQUIT within 5 s. See docs/deployment.md, "Upgrades without downtime".
        #[arg(long, short = 'u')]
        upgrade: bool,
        /// Exit (SIGTERM) when the process with this id, the parent, exits: how
        /// `demo --nodes N` starts its nodes.
        #[arg(long, hide = true, value_name = "PID")]
        exit_with_parent: Option<u32>,
    },
    /// Validate a configuration file and exit.
    CheckConfig {
        /// Configuration file (TOML).
        file: PathBuf,
    },
    /// Print a signed query string for an object.
    Sign {
        #[arg(long, short = 'c', default_value = "conf/edge.toml")]
        conf: PathBuf,
        /// Id of the signing key in [[signing.keys]].
        #[arg(long)]
        key: String,
        /// For an ed25519 key: the private key (base64 of the 32-byte seed, or a
        /// PKCS#8 PEM); it must match the key's public key.
        #[arg(long)]
        private_key_file: Option<PathBuf>,
        /// Object id (o).
        #[arg(long)]
        object: String,
        /// Object version (v).
        #[arg(long)]
        version: String,
        /// Seconds from now until the URL expires.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
        /// Client/session token (t); percent-encoded as needed.
        #[arg(long, default_value = "")]
        token: String,
    },
    /// Print a new Ed25519 key pair: the private key (base64 of the 32-byte seed) and
    /// the public key (base64) for the edges' [[signing.keys]].
    Keygen {
        /// Write the private key to this new file (mode 0600) instead of printing it.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Run the edge on loopback in front of a built-in sample origin.
    Demo {
        /// Edges in the site: 1 runs one edge in this process; 2 to 9 run a site of
        /// edges as child processes, node k on the ports of --http, --admin and --peer
        /// plus k - 1.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=demo_site::MAX_NODES as i64))]
        nodes: u8,
        #[arg(long, default_value = "127.0.0.1:8080")]
        http: SocketAddr,
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin: SocketAddr,
        /// Peer listener of node 1 (with --nodes 2 or more).
        #[arg(long, default_value = "127.0.0.1:7080")]
        peer: SocketAddr,
        #[arg(long, default_value = "127.0.0.1:9000")]
        origin: SocketAddr,
        #[arg(long, default_value = "127.0.0.1:9001")]
        dictionary: SocketAddr,
        #[arg(long, default_value = "127.0.0.1:9002")]
        sink: SocketAddr,
        /// Spool directory for forwarded events and log blobs.
        #[arg(long)]
        spool: Option<PathBuf>,
        /// Memory tier budget in bytes.
        #[arg(long, default_value_t = 256 << 20)]
        memory_bytes: u64,
        /// Directory for a disk tier (none by default).
        #[arg(long)]
        disk: Option<PathBuf>,
        /// Disk tier budget in bytes.
        #[arg(long, default_value_t = 1 << 30)]
        disk_bytes: u64,
    },
    /// Remove an object's slices (one version, or every version) from a running edge and,
    /// in a site, from every other node; prints what each node removed.
    Purge {
        /// Object id (o).
        #[arg(long)]
        object: String,
        /// Object version (v); without it, every version of the object.
        #[arg(long)]
        version: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Take a running edge out of rotation (`on`: /healthz answers 503 draining, every
    /// request is still served) or put it back (`off`).
    Drain {
        #[arg(value_enum)]
        state: OnOff,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Submit a fill job to a running edge and print its progress until it ends (exit
    /// status 1 when it fails).
    Fill {
        /// The manifest, JSON: {"objects": [{"o": "...", "v": "...", "ranges": ["0-1048575"]}]}
        /// (`ranges` optional: the whole object).
        #[arg(long)]
        manifest: PathBuf,
        /// Print the job's id and return at once; follow it with `GET /fill/{id}`.
        #[arg(long)]
        no_wait: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

/// How the admin commands reach a running edge.
#[derive(clap::Args)]
struct AdminArgs {
    /// The edge's admin listener.
    #[arg(long, default_value = "127.0.0.1:9090")]
    admin: SocketAddr,
    /// The edge's admin.token; default: the CDN_EDGE_ADMIN_TOKEN environment variable.
    #[arg(long)]
    token: Option<String>,
}

impl AdminArgs {
    fn client(self) -> AdminClient {
        AdminClient::new(self.admin, self.token)
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum OnOff {
    On,
    Off,
}

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    no_huge_pages();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cdn-edge: {e:#}");
            // A fill job that ran and failed is not a usage or connection error.
            match e.downcast_ref::<FollowError>() {
                Some(FollowError::Failed { .. }) => ExitCode::from(1),
                _ => ExitCode::from(2),
            }
        }
    }
}

/// Turns transparent huge pages off for this process (`prctl(PR_SET_THP_DISABLE)`),
/// before anything is allocated. With them, a buffer of a few hundred KB that the
/// allocator takes from a fresh region (a range read from disk, a slice read onto the
/// heap) faulted in a whole 2 MiB page, which the kernel cleared first: on range hits
/// from disk the clearing took 70% of the edge's CPU and halved its throughput
/// (docs/performance.md). Kernels without the flag (before 3.15) leave THP as it is.
fn no_huge_pages() {
    let _ = rustix::thread::disable_transparent_huge_pages(true);
}

#[allow(clippy::print_stdout)]
fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve {
            conf,
            upgrade,
            exit_with_parent,
        } => {
            if let Some(parent) = exit_with_parent {
                demo_site::exit_with_parent(parent).context("--exit-with-parent")?;
            }
            let config = Config::load(&conf)?;
            let _logs = init_logging(Some(&config.log));
            let mode = if upgrade {
                StartMode::Upgrade
            } else {
                StartMode::Fresh
            };
            let edge = EdgeServer::build_with(&config, mode).context("cannot start")?;
            tracing::info!(
                http = %config.listen.http,
                https = ?config.listen.https,
                admin = %config.listen.admin,
                upgrade,
                "cdn-edge serving"
            );
            if let Err(e) = systemd::notify_ready() {
                tracing::warn!(error = %e, "cannot notify systemd");
            }
            edge.run();
            Ok(())
        }
        Command::CheckConfig { file } => {
            let _logs = init_logging(None);
            Config::load(&file)?;
            println!("{}: ok", file.display());
            Ok(())
        }
        Command::Keygen { out } => keygen(out.as_deref()),
        Command::Sign {
            conf,
            key,
            private_key_file,
            object,
            version,
            ttl,
            token,
        } => {
            let _logs = init_logging(None);
            let config = Config::load(&conf)?;
            let Some(k) = config.signing.keys.iter().find(|k| k.id == key) else {
                bail!("{}: no signing key with id {key:?}", conf.display());
            };
            let signer = match (&k.material, &private_key_file) {
                (KeyMaterial::HmacSha256 { secret }, None) => Signer::Hmac(secret),
                (KeyMaterial::HmacSha256 { .. }, Some(_)) => {
                    bail!("--private-key-file: key {key:?} is an HMAC key, signed with its secret")
                }
                (KeyMaterial::Ed25519 { .. }, None) => bail!(
                    "{}: key {key:?} is an ed25519 public key: give its --private-key-file",
                    conf.display()
                ),
                (KeyMaterial::Ed25519 { public_key }, Some(file)) => {
                    let pair =
                        cdn_edge::config::read_private_key(file).map_err(anyhow::Error::msg)?;
                    if pair.public_key().as_ref() != public_key.as_slice() {
                        bail!("{}: not the private key of key {key:?}", file.display());
                    }
                    Signer::Ed25519(Box::new(pair))
                }
            };
            if !auth::is_valid_id(&object) {
                bail!("--object {object:?}: must match [A-Za-z0-9_-][A-Za-z0-9._-]{{0,255}} without '..'");
            }
            if !auth::is_valid_id(&version) {
                bail!("--version {version:?}: must match [A-Za-z0-9_-][A-Za-z0-9._-]{{0,255}} without '..'");
            }
            let t = utf8_percent_encode(&token, TOKEN_ENCODE).to_string();
            if t.len() > auth::MAX_TOKEN_LEN {
                bail!(
                    "--token is {} characters once encoded; at most {} are accepted",
                    t.len(),
                    auth::MAX_TOKEN_LEN
                );
            }
            let max = config.signing.max_ttl_secs;
            if max > 0 && ttl > max {
                bail!("--ttl {ttl}: the edges refuse URLs that live longer than signing.max_ttl_secs ({max} s) in {}", conf.display());
            }
            let expires = demo::unix_now().saturating_add(ttl);
            println!(
                "{}",
                match &signer {
                    Signer::Hmac(secret) =>
                        auth::sign_query(secret, &object, &version, expires, &t),
                    Signer::Ed25519(pair) =>
                        auth::sign_query_ed25519(pair, &object, &version, expires, &t),
                }
            );
            Ok(())
        }
        Command::Purge {
            object,
            version,
            admin,
        } => {
            let addr = admin.admin;
            let mut body = serde_json::json!({ "o": object });
            if let Some(v) = &version {
                body["v"] = serde_json::json!(v);
            }
            let answer = admin.client().call("POST", "/purge", Some(&body))?;
            let what = match &version {
                Some(v) => format!("{object} version {v}"),
                None => format!("{object} (every version)"),
            };
            let (text, failed) = purge_report(&what, addr, &answer);
            print!("{text}");
            if failed > 0 {
                bail!("{failed} node(s) did not confirm the purge; each applies it when it next reads a peer's purge log");
            }
            Ok(())
        }
        Command::Drain { state, admin } => {
            let method = match state {
                OnOff::On => "POST",
                OnOff::Off => "DELETE",
            };
            let answer = admin.client().call(method, "/drain", None)?;
            let draining = answer.get("draining").and_then(|d| d.as_bool()) == Some(true);
            println!(
                "{}",
                if draining {
                    "draining: /healthz answers 503; requests are still served"
                } else {
                    "not draining: /healthz answers 200"
                }
            );
            Ok(())
        }
        Command::Fill {
            manifest,
            no_wait,
            admin,
        } => {
            let text = std::fs::read_to_string(&manifest)
                .with_context(|| format!("--manifest {}", manifest.display()))?;
            let body: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("--manifest {}: not JSON", manifest.display()))?;
            let client = admin.client();
            let id = follow::submit(&client, &body)?;
            if no_wait {
                println!("{id}");
                return Ok(());
            }
            follow::follow(&client, &id)?;
            Ok(())
        }
        Command::Demo {
            nodes,
            http,
            admin,
            peer,
            origin,
            dictionary,
            sink,
            spool,
            memory_bytes,
            disk,
            disk_bytes,
        } => {
            // Read by a person at a terminal: text, not JSON.
            let _logs = init_logging(Some(&Log {
                format: LogFormat::Text,
                ..Log::default()
            }));
            let addrs = demo::DemoOptions {
                http,
                admin,
                origin,
                dictionary,
                sink,
                spool: spool.unwrap_or_else(|| demo::DemoOptions::loopback().spool),
                memory_bytes,
                disk,
                disk_bytes,
            };
            if nodes > 1 {
                return run_demo_site(&addrs, peer, nodes.into());
            }
            let edge = demo::build(&addrs).context("cannot start the demo")?;
            println!("{}", demo::instructions(&addrs, demo::unix_now()));
            edge.run();
            Ok(())
        }
    }
}

/// The lines `cdn-edge purge` prints for the answer of `POST /purge`, and how many
/// nodes reported an error.
fn purge_report(what: &str, addr: SocketAddr, answer: &serde_json::Value) -> (String, usize) {
    let removed = |v: &serde_json::Value| {
        let n = |k: &str| v.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
        format!("{} slices, {} bytes", n("slices"), n("bytes"))
    };
    let mut text = format!(
        "purged {what}
  {addr} (this edge): {}
",
        removed(answer)
    );
    let mut failed = 0;
    if let Some(peers) = answer.get("peers").and_then(serde_json::Value::as_object) {
        for (peer, result) in peers {
            match result.get("error").and_then(serde_json::Value::as_str) {
                Some(e) => {
                    failed += 1;
                    text.push_str(&format!(
                        "  {peer} (peer): error: {e}
"
                    ));
                }
                None => text.push_str(&format!(
                    "  {peer} (peer): {}
",
                    removed(result)
                )),
            }
        }
    }
    (text, failed)
}

/// `demo --nodes N`, N > 1: the sample upstreams in this process, the nodes as child
/// processes; prints the instructions once all of them listen.
#[allow(clippy::print_stdout)]
fn run_demo_site(addrs: &demo::DemoOptions, peer: SocketAddr, nodes: usize) -> anyhow::Result<()> {
    // On this thread, which lives until the process exits: see `Site::start`.
    let site = demo_site::Site::start(addrs, peer, nodes).context("cannot start the demo site")?;
    let upstreams = demo::build_upstreams(addrs).context("cannot start the demo")?;
    let text = site.instructions(demo::unix_now());
    let origin = addrs.origin;
    std::thread::spawn(move || {
        if demo_site::wait_listening(origin, std::time::Duration::from_secs(10)) {
            println!("{text}");
        } else {
            tracing::error!(%origin, "the sample origin is not listening");
        }
    });
    site.watch();
    upstreams.run(pingora::server::RunArgs::default());
    drop(site);
    Ok(())
}

/// Logs to stderr: `log` from the config (JSON lines by default), plain text at `info`
/// for the one-shot commands. `CDN_EDGE_LOG` (a tracing filter) overrides the level.
/// Either way rustls is quieted unless the filter names it ([`config::log_filter`]).
/// Lines are written by a background thread, so a slow stderr (a pipe, journald) never
/// holds up a request; if it falls 128k lines behind, new lines are dropped. The returned
/// guard writes out what is queued when dropped.
fn init_logging(log: Option<&Log>) -> tracing_appender::non_blocking::WorkerGuard {
    let level = log.map_or("info", |l| l.level.as_str());
    let filter = std::env::var("CDN_EDGE_LOG")
        .ok()
        .and_then(|env| tracing_subscriber::EnvFilter::try_new(config::log_filter(&env)).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new(config::log_filter(level)));
    // Buffered: the writer thread flushes whenever it has caught up, so lines go out in
    // few writes under load and at once when traffic is light.
    let stderr = std::io::BufWriter::with_capacity(64 << 10, std::io::stderr());
    let (writer, guard) = tracing_appender::non_blocking(stderr);
    cdn_edge::access_log::set_writer(writer.clone());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match log.map(|l| l.format) {
        Some(LogFormat::Json) => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
        _ => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
    guard
}

/// What `cdn-edge sign` signs with.
enum Signer<'k> {
    Hmac(&'k [u8]),
    Ed25519(Box<ring::signature::Ed25519KeyPair>),
}

/// `cdn-edge keygen`: a new Ed25519 seed from the system's random source.
#[allow(clippy::print_stdout)]
fn keygen(out: Option<&std::path::Path>) -> anyhow::Result<()> {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine as _;
    use ring::rand::SecureRandom as _;
    let mut seed = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut seed)
        .map_err(|_| anyhow::anyhow!("the system's random source failed"))?;
    let pair = ring::signature::Ed25519KeyPair::from_seed_unchecked(&seed)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let private = STANDARD.encode(seed);
    let public = STANDARD.encode(pair.public_key().as_ref());
    match out {
        Some(path) => {
            use std::io::Write as _;
            use std::os::unix::fs::OpenOptionsExt as _;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .with_context(|| {
                    format!("{}: cannot create the private key file", path.display())
                })?;
            writeln!(f, "{private}")
                .with_context(|| format!("{}: cannot write", path.display()))?;
            println!("private key written to {}", path.display());
        }
        None => println!("private_key = \"{private}\""),
    }
    println!("public_key = \"{public}\"");
    Ok(())
}
