//! How l7ctl prints what the node answers: tables, JSON Lines, YAML.

use anyhow::Result;
use l7mesh_api::rest::{Applied, Status};

/// "policy version N in force (...)": what an apply or delete did, from its report.
pub(crate) fn in_force(applied: &Applied) -> String {
    let r = &applied.report;
    let ms = |us: u64| us as f64 / 1000.0;
    let (closed, rerouted) = (r.closed_connections, r.closed_rerouted);
    format!(
        "policy version {} in force (l7proxy tables {:.1} ms, kernel {:.1} ms, {closed} connection(s) closed: {} denied, \
         {rerouted} rerouted)",
        applied.version,
        ms(r.proxy_us),
        ms(r.kernel_us),
        closed - rerouted.min(closed),
    )
}

pub(crate) fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(c);
            } else {
                out.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        println!("{}", out.trim_end());
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

pub(crate) fn print_json_lines(items: &[serde_json::Value]) {
    for i in items {
        println!("{i}");
    }
}

/// JSON -> YAML text (yaml-rust2's emitter; policies print as users write them).
pub(crate) fn to_yaml(v: &serde_json::Value) -> String {
    fn convert(v: &serde_json::Value) -> yaml_rust2::Yaml {
        use yaml_rust2::Yaml;
        match v {
            serde_json::Value::Null => Yaml::Null,
            serde_json::Value::Bool(b) => Yaml::Boolean(*b),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => Yaml::Integer(i),
                None => Yaml::Real(n.to_string()),
            },
            serde_json::Value::String(s) => Yaml::String(s.clone()),
            serde_json::Value::Array(a) => Yaml::Array(a.iter().map(convert).collect()),
            serde_json::Value::Object(o) => {
                Yaml::Hash(o.iter().map(|(k, v)| (Yaml::String(k.clone()), convert(v))).collect())
            }
        }
    }
    let mut out = String::new();
    let mut emitter = yaml_rust2::YamlEmitter::new(&mut out);
    let _ = emitter.dump(&convert(v));
    out
}

/// "store N, kernel N, l7proxy N" from `/v1/status`.
pub(crate) fn versions_in_force(status: &Status) -> String {
    let f = &status.in_force;
    format!("store {}, kernel {}, l7proxy {}", f.store, or_dash(f.kernel), or_dash(f.proxy))
}

/// A value for a table cell, `-` when there is none.
pub(crate) fn or_dash<T: std::fmt::Display>(x: Option<T>) -> String {
    x.map_or("-".to_string(), |x| x.to_string())
}

/// A view as `-o json` prints it: one line, keys sorted (as serde_json's maps are).
pub(crate) fn json_line<T: serde::Serialize>(view: &T) -> Result<serde_json::Value> {
    Ok(serde_json::to_value(view)?)
}

pub(crate) fn flow_row(f: &serde_json::Value) -> Vec<String> {
    let endpoint = |e: &serde_json::Value| match e["workload"].as_str() {
        Some(w) => w.to_string(),
        None if e["ip"].as_str().unwrap_or("").is_empty() => "?".into(),
        None => format!("{}:{}", e["ip"].as_str().unwrap_or(""), e["port"]),
    };
    let l7 = &f["l7"];
    let (protocol, detail) = match l7["type"].as_str() {
        Some("http") => (
            "http".to_string(),
            format!(
                "{} {} -> {}",
                l7["http"]["method"].as_str().unwrap_or(""),
                l7["http"]["url"].as_str().unwrap_or(""),
                l7["http"]["code"]
            ),
        ),
        Some("grpc") => (
            "grpc".to_string(),
            format!(
                "{}/{} status={}",
                l7["grpc"]["service"].as_str().unwrap_or(""),
                l7["grpc"]["method"].as_str().unwrap_or(""),
                l7["grpc"]["status"].as_str().unwrap_or("-")
            ),
        ),
        Some("kafka") => (
            "kafka".to_string(),
            format!(
                "{} v{} topic={} client={} error={}",
                l7["kafka"]["api_key"].as_str().unwrap_or(""),
                l7["kafka"]["api_version"],
                l7["kafka"]["topic"].as_str().unwrap_or("-"),
                l7["kafka"]["client_id"].as_str().unwrap_or(""),
                l7["kafka"]["error_code"]
            ),
        ),
        _ => (
            f["l4"]["protocol"].as_str().unwrap_or("").to_ascii_lowercase(),
            format!(
                "port {}{}",
                f["destination"]["port"],
                f["reason"].as_str().map(|r| format!(" ({r})")).unwrap_or_default()
            ),
        ),
    };
    vec![
        f["time"].as_str().unwrap_or("").to_string(),
        f["verdict"].as_str().unwrap_or("").to_string(),
        f["direction"].as_str().unwrap_or("").to_string(),
        endpoint(&f["source"]),
        endpoint(&f["destination"]),
        protocol,
        detail,
        f["policy_name"].as_str().unwrap_or("-").to_string(),
    ]
}

pub(crate) const FLOW_HEADERS: [&str; 8] =
    ["TIME", "VERDICT", "DIRECTION", "FROM", "TO", "PROTOCOL", "DETAIL", "POLICY"];
