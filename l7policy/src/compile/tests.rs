use super::*;
use crate::validate::load_text;

fn wl(name: &str, labels: &str, cgroup_id: u64) -> Workload {
    Workload { name: name.into(), labels: Labels::parse(labels).unwrap(), cgroup_id }
}

fn policies(text: &str) -> Vec<LoadedPolicy> {
    let (p, d) = load_text("t.yaml", text);
    assert!(d.iter().all(|d| d.severity != crate::validate::Severity::Error), "{d:?}");
    p
}

fn host() -> Vec<IpNet> {
    vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()]
}

fn star_wars() -> Vec<Workload> {
    vec![
        wl("deathstar", "org=empire,class=deathstar", 10),
        wl("tiefighter", "org=empire,class=tiefighter", 11),
        wl("xwing", "org=alliance,class=xwing", 12),
    ]
}

fn ep<'a>(c: &'a Compiled, name: &str) -> &'a EndpointEntry {
    let cg = match name {
        "deathstar" => 10,
        "tiefighter" => 11,
        "xwing" => 12,
        _ => 13,
    };
    c.endpoint_by_cgroup(cg).unwrap()
}

const L7_POLICY: &str = r#"
apiVersion: "cilium.io/v2"
kind: CiliumNetworkPolicy
metadata:
  name: "rule1"
spec:
  description: "L7 policy to restrict access to specific HTTP call"
  endpointSelector:
    matchLabels:
      org: empire
      class: deathstar
  ingress:
  - fromEndpoints:
    - matchLabels:
        org: empire
    toPorts:
    - ports:
      - port: "80"
        protocol: TCP
      rules:
        http:
        - method: "POST"
          path: "/v1/request-landing"
"#;

#[test]
fn getting_started_l7_policy() {
    let c = compile(&policies(L7_POLICY), &star_wars(), &host(), 1);
    let deathstar = ep(&c, "deathstar");
    assert!(deathstar.ingress_enforced && !deathstar.egress_enforced);
    assert!(!ep(&c, "xwing").ingress_enforced, "unselected");
    // org=empire selects the deathstar itself and the tiefighter.
    let peers: Vec<u32> = c.snapshot.rules.iter().map(|r| r.peer_identity).collect();
    assert_eq!(peers, vec![ep(&c, "deathstar").identity, ep(&c, "tiefighter").identity]);
    for r in &c.snapshot.rules {
        assert_eq!(r.endpoint_id, deathstar.endpoint_id);
        assert_eq!(r.direction, Direction::Ingress);
        assert_eq!(r.protocol, Protocol::Tcp);
        assert_eq!(r.ports, (80, 80));
        assert_eq!(r.verdict.action, Action::Redirect(ProtocolHint::Http));
    }
    assert_eq!(c.published.proxy_rules.len(), 1);
    assert!(
        matches!(&c.published.proxy_rules[0].l7, L7::Http { rules } if rules[0].path.as_deref() == Some("/v1/request-landing"))
    );
    assert_eq!(c.published.policy_ids.get(&1).map(String::as_str), Some("default/rule1"));
}

#[test]
fn an_l3_allow_of_the_same_peer_and_port_allows_every_request() {
    let text = format!(
        "{L7_POLICY}---\napiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: l4\nspec:\n  endpointSelector:\n    matchLabels: {{class: deathstar}}\n  ingress:\n  - fromEndpoints:\n    - matchLabels: {{class: tiefighter}}\n    toPorts:\n    - ports: [{{port: \"80\", protocol: TCP}}]\n"
    );
    let c = compile(&policies(&text), &star_wars(), &host(), 1);
    let tie = ep(&c, "tiefighter").identity;
    assert!(c
        .published
        .proxy_rules
        .iter()
        .any(|r| r.l7 == L7::AllowAll && r.peers == Peers::Identities([tie].into()) && r.ports == (80, 80)));
    // The kernel still redirects (redirect outranks allow), so the proxy sees the request.
    assert!(c.snapshot.rules.iter().any(|r| r.peer_identity == tie && r.verdict.action == Action::Allow));
}

#[test]
fn cidr_sets_with_except_get_their_own_identities() {
    let text = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: cidr}\nspec:\n  endpointSelector: {matchLabels: {class: xwing}}\n  egress:\n  - toCIDRSet:\n    - cidr: 10.0.0.0/8\n      except: [10.96.0.0/12]\n  - toCIDR: [192.0.2.1, 127.0.0.1/32]\n";
    let c = compile(&policies(text), &star_wars(), &host(), 1);
    let id_of = |p: &str| {
        let net: IpNet = p.parse().unwrap();
        c.snapshot.ipcache.iter().find(|(n, _)| *n == net).map(|(_, id)| *id).unwrap()
    };
    let (ten, except, one) = (id_of("10.0.0.0/8"), id_of("10.96.0.0/12"), id_of("192.0.2.1/32"));
    let allowed: BTreeSet<u32> = c.snapshot.rules.iter().map(|r| r.peer_identity).collect();
    assert!(allowed.contains(&ten) && allowed.contains(&one) && !allowed.contains(&except), "{allowed:?}");
    assert_eq!(id_of("127.0.0.0/8"), identity::HOST);
    assert!(c.warnings.iter().any(|w| w.contains("127.0.0.1/32")), "{:?}", c.warnings);
    assert!(ep(&c, "xwing").egress_enforced);
}

#[test]
fn entities_deny_rules_port_ranges_and_default_deny_opt_out() {
    let text = r#"apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: mix}
spec:
  endpointSelector: {matchLabels: {org: alliance}}
  enableDefaultDeny: {egress: false}
  egress:
  - toEntities: [world]
    toPorts: [{ports: [{port: "8000", endPort: 8100, protocol: ANY}]}]
  - toEntities: [all]
    toPorts: [{ports: [{port: "53", protocol: UDP}]}]
  egressDeny:
  - toEntities: [host]
    toPorts: [{ports: [{port: "22"}]}]
  - toEntities: [cluster]
    toPorts: [{ports: [{port: "9999", protocol: TCP}]}]
"#;
    let c = compile(&policies(text), &star_wars(), &host(), 1);
    let x = ep(&c, "xwing");
    assert!(!x.egress_enforced, "enableDefaultDeny.egress: false");
    let r = &c.snapshot.rules;
    assert!(r
        .iter()
        .any(|r| r.peer_identity == identity::WORLD && r.ports == (8000, 8100) && r.protocol == Protocol::Udp));
    assert!(r.iter().any(|r| r.peer_identity == identity::ANY && r.ports == (53, 53) && r.protocol == Protocol::Udp));
    assert!(r
        .iter()
        .any(|r| r.peer_identity == identity::HOST && r.ports == (22, 22) && r.verdict.action == Action::Deny));
    let cluster_denies: BTreeSet<u32> = r.iter().filter(|r| r.ports == (9999, 9999)).map(|r| r.peer_identity).collect();
    let expected: BTreeSet<u32> = [identity::HOST, 256, 257, 258].into();
    assert_eq!(cluster_denies, expected);
}

#[test]
fn namespaces_scope_namespaced_policies() {
    let text = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p, namespace: prod}\nspec:\n  endpointSelector: {}\n  ingress:\n  - fromEndpoints: [{}]\n";
    let mut ws = star_wars();
    ws.push(wl("api", "app=api,k8s:io.kubernetes.pod.namespace=prod", 13));
    ws.push(wl("db", "app=db,io.kubernetes.pod.namespace=prod", 14));
    let c = compile(&policies(text), &ws, &host(), 1);
    assert!(!ep(&c, "deathstar").ingress_enforced, "other namespace");
    let api = c.endpoint_by_cgroup(13).unwrap();
    assert!(api.ingress_enforced);
    let peers: BTreeSet<u32> =
        c.snapshot.rules.iter().filter(|r| r.endpoint_id == api.endpoint_id).map(|r| r.peer_identity).collect();
    let db = c.endpoint_by_cgroup(14).unwrap().identity;
    assert_eq!(peers, [api.identity, db].into(), "`{{}}` in a namespaced policy: every workload of that namespace");
}

#[test]
fn empty_rule_selects_nothing_and_audit_mode_only_reports() {
    let text = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: lock\n  annotations: {l7mesh.io/audit: \"true\"}\nspec:\n  endpointSelector: {matchLabels: {class: xwing}}\n  ingress:\n  - {}\n";
    let c = compile(&policies(text), &star_wars(), &host(), 1);
    let x = ep(&c, "xwing");
    assert!(!x.ingress_enforced && x.ingress_audit);
    assert!(c.snapshot.rules.is_empty());
}

#[test]
fn a_selector_that_selects_nothing_is_a_warning() {
    let text = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: none}\nspec:\n  endpointSelector: {matchLabels: {app: ghost}}\n  ingress: [{}]\n";
    let c = compile(&policies(text), &star_wars(), &host(), 1);
    assert!(
        c.warnings.iter().any(|w| w.contains("default/none") && w.contains("selects no workload")),
        "{:?}",
        c.warnings
    );
}

/// The tables compile() publishes are the JSON l7proxy has always read from the policy stream:
/// l7mesh-api's sample was captured from this very call before the tables were one type.
#[test]
fn the_published_tables_are_todays_wire_form() {
    let text = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: sample, annotations: {"l7mesh.io/audit": "true"}}
spec:
  endpointSelector: {matchLabels: {class: deathstar}}
  ingress:
  - fromEndpoints: [{matchLabels: {org: empire}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http:
        - method: POST
          path: /v1/.*
          host: deathstar
          headers: ["X-Token: yes"]
          headerMatches: [{name: X-Trace, value: "1"}]
    - ports: [{port: "9092", protocol: TCP}]
      rules:
        kafka:
        - {role: produce, topic: t1, clientID: c1}
        - {apiKey: metadata, apiVersion: "4"}
    - ports: [{port: "50051", protocol: TCP}]
      rules:
        grpc:
        - {service: helloworld.Greeter, method: SayHello}
        - {service: open.Everything}
  - toPorts:
    - ports: [{port: "443", protocol: TCP}]
      serverNames: [api.example.com, "*.example.org"]
      terminatingTLS: {secret: {name: web-cert, namespace: certs}}
      originatingTLS: {secret: {name: upstream-ca}}
  - fromEndpoints: [{matchLabels: {class: xwing}}]
    toPorts:
    - ports: [{port: "8000", endPort: 8100, protocol: TCP}]
  egress:
  - toCIDRSet: [{cidr: 10.0.0.0/8, except: [10.96.0.0/12]}]
    toPorts:
    - ports: [{port: "8443", protocol: TCP}]
      serverNames: [db.example.com]
"#;
    let c = compile(&policies(text), &star_wars(), &host(), 7);
    let sample: serde_json::Value =
        serde_json::from_str(include_str!("../../../l7mesh-api/testdata/published_sample.json")).unwrap();
    assert_eq!(serde_json::to_value(&c.published).unwrap(), sample);
    assert!(c.conflicts.is_empty(), "{:?}", c.conflicts);
}

/// Each rule gets the id the kernel reports for it, and the tables say what it stands for:
/// its policy, its field path and whether it denies; every workload names the policies that
/// make a direction default-deny for it.
#[test]
fn kernel_ids_name_their_rule() {
    let text = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: a}
specs:
- endpointSelector: {matchLabels: {class: deathstar}}
  ingressDeny:
  - fromEndpoints: [{matchLabels: {class: xwing}}]
  ingress:
  - fromEndpoints: [{matchLabels: {org: empire}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
    - ports: [{port: "81", protocol: TCP}]
- endpointSelector: {matchLabels: {class: tiefighter}}
  egress:
  - toEndpoints: [{matchLabels: {class: deathstar}}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: b}
spec:
  endpointSelector: {matchLabels: {class: deathstar}}
  ingress:
  - fromEndpoints: [{matchLabels: {class: tiefighter}}]
"#;
    let c = compile(&policies(text), &star_wars(), &host(), 1);
    let named: Vec<(String, String, Direction, bool)> = c
        .published
        .rule_ids
        .iter()
        .map(|(id, r)| (c.published.policy_ids[id].clone(), r.rule.clone(), r.direction, r.deny))
        .collect();
    let want = [
        ("default/a", "specs[0].ingress[0].toPorts[0]", Direction::Ingress, false),
        ("default/a", "specs[0].ingress[0].toPorts[1]", Direction::Ingress, false),
        ("default/a", "specs[0].ingressDeny[0]", Direction::Ingress, true),
        ("default/a", "specs[1].egress[0]", Direction::Egress, false),
        ("default/b", "ingress[0]", Direction::Ingress, false),
    ];
    assert_eq!(named, want.map(|(p, r, d, x)| (p.to_string(), r.to_string(), d, x)).to_vec());
    // The kernel's verdicts carry those ids.
    let deny_id = *c.published.rule_ids.iter().find(|(_, r)| r.deny).unwrap().0;
    assert!(c.snapshot.rules.iter().any(|r| r.verdict.policy_id == deny_id && r.verdict.action == Action::Deny));
    assert!(c.snapshot.rules.iter().all(|r| c.published.rule_ids.contains_key(&r.verdict.policy_id)));
    // The proxy's rules name their toPorts entry.
    let by = |name: &str| c.published.workloads.iter().find(|w| w.name == name).unwrap().clone();
    assert_eq!(by("deathstar").ingress_enforced_by, ["default/a", "default/b"]);
    assert!(by("deathstar").egress_enforced_by.is_empty());
    assert_eq!(by("tiefighter").egress_enforced_by, ["default/a"]);
    assert!(by("xwing").ingress_enforced_by.is_empty() && by("xwing").egress_enforced_by.is_empty());
}

fn cluster_view(tunnel: bool) -> ClusterView {
    ClusterView {
        this_node: "a".into(),
        workloads: vec![RemoteWorkload {
            node: "b".into(),
            name: "server".into(),
            labels: Labels::parse("app=server").unwrap(),
        }],
        nodes: vec![tables::RemoteNode {
            name: "b".into(),
            addresses: vec!["10.0.0.2".parse().unwrap(), "127.0.0.5".parse().unwrap()],
            tunnel_port: tunnel.then_some(15008),
            identity: 0,
        }],
    }
}

fn verdict(c: &Compiled, cgroup: u64, direction: Direction, peer: u32, port: u16) -> redirector_policy::Decision {
    let ep = c.endpoint_by_cgroup(cgroup).unwrap();
    c.snapshot.verdict(ep, direction, Protocol::Tcp, peer, port)
}

#[test]
fn another_node_is_an_identity_of_its_own_and_unenforced_egress_to_it_takes_the_tunnel() {
    let local = vec![wl("client", "app=client", 10)];
    let c = compile_in_cluster(&[], &local, Some(&cluster_view(true)), &host(), 1);
    let node = c.published.cluster.as_ref().unwrap().nodes[0].identity;
    assert!(node >= NODE_IDENTITY_BASE);
    assert!(c.snapshot.ipcache.contains(&("10.0.0.2/32".parse().unwrap(), node)));
    // A node record's loopback address is not taken (it would make 127.0.0.5 "another node").
    assert!(!c
        .snapshot
        .ipcache
        .iter()
        .any(|(n, _)| n.contains(&"127.0.0.5".parse::<std::net::IpAddr>().unwrap()) && n.prefix_len() == 32));
    assert!(c.warnings.iter().any(|w| w.contains("127.0.0.5")), "{:?}", c.warnings);
    assert_eq!(
        verdict(&c, 10, Direction::Egress, node, 8080),
        redirector_policy::Decision::Redirect(ProtocolHint::None)
    );
    // Without the tunnel on that node: direct, as before.
    let c = compile_in_cluster(&[], &local, Some(&cluster_view(false)), &host(), 1);
    let node = c.published.cluster.as_ref().unwrap().nodes[0].identity;
    assert_eq!(verdict(&c, 10, Direction::Egress, node, 8080), redirector_policy::Decision::Allow);
}

#[test]
fn an_egress_deny_without_default_deny_keeps_its_peers_out_of_the_tunnel() {
    let local = vec![wl("client", "app=client", 10)];
    let p = policies(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: p\nspec:\n  endpointSelector:\n    matchLabels:\n      app: client\n  enableDefaultDeny:\n    egress: false\n  egressDeny:\n  - toCIDR: [10.0.0.0/24]\n",
    );
    let c = compile_in_cluster(&p, &local, Some(&cluster_view(true)), &host(), 1);
    let node = c.published.cluster.as_ref().unwrap().nodes[0].identity;
    // The CIDR covers node b's address: the deny names node b's identity, and no tunnel
    // redirect outranks it (the workload has an egress rule).
    assert!(matches!(verdict(&c, 10, Direction::Egress, node, 8080), redirector_policy::Decision::Deny { .. }));
}

#[test]
fn a_cidr_or_world_deny_that_covers_another_nodes_address_still_denies_it() {
    let local = vec![wl("web", "app=web", 10)];
    for peers in ["fromCIDR: [10.0.0.2/32]", "fromCIDR: [10.0.0.0/24]", "fromEntities: [world]"] {
        let p = policies(&format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: p\nspec:\n  endpointSelector:\n    matchLabels:\n      app: web\n  ingress:\n  - fromEntities: [all]\n  ingressDeny:\n  - {peers}\n"
        ));
        let c = compile_in_cluster(&p, &local, Some(&cluster_view(true)), &host(), 1);
        let ip: std::net::IpAddr = "10.0.0.2".parse().unwrap();
        let id = redirector_policy::identity_in(&c.snapshot.ipcache, ip);
        assert!(
            matches!(verdict(&c, 10, Direction::Ingress, id, 8080), redirector_policy::Decision::Deny { .. }),
            "{peers}: direct from node b"
        );
        // Through the tunnel, node b's workloads are judged with node b's rules too.
        let node = c.published.cluster.as_ref().unwrap().nodes[0].identity;
        let folded = l7rules_check(&c);
        assert!(folded.contains(&node), "{peers}: the far side folds node b's rules: {folded:?}");
        assert!(
            matches!(verdict(&c, 10, Direction::Ingress, node, 8080), redirector_policy::Decision::Deny { .. }),
            "{peers}: node b's identity"
        );
    }
}

/// The peers of the ingress rules the tunnel's far side folds.
fn l7rules_check(c: &Compiled) -> Vec<u32> {
    c.published.cluster.as_ref().unwrap().ingress.iter().map(|r| r.peer).collect()
}

#[test]
fn authentication_required_admits_only_workloads_whose_identity_is_proven() {
    let local = vec![wl("web", "app=web", 10), wl("client", "app=client", 11)];
    let p = policies(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: p\nspec:\n  endpointSelector:\n    matchLabels:\n      app: web\n  ingress:\n  - fromEntities: [all]\n    authentication:\n      mode: required\n",
    );
    let c = compile_in_cluster(&p, &local, Some(&cluster_view(true)), &host(), 1);
    let node = c.published.cluster.as_ref().unwrap().nodes[0].identity;
    let client = c.endpoint_by_cgroup(11).unwrap().identity;
    let remote = c.published.workloads.iter().find(|w| w.node == "b").unwrap().identity;
    let allowed = |peer| matches!(verdict(&c, 10, Direction::Ingress, peer, 80), redirector_policy::Decision::Allow);
    assert!(allowed(client), "a local workload: the kernel proves it");
    assert!(allowed(remote), "another node's workload: the tunnel proves it");
    for (what, peer) in [("world", identity::WORLD), ("host", identity::HOST), ("node b's address", node)] {
        assert!(!allowed(peer), "{what} proves no identity");
    }
    // Without `required`, `all` is every peer.
    let open = policies(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: p\nspec:\n  endpointSelector:\n    matchLabels:\n      app: web\n  ingress:\n  - fromEntities: [all]\n",
    );
    let c = compile_in_cluster(&open, &local, Some(&cluster_view(true)), &host(), 1);
    assert!(matches!(verdict(&c, 10, Direction::Ingress, identity::WORLD, 80), redirector_policy::Decision::Allow));
}

/// Node b runs `server` (app=server) and `admin` (app=admin).
fn cluster_of_two_workloads() -> ClusterView {
    let mut view = cluster_view(true);
    view.workloads.push(RemoteWorkload {
        node: "b".into(),
        name: "admin".into(),
        labels: Labels::parse("app=admin").unwrap(),
    });
    view
}

#[test]
fn egress_rules_name_another_nodes_workloads_and_the_proxy_folds_them_for_the_one_listening() {
    use l7rules::L4Decision;
    let local = vec![wl("client", "app=client", 10), wl("free", "app=free", 11)];
    let p = policies(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: p\nspec:\n  endpointSelector:\n    matchLabels:\n      app: client\n  egress:\n  - toEndpoints:\n    - matchLabels:\n        app: server\n    toPorts:\n    - ports:\n      - port: \"8080\"\n        protocol: TCP\n",
    );
    let c = compile_in_cluster(&p, &local, Some(&cluster_of_two_workloads()), &host(), 1);
    let node = c.published.cluster.as_ref().unwrap().nodes[0].identity;
    // The kernel sees node b's address only: every port of it goes to the proxy, which asks
    // node b who listens (an unenforced workload's connections too: they take the tunnel).
    for (cgroup, port) in [(10, 8080), (10, 22), (11, 8080)] {
        assert_eq!(
            verdict(&c, cgroup, Direction::Egress, node, port),
            redirector_policy::Decision::Redirect(ProtocolHint::None),
            "cgroup {cgroup} port {port}"
        );
    }
    let t = l7rules::Tables::build(&c.published);
    let by = |name: &str| c.published.workloads.iter().find(|w| w.name == name && w.node == "b").unwrap().clone();
    let (server, admin) = (by("server"), by("admin"));
    let client = c.endpoint_by_cgroup(10).unwrap().endpoint_id;
    let free = c.endpoint_by_cgroup(11).unwrap().endpoint_id;
    assert!(t.tunnel_egress_judged(client));
    assert!(!t.tunnel_egress_judged(free), "no egress rule: nothing to ask node b");
    assert_eq!(t.tunnel_egress(client, node, Some(&server), 8080), L4Decision::Allow);
    assert!(matches!(t.tunnel_egress(client, node, Some(&server), 9090), L4Decision::Deny { policy_id: 0 }));
    assert!(
        matches!(t.tunnel_egress(client, node, Some(&admin), 8080), L4Decision::Deny { .. }),
        "another workload there"
    );
    assert!(matches!(t.tunnel_egress(client, node, None, 8080), L4Decision::Deny { .. }), "the node's own service");
    assert_eq!(t.tunnel_egress(free, node, Some(&admin), 8080), L4Decision::Allow);
}

#[test]
fn an_egress_deny_naming_another_nodes_workload_denies_it_and_nothing_else_there() {
    use l7rules::L4Decision;
    let local = vec![wl("client", "app=client", 10)];
    let p = policies(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: p\nspec:\n  endpointSelector:\n    matchLabels:\n      app: client\n  enableDefaultDeny:\n    egress: false\n  egressDeny:\n  - toEndpoints:\n    - matchLabels:\n        app: admin\n",
    );
    let c = compile_in_cluster(&p, &local, Some(&cluster_of_two_workloads()), &host(), 1);
    let node = c.published.cluster.as_ref().unwrap().nodes[0].identity;
    let t = l7rules::Tables::build(&c.published);
    let by = |name: &str| c.published.workloads.iter().find(|w| w.name == name && w.node == "b").unwrap().clone();
    let client = c.endpoint_by_cgroup(10).unwrap().endpoint_id;
    assert!(t.tunnel_egress_judged(client));
    assert!(
        matches!(t.tunnel_egress(client, node, Some(&by("admin")), 22), L4Decision::Deny { policy_id } if policy_id != 0)
    );
    assert_eq!(t.tunnel_egress(client, node, Some(&by("server")), 22), L4Decision::Allow);
    assert_eq!(t.tunnel_egress(client, node, None, 22), L4Decision::Allow);
    // The kernel cannot tell admin from server at node b's address: the proxy decides.
    assert_eq!(verdict(&c, 10, Direction::Egress, node, 22), redirector_policy::Decision::Redirect(ProtocolHint::None));
}

#[test]
fn a_cidr_rule_of_another_nodes_address_still_judges_its_workloads_from_the_proxy() {
    use l7rules::L4Decision;
    let local = vec![wl("client", "app=client", 10)];
    let p = policies(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: p\nspec:\n  endpointSelector:\n    matchLabels:\n      app: client\n  egress:\n  - toCIDR: [10.0.0.2/32]\n    toPorts:\n    - ports:\n      - port: \"443\"\n        protocol: TCP\n",
    );
    let c = compile_in_cluster(&p, &local, Some(&cluster_of_two_workloads()), &host(), 1);
    let t = l7rules::Tables::build(&c.published);
    // The kernel gives the address the CIDR's identity (a policy's CIDR of exactly it keeps
    // its entry): the tunnel's redirect covers that identity too.
    let kernel = redirector_policy::identity_in(&c.snapshot.ipcache, "10.0.0.2".parse().unwrap());
    assert_eq!(
        verdict(&c, 10, Direction::Egress, kernel, 80),
        redirector_policy::Decision::Redirect(ProtocolHint::None)
    );
    let id = c.published.cluster.as_ref().unwrap().nodes[0].identity;
    let server = c.published.workloads.iter().find(|w| w.name == "server" && w.node == "b").unwrap().clone();
    let client = c.endpoint_by_cgroup(10).unwrap().endpoint_id;
    assert_eq!(t.tunnel_egress(client, id, Some(&server), 443), L4Decision::Allow, "the address's rule");
    assert!(matches!(t.tunnel_egress(client, id, Some(&server), 80), L4Decision::Deny { .. }));
}
