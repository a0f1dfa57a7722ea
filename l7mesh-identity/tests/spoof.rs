//! A node holds its own intermediate's key and can sign any leaf with it: what a peer's chain
//! proves must come from the path that signed the leaf, never from a certificate merely sent
//! beside it. Certificates made as the broker makes them (rcgen).

use l7mesh_identity::{node_id, peer_identity, workload_id, PROXY_NAME, PROXY_NAMESPACE};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType};

fn ca(cn: &str, uri: String, constrained: u8) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(constrained));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    p.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
    p
}

fn leaf(id: String, dns: Option<String>) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, "leaf");
    p.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
    if let Some(d) = dns {
        p.subject_alt_names.push(SanType::DnsName(d.try_into().unwrap()));
    }
    p.is_ca = IsCa::ExplicitNoCa;
    p
}

#[test]
fn a_node_cannot_speak_for_another_nodes_workloads_or_proxy() {
    let td = "example.org";
    let root_key = KeyPair::generate().unwrap();
    let root_params = ca("root", format!("spiffe://{td}"), 1);
    let root = root_params.self_signed(&root_key).unwrap();
    let root_issuer = Issuer::new(root_params, root_key);
    let node = |name: &str| {
        let key = KeyPair::generate().unwrap();
        let params = ca(&format!("l7mesh node {name}"), node_id(td, name), 0);
        let cert = params.signed_by(&key, &root_issuer).unwrap();
        (cert, Issuer::new(params, key))
    };
    let (a_cert, a) = node("node-a");
    let (c_cert, c) = node("node-c");
    let root_der = root.der().to_vec();
    let new_key = || KeyPair::generate().unwrap();

    // Node a's honest workload.
    let honest = leaf(workload_id(td, "default", "client"), None).signed_by(&new_key(), &a).unwrap();
    let id = peer_identity(&[honest.der(), a_cert.der()], &root_der, td).unwrap();
    assert_eq!((id.node.as_str(), id.name.as_str()), ("node-a", "client"));

    // Node a signs a leaf for a workload, then sends node c's (public) intermediate after it.
    let forged = leaf(workload_id(td, "default", "victim"), None).signed_by(&new_key(), &a).unwrap();
    assert!(peer_identity(&[forged.der(), c_cert.der()], &root_der, td).is_err());
    assert!(peer_identity(&[forged.der(), c_cert.der(), a_cert.der()], &root_der, td).is_err());
    // Signed by a, honestly chained: it is node a's workload, never c's.
    assert_eq!(peer_identity(&[forged.der(), a_cert.der()], &root_der, td).unwrap().node, "node-a");

    // Node a mints node c's proxy name: its DNS name is refused under node a.
    let proxy = leaf(workload_id(td, PROXY_NAMESPACE, PROXY_NAME), Some("node-c.nodes.l7mesh".into()))
        .signed_by(&new_key(), &a)
        .unwrap();
    let e = peer_identity(&[proxy.der(), a_cert.der()], &root_der, td).unwrap_err();
    assert!(e.contains("names `node-c.nodes.l7mesh`"), "{e}");
    // Node c's real proxy certificate reads as node c's.
    let real = leaf(workload_id(td, PROXY_NAMESPACE, PROXY_NAME), Some("node-c.nodes.l7mesh".into()))
        .signed_by(&new_key(), &c)
        .unwrap();
    assert_eq!(peer_identity(&[real.der(), c_cert.der()], &root_der, td).unwrap().node, "node-c");
}
