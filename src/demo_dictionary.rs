//! The demo's dictionary upstream: a few dozen Korean → English entries answered as the
//! player's hover lookup expects (`form`, `sl`, `tl`, … in the query; JSON back).

use async_trait::async_trait;
use http::{header, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use unicode_normalization::UnicodeNormalization;

/// (form, part of speech, translations)
const ENTRIES: &[(&str, &str, &[&str])] = &[
    ("어", "INTJ", &["uh", "er", "oh"]),
    ("나", "PRON", &["I", "me"]),
    ("너", "PRON", &["you"]),
    ("우리", "PRON", &["we", "us", "our"]),
    ("사랑", "NOUN", &["love"]),
    ("집", "NOUN", &["house", "home"]),
    ("물", "NOUN", &["water"]),
    ("밥", "NOUN", &["rice", "meal"]),
    ("사람", "NOUN", &["person", "people"]),
    ("친구", "NOUN", &["friend"]),
    ("시간", "NOUN", &["time", "hour"]),
    ("오늘", "NOUN", &["today"]),
    ("내일", "NOUN", &["tomorrow"]),
    ("어제", "NOUN", &["yesterday"]),
    ("학교", "NOUN", &["school"]),
    ("회사", "NOUN", &["company", "office"]),
    ("엄마", "NOUN", &["mom", "mother"]),
    ("아빠", "NOUN", &["dad", "father"]),
    ("가다", "VERB", &["to go"]),
    ("오다", "VERB", &["to come"]),
    ("먹다", "VERB", &["to eat"]),
    ("마시다", "VERB", &["to drink"]),
    ("보다", "VERB", &["to see", "to watch"]),
    ("하다", "VERB", &["to do"]),
    ("알다", "VERB", &["to know"]),
    ("좋다", "ADJ", &["to be good", "to like"]),
    ("싫다", "ADJ", &["to dislike"]),
    ("예쁘다", "ADJ", &["to be pretty"]),
    ("크다", "ADJ", &["to be big"]),
    ("작다", "ADJ", &["to be small"]),
    ("네", "INTJ", &["yes"]),
    ("아니요", "INTJ", &["no"]),
    ("감사합니다", "INTJ", &["thank you"]),
    ("미안해", "INTJ", &["sorry"]),
    ("왜", "ADV", &["why"]),
    ("정말", "ADV", &["really", "truly"]),
    ("빨리", "ADV", &["quickly", "hurry"]),
    ("지금", "ADV", &["now"]),
];

/// Answers `GET {any path}?form=…&sl=ko&tl=en…` from [`ENTRIES`].
pub struct SampleDictionary;

fn param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then(|| {
            percent_encoding::percent_decode_str(v)
                .decode_utf8_lossy()
                .nfc()
                .collect()
        })
    })
}

#[async_trait]
impl ServeHttp for SampleDictionary {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let query = session.req_header().uri.query().unwrap_or("").to_string();
        let form = param(&query, "form").unwrap_or_default();
        let (sl, tl) = (param(&query, "sl"), param(&query, "tl"));
        let found = ENTRIES.iter().find(|(f, _, _)| *f == form);
        let languages_ok =
            sl.as_deref().is_none_or(|l| l == "ko") && tl.as_deref().is_none_or(|l| l == "en");
        let (status, body) = match found.filter(|_| languages_ok) {
            Some((f, pos, translations)) => (
                StatusCode::OK,
                serde_json::json!({
                    "form": f, "lemma": f, "pos": pos, "sl": "ko", "tl": "en",
                    "translations": translations,
                }),
            ),
            None => (
                StatusCode::NOT_FOUND,
                serde_json::json!({ "error": "no entry", "form": form }),
            ),
        };
        tracing::info!(form = %form, status = status.as_u16(), "sample dictionary: lookup");
        let body = serde_json::to_vec(&body).expect("json serialises");
        Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, "application/json; charset=utf-8")
            .header(header::CACHE_CONTROL, "public, max-age=3600")
            .header(header::CONTENT_LENGTH, body.len())
            .body(body)
            .expect("valid response")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_unique_nfc_words() {
        for (i, (form, _, tr)) in ENTRIES.iter().enumerate() {
            assert_eq!(form.nfc().collect::<String>(), *form);
            assert!(!tr.is_empty());
            assert!(
                ENTRIES[i + 1..].iter().all(|(f, _, _)| f != form),
                "{form} twice"
            );
        }
        assert!(ENTRIES.len() >= 36);
    }

    #[test]
    fn params_are_decoded_and_normalised() {
        assert_eq!(param("form=%EC%96%B4&sl=ko", "form").as_deref(), Some("어"));
        assert_eq!(
            param("form=%E1%84%8B%E1%85%A5", "form").as_deref(),
            Some("어")
        );
        assert_eq!(param("sl=ko", "form"), None);
    }
}
