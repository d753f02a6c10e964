//! `[admin]`, `[fill]` and `[control]`: content operations on the admin listener
//! (SPEC 7).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{invalid, parse_upstream_url, ConfigError, UpstreamUrl};

/// Default time between two control-plane reports.
pub const DEFAULT_REPORT_SECS: u64 = 10;
/// Default time budget of one control-plane report (connect, send, answer).
pub const DEFAULT_REPORT_TIMEOUT_MS: u64 = 2_000;
/// Default slices a fill job fetches at once.
pub const DEFAULT_FILL_CONCURRENCY: usize = 4;
/// Default attempts per slice before a fill job counts it as an error.
pub const DEFAULT_FILL_ATTEMPTS: u32 = 3;

/// `[admin]`: who may use the mutating admin endpoints.
#[derive(Clone, Default)]
pub struct Admin {
    /// The bearer token of `/purge`, `/fill` and `/drain`; `None`: they answer 403.
    pub token: Option<Vec<u8>>,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// A daily window in the machine's local time, `HH:MM-HH:MM`; it may cross midnight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Minutes after midnight the window opens (inclusive).
    pub start_min: u16,
    /// Minutes after midnight it closes (exclusive).
    pub end_min: u16,
}

impl Window {
    pub fn parse(s: &str) -> Result<Self, String> {
        let (a, b) = s
            .split_once('-')
            .ok_or_else(|| format!("{s:?}: expected HH:MM-HH:MM"))?;
        let minute = |t: &str| -> Result<u16, String> {
            let (h, m) = t
                .trim()
                .split_once(':')
                .ok_or_else(|| format!("{t:?}: expected HH:MM"))?;
            let h: u16 = h.parse().map_err(|_| format!("{t:?}: bad hour"))?;
            let m: u16 = m.parse().map_err(|_| format!("{t:?}: bad minute"))?;
            if h > 24 || m > 59 || (h == 24 && m != 0) {
                return Err(format!("{t:?}: not a time of day (00:00 to 24:00)"));
            }
            Ok(h * 60 + m)
        };
        let (start_min, end_min) = (minute(a)?, minute(b)?);
        if start_min % 1440 == end_min % 1440 {
            return Err(format!(
                "{s:?}: opens and closes at the same time (leave fill.window empty for any time)"
            ));
        }
        Ok(Self {
            start_min: start_min % 1440,
            end_min: end_min % 1440,
        })
    }

    /// Whether `minute` (after local midnight, 0..1440) is inside the window.
    pub fn contains(&self, minute: u16) -> bool {
        if self.start_min < self.end_min {
            (self.start_min..self.end_min).contains(&minute)
        } else {
            minute >= self.start_min || minute < self.end_min
        }
    }
}

/// `[fill]`: background fill jobs.
#[derive(Debug, Clone)]
pub struct Fill {
    /// When jobs may fetch; `None`: any time.
    pub window: Option<Window>,
    /// Fetch rate limit of all jobs together; 0: none.
    pub max_bytes_per_sec: u64,
    /// Where jobs are kept (a redb file), so they resume after a restart.
    pub state_dir: PathBuf,
    /// Slices fetched at once.
    pub concurrency: usize,
    /// Attempts per slice before it counts as an error.
    pub attempts: u32,
}

/// `[control]`: the control-plane report.
#[derive(Debug, Clone)]
pub struct Control {
    pub report_url: UpstreamUrl,
    /// The path of `report_url` (`/` when it has none).
    pub report_path: String,
    pub every: Duration,
    pub timeout: Duration,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub token: Option<String>,
    pub token_env: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFill {
    #[serde(default)]
    pub window: String,
    #[serde(default)]
    pub max_bytes_per_sec: u64,
    pub state_dir: PathBuf,
    #[serde(default = "default_fill_concurrency")]
    pub concurrency: usize,
    #[serde(default = "default_fill_attempts")]
    pub attempts: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawControl {
    pub report_url: String,
    #[serde(default = "default_report_secs")]
    pub report_secs: u64,
    #[serde(default = "default_report_timeout")]
    pub timeout_ms: u64,
}

fn default_fill_concurrency() -> usize {
    DEFAULT_FILL_CONCURRENCY
}
fn default_fill_attempts() -> u32 {
    DEFAULT_FILL_ATTEMPTS
}
fn default_report_secs() -> u64 {
    DEFAULT_REPORT_SECS
}
fn default_report_timeout() -> u64 {
    DEFAULT_REPORT_TIMEOUT_MS
}

pub fn validate_admin(
    raw: RawAdmin,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Admin, ConfigError> {
    let token = match (raw.token, raw.token_env) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "admin.token",
                "set either token or token_env, not both",
            ))
        }
        (Some(t), None) => Some(t),
        (None, Some(var)) => Some(env(&var).ok_or_else(|| {
            invalid(
                "admin.token_env",
                format!("environment variable {var} is not set"),
            )
        })?),
        (None, None) => None,
    };
    if let Some(t) = &token {
        if t.len() < 16 {
            return Err(invalid(
                "admin.token",
                "must be at least 16 characters (it guards purge and fill)",
            ));
        }
    }
    Ok(Admin {
        token: token.map(String::into_bytes),
    })
}

pub fn validate_fill(raw: RawFill) -> Result<Fill, ConfigError> {
    if raw.state_dir.as_os_str().is_empty() {
        return Err(invalid("fill.state_dir", "must not be empty"));
    }
    let window = match raw.window.trim() {
        "" => None,
        w => Some(Window::parse(w).map_err(|m| invalid("fill.window", m))?),
    };
    if !(1..=256).contains(&raw.concurrency) {
        return Err(invalid("fill.concurrency", "must be between 1 and 256"));
    }
    if !(1..=100).contains(&raw.attempts) {
        return Err(invalid("fill.attempts", "must be between 1 and 100"));
    }
    Ok(Fill {
        window,
        max_bytes_per_sec: raw.max_bytes_per_sec,
        state_dir: raw.state_dir,
        concurrency: raw.concurrency,
        attempts: raw.attempts,
    })
}

pub fn validate_control(raw: RawControl) -> Result<Control, ConfigError> {
    let url = raw.report_url.trim();
    // The path is kept apart: parse_upstream_url takes scheme://host[:port] only.
    let (scheme_len, rest) = if let Some(r) = url.strip_prefix("http://") {
        (7, r)
    } else if let Some(r) = url.strip_prefix("https://") {
        (8, r)
    } else {
        return Err(invalid(
            "control.report_url",
            format!("{url:?}: must start with http:// or https://"),
        ));
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let report_url =
        parse_upstream_url("control.report_url", &url[..scheme_len + authority.len()])?;
    if path.contains(['#', ' ']) {
        return Err(invalid("control.report_url", format!("{url:?}: bad path")));
    }
    if !(1..=3600).contains(&raw.report_secs) {
        return Err(invalid("control.report_secs", "must be between 1 and 3600"));
    }
    if raw.timeout_ms == 0 || raw.timeout_ms > raw.report_secs * 1000 {
        return Err(invalid(
            "control.timeout_ms",
            "must be between 1 and report_secs × 1000",
        ));
    }
    Ok(Control {
        report_url,
        report_path: path.to_string(),
        every: Duration::from_secs(raw.report_secs),
        timeout: Duration::from_millis(raw.timeout_ms),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_parse_and_may_cross_midnight() {
        let day = Window::parse("02:00-14:00").unwrap();
        assert!(day.contains(120) && day.contains(839));
        assert!(!day.contains(840) && !day.contains(119));
        let night = Window::parse("22:30-06:00").unwrap();
        assert!(night.contains(22 * 60 + 30) && night.contains(0) && night.contains(359));
        assert!(!night.contains(360) && !night.contains(22 * 60 + 29));
        let to_midnight = Window::parse("20:00-24:00").unwrap();
        assert!(to_midnight.contains(1439) && !to_midnight.contains(0));
        for bad in [
            "",
            "02:00",
            "2-3",
            "25:00-01:00",
            "01:60-02:00",
            "03:00-03:00",
            "00:00-24:00",
        ] {
            assert!(Window::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn control_url_keeps_its_path() {
        let c = validate_control(RawControl {
            report_url: "http://127.0.0.1:9100/report".into(),
            report_secs: 10,
            timeout_ms: 2000,
        })
        .unwrap();
        assert_eq!(c.report_path, "/report");
        assert_eq!(c.report_url.port, 9100);
        assert!(validate_control(RawControl {
            report_url: "ftp://x".into(),
            report_secs: 10,
            timeout_ms: 2000,
        })
        .is_err());
    }
}
