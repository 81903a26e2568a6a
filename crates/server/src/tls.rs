//! The server's TLS identity: a key and self-signed certificate created on
//! first start, kept in the state dir; clients pin its SHA-256 fingerprint.

use crate::ServerError;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

/// The certificate and key.
pub struct Identity {
    /// DER certificate.
    pub cert: CertificateDer<'static>,
    /// PKCS#8 DER key.
    pub key: PrivateKeyDer<'static>,
}

/// `SHA256:` and the hex digest of a DER certificate.
pub fn fingerprint(der: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    let hex: String = d.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("SHA256:{hex}")
}

/// Load the identity from `state`, creating it on first start.
pub fn load_or_create(state: &Path) -> Result<Identity, ServerError> {
    let (cp, kp) = (state.join("cert.der"), state.join("key.der"));
    if !cp.exists() || !kp.exists() {
        let ck = rcgen::generate_simple_self_signed(vec!["intermezzo".to_string(), "localhost".to_string()])
            .map_err(|e| ServerError::Tls(format!("generating a certificate: {e}")))?;
        write_private(&kp, &ck.key_pair.serialize_der())?;
        std::fs::write(&cp, ck.cert.der()).map_err(|e| ServerError::io(format!("writing {}", cp.display()), e))?;
    }
    let cert = std::fs::read(&cp).map_err(|e| ServerError::io(format!("reading {}", cp.display()), e))?;
    let key = std::fs::read(&kp).map_err(|e| ServerError::io(format!("reading {}", kp.display()), e))?;
    Ok(Identity { cert: CertificateDer::from(cert), key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)) })
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), ServerError> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| ServerError::io(format!("creating {}", path.display()), e))?;
    f.write_all(bytes).map_err(|e| ServerError::io(format!("writing {}", path.display()), e))
}

/// A TLS acceptor for the identity (ring provider, TLS 1.2/1.3).
pub fn acceptor(id: &Identity) -> Result<tokio_rustls::TlsAcceptor, ServerError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ServerError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(vec![id.cert.clone()], id.key.clone_key())
        .map_err(|e| ServerError::Tls(e.to_string()))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}
