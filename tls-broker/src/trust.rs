//! The cluster's trust: one root per trust domain, one intermediate per node, one leaf per
//! workload (as Linkerd's trust anchor and issuer, and Istio's SPIFFE identities).
//!
//! - The root (`l7ctl ca init`) is made and kept where the operator keeps it, never on a node:
//!   `root.key` (0600) and `root.pem` in a directory of its own. Its certificate names the trust
//!   domain as its URI SAN, `spiffe://<trust domain>`.
//! - A node's intermediate (`l7ctl ca issue-node NAME`, run where the root is) is a CA limited
//!   to one level below it (pathlen 0), named `spiffe://<trust domain>/node/<NAME>`. It goes to
//!   the node as a bundle (its certificate, the root's, its key: one PEM file) that
//!   `l7ctl ca install-node FILE` hands to the node's broker, the only process there that keeps
//!   it. Installing a newer bundle for the same node and root rotates it: leaves issued since
//!   chain to the new one, those issued before still verify (same root) until they expire, so
//!   no connection is dropped.
//! - A workload's leaf (issued by the node's broker, for l7proxy only) names the workload as
//!   `spiffe://<trust domain>/ns/<namespace>/sa/<workload>` and is valid for client and server
//!   authentication. Which node's workload it is, is the issuer's name: a peer reads it from
//!   the chain, so a node can only speak for its own workloads.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PublicKeyData as _, SanType,
};
use thiserror::Error;
use x509_parser::prelude::{FromDer, X509Certificate};

#[derive(Debug, Error)]
pub enum TrustError {
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("`{0}` is not a valid trust domain (a DNS name, lowercase: cluster.local, example.org)")]
    BadTrustDomain(String),
    #[error("`{0}` is not a valid {1} name (1-63 of a-z, 0-9 and '-', starting and ending alphanumeric)")]
    BadName(String, &'static str),
    #[error("{0} holds a cluster root already (root.pem, root.key): it is never made twice")]
    RootExists(PathBuf),
    #[error("{0} holds no cluster root (root.pem and root.key): make one with `l7ctl ca init --dir {0}`")]
    NoRoot(PathBuf),
    #[error("the node bundle: {0}")]
    Bundle(String),
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> TrustError + 'a {
    move |source| TrustError::Io { what, path: path.to_path_buf(), source }
}

/// A DNS-name-like trust domain (SPIFFE: lowercase letters, digits, dots, dashes).
pub fn check_trust_domain(td: &str) -> Result<(), TrustError> {
    let ok = !td.is_empty()
        && td.len() <= 253
        && td.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        });
    if ok {
        Ok(())
    } else {
        Err(TrustError::BadTrustDomain(td.to_string()))
    }
}

/// Node, namespace and workload names: a DNS label, lowercase.
pub fn check_name(name: &str, what: &'static str) -> Result<(), TrustError> {
    if l7mesh_identity::valid_name(name) {
        Ok(())
    } else {
        Err(TrustError::BadName(name.to_string(), what))
    }
}

fn uri(s: String) -> Result<SanType, TrustError> {
    Ok(SanType::URI(s.try_into().map_err(|_| TrustError::Bundle("a URI SAN that is not IA5".into()))?))
}

fn root_params(trust_domain: &str) -> Result<CertificateParams, TrustError> {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, format!("l7mesh cluster root ({trust_domain})"));
    p.distinguished_name.push(DnType::OrganizationName, "l7mesh");
    // Root -> node intermediate -> workload: one CA level below the root.
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.subject_alt_names = vec![uri(format!("spiffe://{trust_domain}"))?];
    Ok(p)
}

fn node_params(trust_domain: &str, node: &str) -> Result<CertificateParams, TrustError> {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, format!("l7mesh node {node}"));
    p.distinguished_name.push(DnType::OrganizationName, "l7mesh");
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    p.subject_alt_names = vec![uri(node_id(trust_domain, node))?];
    Ok(p)
}

/// Makes the cluster root in `dir` (created 0700): `root.key` (0600), `root.pem`. Refuses a
/// directory that holds one already.
pub fn init_root(dir: &Path, trust_domain: &str, lifetime: Duration) -> Result<String, TrustError> {
    check_trust_domain(trust_domain)?;
    let (key_path, cert_path) = (dir.join("root.key"), dir.join("root.pem"));
    if key_path.exists() || cert_path.exists() {
        return Err(TrustError::RootExists(dir.to_path_buf()));
    }
    private_dir(dir)?;
    let key = KeyPair::generate()?;
    let mut params = root_params(trust_domain)?;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::seconds(lifetime.as_secs() as i64);
    let cert = params.self_signed(&key)?;
    write_private(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_private(&cert_path, cert.pem().as_bytes(), 0o644)?;
    Ok(cert.pem())
}

/// A node's bundle from the root in `dir`: the node's intermediate certificate, the root's
/// certificate and the intermediate's key, PEM, in that order.
pub fn issue_node(dir: &Path, node: &str, lifetime: Duration) -> Result<String, TrustError> {
    check_name(node, "node")?;
    let (key_path, cert_path) = (dir.join("root.key"), dir.join("root.pem"));
    if !key_path.exists() || !cert_path.exists() {
        return Err(TrustError::NoRoot(dir.to_path_buf()));
    }
    let root_pem = fs::read_to_string(&cert_path).map_err(io("reading", &cert_path))?;
    let root_key = KeyPair::from_pem(&fs::read_to_string(&key_path).map_err(io("reading", &key_path))?)?;
    let trust_domain = trust_domain_of(&der_of(&root_pem)?)?;
    let root = Issuer::from_ca_cert_pem(&root_pem, root_key)?;
    let key = KeyPair::generate()?;
    let mut params = node_params(&trust_domain, node)?;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + time::Duration::seconds(lifetime.as_secs() as i64);
    let cert = params.signed_by(&key, &root)?;
    Ok(format!("{}{}{}", cert.pem(), root_pem, key.serialize_pem()))
}

fn der_of(pem_text: &str) -> Result<Vec<u8>, TrustError> {
    let p = pem::parse(pem_text).map_err(|e| TrustError::Bundle(format!("not PEM: {e}")))?;
    Ok(p.into_contents())
}

pub use l7mesh_identity::{node_id, peer_identity, uri_sans, workload_id, PeerIdentity};

fn trust_domain_of(root_der: &[u8]) -> Result<String, TrustError> {
    l7mesh_identity::trust_domain_of(root_der).map_err(TrustError::Bundle)
}

/// What a node's broker holds: its intermediate and key, and the root it chains to.
pub struct NodeIssuer {
    pub node: String,
    pub trust_domain: String,
    /// The intermediate's certificate and the root's (PEM).
    pub cert_pem: String,
    pub root_pem: String,
    /// The whole bundle as installed (what is written to the broker's state).
    pub bundle: String,
    /// The intermediate's notAfter (Unix seconds).
    pub not_after: i64,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for NodeIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("NodeIssuer").field("node", &self.node).field("trust_domain", &self.trust_domain).finish()
    }
}

/// A workload's certificate chain (leaf, then the node's intermediate), its key, and the root.
#[derive(Clone, Debug)]
pub struct WorkloadCert {
    pub chain_pem: String,
    pub key_pem: String,
    pub root_pem: String,
    pub spiffe_id: String,
}

impl NodeIssuer {
    /// Reads and checks a bundle: exactly two certificates (a CA intermediate for one node,
    /// and the self-signed root it is signed by, naming the trust domain) and the
    /// intermediate's private key; neither certificate expired or not yet valid.
    pub fn from_bundle(bundle: &str) -> Result<Self, TrustError> {
        let bad = |m: String| TrustError::Bundle(m);
        let parts = pem::parse_many(bundle).map_err(|e| bad(format!("not PEM: {e}")))?;
        let certs: Vec<&pem::Pem> = parts.iter().filter(|p| p.tag() == "CERTIFICATE").collect();
        let keys: Vec<&pem::Pem> = parts.iter().filter(|p| p.tag().ends_with("PRIVATE KEY")).collect();
        if certs.len() != 2 || keys.len() != 1 {
            return Err(bad(format!(
                "expected the node's certificate, the root's certificate and the node's key; found {} certificate(s) and {} key(s)",
                certs.len(),
                keys.len()
            )));
        }
        let (_, inter) =
            X509Certificate::from_der(certs[0].contents()).map_err(|e| bad(format!("the node certificate: {e}")))?;
        let (_, root) =
            X509Certificate::from_der(certs[1].contents()).map_err(|e| bad(format!("the root certificate: {e}")))?;
        if !root.is_ca() || root.subject() != root.issuer() {
            return Err(bad("the second certificate is not a self-signed CA (the cluster root)".into()));
        }
        root.verify_signature(None).map_err(|e| bad(format!("the root's self-signature does not verify: {e}")))?;
        let trust_domain = trust_domain_of(certs[1].contents())?;
        if !inter.is_ca() {
            return Err(bad("the first certificate is not a CA (a node's intermediate)".into()));
        }
        inter
            .verify_signature(Some(root.public_key()))
            .map_err(|e| bad(format!("the node certificate is not signed by the root in the bundle: {e}")))?;
        let prefix = format!("spiffe://{trust_domain}/node/");
        let node = uri_sans(&inter)
            .iter()
            .find_map(|u| u.strip_prefix(&prefix).map(str::to_string))
            .ok_or_else(|| bad(format!("the node certificate names no node ({prefix}<name>)")))?;
        check_name(&node, "node")?;
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        for (what, c) in [("the node certificate", &inter), ("the root certificate", &root)] {
            let v = c.validity();
            if v.not_before.timestamp() > now || v.not_after.timestamp() <= now {
                return Err(bad(format!("{what} is not valid now (valid {} to {})", v.not_before, v.not_after)));
            }
        }
        let key_pem = pem::encode(keys[0]);
        let key = KeyPair::from_pem(&key_pem).map_err(|e| bad(format!("the key: {e}")))?;
        if key.subject_public_key_info() != inter.public_key().raw {
            return Err(bad("the key is not the node certificate's".into()));
        }
        let cert_pem = pem::encode(certs[0]);
        let root_pem = pem::encode(certs[1]);
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)?;
        Ok(NodeIssuer {
            node,
            trust_domain,
            not_after: inter.validity().not_after.timestamp(),
            cert_pem,
            root_pem,
            bundle: bundle.to_string(),
            issuer,
        })
    }

    /// A leaf for workload `namespace/name` of this node, valid for `lifetime` (at most until
    /// the intermediate's own notAfter).
    pub fn issue_workload(&self, namespace: &str, name: &str, lifetime: Duration) -> Result<WorkloadCert, TrustError> {
        check_name(namespace, "namespace")?;
        check_name(name, "workload")?;
        let spiffe_id = workload_id(&self.trust_domain, namespace, name);
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, format!("{namespace}/{name}"));
        params.subject_alt_names = vec![uri(spiffe_id.clone())?];
        if namespace == l7mesh_identity::PROXY_NAMESPACE && name == l7mesh_identity::PROXY_NAME {
            // The node proxy's tunnel certificate: a DNS name of its node for the client's
            // name check (its SPIFFE ID and issuer are checked after).
            let dns = l7mesh_identity::node_server_name(&self.node);
            params
                .subject_alt_names
                .push(SanType::DnsName(dns.clone().try_into().map_err(|_| TrustError::BadName(dns, "node"))?));
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth, ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        let until = now + time::Duration::seconds(lifetime.as_secs() as i64);
        let cap = time::OffsetDateTime::from_unix_timestamp(self.not_after).unwrap_or(until);
        params.not_after = until.min(cap);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(WorkloadCert {
            chain_pem: format!("{}{}", cert.pem(), self.cert_pem),
            key_pem: key.serialize_pem(),
            root_pem: self.root_pem.clone(),
            spiffe_id,
        })
    }
}

fn private_dir(path: &Path) -> Result<(), TrustError> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::create_dir_all(path).map_err(io("creating", path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o700)).map_err(io("chmod 0700", path))
}

fn write_private(path: &Path, data: &[u8], mode: u32) -> Result<(), TrustError> {
    crate::ca::write_private(path, data, mode).map_err(|e| match e {
        crate::ca::CaError::Io { what, path, source } => TrustError::Io { what, path, source },
        other => TrustError::Bundle(other.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("l7mesh-trust-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn chain_der(chain_pem: &str) -> Vec<Vec<u8>> {
        pem::parse_many(chain_pem).unwrap().into_iter().map(|p| p.into_contents()).collect()
    }

    #[test]
    fn root_node_and_workload_chain_up_and_name_who_they_are() {
        let dir = tmp("chain");
        let root = init_root(&dir, "example.org", Duration::from_secs(86400 * 30)).unwrap();
        assert!(root.starts_with("-----BEGIN CERTIFICATE-----"));
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(fs::metadata(dir.join("root.key")).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(matches!(init_root(&dir, "example.org", Duration::from_secs(60)), Err(TrustError::RootExists(_))));
        let bundle = issue_node(&dir, "node-a", Duration::from_secs(86400)).unwrap();
        let issuer = NodeIssuer::from_bundle(&bundle).unwrap();
        assert_eq!((issuer.node.as_str(), issuer.trust_domain.as_str()), ("node-a", "example.org"));
        assert!(!format!("{issuer:?}").contains("PRIVATE"), "no key in Debug");
        let leaf = issuer.issue_workload("default", "client", Duration::from_secs(3600)).unwrap();
        assert_eq!(leaf.spiffe_id, "spiffe://example.org/ns/default/sa/client");
        let der = chain_der(&leaf.chain_pem);
        let refs: Vec<&[u8]> = der.iter().map(Vec::as_slice).collect();
        let root_der = pem::parse(&leaf.root_pem).unwrap().into_contents();
        let id = peer_identity(&refs, &root_der, "example.org").unwrap();
        assert_eq!((id.node.as_str(), id.namespace.as_str(), id.name.as_str()), ("node-a", "default", "client"));
        // The chain verifies: leaf by the intermediate, intermediate by the root.
        let (_, l) = X509Certificate::from_der(&der[0]).unwrap();
        let (_, i) = X509Certificate::from_der(&der[1]).unwrap();
        l.verify_signature(Some(i.public_key())).unwrap();
        // Another trust domain's reader refuses it; a leaf alone names no node.
        assert!(peer_identity(&refs, &root_der, "other.org").unwrap_err().contains("not of trust domain other.org"));
        assert!(peer_identity(&refs[..1], &root_der, "example.org").unwrap_err().contains("sent 1 certificates"));
        // Another node's intermediate after the leaf (a chain a verifier would still accept):
        // the node is never read from a certificate that did not sign the leaf.
        let other = NodeIssuer::from_bundle(&issue_node(&dir, "node-c", Duration::from_secs(86400)).unwrap()).unwrap();
        let other_inter = pem::parse(&other.cert_pem).unwrap().into_contents();
        let spoof: Vec<&[u8]> = vec![&der[0], &other_inter];
        let e = peer_identity(&spoof, &root_der, "example.org").unwrap_err();
        assert!(e.contains("chain is not leaf") || e.contains("not signed by the intermediate it sent"), "{e}");
        let three: Vec<&[u8]> = vec![&der[0], &other_inter, &der[1]];
        assert!(peer_identity(&three, &root_der, "example.org").unwrap_err().contains("sent 3 certificates"));
        // Under another root: refused.
        let dir2 = tmp("chain2");
        let root2 = init_root(&dir2, "example.org", Duration::from_secs(86400)).unwrap();
        let root2_der = pem::parse(&root2).unwrap().into_contents();
        assert!(peer_identity(&refs, &root2_der, "example.org").is_err());
        fs::remove_dir_all(&dir2).unwrap();
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_bundle_that_does_not_hold_together_is_refused_by_what_is_wrong() {
        let (a, b) = (tmp("a"), tmp("b"));
        init_root(&a, "cluster.local", Duration::from_secs(86400)).unwrap();
        init_root(&b, "cluster.local", Duration::from_secs(86400)).unwrap();
        let good = issue_node(&a, "n1", Duration::from_secs(86400)).unwrap();
        let other = issue_node(&b, "n1", Duration::from_secs(86400)).unwrap();
        let pems = |s: &str| pem::parse_many(s).unwrap();
        let (g, o) = (pems(&good), pems(&other));
        let join = |ps: &[&pem::Pem]| ps.iter().map(|p| pem::encode(p)).collect::<String>();
        let err = |bundle: String| NodeIssuer::from_bundle(&bundle).unwrap_err().to_string();
        // The intermediate of root a with root b: not signed by it.
        assert!(err(join(&[&g[0], &o[1], &g[2]])).contains("not signed by the root in the bundle"));
        // Another node's key.
        assert!(err(join(&[&g[0], &g[1], &o[2]])).contains("the key is not the node certificate's"));
        // Missing parts; the root first.
        assert!(err(join(&[&g[0], &g[2]])).contains("found 1 certificate(s) and 1 key(s)"));
        assert!(err(join(&[&g[1], &g[0], &g[2]])).contains("not a self-signed CA"));
        // Expired.
        let dir = tmp("short");
        init_root(&dir, "cluster.local", Duration::from_secs(86400)).unwrap();
        let expired = issue_node(&dir, "n2", Duration::from_secs(0)).unwrap();
        std::thread::sleep(Duration::from_millis(1100));
        assert!(err(expired).contains("is not valid now"));
        for d in [a, b, dir] {
            fs::remove_dir_all(&d).unwrap();
        }
        assert!(matches!(issue_node(&tmp("none"), "n", Duration::from_secs(1)), Err(TrustError::NoRoot(_))));
        assert!(matches!(check_trust_domain("Bad_Domain"), Err(TrustError::BadTrustDomain(_))));
    }

    #[test]
    fn a_leaf_never_outlives_its_intermediate_and_names_are_checked() {
        let dir = tmp("cap");
        init_root(&dir, "cluster.local", Duration::from_secs(86400)).unwrap();
        let issuer = NodeIssuer::from_bundle(&issue_node(&dir, "n", Duration::from_secs(600)).unwrap()).unwrap();
        let leaf = issuer.issue_workload("default", "w", Duration::from_secs(86400)).unwrap();
        let der = chain_der(&leaf.chain_pem);
        let (_, l) = X509Certificate::from_der(&der[0]).unwrap();
        assert!(l.validity().not_after.timestamp() <= issuer.not_after);
        assert!(issuer.issue_workload("default", "../x", Duration::from_secs(60)).is_err());
        assert!(issuer.issue_workload("Default", "w", Duration::from_secs(60)).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }
}
