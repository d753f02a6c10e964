//! Response compression for dictionary answers: negotiation and one-time encoding.
//!
//! Bodies are compressed once per cache entry and encoding, then shared by every hit,
//! instead of once per response. Negotiation honours q-values (RFC 9110 §12.5.3) and
//! prefers br, then zstd, then gzip when the client weighs them equally.

use std::io::Write;

use bytes::Bytes;

/// Bodies smaller than this are sent as they are: the framing would eat the gain.
pub const MIN_COMPRESS_BYTES: usize = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Identity,
    Br,
    Zstd,
    Gzip,
}

impl Encoding {
    /// The `Content-Encoding` token.
    pub const fn token(self) -> &'static str {
        match self {
            Encoding::Identity => "identity",
            Encoding::Br => "br",
            Encoding::Zstd => "zstd",
            Encoding::Gzip => "gzip",
        }
    }

    /// Position in a per-entry table of encoded bodies (identity has none).
    pub const fn slot(self) -> Option<usize> {
        match self {
            Encoding::Identity => None,
            Encoding::Br => Some(0),
            Encoding::Zstd => Some(1),
            Encoding::Gzip => Some(2),
        }
    }
}

/// Picks the encoding for a response from the `Accept-Encoding` header.
pub fn negotiate(accept: Option<&[u8]>) -> Encoding {
    let Some(text) = accept.and_then(|a| std::str::from_utf8(a).ok()) else {
        return Encoding::Identity;
    };
    let mut best = (Encoding::Identity, 0.0f32);
    let mut star = None;
    let mut named = [None::<f32>; 3];
    for item in text.split(',') {
        let mut parts = item.split(';');
        let coding = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let q = parts
            .filter_map(|p| p.trim().strip_prefix("q="))
            .find_map(|q| q.trim().parse::<f32>().ok())
            .unwrap_or(1.0);
        match coding.as_str() {
            "br" => named[0] = Some(q),
            "zstd" => named[1] = Some(q),
            "gzip" | "x-gzip" => named[2] = Some(q),
            "*" => star = Some(q),
            _ => {}
        }
    }
    for (i, enc) in [Encoding::Br, Encoding::Zstd, Encoding::Gzip]
        .into_iter()
        .enumerate()
    {
        let q = named[i].or(star).unwrap_or(0.0);
        if q > best.1 {
            best = (enc, q);
        }
    }
    best.0
}

/// Encodes `body`. Levels favour speed: each entry is encoded once, but on a miss.
pub fn compress(enc: Encoding, body: &[u8]) -> Bytes {
    let out = match enc {
        Encoding::Identity => return Bytes::copy_from_slice(body),
        Encoding::Gzip => {
            let mut w = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
            w.write_all(body).expect("writing to a Vec");
            w.finish().expect("writing to a Vec")
        }
        Encoding::Br => {
            let mut out = Vec::new();
            {
                let mut w = brotli::CompressorWriter::new(&mut out, 4096, 5, 22);
                w.write_all(body).expect("writing to a Vec");
            }
            out
        }
        Encoding::Zstd => zstd::bulk::compress(body, 3).expect("zstd compresses any input"),
    };
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn n(s: &str) -> Encoding {
        negotiate(Some(s.as_bytes()))
    }

    #[test]
    fn negotiation() {
        assert_eq!(negotiate(None), Encoding::Identity);
        assert_eq!(n("gzip"), Encoding::Gzip);
        assert_eq!(n("gzip, deflate, br, zstd"), Encoding::Br);
        assert_eq!(n("gzip;q=1, br;q=0.5"), Encoding::Gzip);
        assert_eq!(n("br;q=0, gzip;q=0.1"), Encoding::Gzip);
        assert_eq!(n("zstd, gzip"), Encoding::Zstd);
        assert_eq!(n("*"), Encoding::Br);
        assert_eq!(n("*;q=0"), Encoding::Identity);
        assert_eq!(n("identity"), Encoding::Identity);
        assert_eq!(n("deflate"), Encoding::Identity);
        assert_eq!(n("GZIP"), Encoding::Gzip);
        assert_eq!(n("br;q=0"), Encoding::Identity);
    }

    #[test]
    fn round_trips() {
        let body = br#"{"form":"\xec\x96\xb4","senses":["uh","er","um"]}"#.repeat(40);
        let gz = compress(Encoding::Gzip, &body);
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, body);
        let br = compress(Encoding::Br, &body);
        let mut out = Vec::new();
        brotli::Decompressor::new(&br[..], 4096)
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, body);
        let zs = compress(Encoding::Zstd, &body);
        assert_eq!(zstd::decode_all(&zs[..]).unwrap(), body);
        assert!(gz.len() < body.len() && br.len() < body.len() && zs.len() < body.len());
    }
}
