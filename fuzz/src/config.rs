//! `config`: the configuration file (src/config.rs and src/config/*.rs).

use cdn_edge::config::Config;

/// Keys whose value names a file that validation reads; skipped, so that the fuzzer
/// never reads `/dev/zero` or a FIFO. The TOML is parsed first to find them under any
/// spelling (quoted, escaped).
const READS_A_FILE: &[&str] = &["public_key_file"];

/// The text of a configuration file; `secret_env` names are set in the environment
/// unless empty.
///
/// Invariants: loading returns the config or an error, never panics, and the error has
/// a message.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(table) = text.parse::<toml::Table>() {
        if names_a_file(&table) {
            return;
        }
    }
    let env = |name: &str| (!name.is_empty()).then(|| format!("secret of {name}"));
    if let Err(e) = Config::from_toml_with_env(text, env) {
        assert!(!e.to_string().is_empty());
    }
}

fn names_a_file(table: &toml::Table) -> bool {
    table
        .iter()
        .any(|(k, v)| READS_A_FILE.contains(&k.as_str()) || value_names_a_file(v))
}

fn value_names_a_file(v: &toml::Value) -> bool {
    match v {
        toml::Value::Table(t) => names_a_file(t),
        toml::Value::Array(a) => a.iter().any(value_names_a_file),
        _ => false,
    }
}
