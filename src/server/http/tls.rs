//! TLS for the HTTP port with the gRPC port's certificate, key and client CA
//! (`server.tls`), so that bearer tokens sent to it never travel in clear
//! when the gRPC port is protected.

use std::{path::Path, sync::Arc};

use rustls::{
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    server::WebPkiClientVerifier,
    RootCertStore, ServerConfig,
};
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;

#[derive(Debug, thiserror::Error)]
#[error("TLS for the HTTP port: {0}")]
pub struct HttpTlsError(String);

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, HttpTlsError> {
    let read = |err: rustls::pki_types::pem::Error| {
        HttpTlsError(format!(
            "cannot read certificates from {}: {err}",
            path.display()
        ))
    };
    let certificates = CertificateDer::pem_file_iter(path)
        .map_err(read)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(read)?;
    if certificates.is_empty() {
        return Err(HttpTlsError(format!(
            "{} holds no certificate",
            path.display()
        )));
    }
    Ok(certificates)
}

/// The acceptor for `tls`: HTTP/1.1 only, client certificates required when
/// a client CA is set, as on the gRPC port.
pub fn acceptor(tls: &TlsConfig) -> Result<TlsAcceptor, HttpTlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let key = PrivateKeyDer::from_pem_file(&tls.key_file).map_err(|err| {
        HttpTlsError(format!(
            "cannot read the key {}: {err}",
            tls.key_file.display()
        ))
    })?;
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|err| HttpTlsError(err.to_string()))?;
    let builder = match &tls.client_ca_file {
        Some(ca_file) => {
            let mut roots = RootCertStore::empty();
            for certificate in certificates(ca_file)? {
                roots
                    .add(certificate)
                    .map_err(|err| HttpTlsError(format!("{}: {err}", ca_file.display())))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|err| HttpTlsError(err.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certificates(&tls.cert_file)?, key)
        .map_err(|err| HttpTlsError(err.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
