//! Cilium's own example policies (tests/data/cilium, copied unchanged; see SOURCES.md) load as
//! Cilium reads them, and the ones using features l7mesh does not support are refused by name.

use std::path::Path;

use l7policy::compile::{compile, Workload};
use l7policy::labels::Labels;
use l7policy::validate::{load_path, Severity};

fn data(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/cilium").join(path)
}

/// Documents that must load, with how many policies each file holds.
const LOADS: &[(&str, usize)] = &[
    ("examples/minikube/sw_l3_l4_policy.yaml", 1),
    ("examples/minikube/sw_l3_l4_l7_policy.yaml", 1),
    ("examples/minikube/sw_deny_policy.yaml", 1),
    ("examples/policies/getting-started/kafka.yaml", 1),
    ("examples/policies/getting-started/l7-policy.yaml", 1),
    ("examples/policies/l4/l4_port_range.yaml", 1),
    ("examples/policies/l3/cidr/cidr.yaml", 1),
    ("examples/policies/l7/http/http.yaml", 1),
    ("examples/policies/l7/http/l7_multi.yaml", 1),
    ("examples/policies/l7/kafka/kafka.yaml", 1),
    ("examples/policies/l7/kafka/kafka-role.yaml", 1),
    ("examples/policies/l3/entities/from_world_deny.yaml", 1),
    ("examples/policies/l4/l4_sni.yaml", 1),
    ("examples/policies/l3/match-expressions/or-statement.yaml", 1),
    ("examples/policies/l3/match-expressions/and-statement.yaml", 1),
    ("examples/policies/kubernetes/namespace/isolate-namespaces.yaml", 2),
    ("examples/policies/kubernetes/namespace/namespace-policy.yaml", 1),
    ("examples/policies/kubernetes/clusterwide/clusterscope-policy.yaml", 1),
    ("examples/policies/l4/cidr_l4_combined.yaml", 1),
    ("examples/policies/l4/multi_rule.yaml", 1),
    ("examples/policies/l3/entities/world.yaml", 1),
    ("examples/policies/l3/entities/host.yaml", 1),
    ("examples/policies/l3/egress-default-deny/egress-default-deny.yaml", 1),
    ("examples/policies/l3/ingress-allow-all/ingress-allow-all.yaml", 1),
    ("examples/policies/l3/egress-deny/egress-deny.yaml", 1),
    ("examples/policies/l3/simple/l3.yaml", 1),
    ("examples/policies/l3/simple/l3_egress.yaml", 1),
    ("examples/policies/l7/http/simple/l7.yaml", 1),
    ("examples/policies/l4/l4.yaml", 1),
    ("examples/policies/getting-started/l3-l4-policy.yaml", 1),
    ("examples/policies/kubernetes/clusterwide/wildcard-from-endpoints.yaml", 1),
    ("examples/policies/kubernetes/namespace/kubedns-policy.yaml", 1),
    ("examples/policies/kubernetes/serviceaccount/serviceaccount-policy.yaml", 1),
    ("examples/policies/l3/egress-allow-all/egress-allow-all.yaml", 1),
    ("examples/policies/kubernetes/namespace/namespace-labels-policy.yaml", 1),
    ("examples/policies/kubernetes/clustermesh/cross-cluster-policy.yaml", 1),
];

/// Documents refused, and what the error must say.
const REFUSED: &[(&str, &str)] = &[
    ("examples/policies/l3/fqdn/fqdn.yaml", "spec.egress[1].toFQDNs: toFQDNs (DNS-based policy) is not supported"),
    ("examples/policies/l4/icmp.yaml", "spec.egress[0].icmps: icmps (ICMP rules) is not supported"),
    (
        "examples/policies/l3/requires/requires.yaml",
        "specs[0].ingress[0].fromRequires: fromRequires (requirement-based selection) is not supported",
    ),
    (
        "examples/policies/l3/service/service.yaml",
        "spec.egress[0].toServices: toServices (Kubernetes services) is not supported",
    ),
    (
        "examples/policies/l7/dns/dns.yaml",
        "spec.egress[0].toPorts[0].rules.dns: dns (DNS proxy rules) is not supported",
    ),
    ("examples/policies/l4/l4.json", "a bare list of rules"),
    ("examples/minikube/l3_l4_l7_policy.yaml", "apiVersion: `cilium.io/v1` is not supported"),
    (
        "examples/policies/l3/entities/apiserver.yaml",
        "spec.egress[0].toEntities[0]: entity `kube-apiserver` is not supported",
    ),
    ("examples/policies/l4/from_init.yaml", "spec.ingress[0].fromEntities[0]: entity `init` is not supported"),
    (
        "examples/policies/l4/wildcard_port_listener.yaml",
        "spec.egress[0].toPorts[0].listener: listener (custom Envoy listeners) is not supported",
    ),
    ("examples/policies/auth/auth.yaml", "spec.egress[0].auth: auth (the pre-1.14 name of `authentication`"),
    ("examples/policies/l3/host/host-policy.yaml", "spec.nodeSelector: nodeSelector (host policies) is not supported"),
    ("examples/policies/kubernetes/clusterwide/health.yaml", "entity `remote-node` is not supported"),
    (
        "examples/policies/l3/entities/nodes.yaml",
        "spec.ingress[0].fromEntities[1]: entity `remote-node` is not supported",
    ),
    // Mis-indented in Cilium's repository: `role` sits beside `matchLabels`, so Cilium's
    // decoder drops it and the selector selects every endpoint. l7mesh refuses it instead.
    ("examples/policies/l4/l3_l4_combined.yaml", "spec.ingress[0].fromEndpoints[0].role: unknown field `role`"),
];

#[test]
fn cilium_examples_load_unchanged() {
    for (path, count) in LOADS {
        let (policies, diags) = load_path(&data(path));
        let errors: Vec<String> =
            diags.iter().filter(|d| d.severity == Severity::Error).map(|d| d.to_string()).collect();
        assert!(errors.is_empty(), "{path}: {errors:?}");
        assert_eq!(policies.len(), *count, "{path}");
    }
}

#[test]
fn unsupported_cilium_features_are_refused_by_name() {
    for (path, expected) in REFUSED {
        let (policies, diags) = load_path(&data(path));
        assert!(policies.is_empty(), "{path} loaded");
        let all: Vec<String> = diags.iter().map(|d| d.to_string()).collect();
        assert!(all.iter().any(|d| d.contains(expected)), "{path}: expected `{expected}` in {all:#?}");
        assert!(all.iter().all(|d| d.contains(".yaml:") || d.contains(".json:")), "errors carry file:line: {all:?}");
    }
}

#[test]
fn the_whole_corpus_compiles_for_the_star_wars_demo() {
    let mut policies = Vec::new();
    for (path, _) in LOADS {
        policies.extend(load_path(&data(path)).0);
    }
    let workloads: Vec<Workload> = [
        ("deathstar", "org=empire,class=deathstar"),
        ("tiefighter", "org=empire,class=tiefighter"),
        ("xwing", "org=alliance,class=xwing"),
        ("kafka", "app=kafka"),
        ("empire-hq", "app=empire-hq"),
    ]
    .iter()
    .enumerate()
    .map(|(i, (n, l))| Workload { name: n.to_string(), labels: Labels::parse(l).unwrap(), cgroup_id: 100 + i as u64 })
    .collect();
    let compiled = compile(&policies, &workloads, &["127.0.0.0/8".parse().unwrap()], 1);
    // The HTTP rule of sw_l3_l4_l7_policy and the Kafka rules reach the proxy table.
    assert!(compiled.published.proxy_rules.iter().any(|r| r.endpoint == "deathstar" && r.ports == (80, 80)));
    assert!(compiled.published.proxy_rules.iter().any(|r| r.endpoint == "kafka" && r.ports == (9092, 9092)));
    assert!(!compiled.snapshot.rules.is_empty());
}
