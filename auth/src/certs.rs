//! Making a cluster's CA and issuing its certificates (`elea certs init` and `elea certs
//! issue`). Keys are ECDSA P-256; every certificate may be used as a TLS client and server
//! (every node is both); a CA is valid for ten years, a certificate for as long as asked.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};

use crate::{AuthError, ClusterId, Identity, Role, SCHEME};

/// The CA certificate, in a cluster's certificate directory.
pub const CA_CERT: &str = "ca.pem";
/// The CA's private key (mode 0600).
pub const CA_KEY: &str = "ca.key";
/// The cluster id, as text.
pub const CLUSTER_ID: &str = "cluster-id";
/// How long a CA is valid.
const CA_DAYS: i64 = 3650;

/// Makes a new cluster in `dir` (created if missing): a random cluster id and a CA, written
/// as [`CA_CERT`], [`CA_KEY`] and [`CLUSTER_ID`]. Refuses to touch a directory that already
/// holds a CA key: replacing it would lock every node out.
pub fn init(dir: &Path) -> Result<ClusterId, AuthError> {
    std::fs::create_dir_all(dir).map_err(|e| AuthError::io(dir, e))?;
    let key_path = dir.join(CA_KEY);
    if key_path.exists() {
        return Err(AuthError::Invalid(format!(
            "{} already exists: this directory already holds a cluster's CA",
            key_path.display()
        )));
    }
    let cluster = ClusterId::random()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::OrganizationName, "Elea");
    params.distinguished_name.push(DnType::CommonName, format!("Elea cluster {cluster}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.subject_alt_names = vec![uri(&format!("{SCHEME}{cluster}/ca"))?];
    params.serial_number = Some(serial()?);
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(CA_DAYS);
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    write(&key_path, key.serialize_pem().as_bytes(), true)?;
    write(&dir.join(CA_CERT), cert.pem().as_bytes(), false)?;
    write(&dir.join(CLUSTER_ID), format!("{cluster}\n").as_bytes(), false)?;
    Ok(cluster)
}

/// What to issue.
#[derive(Debug, Clone)]
pub struct Request {
    pub role: Role,
    /// The holder's name: a meta node's id, a cache node's or a host's name, an operator's.
    pub name: String,
    /// The volumes a gateway may mount (at least one; none for other roles).
    pub volumes: Vec<String>,
    /// How long the certificate is valid.
    pub days: u32,
}

/// Issues a certificate with the CA in `dir`; writes `PREFIX.pem` and `PREFIX.key` (mode
/// 0600) and returns the identity it names.
pub fn issue(dir: &Path, req: &Request, prefix: &Path) -> Result<Identity, AuthError> {
    check_name("name", &req.name)?;
    match req.role {
        Role::Meta if req.name.parse::<u64>().map_or(true, |id| id == 0) => {
            return Err(AuthError::Invalid(format!(
                "a meta certificate's name is its node id (a positive integer), not {:?}",
                req.name
            )));
        }
        Role::Gateway if req.volumes.is_empty() => {
            return Err(AuthError::Invalid(
                "a gateway certificate names the volumes it may mount (--volume V, repeatable)".into(),
            ));
        }
        r if r != Role::Gateway && !req.volumes.is_empty() => {
            return Err(AuthError::Invalid(format!("only gateway certificates name volumes, not {r} ones")));
        }
        _ => {}
    }
    for v in &req.volumes {
        check_name("volume", v)?;
    }
    if req.days == 0 {
        return Err(AuthError::Invalid("a certificate must be valid for at least a day".into()));
    }
    let ca_path = dir.join(CA_CERT);
    let ca_pem = std::fs::read_to_string(&ca_path).map_err(|e| AuthError::io(&ca_path, e))?;
    let key_path = dir.join(CA_KEY);
    let ca_key_pem = std::fs::read_to_string(&key_path).map_err(|e| AuthError::io(&key_path, e))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem)?;
    let ca_der = rustls::pki_types::CertificateDer::from(
        pem_der(&ca_pem)
            .ok_or_else(|| AuthError::Invalid(format!("{}: no certificate", ca_path.display())))?,
    );
    let cluster = crate::ca_cluster(&ca_der)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;

    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::OrganizationName, "Elea");
    params.distinguished_name.push(DnType::OrganizationalUnitName, req.role.as_str());
    params.distinguished_name.push(DnType::CommonName, req.name.clone());
    let mut sans = vec![uri(&format!("{SCHEME}{cluster}/{}/{}", req.role, req.name))?];
    for v in &req.volumes {
        sans.push(uri(&format!("{SCHEME}{cluster}/volume/{v}"))?);
    }
    params.subject_alt_names = sans;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages =
        vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(serial()?);
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(i64::from(req.days));
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    let identity = Identity::of(cert.der())?;
    write(&with_ext(prefix, "key"), key.serialize_pem().as_bytes(), true)?;
    write(&with_ext(prefix, "pem"), cert.pem().as_bytes(), false)?;
    Ok(identity)
}

/// `PREFIX.ext` (the prefix may itself contain dots).
pub fn with_ext(prefix: &Path, ext: &str) -> PathBuf {
    let mut s = prefix.as_os_str().to_owned();
    s.push(".");
    s.push(ext);
    PathBuf::from(s)
}

/// Names go into `elea://` URIs: no slashes, no spaces or controls, not empty, not too long.
fn check_name(what: &str, s: &str) -> Result<(), AuthError> {
    let ok = !s.is_empty()
        && s.len() <= 200
        && s.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b'@' | b':'));
    if ok {
        Ok(())
    } else {
        Err(AuthError::Invalid(format!("bad {what} {s:?}: use letters, digits and - _ . @ : (at most 200)")))
    }
}

fn uri(s: &str) -> Result<SanType, AuthError> {
    Ok(SanType::URI(s.try_into()?))
}

/// A random positive 128-bit serial number.
fn serial() -> Result<SerialNumber, AuthError> {
    let mut b = [0u8; 16];
    rustls::crypto::aws_lc_rs::default_provider()
        .secure_random
        .fill(&mut b)
        .map_err(|_| AuthError::Invalid("no secure random numbers".into()))?;
    b[0] &= 0x7f;
    b[0] |= 0x01;
    Ok(SerialNumber::from_slice(&b))
}

/// The DER bytes of the first PEM block.
fn pem_der(pem: &str) -> Option<Vec<u8>> {
    use rustls::pki_types::pem::PemObject as _;
    rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).ok().map(|c| c.to_vec())
}

/// Writes a file whole (private ones readable by their owner only), refusing to replace one.
fn write(path: &Path, data: &[u8], private: bool) -> Result<(), AuthError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(path)
        .map_err(|e| AuthError::io(path, e))?;
    f.write_all(data).and_then(|()| f.sync_all()).map_err(|e| AuthError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Credentials;

    fn req(role: Role, name: &str, volumes: &[&str]) -> Request {
        Request {
            role,
            name: name.into(),
            volumes: volumes.iter().map(|v| v.to_string()).collect(),
            days: 30,
        }
    }

    #[test]
    fn a_cluster_issues_certificates_that_name_their_holder() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("certs");
        let cluster = init(&dir).unwrap();
        assert_eq!(std::fs::read_to_string(dir.join(CLUSTER_ID)).unwrap().trim(), cluster.as_str());
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(std::fs::metadata(dir.join(CA_KEY)).unwrap().permissions().mode() & 0o777, 0o600);
        // A second init in the same directory would lock every node out.
        assert!(init(&dir).unwrap_err().to_string().contains("already holds"));

        let cases = [
            (req(Role::Meta, "3", &[]), "m3"),
            (req(Role::Cache, "cache-a.dc1", &[]), "c"),
            (req(Role::Gateway, "host7", &["vol1", "vol2"]), "g"),
            (req(Role::Admin, "ops@example", &[]), "a"),
        ];
        for (r, file) in cases {
            let prefix = d.path().join(file);
            let id = issue(&dir, &r, &prefix).unwrap();
            assert_eq!((id.role, id.name.as_str(), &id.cluster), (r.role, r.name.as_str(), &cluster));
            assert_eq!(id.volumes, r.volumes);
            let creds =
                Credentials::load(&dir.join(CA_CERT), &with_ext(&prefix, "pem"), &with_ext(&prefix, "key"))
                    .unwrap();
            assert_eq!(creds.identity, id);
            assert_eq!(creds.cluster, cluster);
            assert_eq!(
                std::fs::metadata(with_ext(&prefix, "key")).unwrap().permissions().mode() & 0o777,
                0o600
            );
            // Issuing over existing files is refused.
            assert!(issue(&dir, &r, &prefix).is_err());
        }
        let g =
            Identity::of(&pem_der(&std::fs::read_to_string(d.path().join("g.pem")).unwrap()).unwrap().into())
                .unwrap();
        assert!(g.may_use_volume("vol2") && !g.may_use_volume("vol3"));
    }

    #[test]
    fn bad_requests_are_refused_with_reasons() {
        let d = tempfile::tempdir().unwrap();
        init(d.path()).unwrap();
        let out = d.path().join("x");
        for (r, want) in [
            (req(Role::Meta, "meta1", &[]), "node id"),
            (req(Role::Meta, "0", &[]), "node id"),
            (req(Role::Gateway, "h", &[]), "names the volumes"),
            (req(Role::Cache, "c", &["v"]), "only gateway"),
            (req(Role::Admin, "a/b", &[]), "bad name"),
            (req(Role::Gateway, "h", &["v/w"]), "bad volume"),
            (Request { days: 0, ..req(Role::Admin, "a", &[]) }, "at least a day"),
        ] {
            let e = issue(d.path(), &r, &out).unwrap_err().to_string();
            assert!(e.contains(want), "{r:?}: {e}");
        }
        // No CA here.
        let e = issue(&d.path().join("none"), &req(Role::Admin, "a", &[]), &out).unwrap_err().to_string();
        assert!(e.contains(CA_CERT), "{e}");
    }

    #[test]
    fn credentials_from_another_cluster_or_key_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        init(&a).unwrap();
        init(&b).unwrap();
        issue(&a, &req(Role::Cache, "c1", &[]), &d.path().join("c1")).unwrap();
        issue(&b, &req(Role::Cache, "c2", &[]), &d.path().join("c2")).unwrap();
        let p = |n: &str| d.path().join(n);
        // A certificate of cluster a with b's CA.
        let e = Credentials::load(&b.join(CA_CERT), &p("c1.pem"), &p("c1.key")).unwrap_err().to_string();
        assert!(e.contains("cluster"), "{e}");
        // The right CA, the wrong key.
        let e = Credentials::load(&a.join(CA_CERT), &p("c1.pem"), &p("c2.key")).unwrap_err().to_string();
        assert!(e.contains("not the certificate's"), "{e}");
        // A CA that is not an Elea CA: a plain certificate in its place.
        let e = Credentials::load(&p("c2.pem"), &p("c1.pem"), &p("c1.key")).unwrap_err().to_string();
        assert!(e.contains("not an Elea cluster CA"), "{e}");
        // Files that are not PEM.
        std::fs::write(p("junk"), b"junk").unwrap();
        assert!(Credentials::load(&p("junk"), &p("c1.pem"), &p("c1.key")).is_err());
        assert!(Credentials::load(&a.join(CA_CERT), &p("c1.pem"), &p("junk")).is_err());
    }
}
