//! The client side of the admin API, for `cdn-edge purge|fill|drain`: one blocking
//! request to a running edge's admin listener, with the token, and errors an operator
//! can act on (unreachable, 401, 403, the edge's own JSON error).

use std::net::SocketAddr;
use std::time::Duration;

/// Environment variable the admin commands read the token from when `--token` is not
/// given.
pub const TOKEN_ENV: &str = "CDN_EDGE_ADMIN_TOKEN";

/// Time budget of one admin request.
const TIMEOUT: Duration = Duration::from_secs(30);

/// Why an admin command failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot reach the edge's admin listener at {addr}: {detail}")]
    Unreachable { addr: SocketAddr, detail: String },
    #[error("{addr}: the token was refused (401): pass the edge's admin.token with --token or {TOKEN_ENV}")]
    Unauthorized { addr: SocketAddr },
    #[error(
        "{addr}: admin endpoints are off on this edge (403): it has no admin.token configured"
    )]
    Forbidden { addr: SocketAddr },
    #[error("{addr}: {status}: {message}")]
    Refused {
        addr: SocketAddr,
        status: u16,
        message: String,
    },
}

/// An edge's admin listener.
pub struct AdminClient {
    addr: SocketAddr,
    token: Option<String>,
    agent: ureq::Agent,
}

impl AdminClient {
    /// `token`: from the command line, else from [`TOKEN_ENV`].
    pub fn new(addr: SocketAddr, token: Option<String>) -> Self {
        let token = token.or_else(|| std::env::var(TOKEN_ENV).ok());
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(TIMEOUT))
            .http_status_as_error(false)
            .build()
            .into();
        Self { addr, token, agent }
    }

    /// Sends `method path` with an optional JSON body; returns the answer's JSON on a
    /// 2xx.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<serde_json::Value, AdminError> {
        let url = format!("http://{}{path}", self.addr);
        let mut req = http::Request::builder().method(method).uri(&url);
        if let Some(t) = &self.token {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let unreachable = |detail: String| AdminError::Unreachable {
            addr: self.addr,
            detail,
        };
        let result = match body {
            Some(b) => {
                let req = req
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .body(serde_json::to_vec(b).expect("JSON serialises"))
                    .map_err(|e| unreachable(e.to_string()))?;
                self.agent.run(req)
            }
            None => {
                let req = req.body(()).map_err(|e| unreachable(e.to_string()))?;
                self.agent.run(req)
            }
        };
        let mut resp = result.map_err(|e| unreachable(e.to_string()))?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| unreachable(e.to_string()))?;
        match status {
            200..=299 => serde_json::from_str(&text).map_err(|e| AdminError::Refused {
                addr: self.addr,
                status,
                message: format!("not a JSON answer: {e}"),
            }),
            401 => Err(AdminError::Unauthorized { addr: self.addr }),
            403 => Err(AdminError::Forbidden { addr: self.addr }),
            _ => {
                let message = serde_json::from_str::<serde_json::Value>(&text)
                    .ok()
                    .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
                    .unwrap_or_else(|| text.trim().to_string());
                Err(AdminError::Refused {
                    addr: self.addr,
                    status,
                    message,
                })
            }
        }
    }
}
