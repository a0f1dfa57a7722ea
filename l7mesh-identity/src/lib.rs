//! Workload identity between l7mesh nodes, in one place for the broker that issues it and
//! the proxy that checks it: the SPIFFE IDs (`spiffe://<trust domain>/ns/<namespace>/sa/<name>`
//! for a workload, `spiffe://<trust domain>/node/<name>` for a node's intermediate) and the
//! identity a certificate chain proves once the TLS stack has verified it to the root.
#![forbid(unsafe_code)]

use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

/// Node, namespace and workload names: a DNS label, lowercase.
pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    (1..=63).contains(&b.len())
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// The SPIFFE ID of a workload.
pub fn workload_id(trust_domain: &str, namespace: &str, name: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{namespace}/sa/{name}")
}

/// The SPIFFE ID of a node's intermediate.
pub fn node_id(trust_domain: &str, node: &str) -> String {
    format!("spiffe://{trust_domain}/node/{node}")
}

/// The namespace and name of the identity a node's proxy presents as a tunnel's server.
pub const PROXY_NAMESPACE: &str = "l7mesh-system";
pub const PROXY_NAME: &str = "node-proxy";

/// The DNS name a node proxy's tunnel certificate carries beside its SPIFFE ID (what a TLS
/// client verifies the server's name against; the peer then checks the chain's node too).
pub fn node_server_name(node: &str) -> String {
    format!("{node}.nodes.l7mesh")
}

/// The URI SANs of a certificate.
pub fn uri_sans(cert: &X509Certificate<'_>) -> Vec<String> {
    let mut out = Vec::new();
    for ext in cert.extensions() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
            for n in &san.general_names {
                if let GeneralName::URI(u) = n {
                    out.push(u.to_string());
                }
            }
        }
    }
    out
}

/// The trust domain a root certificate names (its `spiffe://<domain>` URI SAN).
pub fn trust_domain_of(root_der: &[u8]) -> Result<String, String> {
    let (_, root) = X509Certificate::from_der(root_der).map_err(|e| format!("the root: {e}"))?;
    uri_sans(&root)
        .iter()
        .find_map(|u| u.strip_prefix("spiffe://").filter(|td| !td.contains('/')).map(str::to_string))
        .ok_or_else(|| "the root names no trust domain (a spiffe://<domain> URI SAN)".to_string())
}

/// A peer's identity as its chain proves it (after the TLS stack verified the chain to the
/// root): the workload's namespace and name from the leaf, its node from the intermediate.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PeerIdentity {
    pub trust_domain: String,
    pub node: String,
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (node {})", workload_id(&self.trust_domain, &self.namespace, &self.name), self.node)
    }
}

/// Reads a chain the TLS stack verified (leaf first, DER) and proves it again along the one
/// path it names: exactly two certificates, the leaf signed by the second (the node's
/// intermediate: the leaf's issuer is its subject, and its key verifies the leaf's signature),
/// and the second signed by `root_der`. (A TLS verifier accepts extra certificates and builds
/// its own path, so the second certificate sent need not be the leaf's issuer: the node must
/// come from the path that was proven, or any node could claim another's workloads.) Then the
/// leaf must carry exactly one SPIFFE URI of this trust domain of the workload form, and the
/// intermediate one of the node form.
pub fn peer_identity(chain: &[&[u8]], root_der: &[u8], trust_domain: &str) -> Result<PeerIdentity, String> {
    let [leaf, inter] = chain else {
        return Err(format!(
            "the peer sent {} certificates; a workload presents exactly its own and its node's intermediate",
            chain.len()
        ));
    };
    let (_, leaf) = X509Certificate::from_der(leaf).map_err(|e| format!("the peer's certificate: {e}"))?;
    let (_, inter) = X509Certificate::from_der(inter).map_err(|e| format!("the peer's intermediate: {e}"))?;
    let (_, root) = X509Certificate::from_der(root_der).map_err(|e| format!("the cluster root: {e}"))?;
    if leaf.issuer() != inter.subject() || inter.issuer() != root.subject() {
        return Err("the peer's chain is not leaf -> its node's intermediate -> the cluster root".into());
    }
    leaf.verify_signature(Some(inter.public_key()))
        .map_err(|e| format!("the peer's certificate is not signed by the intermediate it sent: {e}"))?;
    inter
        .verify_signature(Some(root.public_key()))
        .map_err(|e| format!("the peer's intermediate is not signed by the cluster root: {e}"))?;
    if !inter.is_ca() || leaf.is_ca() {
        return Err("the peer's chain has a CA where a workload's certificate belongs, or none above it".into());
    }
    let spiffe: Vec<String> = uri_sans(&leaf).into_iter().filter(|u| u.starts_with("spiffe://")).collect();
    let [id] = spiffe.as_slice() else {
        return Err(format!("the peer's certificate has {} SPIFFE IDs, not one", spiffe.len()));
    };
    let path = id
        .strip_prefix(&format!("spiffe://{trust_domain}/"))
        .ok_or_else(|| format!("`{id}` is not of trust domain {trust_domain}"))?;
    let parts: Vec<&str> = path.split('/').collect();
    let ["ns", namespace, "sa", name] = parts.as_slice() else {
        return Err(format!("`{id}` is not a workload ID (spiffe://{trust_domain}/ns/<namespace>/sa/<name>)"));
    };
    for (n, what) in [(*namespace, "namespace"), (*name, "workload")] {
        if !valid_name(n) {
            return Err(format!("`{n}` is not a valid {what} name"));
        }
    }
    let prefix = format!("spiffe://{trust_domain}/node/");
    let nodes: Vec<String> =
        uri_sans(&inter).iter().filter_map(|u| u.strip_prefix(&prefix).map(str::to_string)).collect();
    let [node] = nodes.as_slice() else {
        return Err("the peer's intermediate names no single node".into());
    };
    if !valid_name(node) {
        return Err(format!("`{node}` is not a valid node name"));
    }
    // The node proxy's own certificate names its node's DNS name too: it must be its own node's.
    if *namespace == PROXY_NAMESPACE && *name == PROXY_NAME {
        for ext in leaf.extensions() {
            if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
                for n in &san.general_names {
                    if let GeneralName::DNSName(d) = n {
                        if *d != node_server_name(node) {
                            return Err(format!("node {node}'s proxy certificate names `{d}`"));
                        }
                    }
                }
            }
        }
    }
    Ok(PeerIdentity {
        trust_domain: trust_domain.to_string(),
        node: node.clone(),
        namespace: namespace.to_string(),
        name: name.to_string(),
    })
}
