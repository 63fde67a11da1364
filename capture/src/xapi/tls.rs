//! How the client trusts a pool's HTTPS certificate (reference §5.6): the public roots,
//! a pinned certificate (XAPI hosts use self-signed ones), or nothing (`--insecure`).

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::Digest;

/// Which certificates to accept.
#[derive(Clone, Debug, Default)]
pub enum Trust {
    /// Certificates that chain to the public web roots, for the host name connected to.
    #[default]
    Roots,
    /// Exactly these certificates (SHA-256 of their DER), whatever their names and issuers:
    /// the way to trust a host's self-signed certificate.
    Pinned(Vec<[u8; 32]>),
    /// Any certificate. The connection is encrypted but not authenticated.
    Insecure,
}

impl Trust {
    /// Pin the certificate(s) in a PEM text.
    pub fn pin_pem(pem: &str) -> Result<Trust, String> {
        use rustls::pki_types::pem::PemObject;
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| format!("not a PEM certificate: {e}"))?;
        if certs.is_empty() {
            return Err("no certificate in the PEM text".into());
        }
        Ok(Trust::Pinned(certs.iter().map(|c| fingerprint(c)).collect()))
    }

    /// Pin a fingerprint written `sha256:HEX` or `HEX` (colons allowed).
    pub fn pin_fingerprint(text: &str) -> Result<Trust, String> {
        let hex_text: String = text.trim().trim_start_matches("sha256:").chars().filter(|c| *c != ':').collect();
        let bytes = hex::decode(&hex_text).map_err(|_| format!("{text:?} is not a hex SHA-256 fingerprint"))?;
        let fp: [u8; 32] = bytes.try_into().map_err(|_| format!("{text:?}: a SHA-256 fingerprint has 32 bytes"))?;
        Ok(Trust::Pinned(vec![fp]))
    }

    /// The rustls configuration, or `None` for the HTTP client's default (public roots).
    pub fn client_config(&self) -> Option<Arc<rustls::ClientConfig>> {
        let pins = match self {
            Trust::Roots => return None,
            Trust::Pinned(p) => Some(p.clone()),
            Trust::Insecure => None,
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = Arc::new(Verifier { pins, provider: Arc::clone(&provider) });
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .ok()?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Some(Arc::new(config))
    }
}

/// SHA-256 of a certificate's DER bytes.
pub fn fingerprint(cert: &[u8]) -> [u8; 32] {
    sha2::Sha256::digest(cert).into()
}

#[derive(Debug)]
struct Verifier {
    /// `None`: accept any certificate.
    pins: Option<Vec<[u8; 32]>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match &self.pins {
            None => Ok(ServerCertVerified::assertion()),
            Some(pins) => {
                let fp = fingerprint(end_entity);
                if pins.contains(&fp) {
                    Ok(ServerCertVerified::assertion())
                } else {
                    Err(rustls::Error::General(format!(
                        "the server's certificate (sha256:{}) is not the pinned one",
                        hex::encode(fp)
                    )))
                }
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
