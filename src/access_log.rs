//! The access log: one line per request, written without going through `tracing`'s
//! formatters, which cost about a fifth of a small request's instructions.
//!
//! Lines have the shape of the other log lines (`timestamp`, `level`, `target` =
//! `access`), as JSON or as text, and go to the process's log writer (see
//! [`set_writer`]). The query string is never written: it carries the signature and
//! the client's token.

use std::cell::RefCell;
use std::io::Write;
use std::sync::{Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::config::LogFormat;

/// Where lines go: the writer shared with the rest of the log, so lines never interleave.
static WRITER: OnceLock<Mutex<Box<dyn Write + Send>>> = OnceLock::new();

/// Sends access lines to `writer` (a non-blocking writer, so a request never waits on
/// the disk). Without it, lines go straight to stderr.
pub fn set_writer(writer: impl Write + Send + 'static) {
    let _ = WRITER.set(Mutex::new(Box::new(writer)));
}

/// One request, as logged.
pub struct Entry<'a> {
    pub client: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub route: &'a str,
    pub status: u16,
    pub bytes: u64,
    pub duration_ms: f64,
    pub cache: &'a str,
    pub range: &'a str,
    pub proto: &'a str,
    pub tls: bool,
    pub error: &'a str,
}

thread_local! {
    static LINE: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(512));
}

/// Formats and writes one line.
pub fn write(entry: &Entry<'_>, format: LogFormat) {
    LINE.with(|line| {
        let mut line = line.borrow_mut();
        line.clear();
        render(&mut line, entry, format, SystemTime::now());
        match WRITER.get() {
            Some(w) => {
                let _ = w.lock().unwrap_or_else(|e| e.into_inner()).write_all(&line);
            }
            None => {
                let _ = std::io::stderr().write_all(&line);
            }
        }
    });
}

/// Appends one line (newline included) in `format`, stamped `now`.
pub fn render(out: &mut Vec<u8>, entry: &Entry<'_>, format: LogFormat, now: SystemTime) {
    match format {
        LogFormat::Json => json_line(out, entry, now),
        LogFormat::Text => text_line(out, entry, now),
    }
}

fn json_line(out: &mut Vec<u8>, e: &Entry<'_>, now: SystemTime) {
    out.extend_from_slice(b"{\"timestamp\":\"");
    rfc3339(out, now);
    out.extend_from_slice(b"\",\"level\":\"INFO\"");
    for (key, value) in [
        ("client", e.client),
        ("method", e.method),
        ("path", e.path),
        ("route", e.route),
    ] {
        json_field(out, key, value);
    }
    let _ = write!(
        out,
        ",\"status\":{},\"bytes\":{},\"duration_ms\":",
        e.status, e.bytes
    );
    let _ = serde_json::to_writer(&mut *out, &e.duration_ms);
    for (key, value) in [("cache", e.cache), ("range", e.range), ("proto", e.proto)] {
        json_field(out, key, value);
    }
    out.extend_from_slice(if e.tls {
        b",\"tls\":true"
    } else {
        b",\"tls\":false"
    });
    json_field(out, "error", e.error);
    out.extend_from_slice(b",\"target\":\"access\"}\n");
}

/// `,"key":"value"`. Keys are fixed identifiers; values are escaped unless they are
/// plain printable ASCII (most are), which is copied as it is.
fn json_field(out: &mut Vec<u8>, key: &str, value: &str) {
    out.extend_from_slice(b",\"");
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(b"\":");
    if value
        .bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
    {
        out.push(b'"');
        out.extend_from_slice(value.as_bytes());
        out.push(b'"');
    } else {
        let _ = serde_json::to_writer(&mut *out, value);
    }
}

fn text_line(out: &mut Vec<u8>, e: &Entry<'_>, now: SystemTime) {
    rfc3339(out, now);
    let _ = writeln!(
        out,
        "  INFO access: client={} method={} path={:?} route={} status={} bytes={} \
         duration_ms={:.3} cache={:?} range={:?} proto={} tls={} error={:?}",
        e.client,
        e.method,
        e.path,
        e.route,
        e.status,
        e.bytes,
        e.duration_ms,
        e.cache,
        e.range,
        e.proto,
        e.tls,
        e.error
    );
}

/// `2026-11-26T14:02:15.720277Z`: UTC with microseconds, as the other log lines.
fn rfc3339(out: &mut Vec<u8>, now: SystemTime) {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    // Fixed-width digits written directly: this runs once per request.
    digits(out, year.clamp(0, 9999) as u64, 4);
    out.push(b'-');
    digits(out, month.into(), 2);
    out.push(b'-');
    digits(out, day.into(), 2);
    out.push(b'T');
    digits(out, rem / 3600, 2);
    out.push(b':');
    digits(out, rem / 60 % 60, 2);
    out.push(b':');
    digits(out, rem % 60, 2);
    out.push(b'.');
    digits(out, since.subsec_micros().into(), 6);
    out.push(b'Z');
}

/// `value` as exactly `width` decimal digits (zero-padded; higher digits dropped).
fn digits(out: &mut Vec<u8>, mut value: u64, width: usize) {
    let start = out.len();
    out.resize(start + width, b'0');
    for slot in out[start..].iter_mut().rev() {
        *slot = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn entry() -> Entry<'static> {
        Entry {
            client: "203.0.113.7",
            method: "GET",
            path: "/range/0-9\"\n",
            route: "range",
            status: 200,
            bytes: 10,
            duration_ms: 0.25,
            cache: "hit",
            range: "",
            proto: "h2",
            tls: true,
            error: "",
        }
    }

    #[test]
    fn dates_are_utc_calendar_dates() {
        let at = |secs: u64, micros: u32| {
            let mut out = Vec::new();
            rfc3339(
                &mut out,
                UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(micros.into()),
            );
            String::from_utf8(out).unwrap()
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(at(951_782_400, 5), "2000-02-29T00:00:00.000005Z");
        assert_eq!(at(1_795_705_685, 123_456), "2026-11-26T15:08:05.123456Z");
        assert_eq!(at(4_107_542_399, 999_999), "2100-02-28T23:59:59.999999Z");
    }

    #[test]
    fn json_lines_parse_and_escape_what_they_quote() {
        let mut out = Vec::new();
        json_line(&mut out, &entry(), UNIX_EPOCH);
        assert_eq!(out.last(), Some(&b'\n'));
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["path"], "/range/0-9\"\n");
        assert_eq!(v["status"], 200);
        assert_eq!(v["duration_ms"], 0.25);
        assert_eq!(v["tls"], true);
        assert_eq!(v["target"], "access");
        assert_eq!(v["timestamp"], "1970-01-01T00:00:00.000000Z");
    }

    #[test]
    fn text_lines_are_one_line() {
        let mut out = Vec::new();
        text_line(&mut out, &entry(), UNIX_EPOCH);
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.matches('\n').count(), 1, "{text}");
        assert!(
            text.contains("INFO access: client=203.0.113.7 method=GET"),
            "{text}"
        );
    }
}
