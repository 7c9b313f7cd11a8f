//! TLS for both ends of the uplink: mutual TLS 1.3 with the ring provider.
//!
//! Both configs are built with an explicit crypto provider, so no
//! process-wide default has to be installed and a second provider linked
//! in by another crate cannot make rustls panic. 0-RTT stays off: client
//! early data is replayable and server 0.5-RTT data runs before client
//! authentication.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

/// Keep-alive default: well below the idle timeout on both sides.
pub const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(5);
/// Idle timeout default.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{what}: no PEM {expected} found")]
    Empty {
        what: String,
        expected: &'static str,
    },
    #[error("{what}: invalid PEM: {source}")]
    Pem {
        what: String,
        source: std::io::Error,
    },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(String),
    #[error("QUIC crypto: {0}")]
    Quic(String),
    #[error("transport: {0}")]
    Transport(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Certificates in a PEM text; `what` names the source in errors.
pub fn certs_from_pem(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            what: what.to_string(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what: what.to_string(),
            expected: "certificate",
        });
    }
    Ok(certs)
}

/// The first private key in a PEM text.
pub fn key_from_pem(pem: &[u8], what: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    rustls_pemfile::private_key(&mut &pem[..])
        .map_err(|source| TlsError::Pem {
            what: what.to_string(),
            source,
        })?
        .ok_or_else(|| TlsError::Empty {
            what: what.to_string(),
            expected: "private key",
        })
}

fn roots(ca: &[CertificateDer<'static>]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in ca {
        roots.add(cert.clone())?;
    }
    Ok(roots)
}

fn transport(
    keep_alive: Duration,
    idle: Duration,
) -> Result<Arc<quinn::TransportConfig>, TlsError> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(keep_alive));
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(idle).map_err(|e| TlsError::Transport(e.to_string()))?,
    ));
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(256));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    Ok(Arc::new(t))
}

/// The central side: our certificate, and client certificates required and
/// verified against `client_ca`.
pub fn server_config_pem(
    cert: &[u8],
    key: &[u8],
    client_ca: &[u8],
) -> Result<quinn::ServerConfig, TlsError> {
    let certs = certs_from_pem(cert, "server certificate")?;
    let key = key_from_pem(key, "server key")?;
    let ca = certs_from_pem(client_ca, "client CA")?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(&ca)?), provider())
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)?;
    tls.alpn_protocols = vec![touchline_proto::ALPN.to_vec()];
    tls.max_early_data_size = 0;
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport(DEFAULT_KEEP_ALIVE, DEFAULT_IDLE_TIMEOUT)?);
    Ok(config)
}

/// [`server_config_pem`] from files.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: &Path,
) -> Result<quinn::ServerConfig, TlsError> {
    server_config_pem(&read(cert)?, &read(key)?, &read(client_ca)?)
}

/// The site side: trusts `ca` for the central certificate and presents its
/// own certificate.
pub fn client_config_pem(
    ca: &[u8],
    cert: &[u8],
    key: &[u8],
    keep_alive: Duration,
    idle_timeout: Duration,
) -> Result<quinn::ClientConfig, TlsError> {
    let ca = certs_from_pem(ca, "central CA")?;
    let certs = certs_from_pem(cert, "site certificate")?;
    let key = key_from_pem(key, "site key")?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(&ca)?)
        .with_client_auth_cert(certs, key)?;
    tls.alpn_protocols = vec![touchline_proto::ALPN.to_vec()];
    tls.enable_early_data = false;
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport(keep_alive, idle_timeout)?);
    Ok(config)
}

/// [`client_config_pem`] from files.
pub fn client_config(
    ca: &Path,
    cert: &Path,
    key: &Path,
    keep_alive: Duration,
    idle_timeout: Duration,
) -> Result<quinn::ClientConfig, TlsError> {
    client_config_pem(
        &read(ca)?,
        &read(cert)?,
        &read(key)?,
        keep_alive,
        idle_timeout,
    )
}

/// The site id a verified client certificate names: its first DNS subject
/// alternative name. `None` when the connection has no usable certificate.
pub fn site_of(conn: &quinn::Connection) -> Option<String> {
    let identity = conn.peer_identity()?;
    let chain = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    let leaf = chain.first()?;
    let cert = webpki::EndEntityCert::try_from(leaf).ok()?;
    let name = cert.valid_dns_names().next().map(str::to_string);
    name
}
