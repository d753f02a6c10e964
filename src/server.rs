//! Builds the Pingora server and its services from the validated config.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;

use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::Server;
use pingora::services::listening::Service;

use crate::admin::AdminApp;
use crate::app::AppState;
use crate::app::StateError;
use crate::config::Config;
use crate::edge::Edge;
use crate::forward::deliver::DeliveryService;
use pingora::services::background::background_service;

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
    #[error("listen.https is not supported yet; remove it to serve plain HTTP")]
    HttpsUnsupported,
}

/// A built, not yet running edge: the Pingora server with the public and admin services.
pub struct EdgeServer {
    pub server: Server,
    pub state: Arc<AppState>,
}

impl EdgeServer {
    /// Builds the server. Fails with a clear error when a listen address is taken or an
    /// origin host does not resolve, instead of failing later inside a service thread.
    pub fn build(config: &Config) -> Result<Self, StartError> {
        if config.listen.https.is_some() {
            return Err(StartError::HttpsUnsupported);
        }
        check_bindable("listen.http", config.listen.http)?;
        check_bindable("listen.admin", config.listen.admin)?;

        let state = AppState::new(config)?;
        let mut server = Server::new_with_opt_and_conf(None::<Opt>, server_conf(config));
        server.bootstrap();

        let mut edge = pingora::proxy::http_proxy_service_with_name(
            &server.configuration,
            Edge::new(state.clone()),
            "cdn-edge public",
        );
        edge.add_tcp(&config.listen.http.to_string());
        server.add_service(edge);

        let mut admin = Service::new("cdn-edge admin".to_string(), AdminApp::new(state.clone()));
        admin.threads = Some(1);
        admin.add_tcp(&config.listen.admin.to_string());
        server.add_service(admin);

        if let (Some(forwarder), Some(cfg)) = (&state.forwarder, &config.forward) {
            let delivery = DeliveryService::new(
                forwarder,
                cfg,
                config.server.upstream_keepalive_pool,
                state.metrics.clone(),
            )
            .map_err(|e| StartError::State(StateError::Resolve(e)))?;
            server.add_service(background_service("cdn-edge forward delivery", delivery));
        }

        Ok(Self { server, state })
    }

    /// Runs until SIGTERM (graceful) or SIGINT (fast); never returns.
    pub fn run(self) -> ! {
        self.server.run_forever()
    }
}

fn server_conf(config: &Config) -> ServerConf {
    let mut conf = ServerConf {
        threads: config.server.threads,
        grace_period_seconds: Some(config.server.grace_period_secs),
        graceful_shutdown_timeout_seconds: Some(config.server.shutdown_timeout_secs),
        upstream_keepalive_pool_size: config.server.upstream_keepalive_pool,
        ..ServerConf::default()
    };
    conf.version = 1;
    conf
}

/// Fails with a clear error when `addr` cannot be listened on (taken, not local).
pub fn check_bindable(key: &'static str, addr: SocketAddr) -> Result<(), StartError> {
    TcpListener::bind(addr)
        .map(drop)
        .map_err(|error| StartError::Bind { key, addr, error })
}
