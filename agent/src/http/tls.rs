//! TLS on the control port (rustls): the agent's certificate and, optionally, client
//! certificates required and checked against a CA — so that only management nodes holding a
//! certificate from that CA can drive the host.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("server.tls: cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("server.tls: {path} holds no {what} in PEM form")]
    Empty { path: PathBuf, what: &'static str },
    #[error("server.tls: {what} is not usable: {reason}")]
    Rejected { what: &'static str, reason: String },
}

fn pem(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { path: path.to_owned(), source })
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = pem(path)?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut bytes.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|source| TlsError::Read { path: path.to_owned(), source })?;
    if certs.is_empty() {
        return Err(TlsError::Empty { path: path.to_owned(), what: "certificate" });
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = pem(path)?;
    rustls_pemfile::private_key(&mut bytes.as_slice())
        .map_err(|source| TlsError::Read { path: path.to_owned(), source })?
        .ok_or_else(|| TlsError::Empty { path: path.to_owned(), what: "private key" })
}

/// The acceptor for `config`; every file problem is reported with the file named.
pub fn acceptor(config: &TlsConfig) -> Result<TlsAcceptor, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rejected { what: "the protocol versions", reason: e.to_string() })?;
    let builder = match &config.client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in certificates(ca)? {
                roots.add(c).map_err(|e| TlsError::Rejected { what: "the client CA", reason: e.to_string() })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError::Rejected { what: "the client CA", reason: e.to_string() })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let server = builder
        .with_single_cert(certificates(&config.cert)?, private_key(&config.key)?)
        .map_err(|e| TlsError::Rejected { what: "the certificate and key", reason: e.to_string() })?;
    Ok(TlsAcceptor::from(Arc::new(server)))
}

/// How `kvmagent call` trusts an agent serving TLS.
pub enum Trust<'a> {
    /// Certificates signed by the CA(s) in this PEM file (`--ca`).
    Ca(&'a Path),
    /// Exactly the agent's own certificate (the first in its `server.tls.cert`): the command
    /// line runs on the agent's host and reads the same file, so no CA needs to vouch for it.
    Pinned(&'a Path),
}

/// The certificate (PEM chain) and key a client presents to an agent that asks for one
/// (`server.tls.client_ca`).
pub struct ClientCert<'a> {
    pub cert: &'a Path,
    pub key: &'a Path,
}

/// A TLS client for `kvmagent call`, presenting `client` when given.
pub fn connector(trust: Trust<'_>, client: Option<ClientCert<'_>>) -> Result<tokio_rustls::TlsConnector, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rejected { what: "the protocol versions", reason: e.to_string() })?;
    let builder = match trust {
        Trust::Ca(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in certificates(ca)? {
                roots.add(c).map_err(|e| TlsError::Rejected { what: "the CA", reason: e.to_string() })?;
            }
            builder.with_root_certificates(roots)
        }
        Trust::Pinned(cert) => {
            let pinned = certificates(cert)?.swap_remove(0);
            let verifier = Arc::new(PinnedCert { cert: pinned, provider });
            builder.dangerous().with_custom_certificate_verifier(verifier)
        }
    };
    let config = match client {
        None => builder.with_no_client_auth(),
        Some(c) => builder
            .with_client_auth_cert(certificates(c.cert)?, private_key(c.key)?)
            .map_err(|e| TlsError::Rejected { what: "the client certificate and key", reason: e.to_string() })?,
    };
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// Accepts only the one certificate (signatures are still checked, against its key).
#[derive(Debug)]
struct PinnedCert {
    cert: CertificateDer<'static>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.cert.as_ref() {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General("the agent's certificate is not the one in its server.tls.cert".into()))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_empty_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let missing = dir.path().join("missing.pem");
        let config = |cert: &Path| TlsConfig { cert: cert.to_owned(), key: empty.clone(), client_ca: None };
        let e = acceptor(&config(&missing)).err().unwrap().to_string();
        assert!(e.contains("missing.pem"), "{e}");
        let e = acceptor(&config(&empty)).err().unwrap().to_string();
        assert!(e.contains("empty.pem") && e.contains("no certificate"), "{e}");
    }
}
