//! How l7ctl prints what the node answers: tables, JSON Lines, YAML.

use anyhow::Result;
use l7mesh_api::flow::{Flow, FlowEndpoint, L7Part};
use l7mesh_api::rest::{Applied, Status};
#[cfg(test)]
use l7mesh_api::Verdict;

/// "policy version N in force (...)": what an apply or delete did, from its report; in a
/// cluster, the kvstore revision and each node's word on it.
pub(crate) fn in_force(applied: &Applied) -> String {
    if let Some(c) = &applied.cluster {
        let mut out = format!("stored in the cluster at revision {}", c.revision);
        for n in &c.nodes {
            match (&n.error, n.in_force) {
                (_, true) => out.push_str(&format!(
                    "\n  node {}: in force{}",
                    n.node,
                    n.after_ms.map(|ms| format!(" after {ms} ms")).unwrap_or_default()
                )),
                (Some(e), false) => out.push_str(&format!("\n  node {}: NOT in force: {e}", n.node)),
                (None, false) => out.push_str(&format!("\n  node {}: NOT in force", n.node)),
            }
        }
        return out;
    }
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
    for line in table_lines(headers, rows) {
        println!("{line}");
    }
}

/// A table's lines: the header, then each row, columns padded to their widest cell.
pub(crate) fn table_lines(headers: &[&str], rows: &[Vec<String>]) -> Vec<String> {
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
        out.trim_end().to_string()
    };
    let mut out = vec![line(headers.to_vec())];
    out.extend(rows.iter().map(|row| line(row.iter().map(String::as_str).collect())));
    out
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

/// One YAML document (`---` first, a newline last): a stream of them is what `apply -f` takes.
pub(crate) fn yaml_document(v: &serde_json::Value) -> String {
    to_yaml(v) + "\n"
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

/// `s` safe to print on an operator's terminal: flows carry what clients chose (paths, Kafka
/// topics and client ids, gRPC names), so control characters (C0, DEL, C1: cursor moves, OSC
/// title and clipboard writes) and bidirectional overrides (text shown in another order) are
/// written as `\u{..}` escapes.
pub(crate) fn printable(s: &str) -> String {
    let hostile = |c: char| c.is_control() || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}');
    if !s.chars().any(hostile) {
        return s.to_string();
    }
    s.chars().map(|c| if hostile(c) { c.escape_unicode().to_string() } else { c.to_string() }).collect()
}

/// One flow as a table row, read as the one flow type l7proxy writes (`l7mesh_api::flow::Flow`).
pub(crate) fn flow_row(f: &Flow) -> Vec<String> {
    flow_cells(f).iter().map(|c| printable(c)).collect()
}

fn flow_cells(f: &Flow) -> Vec<String> {
    let endpoint = |e: &FlowEndpoint| match &e.workload {
        Some(w) => w.clone(),
        None if e.ip.is_empty() => "?".into(),
        None => format!("{}:{}", e.ip, e.port),
    };
    let (protocol, detail) = match &f.l7 {
        Some(L7Part::Http { http }) => ("http".to_string(), format!("{} {} -> {}", http.method, http.url, http.code)),
        Some(L7Part::Grpc { grpc }) => (
            "grpc".to_string(),
            format!("{}/{} status={}", grpc.service, grpc.method, grpc.status.as_deref().unwrap_or("-")),
        ),
        Some(L7Part::Kafka { kafka }) => (
            "kafka".to_string(),
            format!(
                "{} v{} topic={} client={} error={}",
                kafka.api_key,
                kafka.api_version,
                kafka.topic.as_deref().unwrap_or("-"),
                kafka.client_id,
                kafka.error_code
            ),
        ),
        None => (
            f.l4.protocol.to_ascii_lowercase(),
            format!("port {}{}", f.destination.port, f.reason.as_ref().map(|r| format!(" ({r})")).unwrap_or_default()),
        ),
    };
    vec![
        f.time.clone(),
        f.verdict.to_string(),
        f.direction.to_string(),
        endpoint(&f.source),
        endpoint(&f.destination),
        protocol,
        detail,
        f.policy_name.clone().unwrap_or_else(|| "-".into()),
        // `kernel` or `proxy`: who recorded it (the hook is in `-o json`).
        // In a cluster-wide answer, which node recorded it.
        match &f.node {
            Some(node) => format!("{}@{node}", f.observer.split(':').next().unwrap_or_default()),
            None => f.observer.split(':').next().unwrap_or_default().to_string(),
        },
    ]
}

pub(crate) const FLOW_HEADERS: [&str; 9] =
    ["TIME", "VERDICT", "DIRECTION", "FROM", "TO", "PROTOCOL", "DETAIL", "POLICY", "OBSERVER"];

/// A DENIED or AUDIT flow as one sentence: who asked what, which policy rule decided, why.
/// `DENIED  client -> server:8080 GET /admin  by policy default/web
/// ingress[0].toPorts[0].rules.http: no rule matched path /admin (rule allows GET /)`.
pub(crate) fn explain_line(f: &Flow) -> String {
    let who = |e: &FlowEndpoint| e.display();
    let what = match &f.l7 {
        Some(L7Part::Http { http }) => format!("{} {}", http.method, url_path(&http.url)),
        Some(L7Part::Grpc { grpc }) => format!("gRPC {}/{}", grpc.service, grpc.method),
        Some(L7Part::Kafka { kafka }) => match &kafka.topic {
            Some(t) => format!("Kafka {} topic {t}", kafka.api_key),
            None => format!("Kafka {}", kafka.api_key),
        },
        None => format!("{} connect", f.l4.protocol.to_ascii_lowercase()),
    };
    let by = match (&f.decided_by, &f.policy_name) {
        (Some(d), _) => d.to_string(),
        (None, Some(p)) => format!("policy {p}"),
        (None, None) => "no policy rule".to_string(),
    };
    let why = f.reason.as_ref().map_or_else(|| "no reason recorded".to_string(), |r| r.to_string());
    let (side, observer) = (f.direction.as_str().to_ascii_lowercase(), f.observer.split(':').next().unwrap_or(""));
    printable(&format!(
        "{}  {} -> {}:{} {what}  by {by} ({side}, {observer}): {why}",
        f.verdict,
        who(&f.source),
        who(&f.destination),
        f.destination.port
    ))
}

/// `/admin?x=1` from `http://server:8080/admin?x=1` (a URL without a scheme is left as is).
fn url_path(url: &str) -> &str {
    match url.split_once("://") {
        Some((_, rest)) => rest.find('/').map_or("/", |i| &rest[i..]),
        None => url,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn client_chosen_control_characters_reach_no_terminal() {
        let hostile = "t\u{1b}]0;pwned\u{7}\u{1b}[2K\u{9b}1A\u{202e}gpj.exe\u{7f}";
        let shown = super::printable(hostile);
        assert!(!shown.chars().any(|c| c.is_control() || c == '\u{202e}'), "{shown:?}");
        assert!(shown.starts_with("t\\u{1b}]0;pwned\\u{7}"), "{shown}");
        assert_eq!(super::printable("GET /a/ü?x=1"), "GET /a/ü?x=1", "printable text stays as it is");
    }

    use super::*;

    /// The flow lines l7proxy writes (held byte for byte in l7mesh-api's tests) read as the one
    /// flow type and render as rows: none is left out for a shape l7ctl does not know.
    #[test]
    fn the_proxys_flow_lines_render_as_rows() {
        let lines = include_str!("../../l7mesh-api/tests/flows.jsonl");
        let rows: Vec<Vec<String>> =
            lines.lines().map(|l| flow_row(&serde_json::from_str::<Flow>(l).expect(l))).collect();
        assert_eq!(rows.len(), lines.lines().count());
        for row in &rows {
            assert_eq!(row.len(), FLOW_HEADERS.len());
            assert!(["ALLOWED", "DENIED", "AUDIT", "FORWARDED", "ERROR"].contains(&row[1].as_str()), "{row:?}");
            assert!(["EGRESS", "INGRESS"].contains(&row[2].as_str()), "{row:?}");
        }
        assert_eq!(rows[0][3], "web");
        assert_eq!(rows[1][3], "10.0.0.9:80", "an endpoint with no workload is its address");
        assert_eq!(rows[4][8], "kernel");
        assert_eq!(rows[0][8], "proxy");
    }

    /// Each sample denial, in words: the rule and reason when the flow names them, and the
    /// bare facts when an older line does not.
    #[test]
    fn denials_are_explained_in_words() {
        let flows: Vec<Flow> = l7mesh_api::flow::parse_lines(include_str!("../../l7mesh-api/tests/flows.jsonl"));
        let lines: Vec<String> =
            flows.iter().filter(|f| matches!(f.verdict, Verdict::Denied | Verdict::Audit)).map(explain_line).collect();
        assert_eq!(
            lines,
            [
                "DENIED  web -> 10.0.0.9:80 PUT /x  by policy default/web-egress (egress, proxy): no reason recorded",
                "AUDIT  web -> 10.0.0.9:80 Kafka Produce topic orders  by no policy rule (egress, proxy): no reason recorded",
                "DENIED  web -> 127.0.0.1:2 tcp connect  by no policy rule (ingress, kernel): no reason recorded",
                "DENIED  web -> 10.0.0.9:80 PUT /x  by policy default/web ingress[0].toPorts[0].rules.http (ingress, proxy): \
                 no rule matched path /x (rule allows GET /public/.*)",
                "DENIED  web -> 127.0.0.1:2 tcp connect  by policy default/db (ingress, kernel): \
                 default deny: db is ingress-enforced by default/db, no rule allows web",
            ]
        );
        assert_eq!(url_path("http://a:80/p?q=1"), "/p?q=1");
        assert_eq!(url_path("https://a"), "/");
    }
}
