//! A YAML emitter for JSON values that writes what Go's `sigs.k8s.io/yaml` writes.
//!
//! Upstream encodes a config as JSON and converts that to YAML with go-yaml v2: mapping keys
//! sorted, block style, sequences not indented under their key, and strings quoted only when
//! a plain scalar would read back as something else. Matching that byte for byte keeps
//! `--write-config-to` output identical to upstream's, so operators can diff the two.

use serde_json::Value;

/// Emits `value` (normally an object) as a YAML document ending in a newline.
pub fn emit(value: &Value) -> String {
    let mut out = String::new();
    match value {
        Value::Object(map) if !map.is_empty() => emit_mapping(&mut out, map, 0),
        Value::Array(items) if !items.is_empty() => emit_sequence(&mut out, items, 0),
        scalar => {
            out.push_str(&scalar_text(scalar));
            out.push('\n');
        }
    }
    out
}

fn emit_mapping(out: &mut String, map: &serde_json::Map<String, Value>, indent: usize) {
    let mut keys: Vec<&String> = map.keys().collect();
    keys.sort();
    for key in keys {
        emit_entry(out, key, &map[key], indent);
    }
}

fn emit_entry(out: &mut String, key: &str, value: &Value, indent: usize) {
    out.push_str(&" ".repeat(indent));
    out.push_str(&string_text(key));
    out.push(':');
    match value {
        Value::Object(map) if !map.is_empty() => {
            out.push('\n');
            emit_mapping(out, map, indent + 2);
        }
        // go-yaml v2 does not indent a block sequence under its mapping key.
        Value::Array(items) if !items.is_empty() => {
            out.push('\n');
            emit_sequence(out, items, indent);
        }
        scalar => {
            out.push(' ');
            out.push_str(&scalar_text(scalar));
            out.push('\n');
        }
    }
}

fn emit_sequence(out: &mut String, items: &[Value], indent: usize) {
    for item in items {
        out.push_str(&" ".repeat(indent));
        out.push('-');
        match item {
            Value::Object(map) if !map.is_empty() => {
                // The first entry shares the dash's line; the rest align under it.
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                let mut nested = String::new();
                for key in keys {
                    emit_entry(&mut nested, key, &map[key], indent + 2);
                }
                out.push(' ');
                out.push_str(&nested[indent + 2..]);
            }
            Value::Array(inner) if !inner.is_empty() => {
                out.push('\n');
                emit_sequence(out, inner, indent + 2);
            }
            scalar => {
                out.push(' ');
                out.push_str(&scalar_text(scalar));
                out.push('\n');
            }
        }
    }
}

fn scalar_text(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => number_text(n),
        Value::String(s) => string_text(s),
        Value::Array(_) => "[]".into(),
        Value::Object(_) => "{}".into(),
    }
}

fn number_text(n: &serde_json::Number) -> String {
    if let Some(i) = n.as_i64() {
        return i.to_string();
    }
    if let Some(u) = n.as_u64() {
        return u.to_string();
    }
    let f = n.as_f64().unwrap_or(0.0);
    if f.fract() == 0.0 && f.abs() < 1e15 {
        // Go's JSON encoder writes integral floats without a fraction (`qps: 5`).
        format!("{}", f as i64)
    } else {
        f.to_string()
    }
}

/// A string as go-yaml v2 writes it: plain when it reads back as the same string, otherwise
/// double-quoted when it would resolve to another type (`""`, `"0"`, `"true"`), otherwise
/// single-quoted when YAML syntax forbids it plain (`'[::]:10256'`).
fn string_text(s: &str) -> String {
    if s.is_empty() || resolves_to_non_string(s) {
        return double_quoted(s);
    }
    if s.chars().any(|c| c.is_control()) {
        return double_quoted(s);
    }
    if plain_forbidden(s) {
        return format!("'{}'", s.replace('\'', "''"));
    }
    s.to_string()
}

fn double_quoted(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\x{:02X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// YAML 1.1 resolution as go-yaml v2 does it: booleans, nulls, ints, floats.
fn resolves_to_non_string(s: &str) -> bool {
    const WORDS: &[&str] = &[
        "y", "Y", "yes", "Yes", "YES", "n", "N", "no", "No", "NO", "true", "True", "TRUE", "false",
        "False", "FALSE", "on", "On", "ON", "off", "Off", "OFF", "~", "null", "Null", "NULL",
        ".inf", ".Inf", ".INF", "+.inf", "+.Inf", "+.INF", "-.inf", "-.Inf", "-.INF", ".nan",
        ".NaN", ".NAN", "<<",
    ];
    if WORDS.contains(&s) {
        return true;
    }
    let unsigned = s.strip_prefix(['-', '+']).unwrap_or(s);
    let plain = unsigned.replace('_', "");
    if plain.is_empty() {
        return false;
    }
    if plain.bytes().all(|b| b.is_ascii_digit()) {
        return true;
    }
    if let Some(hex) = plain.strip_prefix("0x") {
        if !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return true;
        }
    }
    if let Some(bin) = plain.strip_prefix("0b") {
        if !bin.is_empty() && bin.bytes().all(|b| b == b'0' || b == b'1') {
            return true;
        }
    }
    // Floats: digits with one dot and an optional exponent (`1.5`, `.5`, `1e3`, `1.0e-3`).
    let looks_float = plain
        .bytes()
        .all(|b| b.is_ascii_digit() || b".eE+-".contains(&b))
        && plain.bytes().any(|b| b.is_ascii_digit())
        && plain.parse::<f64>().is_ok();
    looks_float
}

/// Whether the YAML grammar forbids `s` as a plain scalar in block context.
fn plain_forbidden(s: &str) -> bool {
    let first = s.chars().next().unwrap_or(' ');
    let second = s.chars().nth(1);
    if "#,[]{}&*!|>'\"%@`".contains(first) {
        return true;
    }
    if "-?:".contains(first) && second.is_none_or(|c| c == ' ') {
        return true;
    }
    s.starts_with(' ')
        || s.ends_with(' ')
        || s.ends_with(':')
        || s.contains(": ")
        || s.contains(" #")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strings_are_quoted_like_go_yaml() {
        assert_eq!(string_text(""), "\"\"");
        assert_eq!(string_text("0"), "\"0\"");
        assert_eq!(string_text("true"), "\"true\"");
        assert_eq!(string_text("yes"), "\"yes\"");
        assert_eq!(string_text("1.5"), "\"1.5\"");
        assert_eq!(string_text("0.0.0.0:10256"), "0.0.0.0:10256");
        assert_eq!(string_text("[::]:10256"), "'[::]:10256'");
        assert_eq!(string_text("24h0m0s"), "24h0m0s");
        assert_eq!(string_text("10.0.0.0/8"), "10.0.0.0/8");
        assert_eq!(
            string_text("application/vnd.kubernetes.protobuf"),
            "application/vnd.kubernetes.protobuf"
        );
        assert_eq!(string_text("a: b"), "'a: b'");
    }

    #[test]
    fn layout_matches_go_yaml() {
        let doc = json!({
            "b": {"z": 1, "a": null},
            "a": ["primary", "10.0.0.0/8"],
            "c": [],
            "d": {},
            "e": [{"filePattern": "x", "verbosity": 2}],
            "q": 5.0,
        });
        assert_eq!(
            emit(&doc),
            "a:\n- primary\n- 10.0.0.0/8\nb:\n  a: null\n  z: 1\nc: []\nd: {}\ne:\n- filePattern: x\n  verbosity: 2\nq: 5\n"
        );
    }
}
