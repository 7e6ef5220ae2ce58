//! Cluster identity. A cluster has a random id and its own certificate authority; every
//! process holds a certificate of that CA naming its cluster, its role and its name, and a
//! gateway's also names the volumes it may mount. The names travel as URIs in the
//! certificate's subject alternative names:
//!
//! - `elea://CLUSTER/ROLE/NAME`, one per certificate (ROLE: `meta`, `cache`, `gateway` or
//!   `admin`; a meta certificate's NAME is its node id);
//! - `elea://CLUSTER/volume/V`, one per volume a gateway may mount;
//! - `elea://CLUSTER/ca` on the CA itself.
//!
//! [`certs`] makes the CA and issues certificates (what `elea certs` runs); [`Identity`]
//! reads a certificate back; [`Credentials`] loads a process's CA, certificate and key and
//! checks that they belong together.

pub mod certs;
pub mod tls;
pub use rustls;

use std::fmt;
use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The URI scheme of Elea names in certificates.
const SCHEME: &str = "elea://";

/// Why a certificate, key or CA could not be made, read or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{0}")]
    Invalid(String),
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
}

impl AuthError {
    fn io(path: &Path, err: std::io::Error) -> Self {
        Self::Io { path: path.to_path_buf(), err }
    }
}

/// What a certificate lets its holder do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// A metadata node (a Raft voter or learner); its name is its node id.
    Meta,
    /// A cache node.
    Cache,
    /// A mount (or any client of file data): only the volumes its certificate names.
    Gateway,
    /// An operator: volumes, membership, certificates.
    Admin,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Meta, Role::Cache, Role::Gateway, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Meta => "meta",
            Role::Cache => "cache",
            Role::Gateway => "gateway",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = AuthError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| AuthError::Invalid(format!("unknown role {s:?} (meta, cache, gateway or admin)")))
    }
}

/// A cluster's id: 32 lowercase hex digits, random when the cluster's CA is made.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClusterId(String);

impl ClusterId {
    /// A new random id.
    pub fn random() -> Result<Self, AuthError> {
        let mut b = [0u8; 16];
        rustls::crypto::aws_lc_rs::default_provider()
            .secure_random
            .fill(&mut b)
            .map_err(|_| AuthError::Invalid("no secure random numbers".into()))?;
        Ok(Self(b.iter().map(|x| format!("{x:02x}")).collect()))
    }

    pub fn parse(s: &str) -> Result<Self, AuthError> {
        let s = s.trim();
        if s.len() == 32 && s.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)) {
            Ok(Self(s.to_string()))
        } else {
            Err(AuthError::Invalid(format!("{s:?} is not a cluster id (32 lowercase hex digits)")))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Who holds a certificate, as its names say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub cluster: ClusterId,
    pub role: Role,
    pub name: String,
    /// The volumes a gateway may mount (empty for other roles).
    pub volumes: Vec<String>,
}

impl Identity {
    /// Reads the Elea names of a certificate (DER).
    pub fn of(cert: &CertificateDer<'_>) -> Result<Self, AuthError> {
        let uris = elea_uris(cert)?;
        let mut cluster = None;
        let mut who = None;
        let mut volumes = Vec::new();
        for uri in uris {
            let rest = &uri[SCHEME.len()..];
            let mut parts = rest.splitn(3, '/');
            let (Some(c), Some(kind), name) = (parts.next(), parts.next(), parts.next()) else {
                return Err(AuthError::Invalid(format!("malformed name {uri:?} in the certificate")));
            };
            let c = ClusterId::parse(c)?;
            if cluster.get_or_insert_with(|| c.clone()) != &c {
                return Err(AuthError::Invalid("the certificate names two clusters".into()));
            }
            match (kind, name) {
                ("volume", Some(v)) if !v.is_empty() => volumes.push(v.to_string()),
                ("ca", None) => return Err(AuthError::Invalid("this is the CA's certificate".into())),
                (role, Some(name)) if !name.is_empty() => {
                    let role: Role = role.parse()?;
                    if who.replace((role, name.to_string())).is_some() {
                        return Err(AuthError::Invalid("the certificate names two holders".into()));
                    }
                }
                _ => return Err(AuthError::Invalid(format!("malformed name {uri:?} in the certificate"))),
            }
        }
        let (Some(cluster), Some((role, name))) = (cluster, who) else {
            return Err(AuthError::Invalid("not an Elea certificate (no elea:// names)".into()));
        };
        if role != Role::Gateway && !volumes.is_empty() {
            return Err(AuthError::Invalid(format!("a {role} certificate names volumes")));
        }
        Ok(Self { cluster, role, name, volumes })
    }

    /// Whether the holder may use volume `v` (a gateway only the volumes it names; `meta`,
    /// `cache` and `admin` any).
    pub fn may_use_volume(&self, v: &str) -> bool {
        self.role != Role::Gateway || self.volumes.iter().any(|x| x == v)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {:?} of cluster {}", self.role, self.name, self.cluster)?;
        if !self.volumes.is_empty() {
            write!(f, " (volumes {})", self.volumes.join(", "))?;
        }
        Ok(())
    }
}

/// The `elea://` URIs among a certificate's subject alternative names.
fn elea_uris(cert: &CertificateDer<'_>) -> Result<Vec<String>, AuthError> {
    let (_, x) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| AuthError::Invalid(format!("unreadable certificate: {e}")))?;
    let san = x
        .subject_alternative_name()
        .map_err(|e| AuthError::Invalid(format!("unreadable certificate names: {e}")))?;
    Ok(san
        .map(|s| {
            s.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(u) if u.starts_with(SCHEME) => {
                        Some(u.to_string())
                    }
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// The cluster id a CA certificate names.
pub fn ca_cluster(ca: &CertificateDer<'_>) -> Result<ClusterId, AuthError> {
    let uris = elea_uris(ca)?;
    let ca_uri = uris
        .iter()
        .find_map(|u| u[SCHEME.len()..].strip_suffix("/ca"))
        .ok_or_else(|| AuthError::Invalid("not an Elea cluster CA (no elea://CLUSTER/ca name)".into()))?;
    ClusterId::parse(ca_uri)
}

/// A process's credentials: its cluster's CA, its certificate and key, and who the
/// certificate says it is.
pub struct Credentials {
    pub ca: CertificateDer<'static>,
    pub cluster: ClusterId,
    pub cert: CertificateDer<'static>,
    pub key: PrivateKeyDer<'static>,
    pub identity: Identity,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials").field("identity", &self.identity).finish_non_exhaustive()
    }
}

impl Credentials {
    /// Loads PEM files and checks that they belong together: the CA is an Elea cluster CA,
    /// it signed the certificate, the certificate names the same cluster, and the key is the
    /// certificate's.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Self, AuthError> {
        let ca_der = read_cert(ca)?;
        let cert_der = read_cert(cert)?;
        let key_pem = std::fs::read_to_string(key).map_err(|e| AuthError::io(key, e))?;
        let key_der = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| AuthError::Invalid(format!("{}: not a private key in PEM ({e})", key.display())))?;
        Self::new(ca_der, cert_der, key_der).map_err(|e| {
            AuthError::Invalid(format!("{} with {} and {}: {e}", cert.display(), ca.display(), key.display()))
        })
    }

    /// See [`Credentials::load`].
    pub fn new(
        ca: CertificateDer<'static>,
        cert: CertificateDer<'static>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, AuthError> {
        let cluster = ca_cluster(&ca)?;
        let identity = Identity::of(&cert)?;
        if identity.cluster != cluster {
            return Err(AuthError::Invalid(format!(
                "the certificate is of cluster {}, the CA of cluster {cluster}",
                identity.cluster
            )));
        }
        let (_, ca_x) = x509_parser::parse_x509_certificate(ca.as_ref())
            .map_err(|e| AuthError::Invalid(format!("unreadable CA certificate: {e}")))?;
        let (_, cert_x) = x509_parser::parse_x509_certificate(cert.as_ref())
            .map_err(|e| AuthError::Invalid(format!("unreadable certificate: {e}")))?;
        cert_x
            .verify_signature(Some(ca_x.public_key()))
            .map_err(|_| AuthError::Invalid("the certificate was not issued by this CA".into()))?;
        let signing = rustls::crypto::aws_lc_rs::sign::any_supported_type(&key)
            .map_err(|e| AuthError::Invalid(format!("unusable private key: {e}")))?;
        let public = signing
            .public_key()
            .ok_or_else(|| AuthError::Invalid("unusable private key: no public key".into()))?;
        if public.as_ref() != cert_x.public_key().raw {
            return Err(AuthError::Invalid("the key is not the certificate's".into()));
        }
        Ok(Self { ca, cluster, cert, key, identity })
    }
}

/// The first certificate of a PEM file.
fn read_cert(path: &Path) -> Result<CertificateDer<'static>, AuthError> {
    let pem = std::fs::read(path).map_err(|e| AuthError::io(path, e))?;
    CertificateDer::from_pem_slice(&pem)
        .map_err(|e| AuthError::Invalid(format!("{}: not a certificate in PEM ({e})", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_and_cluster_ids_parse() {
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>().unwrap(), r);
        }
        assert!("root".parse::<Role>().is_err());
        let id = ClusterId::random().unwrap();
        assert_eq!(ClusterId::parse(id.as_str()).unwrap(), id);
        assert_ne!(ClusterId::random().unwrap(), id);
        for bad in ["", "abc", "0123456789ABCDEF0123456789abcdef", "0123456789abcdef0123456789abcdeg"] {
            assert!(ClusterId::parse(bad).is_err(), "{bad}");
        }
    }
}
