//! Origin faults for [`super::origin::TestOrigin`], written byte by byte: rules that
//! pick requests (by object, by the first byte of the asked range, for a number of
//! times), and the wrong answer each fault sends in place of a correct one.

use std::time::Duration;

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// Pause between two bytes of a [`Fault::Drip`] answer: far below any read timeout,
/// so only a deadline on the whole answer catches it.
pub const DRIP_EVERY: Duration = Duration::from_millis(25);

/// The ETag a [`Fault::OtherEtag`] answer carries.
pub const FAULTY_ETAG: &str = "\"faulty\"";

/// Length of the `Content-Type` of a [`Fault::LongContentType`] answer.
pub const LONG_CONTENT_TYPE_BYTES: usize = 100_000;

/// How much larger the total size of a [`Fault::OtherSize`] answer is than the object.
pub const EXTRA_SIZE: u64 = 1000;

/// One way to answer a range request wrongly. Unless a variant says otherwise, the rest
/// of the answer (status line, Content-Type, the object's headers, Content-Length and
/// Content-Range) is what a correct 206 would carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The header and half of the body, then a TCP reset (RST).
    ResetMidBody,
    /// The header and all but the last 100 bytes of the body, then a clean close.
    ShortBody,
    /// `Content-Range` and body start one byte after the asked start.
    RangeOtherStart,
    /// `Content-Range` and body end one byte before the asked end.
    RangeOtherEnd,
    /// `Content-Range` with a total that ends before the range does.
    RangeOtherTotal,
    /// `200` with the whole object, as if `Range` were ignored.
    WholeObject,
    /// A correct 206 whose `ETag` is [`FAULTY_ETAG`].
    OtherEtag,
    /// A correct 206 whose `Content-Range` total is [`EXTRA_SIZE`] bytes larger.
    OtherSize,
    /// A correct answer, one byte every [`DRIP_EVERY`].
    Drip,
    /// A header block larger than 1 MiB (200 headers of 6,000 bytes).
    OversizedHeader,
    /// A correct 206 whose `Content-Type` is [`LONG_CONTENT_TYPE_BYTES`] long.
    LongContentType,
    /// 300 header lines.
    TooManyHeaders,
    /// The status line `HTTP/1.1 2x6 Partial Content`.
    BadStatusLine,
    /// `Content-Length: sixty`.
    BadContentLength,
    /// Two `Content-Length` lines: the right length and 10 more.
    ConflictingContentLength,
    /// The right length three times: `Content-Length: n, n` and `Content-Length: n`,
    /// which RFC 9110 §8.6 lets a recipient accept as one.
    RepeatedContentLength,
    /// A correct 206 sent with `Transfer-Encoding: chunked` (no Content-Length).
    Chunked,
    /// Chunked, closed in the middle of a chunk halfway through the body.
    TruncatedChunked,
    /// A correct 206 followed, in the same write, by a 206 for the next slice (as the
    /// edge asks for it) full of zeros: an answer to a request not sent yet.
    AnswerAhead,
    /// A `103 Early Hints` interim answer, then a correct 206.
    EarlyHints,
    /// Closes the connection before any byte of the answer.
    CloseBeforeAnswer,
    /// A 206 with the right `Content-Range` and `Content-Length: 0`, no body.
    EmptyBody,
}

/// Which requests get a fault, and how many times.
#[derive(Debug, Clone)]
pub struct FaultRule {
    /// Request path, `/objects/{o}/{v}`.
    target: String,
    /// First byte of the asked range; `None` matches any request for the object.
    start: Option<u64>,
    /// Matching requests still to fault; `None` until healed.
    left: Option<u32>,
    fault: Fault,
}

impl FaultRule {
    /// `fault` on every request for object (o, v) until healed.
    pub fn on(o: &str, v: &str, fault: Fault) -> Self {
        Self {
            target: format!("/objects/{o}/{v}"),
            start: None,
            left: None,
            fault,
        }
    }

    /// Only requests whose range starts at `start` (a slice's first byte).
    pub fn from(mut self, start: u64) -> Self {
        self.start = Some(start);
        self
    }

    /// Only the next `n` matching requests.
    pub fn times(mut self, n: u32) -> Self {
        self.left = Some(n);
        self
    }
}

/// The rules an origin applies, first match wins.
#[derive(Debug, Default)]
pub struct Faults {
    rules: Vec<FaultRule>,
}

impl Faults {
    pub fn add(&mut self, rule: FaultRule) {
        self.rules.push(rule);
    }

    pub fn clear(&mut self) {
        self.rules.clear();
    }

    /// The fault for a request of `target` with this `Range` header, if a rule matches;
    /// counts it against the rule.
    pub fn take(&mut self, target: &str, range: Option<&str>) -> Option<Fault> {
        let start = range
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.split_once('-'))
            .and_then(|(a, _)| a.parse::<u64>().ok());
        let rule = self.rules.iter_mut().find(|r| {
            r.target == target && r.left != Some(0) && (r.start.is_none() || r.start == start)
        })?;
        if let Some(left) = &mut rule.left {
            *left -= 1;
        }
        Some(rule.fault)
    }
}

/// What the origin does with the connection after a faulty answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    /// Reads the next request on it.
    KeepOpen,
    Close,
    /// Closes it with a TCP reset.
    Reset,
}

/// A connection an origin can close with a reset instead of a FIN.
pub trait Resettable {
    /// Makes the coming close send an RST (`SO_LINGER` 0).
    fn reset_on_close(&self);
}

impl Resettable for TcpStream {
    fn reset_on_close(&self) {
        let _ = self.set_zero_linger();
    }
}

impl Resettable for pingora::tls::ServerTlsStream<TcpStream> {
    fn reset_on_close(&self) {
        let _ = self.get_ref().0.set_zero_linger();
    }
}

/// The object a faulty answer is about.
pub struct Object<'a> {
    pub bytes: &'a [u8],
    pub content_type: &'a str,
    /// Header lines its answers carry, e.g. `ETag`.
    pub headers: &'a [(String, String)],
}

/// Writes `fault`'s answer to a request with this `Range` header (the whole object when
/// it has none or it cannot be parsed). Write errors end the answer early: the edge may
/// hang up on a faulty answer at any point.
pub async fn answer<S: AsyncWrite + Unpin>(
    sock: &mut S,
    fault: Fault,
    obj: &Object<'_>,
    range: Option<&str>,
) -> After {
    let size = obj.bytes.len();
    let (a, b) = range
        .and_then(|r| super::origin::parse_range(r, size as u64).ok())
        .map_or((0, size.saturating_sub(1)), |(a, b)| {
            (a as usize, b as usize)
        });
    let body = &obj.bytes[a..=b];
    let long_type = format!("video/{}", "x".repeat(LONG_CONTENT_TYPE_BYTES - 6));
    let content_type = match fault {
        Fault::LongContentType => &long_type,
        _ => obj.content_type,
    };
    let len = body.len();
    let etag_line = |etag: Option<&str>| {
        obj.headers
            .iter()
            .map(|(k, v)| match etag {
                Some(e) if k.eq_ignore_ascii_case("etag") => format!("{k}: {e}\r\n"),
                _ => format!("{k}: {v}\r\n"),
            })
            .collect::<String>()
    };
    // A 206 head without its final empty line: status, type, object headers, then `rest`.
    let head = |status: &str, etag: Option<&str>, rest: String| {
        format!(
            "{status}\r\nContent-Type: {content_type}\r\n{}{rest}",
            etag_line(etag)
        )
    };
    const PARTIAL: &str = "HTTP/1.1 206 Partial Content";
    let range_line = |first: usize, last: usize, total: usize| {
        format!("Content-Range: bytes {first}-{last}/{total}\r\n")
    };
    let valid_head = |rest: &str| head(PARTIAL, None, format!("{}{rest}", range_line(a, b, size)));
    let with_length = |h: String, n: usize| format!("{h}Content-Length: {n}\r\n\r\n");

    let (bytes, after): (Vec<u8>, After) = match fault {
        Fault::ResetMidBody => (
            cat(&with_length(valid_head(""), len), &body[..len / 2]),
            After::Reset,
        ),
        Fault::ShortBody => (
            cat(
                &with_length(valid_head(""), len),
                &body[..len.saturating_sub(100)],
            ),
            After::Close,
        ),
        Fault::RangeOtherStart => (
            cat(
                &with_length(head(PARTIAL, None, range_line(a + 1, b, size)), len - 1),
                &body[1..],
            ),
            After::KeepOpen,
        ),
        Fault::RangeOtherEnd => (
            cat(
                &with_length(head(PARTIAL, None, range_line(a, b - 1, size)), len - 1),
                &body[..len - 1],
            ),
            After::KeepOpen,
        ),
        Fault::RangeOtherTotal => (
            cat(
                &with_length(head(PARTIAL, None, range_line(a, b, b - 1)), len),
                body,
            ),
            After::KeepOpen,
        ),
        Fault::WholeObject => (
            cat(
                &with_length(head("HTTP/1.1 200 OK", None, String::new()), size),
                obj.bytes,
            ),
            After::KeepOpen,
        ),
        Fault::OtherEtag => (
            cat(
                &with_length(
                    head(PARTIAL, Some(FAULTY_ETAG), range_line(a, b, size)),
                    len,
                ),
                body,
            ),
            After::KeepOpen,
        ),
        Fault::OtherSize => (
            cat(
                &with_length(
                    head(PARTIAL, None, range_line(a, b, size + EXTRA_SIZE as usize)),
                    len,
                ),
                body,
            ),
            After::KeepOpen,
        ),
        Fault::Drip => {
            let all = cat(&with_length(valid_head(""), len), body);
            for byte in all.chunks(1) {
                if sock.write_all(byte).await.is_err() {
                    return After::Close;
                }
                tokio::time::sleep(DRIP_EVERY).await;
            }
            return After::Close;
        }
        Fault::OversizedHeader => {
            let pad = "a".repeat(6000);
            let lines: String = (0..200).map(|i| format!("X-Pad-{i}: {pad}\r\n")).collect();
            (
                cat(&with_length(valid_head(&lines), len), body),
                After::Close,
            )
        }
        Fault::LongContentType => (
            cat(&with_length(valid_head(""), len), body),
            After::KeepOpen,
        ),
        Fault::TooManyHeaders => {
            let lines: String = (0..300).map(|i| format!("X-Many-{i}: {i}\r\n")).collect();
            (
                cat(&with_length(valid_head(&lines), len), body),
                After::Close,
            )
        }
        Fault::BadStatusLine => (
            cat(
                &with_length(
                    head("HTTP/1.1 2x6 Partial Content", None, range_line(a, b, size)),
                    len,
                ),
                body,
            ),
            After::Close,
        ),
        Fault::BadContentLength => (
            cat(&valid_head("Content-Length: sixty\r\n\r\n"), body),
            After::Close,
        ),
        Fault::ConflictingContentLength => (
            cat(
                &valid_head(&format!(
                    "Content-Length: {len}\r\nContent-Length: {}\r\n\r\n",
                    len + 10
                )),
                body,
            ),
            After::Close,
        ),
        Fault::RepeatedContentLength => (
            cat(
                &valid_head(&format!(
                    "Content-Length: {len}, {len}\r\nContent-Length: {len}\r\n\r\n"
                )),
                body,
            ),
            After::KeepOpen,
        ),
        Fault::Chunked => (
            cat(
                &valid_head("Transfer-Encoding: chunked\r\n\r\n"),
                &chunked(body),
            ),
            After::KeepOpen,
        ),
        Fault::TruncatedChunked => {
            let whole = chunked(body);
            (
                cat(
                    &valid_head("Transfer-Encoding: chunked\r\n\r\n"),
                    &whole[..whole.len() / 2],
                ),
                After::Close,
            )
        }
        Fault::AnswerAhead => {
            let (next, next_last) = (b + 1, (2 * b + 1 - a).min(size - 1));
            let ahead = with_length(
                head(PARTIAL, None, range_line(next, next_last, size)),
                next_last + 1 - next,
            );
            let mut out = cat(&with_length(valid_head(""), len), body);
            out.extend_from_slice(&cat(&ahead, &vec![0; next_last + 1 - next]));
            (out, After::KeepOpen)
        }
        Fault::EarlyHints => (
            cat(
                "HTTP/1.1 103 Early Hints\r\nLink: </init.mp4>; rel=preload\r\n\r\n",
                &cat(&with_length(valid_head(""), len), body),
            ),
            After::KeepOpen,
        ),
        Fault::CloseBeforeAnswer => (Vec::new(), After::Close),
        Fault::EmptyBody => (with_length(valid_head(""), 0).into_bytes(), After::KeepOpen),
    };
    if sock.write_all(&bytes).await.is_err() || sock.flush().await.is_err() {
        return After::Close;
    }
    after
}

fn cat(head: &str, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(head.len() + body.len());
    out.extend_from_slice(head.as_bytes());
    out.extend_from_slice(body);
    out
}

/// `body` in chunks of 10,000 bytes, with the last chunk.
fn chunked(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 64);
    for c in body.chunks(10_000) {
        out.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
        out.extend_from_slice(c);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}
