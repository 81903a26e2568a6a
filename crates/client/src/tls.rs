//! Certificate pinning: the client accepts exactly the server certificate
//! whose SHA-256 fingerprint it was given, or, given none, the one the
//! server presented at the first connection (trust on first use); every
//! later connection must present that one.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, OtherError, SignatureScheme};
use std::sync::{Arc, Mutex};

/// `SHA256:` and the hex digest of a DER certificate (same as the server's).
pub fn fingerprint(der: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    let hex: String = d.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("SHA256:{hex}")
}

/// The server presented a certificate other than the pinned one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the server presented a certificate with fingerprint {presented}, not the pinned {pinned}")]
pub struct Mismatch {
    /// Fingerprint of the certificate the server presented.
    pub presented: String,
    /// Fingerprint the client trusts.
    pub pinned: String,
}

/// The [`Mismatch`] inside a failed TLS connect, if that is why it failed.
pub fn mismatch(e: &std::io::Error) -> Option<Mismatch> {
    match e.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(o))) => o.downcast_ref().cloned(),
        _ => None,
    }
}

#[derive(Debug)]
struct Pinned {
    want: Option<String>,
    trusted: Arc<Mutex<Option<String>>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = fingerprint(end_entity);
        let mut trusted = self.trusted.lock().unwrap_or_else(|p| p.into_inner());
        match self.want.clone().or_else(|| trusted.clone()) {
            Some(pinned) if !pinned.eq_ignore_ascii_case(&got) => {
                // (the trusted one stays: a reconnect never takes the new one)
                let m = Mismatch { presented: got, pinned };
                Err(rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(m)))))
            }
            _ => {
                *trusted = Some(got);
                Ok(ServerCertVerified::assertion())
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// A connector pinning `want`; with `None`, the fingerprint already in
/// `trusted` (from an earlier connection), or on first use whatever the
/// server presents. `trusted` receives the fingerprint accepted; a
/// mismatch fails the handshake with a [`Mismatch`] (see [`mismatch`]) and
/// leaves `trusted` as it was.
pub fn connector(
    want: Option<String>,
    trusted: Arc<Mutex<Option<String>>>,
) -> Result<tokio_rustls::TlsConnector, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(Pinned { want, trusted, provider: provider.clone() });
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
}
