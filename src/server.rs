//! Builds the Pingora server and its services from the validated config.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pingora::apps::HttpServerOptions;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{ExecutionPhase, Server};
use pingora::services::background::background_service;
use pingora::services::listening::Service;
use tokio::sync::broadcast;

use crate::admin::AdminApp;
use crate::app::AppState;
use crate::app::StateError;
use crate::cluster::purge::PurgeSync;
use crate::cluster::service::PeerApp;
use crate::cluster::site::SiteHealth;
use crate::config::Config;
use crate::connection::{self, GuardedApp, TlsHandshake};
use crate::edge::Edge;
use crate::forward::opening::DeliveryWhenOpen;
use crate::ops::control::ControlReporter;
use crate::ops::fill::runner::FillRunner;
use crate::tls::{self, TlsError};
use crate::upstream::ConnectorSettings;

/// Time the old process keeps serving after handing over its listeners (Pingora's
/// CLOSE_TIMEOUT), before its own graceful shutdown starts.
const HANDOVER_CLOSE_SECS: u64 = 5;

/// Why the edge could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Config(crate::config::ConfigError),
    #[error("{key} {addr}: cannot listen: {error}")]
    Bind {
        key: &'static str,
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("tls: {0}")]
    Tls(#[from] TlsError),
    #[error("upgrade: the previous process still holds the disk tier or the spool after {secs} s: {source}")]
    HandoverTimeout { secs: u64, source: StateError },
}

/// How the process starts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StartMode {
    /// Bind the listeners.
    #[default]
    Fresh,
    /// Receive the listeners from the running process over `server.upgrade_sock`, which is
    /// sent SIGQUIT once this one waits; then take over its disk tier and spool.
    Upgrade,
}

/// A built, not yet running edge: the Pingora server with the public and admin services.
pub struct EdgeServer {
    pub server: Server,
    pub state: Arc<AppState>,
}

impl EdgeServer {
    /// Builds a freshly started server; see [`EdgeServer::build_with`].
    pub fn build(config: &Config) -> Result<Self, StartError> {
        Self::build_with(config, StartMode::Fresh)
    }

    /// Builds the server. Fails with a clear error when a listen address is taken, a TLS
    /// file is unusable or an origin host does not resolve, instead of failing later
    /// inside a service thread.
    pub fn build_with(config: &Config, mode: StartMode) -> Result<Self, StartError> {
        let https = match (config.listen.https, &config.tls.server) {
            (Some(addr), Some(cert)) => Some(TlsHandshake::new(
                addr,
                tls::acceptor(cert)?,
                config.limits.tls_handshake_timeout,
            )),
            _ => None,
        };
        if let Some(ca) = &config.tls.ca_file {
            tls::check_ca_file(ca)?;
        }
        let opt = Opt {
            upgrade: mode == StartMode::Upgrade,
            ..Opt::default()
        };
        let mut server = Server::new_with_opt_and_conf(opt, server_conf(config));
        let phases = server.watch_execution_phase();
        let state = match mode {
            StartMode::Fresh => {
                check_bindable("listen.http", config.listen.http)?;
                if let Some(addr) = config.listen.https {
                    check_bindable("listen.https", addr)?;
                }
                check_bindable("listen.admin", config.listen.admin)?;
                if let Some(addr) = config.listen.peer {
                    check_bindable("listen.peer", addr)?;
                }
                let state = AppState::new(config)?;
                server.bootstrap();
                state
            }
            StartMode::Upgrade => {
                // Blocks until the old process, sent SIGQUIT, hands over its listeners;
                // exits the process after 5 s without them.
                server.bootstrap();
                take_over_state(config)?
            }
        };

        hand_over_storage_on_upgrade(phases, state.clone());

        let mut options = HttpServerOptions::default();
        // Pingora counts reuses after the first request.
        options.keepalive_request_limit = Some(config.limits.keepalive_requests - 1);
        options.h2_idle_timeout = Some(config.limits.idle_timeout);
        let edge_app = Edge::new(state.clone(), &config.limits, &config.log, options);
        let app = GuardedApp::new(edge_app, &config.limits, state.metrics.clone(), https);
        // One service, so one runtime, for both listeners. HTTPS is listened on as plain
        // TCP: the application counts each connection, then does its TLS handshake.
        let mut edge = Service::new("cdn-edge public".to_string(), app);
        edge.add_listener(connection::plain_listener(config.listen.http));
        if let Some(addr) = config.listen.https {
            edge.add_listener(connection::tls_listener(addr));
        }
        server.add_service(edge);

        let mut admin = Service::new("cdn-edge admin".to_string(), AdminApp::new(state.clone()));
        admin.threads = Some(1);
        admin.add_tcp(&config.listen.admin.to_string());
        server.add_service(admin);

        if let (Some(site), Some(addr)) = (&state.site, config.listen.peer) {
            let mut peer = Service::new(
                "cdn-edge peer".to_string(),
                PeerApp::new(state.clone(), site.clone()),
            );
            peer.add_tcp(&addr.to_string());
            server.add_service(peer);
            server.add_service(background_service(
                "cdn-edge peer health",
                SiteHealth(site.clone()),
            ));
            server.add_service(background_service(
                "cdn-edge purge sync",
                PurgeSync::new(state.clone(), site.clone()),
            ));
        }

        if let (Some(slot), Some(cfg)) = (&state.forwarder, &config.forward) {
            let delivery = DeliveryWhenOpen::new(
                slot.clone(),
                cfg,
                &ConnectorSettings::from_config(config),
                state.metrics.clone(),
            );
            server.add_service(background_service("cdn-edge forward delivery", delivery));
        }

        if let Some(cfg) = &config.control {
            let reporter =
                ControlReporter::new(state.clone(), cfg, &ConnectorSettings::from_config(config));
            server.add_service(background_service("cdn-edge control report", reporter));
        }

        if state.fill.is_some() {
            server.add_service(background_service(
                "cdn-edge fill jobs",
                FillRunner::new(state.clone()),
            ));
        }

        Ok(Self { server, state })
    }

    /// Runs until SIGTERM (graceful), SIGINT (fast) or a hand-over (SIGQUIT) has ended.
    pub fn run(self) {
        self.server.run(pingora::server::RunArgs::default())
    }
}

fn server_conf(config: &Config) -> ServerConf {
    let mut conf = ServerConf {
        threads: config.server.threads,
        grace_period_seconds: Some(config.server.grace_period_secs),
        graceful_shutdown_timeout_seconds: Some(config.server.shutdown_timeout_secs),
        upstream_keepalive_pool_size: config.server.upstream_keepalive_pool,
        upgrade_sock: config.server.upgrade_sock.display().to_string(),
        ..ServerConf::default()
    };
    conf.version = 1;
    conf
}

/// Once this process has sent its listeners to a new one (SIGQUIT), it lets go of the
/// disk tier and the spool at once, so the new process can open them and serve while
/// this one finishes its in-flight requests.
fn hand_over_storage_on_upgrade(
    mut phases: tokio::sync::broadcast::Receiver<ExecutionPhase>,
    state: Arc<AppState>,
) {
    let watcher = std::thread::Builder::new()
        .name("cdn-edge hand-over".into())
        .spawn(move || loop {
            match phases.blocking_recv() {
                Ok(ExecutionPhase::GracefulUpgradeCloseTimeout) => {
                    state.hand_over_storage();
                    return;
                }
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            }
        });
    if let Err(e) = watcher {
        tracing::error!(error = %e, "cannot watch for upgrades: an upgrade will wait for this process to exit");
    }
}

/// Opens the disk tier and the spool once the process that handed over its listeners
/// has let go of them. It does so right after sending them; should it not (an older
/// version), it holds them until it exits: [`HANDOVER_CLOSE_SECS`], then its grace
/// period and shutdown timeout. Both processes share one config, so those are ours.
fn take_over_state(config: &Config) -> Result<Arc<AppState>, StartError> {
    let secs = HANDOVER_CLOSE_SECS
        + config.server.grace_period_secs
        + config.server.shutdown_timeout_secs
        + 5;
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        match AppState::new(config) {
            Ok(state) => return Ok(state),
            Err(e) if e.is_in_use() && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) if e.is_in_use() => return Err(StartError::HandoverTimeout { secs, source: e }),
            Err(e) => return Err(e.into()),
        }
    }
}

/// Fails with a clear error when `addr` cannot be listened on (taken, not local).
pub fn check_bindable(key: &'static str, addr: SocketAddr) -> Result<(), StartError> {
    TcpListener::bind(addr)
        .map(drop)
        .map_err(|error| StartError::Bind { key, addr, error })
}
