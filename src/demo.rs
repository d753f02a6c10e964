//! `cdn-edge demo`: the edge on loopback in front of a built-in sample origin, with
//! ready-to-run `curl` commands that carry valid signatures.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use http::{header, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::Server;
use pingora::services::listening::Service;

use crate::auth::{sign_query, sign_query_ed25519};
use crate::config::Config;
use crate::range::parse_range_header;
use crate::server::{check_bindable, EdgeServer, StartError};

/// Signing secret of the demo; printed URLs are signed with it.
pub const DEMO_SECRET: &str = "demo-secret-not-for-production";
/// Seed of the demo's Ed25519 key pair (key id `demo-ed`); public, like the secret.
const DEMO_ED25519_SEED: [u8; 32] = *b"demo-ed25519-not-for-production!";

/// The demo's Ed25519 key pair.
pub fn demo_ed25519_pair() -> ring::signature::Ed25519KeyPair {
    ring::signature::Ed25519KeyPair::from_seed_unchecked(&DEMO_ED25519_SEED)
        .expect("any 32 bytes are a seed")
}

fn demo_ed25519_public_key() -> String {
    use base64::Engine as _;
    use ring::signature::KeyPair as _;
    base64::engine::general_purpose::STANDARD.encode(demo_ed25519_pair().public_key())
}

/// Where the demo listens and how big its caches are.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub http: SocketAddr,
    pub admin: SocketAddr,
    pub origin: SocketAddr,
    pub dictionary: SocketAddr,
    pub sink: SocketAddr,
    /// Spool directory for forwarded events and log blobs.
    pub spool: PathBuf,
    pub memory_bytes: u64,
    /// Directory of a disk tier; none by default.
    pub disk: Option<PathBuf>,
    pub disk_bytes: u64,
}

impl DemoOptions {
    /// The default loopback addresses and a 256 MiB memory tier.
    pub fn loopback() -> Self {
        Self {
            http: "127.0.0.1:8080".parse().expect("valid address"),
            admin: "127.0.0.1:9090".parse().expect("valid address"),
            origin: "127.0.0.1:9000".parse().expect("valid address"),
            dictionary: "127.0.0.1:9001".parse().expect("valid address"),
            sink: "127.0.0.1:9002".parse().expect("valid address"),
            spool: std::env::temp_dir().join("cdn-edge-demo-spool"),
            memory_bytes: 256 << 20,
            disk: None,
            disk_bytes: 1 << 30,
        }
    }
}

/// A sample object of the built-in origin.
pub struct SampleObject {
    pub o: &'static str,
    pub v: &'static str,
    pub content_type: &'static str,
    pub bytes: Vec<u8>,
}

/// Deterministic pseudo-random bytes (xorshift64*), so any range can be checked by
/// regenerating it.
pub fn sample_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The demo's objects: one large enough for the seed range
/// `/range/122638100-122948590`, and one of an odd size.
pub fn sample_objects() -> Vec<SampleObject> {
    vec![
        SampleObject {
            o: "sample",
            v: "1",
            content_type: "video/mp4",
            bytes: with_mp4_signature(sample_bytes(1, 128 << 20)),
        },
        SampleObject {
            o: "trailer",
            v: "2",
            content_type: "video/mp4",
            bytes: with_mp4_signature(sample_bytes(2, 3_000_001)),
        },
    ]
}

/// An ISO BMFF `ftyp` box (brand `isom`), so that content sniffers (browsers, REDbot)
/// see the bytes as the MP4 their `Content-Type` says.
const MP4_FTYP: [u8; 24] = *b"\0\0\0\x18ftypisom\0\0\x02\0isomiso2";

fn with_mp4_signature(mut bytes: Vec<u8>) -> Vec<u8> {
    let n = MP4_FTYP.len().min(bytes.len());
    bytes[..n].copy_from_slice(&MP4_FTYP[..n]);
    bytes
}

/// A minimal origin: `GET /objects/{o}/{v}` with single-range support.
pub struct SampleOrigin {
    objects: HashMap<String, (&'static str, Vec<u8>)>,
}

impl SampleOrigin {
    pub fn new(objects: Vec<SampleObject>) -> Self {
        Self {
            objects: objects
                .into_iter()
                .map(|s| {
                    (
                        format!("/objects/{}/{}", s.o, s.v),
                        (s.content_type, s.bytes),
                    )
                })
                .collect(),
        }
    }
}

#[async_trait]
impl ServeHttp for SampleOrigin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let Some((content_type, bytes)) = self.objects.get(req.uri.path()) else {
            return Response::builder()
                .status(StatusCode::NOT_FOUND)
                .header(header::CONTENT_LENGTH, 0)
                .body(Vec::new())
                .expect("valid response");
        };
        let size = bytes.len() as u64;
        let spec = req
            .headers
            .get(header::RANGE)
            .and_then(|v| parse_range_header(v.as_bytes()));
        let builder = Response::builder()
            .header(header::CONTENT_TYPE, *content_type)
            .header(header::ACCEPT_RANGES, "bytes");
        let response = match spec.map(|s| s.resolve(size)) {
            None => builder
                .status(StatusCode::OK)
                .header(header::CONTENT_LENGTH, size)
                .body(bytes.clone()),
            Some(None) => builder
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(header::CONTENT_RANGE, format!("bytes */{size}"))
                .header(header::CONTENT_LENGTH, 0)
                .body(Vec::new()),
            Some(Some(r)) => {
                tracing::info!(
                    path = req.uri.path(),
                    start = r.start,
                    end = r.end,
                    "sample origin: range request"
                );
                builder
                    .status(StatusCode::PARTIAL_CONTENT)
                    .header(
                        header::CONTENT_RANGE,
                        format!("bytes {}-{}/{size}", r.start, r.end),
                    )
                    .header(header::CONTENT_LENGTH, r.len())
                    .body(bytes[r.start as usize..=r.end as usize].to_vec())
            }
        };
        response.expect("valid response")
    }
}

/// The configuration the demo runs with.
pub fn demo_config(addrs: &DemoOptions) -> Result<Config, crate::config::ConfigError> {
    Config::from_toml(&config_text(addrs, None))
}

/// A node's place in a demo site (`demo --nodes N`): the sections a single-node demo
/// does not have.
#[derive(Debug, Clone)]
pub struct SiteMember {
    /// This node's peer listener (`listen.peer` and `cluster.self`).
    pub peer: SocketAddr,
    /// Every node's peer listener, this one included (`cluster.peers`).
    pub peers: Vec<SocketAddr>,
    /// `cluster.secret`, the same on every node.
    pub secret: String,
    /// `server.upgrade_sock`: one per node, in the site's directory.
    pub upgrade_sock: PathBuf,
}

/// The TOML text of the demo's configuration; with `member`, that of one node of a
/// demo site.
pub fn config_text(addrs: &DemoOptions, member: Option<&SiteMember>) -> String {
    let (peer_line, cluster, upgrade_sock) = match member {
        Some(m) => {
            let peers: Vec<String> = m.peers.iter().map(|p| format!("\"{p}\"")).collect();
            (
                format!("peer = \"{}\"\n", m.peer),
                // Text logs: each node's goes to a file a person reads with `tail -f`.
                format!(
                    "\n[log]\nformat = \"text\"\n\n[cluster]\nself = \"{}\"\npeers = [{}]\nsecret = {:?}\n",
                    m.peer,
                    peers.join(", "),
                    m.secret
                ),
                format!("upgrade_sock = {:?}\n", m.upgrade_sock.display().to_string()),
            )
        }
        None => (String::new(), String::new(), String::new()),
    };
    format!(
        r#"
[listen]
http = "{http}"
admin = "{admin}"
{peer_line}
[signing]
clock_skew_secs = 30
[[signing.keys]]
id = "demo"
secret = "{DEMO_SECRET}"
[[signing.keys]]
id = "demo-ed"
alg = "ed25519"
public_key = "{ed25519}"

[cache]
slice_bytes = 1048576
memory_bytes = {memory}
{disk}
[origin]
urls = ["http://{origin}"]
path = "/objects/{{o}}/{{v}}"
connect_timeout_ms = 1000
timeout_ms = 10000

[dictionary]
paths = ["/base_dict_getHoverDict_8"]
upstream = "http://{dictionary}"

[cors]
allow_origins = ["http://localhost:8000"]

[forward]
spool_dir = {spool:?}
events = "http://{sink}"
logblob = "http://{sink}"
stats = "http://{sink}"

[server]
grace_period_secs = 1
shutdown_timeout_secs = 1
{upgrade_sock}{cluster}
[limits]
max_pinned_bytes = {pinned}
"#,
        http = addrs.http,
        admin = addrs.admin,
        origin = addrs.origin,
        dictionary = addrs.dictionary,
        sink = addrs.sink,
        spool = addrs.spool.display().to_string(),
        memory = addrs.memory_bytes,
        pinned = pinned_budget(addrs),
        ed25519 = demo_ed25519_public_key(),
        disk = match &addrs.disk {
            Some(path) => format!(
                "[cache.disk]\npath = {:?}\nmax_bytes = {}\n",
                path.display().to_string(),
                addrs.disk_bytes
            ),
            None => String::new(),
        },
    )
}

/// `limits.max_pinned_bytes` of the demo: its default, `cache.memory_bytes`, unless the
/// memory tier is smaller than [`DEMO_MIN_PINNED`]. Slices read from a disk tier that the
/// memory tier does not keep are held by the responses sending them alone, so a demo
/// with a disk tier behind a memory tier of a few slices (`bench/wrk-ranges.sh disk`)
/// would otherwise turn away all but a few concurrent range requests with 503.
fn pinned_budget(addrs: &DemoOptions) -> u64 {
    addrs.memory_bytes.max(DEMO_MIN_PINNED)
}

/// The least `limits.max_pinned_bytes` of the demo: 64 slices.
const DEMO_MIN_PINNED: u64 = 64 << 20;

/// The signed query of the sample object printed by the demo, valid for an hour.
pub fn sample_query(now: u64) -> String {
    sign_query(DEMO_SECRET.as_bytes(), "sample", "1", now + 3600, "demo")
}

/// The signed query of the sample object under the demo's Ed25519 key.
pub fn sample_query_ed25519(now: u64) -> String {
    sign_query_ed25519(&demo_ed25519_pair(), "sample", "1", now + 3600, "demo")
}

/// The seed request: 310,491 bytes of the sample object, across a slice boundary.
pub const SEED_RANGE: &str = "/range/122638100-122948590";

/// The text printed when the demo starts.
pub fn instructions(addrs: &DemoOptions, now: u64) -> String {
    let q = sample_query(now);
    let t = sign_query(DEMO_SECRET.as_bytes(), "trailer", "2", now + 3600, "demo");
    let expired = sign_query(DEMO_SECRET.as_bytes(), "sample", "1", now - 3600, "demo");
    let base = format!("http://{}", addrs.http);
    let admin = format!("http://{}", addrs.admin);
    format!(
        "cdn-edge demo: edge on {base}, admin on {admin}, sample origin on http://{origin}, \
         sample dictionary on http://{dictionary}, event sink on http://{sink}\n\
         Signing key id \"demo\", secret \"{DEMO_SECRET}\". URLs below are valid for one hour.\n\
         \n\
         # the seed request: 310,491 bytes of a 128 MiB object (run it twice: miss, then hit)\n\
         curl -s -o /dev/null -D - '{base}{SEED_RANGE}?{q}'\n\
         \n\
         # the same range under an Ed25519 signature (key \"demo-ed\": the edge holds only its public key)\n\
         curl -s -o /dev/null -D - '{base}{SEED_RANGE}?{ed}'\n\
         \n\
         # the same object with a Range header (206)\n\
         curl -s -D - -H 'Range: bytes=0-15' '{base}/?{q}' -o /dev/null\n\
         \n\
         # HEAD of an odd-sized object\n\
         curl -sI '{base}/?{t}'\n\
         \n\
         # refused: expired (410) and tampered (403)\n\
         curl -s '{base}/range/0-99?{expired}'\n\
         curl -s '{base}/range/0-99?{tampered}'\n\
         \n\
         # a dictionary lookup (run it twice: fwd=miss, then hit), and a CORS preflight\n\
         curl -s -D - '{base}/base_dict_getHoverDict_8?form=%EC%96%B4&lemma=&sl=ko&tl=en&pos=NOUN&pow=n'\n\
         curl -s -D - -X OPTIONS -H 'Origin: http://localhost:8000' -H 'Access-Control-Request-Method: GET' '{base}/base_dict_getHoverDict_8'\n\
         \n\
         # a playback event (relayed to the sample event sink), a log blob (spooled, 202)\n\
         curl -s -X POST -H 'Content-Type: application/json' -d '{{\"event\":\"pause\"}}' '{base}/msl/playapi/cadmium/event/1?reqAttempt=1&reqName=events/pause&reqId=demo-1'\n\
         curl -s -X POST -d 'log blob' '{base}/log/cadmium/logblob/1?reqId=demo-2'\n\
         \n\
         # metrics, health and status\n\
         curl -s {admin}/metrics | grep -E '^cdn_edge_(requests|cache_lookups|origin_requests)_total'\n\
         curl -s {admin}/healthz\n\
         curl -s {admin}/status\n",
        origin = addrs.origin,
        dictionary = addrs.dictionary,
        sink = addrs.sink,
        tampered = q.replacen("o=sample", "o=sampl3", 1),
        ed = sample_query_ed25519(now),
    )
}

/// Builds the demo: the edge plus the sample upstreams, in one process.
pub fn build(addrs: &DemoOptions) -> Result<EdgeServer, StartError> {
    check_upstreams_bindable(addrs)?;
    let config = demo_config(addrs).map_err(StartError::Config)?;
    let mut edge = EdgeServer::build(&config)?;
    add_upstreams(&mut edge.server, addrs);
    Ok(edge)
}

/// Builds a server with the sample upstreams only: the process of `demo --nodes N`,
/// whose edges run as child processes.
pub fn build_upstreams(addrs: &DemoOptions) -> Result<Server, StartError> {
    check_upstreams_bindable(addrs)?;
    let conf = ServerConf {
        threads: 1,
        grace_period_seconds: Some(1),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(Opt::default(), conf);
    server.bootstrap();
    add_upstreams(&mut server, addrs);
    Ok(server)
}

/// Fails with a clear error when an address of the sample upstreams is taken.
pub fn check_upstreams_bindable(addrs: &DemoOptions) -> Result<(), StartError> {
    for (key, addr) in [
        ("demo origin", addrs.origin),
        ("demo dictionary", addrs.dictionary),
        ("demo event sink", addrs.sink),
    ] {
        check_bindable(key, addr)?;
    }
    Ok(())
}

fn add_upstreams(server: &mut Server, addrs: &DemoOptions) {
    let mut origin = Service::new(
        "cdn-edge demo origin".to_string(),
        SampleOrigin::new(sample_objects()),
    );
    origin.threads = Some(1);
    origin.add_tcp(&addrs.origin.to_string());
    server.add_service(origin);
    let mut dictionary = Service::new(
        "cdn-edge demo dictionary".to_string(),
        crate::demo_dictionary::SampleDictionary,
    );
    dictionary.threads = Some(1);
    dictionary.add_tcp(&addrs.dictionary.to_string());
    server.add_service(dictionary);
    let mut sink = Service::new(
        "cdn-edge demo event sink".to_string(),
        crate::demo_sink::EventSink,
    );
    sink.threads = Some(1);
    sink.add_tcp(&addrs.sink.to_string());
    server.add_service(sink);
}

/// Seconds since the epoch, for signing.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_bytes_are_deterministic_prefixes() {
        assert_eq!(sample_bytes(7, 1000)[..100], sample_bytes(7, 100)[..]);
        assert_ne!(sample_bytes(7, 100), sample_bytes(8, 100));
        assert_eq!(sample_bytes(1, 13).len(), 13);
    }

    #[test]
    fn demo_config_is_valid_and_instructions_are_signed() {
        let addrs = DemoOptions::loopback();
        let c = demo_config(&addrs).unwrap();
        let v = crate::auth::Verifier::new(&c.signing.keys, 30);
        let text = instructions(&addrs, 1_800_000_000);
        let q = text
            .lines()
            .find(|l| l.contains("/range/122638100-122948590?"))
            .and_then(|l| l.split('?').nth(1))
            .map(|q| q.trim_end_matches('\''))
            .unwrap();
        assert_eq!(v.verify(q, 1_800_000_000).unwrap().object, "sample");
        let ed = text
            .lines()
            .filter(|l| l.contains("/range/122638100-122948590?"))
            .find_map(|l| l.split('?').nth(1).filter(|q| q.len() > 110))
            .map(|q| q.trim_end_matches('\''))
            .unwrap();
        assert_eq!(ed, sample_query_ed25519(1_800_000_000));
        assert_eq!(v.verify(ed, 1_800_000_000).unwrap().object, "sample");
    }

    #[test]
    fn a_small_memory_tier_does_not_shrink_the_demos_pinned_budget_below_64_slices() {
        let mut addrs = DemoOptions::loopback();
        assert_eq!(
            demo_config(&addrs).unwrap().limits.max_pinned_bytes,
            256 << 20
        );
        addrs.memory_bytes = 1 << 20;
        addrs.disk = Some(std::env::temp_dir().join("cdn-edge-demo-disk"));
        assert_eq!(
            demo_config(&addrs).unwrap().limits.max_pinned_bytes,
            64 << 20
        );
    }
}
