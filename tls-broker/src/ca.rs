//! The mesh CA and the secret store, on disk with restrictive modes.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum CaError {
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("`{0}` is not a DNS name or IP address")]
    BadName(String),
    #[error("secret {0} not found")]
    NoSecret(String),
    #[error("`{0}` is not a valid secret or namespace name")]
    BadSecretName(String),
    #[error("cluster trust: {0}")]
    Trust(String),
    #[error("no node intermediate is installed (`l7ctl ca issue-node NAME` where the cluster root is kept, then `l7ctl ca install-node FILE` on this node)")]
    NoNodeIssuer,
}

/// The installed node intermediate, if any. One that no longer reads (expired, say) is an
/// error at start: the broker says why rather than serve without it.
fn load_node_issuer(dir: &Path) -> Result<Option<std::sync::Arc<crate::trust::NodeIssuer>>, CaError> {
    let path = dir.join("cluster").join("node.pem");
    if !path.exists() {
        return Ok(None);
    }
    let bundle = fs::read_to_string(&path).map_err(io("reading", &path))?;
    match crate::trust::NodeIssuer::from_bundle(&bundle) {
        Ok(i) => Ok(Some(std::sync::Arc::new(i))),
        Err(e) => {
            // Kept on disk for the operator; the node serves no workload identity until a
            // good bundle is installed.
            tracing::error!(path = %path.display(), error = %e, "the installed node intermediate does not read; install a new one (`l7ctl ca install-node`)");
            Ok(None)
        }
    }
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> CaError + 'a {
    move |source| CaError::Io { what, path: path.to_path_buf(), source }
}

/// Writes `data` to `path` with `mode`, atomically (temp file + rename).
pub(crate) fn write_private(path: &Path, data: &[u8], mode: u32) -> Result<(), CaError> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io("writing", &tmp))?;
    f.write_all(data).map_err(io("writing", &tmp))?;
    f.sync_all().map_err(io("syncing", &tmp))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).map_err(io("chmod", &tmp))?;
    fs::rename(&tmp, path).map_err(io("renaming", path))
}

fn private_dir(path: &Path) -> Result<(), CaError> {
    fs::create_dir_all(path).map_err(io("creating", path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o700)).map_err(io("chmod 0700", path))
}

/// The CA's subject and constraints (the same on every start).
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, "l7mesh mesh CA");
    params.distinguished_name.push(DnType::OrganizationName, "l7mesh");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params
}

/// An imported secret's parts (PEM); any may be absent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Secret {
    pub cert: Option<String>,
    pub key: Option<String>,
    pub ca: Option<String>,
}

/// A leaf certificate and its key, PEM.
#[derive(Clone, Debug)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
}

pub struct Ca {
    dir: PathBuf,
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
    leaf_lifetime: Duration,
    /// This node's intermediate of the cluster's trust, once installed (`cluster/node.pem`).
    node_issuer: std::sync::RwLock<Option<std::sync::Arc<crate::trust::NodeIssuer>>>,
}

/// Default lifetime of issued leaf certificates; the proxy renews before expiry.
pub const LEAF_LIFETIME: Duration = Duration::from_secs(24 * 3600);

impl Ca {
    /// Loads the CA from `dir`, or generates one there on first start.
    pub fn open(dir: &Path) -> Result<Self, CaError> {
        private_dir(dir)?;
        let key_path = dir.join("ca.key");
        let cert_path = dir.join("ca.crt");
        if key_path.exists() && cert_path.exists() {
            let key_pem = fs::read_to_string(&key_path).map_err(io("reading", &key_path))?;
            let cert_pem = fs::read_to_string(&cert_path).map_err(io("reading", &cert_path))?;
            let key = KeyPair::from_pem(&key_pem)?;
            // The issuer is the stored key under the same subject: what it signs verifies
            // against the stored certificate.
            let issuer = Issuer::new(ca_params(), key);
            let node_issuer = std::sync::RwLock::new(load_node_issuer(dir)?);
            return Ok(Ca { dir: dir.to_path_buf(), cert_pem, issuer, leaf_lifetime: LEAF_LIFETIME, node_issuer });
        }
        let key = KeyPair::generate()?;
        let mut params = ca_params();
        params.not_before = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
        params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(3650);
        let cert = params.self_signed(&key)?;
        write_private(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
        write_private(&cert_path, cert.pem().as_bytes(), 0o644)?;
        let issuer = Issuer::new(params, key);
        let node_issuer = std::sync::RwLock::new(load_node_issuer(dir)?);
        Ok(Ca { dir: dir.to_path_buf(), cert_pem: cert.pem(), issuer, leaf_lifetime: LEAF_LIFETIME, node_issuer })
    }

    /// This node's intermediate of the cluster's trust, if one is installed.
    pub fn node_issuer(&self) -> Option<std::sync::Arc<crate::trust::NodeIssuer>> {
        self.node_issuer.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Installs `bundle` as this node's intermediate (checked whole first), replacing the one
    /// installed: a rotation, which must keep the root and the node. Leaves issued from now on
    /// chain to it; those issued before still verify under the same root until they expire.
    pub fn install_node_issuer(&self, bundle: &str) -> Result<std::sync::Arc<crate::trust::NodeIssuer>, CaError> {
        let new = crate::trust::NodeIssuer::from_bundle(bundle).map_err(|e| CaError::Trust(e.to_string()))?;
        let mut slot = self.node_issuer.write().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = slot.as_ref() {
            if old.root_pem != new.root_pem {
                return Err(CaError::Trust(format!(
                    "this node trusts another cluster root (trust domain {}); a bundle under a different root is refused (nothing was changed)",
                    old.trust_domain
                )));
            }
            if old.node != new.node {
                return Err(CaError::Trust(format!(
                    "this node's broker holds node {}'s intermediate; a bundle for node {} is refused (nothing was changed)",
                    old.node, new.node
                )));
            }
        }
        let cluster = self.dir.join("cluster");
        private_dir(&cluster)?;
        write_private(&cluster.join("node.pem"), new.bundle.as_bytes(), 0o600)?;
        let new = std::sync::Arc::new(new);
        *slot = Some(new.clone());
        Ok(new)
    }

    /// A workload's certificate chain from this node's intermediate.
    pub fn issue_workload(&self, namespace: &str, name: &str) -> Result<crate::trust::WorkloadCert, CaError> {
        let issuer = self.node_issuer().ok_or(CaError::NoNodeIssuer)?;
        issuer.issue_workload(namespace, name, self.leaf_lifetime).map_err(|e| CaError::Trust(e.to_string()))
    }

    /// Issues leaves that live `lifetime` from now on.
    pub fn with_leaf_lifetime(mut self, lifetime: Duration) -> Self {
        self.leaf_lifetime = lifetime;
        self
    }

    /// The CA certificate (PEM): what workloads may trust.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A server certificate for DNS names and/or IP addresses (termination, interception).
    pub fn issue_server(&self, names: &[String]) -> Result<Issued, CaError> {
        self.issue(names, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate for an identity (mTLS origination).
    pub fn issue_client(&self, identity: &str) -> Result<Issued, CaError> {
        self.issue(&[identity.to_string()], ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn issue(&self, names: &[String], usage: ExtendedKeyUsagePurpose) -> Result<Issued, CaError> {
        let mut params = CertificateParams::default();
        let mut sans = Vec::new();
        for n in names {
            sans.push(match n.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) if is_dns_name(n) => {
                    SanType::DnsName(n.clone().try_into().map_err(|_| CaError::BadName(n.clone()))?)
                }
                Err(_) => return Err(CaError::BadName(n.clone())),
            });
        }
        params.subject_alt_names = sans;
        params.distinguished_name.push(DnType::CommonName, names.first().cloned().unwrap_or_default());
        params.extended_key_usages = vec![usage];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + time::Duration::seconds(self.leaf_lifetime.as_secs() as i64);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem(), ca_pem: self.cert_pem.clone() })
    }

    fn secret_dir(&self, namespace: &str, name: &str) -> Result<PathBuf, CaError> {
        for part in [namespace, name] {
            if part.is_empty()
                || !part.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
                || part.starts_with('.')
            {
                return Err(CaError::BadSecretName(part.to_string()));
            }
        }
        Ok(self.dir.join("secrets").join(namespace).join(name))
    }

    /// Stores an imported secret (any part may be absent: a CA alone is a trust anchor).
    pub fn import(
        &self,
        namespace: &str,
        name: &str,
        cert: Option<&str>,
        key: Option<&str>,
        ca: Option<&str>,
    ) -> Result<(), CaError> {
        let dir = self.secret_dir(namespace, name)?;
        private_dir(&self.dir.join("secrets"))?;
        private_dir(dir.parent().unwrap_or(&dir))?;
        private_dir(&dir)?;
        for (file, data) in [("tls.crt", cert), ("tls.key", key), ("ca.crt", ca)] {
            let path = dir.join(file);
            match data {
                Some(d) => write_private(&path, d.as_bytes(), 0o600)?,
                None => {
                    let _ = fs::remove_file(&path);
                }
            }
        }
        Ok(())
    }

    /// An imported secret's parts.
    pub fn secret(&self, namespace: &str, name: &str) -> Result<Secret, CaError> {
        let dir = self.secret_dir(namespace, name)?;
        if !dir.exists() {
            return Err(CaError::NoSecret(format!("{namespace}/{name}")));
        }
        let read = |f: &str| fs::read_to_string(dir.join(f)).ok();
        Ok(Secret { cert: read("tls.crt"), key: read("tls.key"), ca: read("ca.crt") })
    }
}

fn is_dns_name(s: &str) -> bool {
    let s = s.strip_prefix("*.").unwrap_or(s);
    !s.is_empty()
        && s.len() <= 253
        && s.split('.')
            .all(|l| !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_is_generated_once_with_private_modes_and_issues_leaves() {
        let dir = std::env::temp_dir().join(format!("l7mesh-ca-test-{}", std::process::id()));
        let ca = Ca::open(&dir).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("ca.key")), 0o600);
        let again = Ca::open(&dir).unwrap();
        assert_eq!(ca.cert_pem(), again.cert_pem(), "the CA is kept across restarts");
        let leaf = again.issue_server(&["deathstar.default".into(), "127.0.0.1".into()]).unwrap();
        assert!(leaf.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(leaf.key_pem.contains("PRIVATE KEY"));
        assert!(matches!(again.issue_server(&["bad name!".into()]), Err(CaError::BadName(_))));
        again.import("default", "web", Some("CERT"), Some("KEY"), None).unwrap();
        assert_eq!(mode(&dir.join("secrets/default/web/tls.key")), 0o600);
        assert_eq!(
            again.secret("default", "web").unwrap(),
            Secret { cert: Some("CERT".into()), key: Some("KEY".into()), ca: None }
        );
        assert!(matches!(again.secret("default", "../etc"), Err(CaError::BadSecretName(_))));
        fs::remove_dir_all(&dir).unwrap();
    }
}
