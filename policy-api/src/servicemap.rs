//! The service map: who talks to whom, from flows. Nodes are workloads (or, for peers that
//! are not workloads, their address); an edge carries the protocols seen, L7 requests, L4
//! connections the kernel judged, and how many of those were denied or audited.

use std::collections::BTreeMap;

use crate::flows::Flow;
use l7mesh_api::Verdict;

// The map is a REST view (`/v1/servicemap`): l7mesh-api's.
pub use l7mesh_api::rest::{NodeKind, ServiceMap, ServiceMapEdge as Edge, ServiceMapNode as Node};

pub fn build(flows: &[Flow]) -> ServiceMap {
    let mut nodes: BTreeMap<String, Node> = BTreeMap::new();
    let mut edges: BTreeMap<(String, String), Edge> = BTreeMap::new();
    for f in flows {
        // The proxy's per-connection records would count each proxied connection twice (its
        // requests are flows); a refused one (e.g. a server name) still counts as a denial.
        if f.is_proxy_connection() && f.verdict != Verdict::Denied {
            continue;
        }
        let mut node = |e: &crate::flows::FlowEndpoint| {
            let name = e.display();
            nodes.entry(name.clone()).or_insert_with(|| Node {
                name: name.clone(),
                kind: if e.workload.is_some() { NodeKind::Workload } else { NodeKind::External },
                namespace: e.namespace.clone(),
            });
            name
        };
        let (from, to) = (node(&f.source), node(&f.destination));
        let edge = edges.entry((from.clone(), to.clone())).or_insert_with(|| Edge { from, to, ..Edge::default() });
        edge.protocols.insert(f.protocol());
        if f.l7.is_some() {
            edge.requests += 1;
        } else {
            edge.connections += 1;
        }
        match f.verdict {
            Verdict::Denied => edge.denied += 1,
            Verdict::Audit => edge.audit += 1,
            _ => {}
        }
    }
    ServiceMap { nodes: nodes.into_values().collect(), edges: edges.into_values().collect() }
}

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Graphviz DOT: workloads as boxes, external peers as ellipses; edges red where anything
/// was denied, orange where audited.
pub fn to_dot(map: &ServiceMap) -> String {
    let mut out = String::from("digraph l7mesh {\n  rankdir=LR;\n  node [fontname=\"Helvetica\"];\n  edge [fontname=\"Helvetica\", fontsize=10];\n");
    for n in &map.nodes {
        let shape = if n.kind == NodeKind::Workload { "box, style=rounded" } else { "ellipse, style=dashed" };
        out.push_str(&format!("  {} [shape={shape}];\n", quote(&n.name)));
    }
    for e in &map.edges {
        let protocols: Vec<&str> = e.protocols.iter().map(String::as_str).collect();
        let mut label = protocols.join(",");
        if e.requests > 0 {
            label.push_str(&format!("\\n{} req", e.requests));
        }
        if e.connections > 0 {
            label.push_str(&format!("\\n{} conn", e.connections));
        }
        if e.denied > 0 {
            label.push_str(&format!("\\n{} denied", e.denied));
        }
        if e.audit > 0 {
            label.push_str(&format!("\\n{} audit", e.audit));
        }
        let colour = if e.denied > 0 {
            "red"
        } else if e.audit > 0 {
            "orange"
        } else {
            "darkgreen"
        };
        out.push_str(&format!(
            "  {} -> {} [label={}, color={colour}, fontcolor={colour}];\n",
            quote(&e.from),
            quote(&e.to),
            quote(&label).replace("\\\\n", "\\n")
        ));
    }
    out.push_str("}\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edges_count_requests_connections_and_denials() {
        let lines = r#"{"time":"t","verdict":"ALLOWED","direction":"EGRESS","source":{"workload":"a","ip":"","port":0},"destination":{"workload":"b","ip":"127.0.0.1","port":80},"l4":{"protocol":"TCP"},"observer":"kernel:connect4"}
{"time":"t","verdict":"ALLOWED","direction":"EGRESS","source":{"workload":"a","ip":"127.0.0.1","port":5},"destination":{"workload":"b","ip":"127.0.0.1","port":80},"l4":{"protocol":"TCP"},"observer":"proxy"}
{"time":"t","verdict":"DENIED","direction":"EGRESS","source":{"workload":"a","ip":"127.0.0.1","port":5},"destination":{"workload":"b","ip":"127.0.0.1","port":80},"l4":{"protocol":"TCP"},"observer":"proxy","l7":{"type":"http","http":{"method":"PUT","url":"http://b/x","code":403,"protocol":"HTTP/1.1"}}}
{"time":"t","verdict":"DENIED","direction":"EGRESS","source":{"workload":"a","ip":"","port":0},"destination":{"ip":"10.0.0.1","port":22},"l4":{"protocol":"TCP"},"observer":"kernel:connect4"}"#;
        let map = build(&crate::flows::parse_lines(lines));
        assert_eq!(map.nodes.len(), 3);
        let ab = map.edges.iter().find(|e| e.to == "b").unwrap();
        assert_eq!((ab.requests, ab.connections, ab.denied), (1, 1, 1));
        assert_eq!(ab.protocols.iter().cloned().collect::<Vec<_>>(), vec!["http", "tcp"]);
        let ext = map.edges.iter().find(|e| e.to == "10.0.0.1").unwrap();
        assert_eq!((ext.connections, ext.denied), (1, 1));
        let dot = to_dot(&map);
        assert!(dot.contains("\"a\" -> \"b\" [label=\"http,tcp\\n1 req\\n1 conn\\n1 denied\", color=red"), "{dot}");
    }
}
