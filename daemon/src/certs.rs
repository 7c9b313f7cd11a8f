//! `touchline certs`: a development PKI, so mutual TLS is one command away.
//!
//! It writes a CA, a central server certificate and one client certificate
//! per site. A site certificate names the site in its first DNS subject
//! alternative name (and its common name); that is where the central side
//! reads the site id from. Production sites use their operator's PKI with
//! the same convention.

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("invalid site id `{0}`: use letters, digits, '.', '_' or '-'")]
    SiteId(String),
    #[error("cannot generate a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

/// A development PKI in memory (PEM text).
pub struct DevPki {
    pub ca_pem: String,
    pub ca_key_pem: String,
    pub central_cert_pem: String,
    pub central_key_pem: String,
    /// (site id, certificate PEM, key PEM)
    pub sites: Vec<(String, String, String)>,
}

fn valid_site_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Generates a CA, a central certificate valid for `central_names`
/// (default `localhost` and `127.0.0.1`) and a client certificate per site.
pub fn generate_dev_pki(sites: &[String], central_names: &[String]) -> Result<DevPki, CertError> {
    for site in sites {
        if !valid_site_id(site) {
            return Err(CertError::SiteId(site.clone()));
        }
    }
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca_params.distinguished_name = name("Touchline development CA");
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, &ca_key);

    let names: Vec<String> = if central_names.is_empty() {
        vec!["localhost".into(), "127.0.0.1".into()]
    } else {
        central_names.to_vec()
    };
    let central_key = KeyPair::generate()?;
    let mut central_params = CertificateParams::new(names)?;
    central_params.distinguished_name = name("touchline-central");
    central_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    central_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let central_cert = central_params.signed_by(&central_key, &issuer)?;

    let mut out = Vec::new();
    for site in sites {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![site.clone()])?;
        params.distinguished_name = name(site);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let cert = params.signed_by(&key, &issuer)?;
        out.push((site.clone(), cert.pem(), key.serialize_pem()));
    }
    Ok(DevPki {
        ca_pem: ca_cert.pem(),
        ca_key_pem: ca_key.serialize_pem(),
        central_cert_pem: central_cert.pem(),
        central_key_pem: central_key.serialize_pem(),
        sites: out,
    })
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

/// Writes `ca.pem`, `ca.key`, `central.pem`, `central.key` and
/// `<site>.pem`, `<site>.key` per site into `out`; keys get mode 0600.
pub fn write_dev_certs(
    out: &Path,
    sites: &[String],
    central_names: &[String],
) -> Result<(), CertError> {
    let pki = generate_dev_pki(sites, central_names)?;
    std::fs::create_dir_all(out).map_err(|source| CertError::Write {
        path: out.display().to_string(),
        source,
    })?;
    write(out, "ca.pem", &pki.ca_pem, false)?;
    write(out, "ca.key", &pki.ca_key_pem, true)?;
    write(out, "central.pem", &pki.central_cert_pem, false)?;
    write(out, "central.key", &pki.central_key_pem, true)?;
    for (site, cert, key) in &pki.sites {
        write(out, &format!("{site}.pem"), cert, false)?;
        write(out, &format!("{site}.key"), key, true)?;
    }
    Ok(())
}

fn write(dir: &Path, file: &str, text: &str, secret: bool) -> Result<(), CertError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(file);
    let err = |source| CertError::Write {
        path: path.display().to_string(),
        source,
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    options.mode(if secret { 0o600 } else { 0o644 });
    let mut f = options.open(&path).map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)
}
