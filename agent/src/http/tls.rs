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

/// A client trusting the certificates in `ca` (the agent's own certificate, or its CA): what
/// `kvmagent call` uses to reach an agent serving TLS.
pub fn connector(ca: &Path) -> Result<tokio_rustls::TlsConnector, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certificates(ca)? {
        roots.add(c).map_err(|e| TlsError::Rejected { what: "the trusted certificate", reason: e.to_string() })?;
    }
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rejected { what: "the protocol versions", reason: e.to_string() })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(client)))
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
