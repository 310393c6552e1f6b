//! TLS for libpq's sslmode values, with rustls.
//!
//! - `prefer`/`require` without a root certificate: encrypt, verify nothing
//!   (libpq does the same; it protects against passive sniffing only).
//! - `require` with a root certificate file, and `verify-ca`: the chain must
//!   lead to that root; the host name is not checked.
//! - `verify-full`: chain and host name.
//! - `sslrootcert=system`: the host's trusted roots (OpenSSL's default
//!   bundle, or `SSL_CERT_FILE`), only with `verify-full`.
//! - A client certificate (`sslcert`, default `~/.postgresql/postgresql.crt`)
//!   is offered when its file exists; its key (`sslkey`, default
//!   `postgresql.key` beside it) must not be readable by group or others.

use crate::error::PgError;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tidemark_proto::conninfo::{ConnParams, SslMode};
use tokio::net::TcpStream;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    Nothing,
    Chain,
    ChainAndHost,
}

/// Where trusted roots come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Roots {
    File(PathBuf),
    /// The host's trusted roots (`sslrootcert=system`).
    System,
}

/// OpenSSL's default bundle on Debian, what libpq's `system` reads.
const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The rustls configuration `params` ask for.
pub fn config_for(params: &ConnParams) -> Result<Arc<ClientConfig>, PgError> {
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let roots = match params.sslrootcert.as_deref() {
        Some("system") => Some(Roots::System),
        Some(file) => Some(Roots::File(PathBuf::from(file))),
        None => home.as_ref().map(|h| Roots::File(h.join(".postgresql/root.crt"))),
    };
    let root_exists = match &roots {
        Some(Roots::File(path)) => path.exists(),
        Some(Roots::System) => true,
        None => false,
    };
    let verify = match params.sslmode {
        SslMode::VerifyFull => Verify::ChainAndHost,
        SslMode::VerifyCa => Verify::Chain,
        // libpq: with a root certificate file present, require behaves like verify-ca.
        SslMode::Require if root_exists => Verify::Chain,
        _ => Verify::Nothing,
    };
    let cert = params
        .sslcert
        .as_ref()
        .map(PathBuf::from)
        .or_else(|| home.as_ref().map(|h| h.join(".postgresql/postgresql.crt")));
    let client = match cert {
        Some(cert) if cert.exists() => {
            let key =
                params.sslkey.as_ref().map(PathBuf::from).unwrap_or_else(|| cert.with_file_name("postgresql.key"));
            Some(load_client_identity(&cert, &key)?)
        }
        Some(cert) if params.sslcert.is_some() => {
            return Err(PgError::Tls(format!("client certificate {} does not exist", cert.display())))
        }
        _ => None,
    };
    client_config(verify, roots.as_ref(), client).map_err(PgError::Tls)
}

/// The TLS handshake over a TCP stream whose SSLRequest the server accepted.
pub async fn handshake(
    tcp: TcpStream,
    host: &str,
    params: &ConnParams,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, PgError> {
    let config = config_for(params)?;
    let server_name =
        ServerName::try_from(host.to_string()).map_err(|e| PgError::Tls(format!("invalid host name {host:?}: {e}")))?;
    tokio_rustls::TlsConnector::from(config)
        .connect(server_name, tcp)
        .await
        .map_err(|e| PgError::Tls(format!("handshake with {host} failed: {e}")))
}

pub fn client_config(
    verify: Verify,
    roots: Option<&Roots>,
    client: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<Arc<ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match verify {
        Verify::Nothing => builder.dangerous().with_custom_certificate_verifier(Arc::new(NoVerification(provider))),
        Verify::Chain | Verify::ChainAndHost => {
            let roots = load_roots(roots)?;
            let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| e.to_string())?;
            if verify == Verify::ChainAndHost {
                builder.with_webpki_verifier(webpki)
            } else {
                builder.dangerous().with_custom_certificate_verifier(Arc::new(ChainOnly(webpki)))
            }
        }
    };
    let config = match client {
        Some((chain, key)) => {
            builder.with_client_auth_cert(chain, key).map_err(|e| format!("client certificate: {e}"))?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

fn load_roots(roots: Option<&Roots>) -> Result<RootCertStore, String> {
    let path = match roots {
        Some(Roots::File(path)) => path.clone(),
        Some(Roots::System) => {
            std::env::var_os("SSL_CERT_FILE").map(PathBuf::from).unwrap_or_else(|| SYSTEM_BUNDLE.into())
        }
        None => {
            return Err(
                "no root certificate: set sslrootcert (a file, or system) or create ~/.postgresql/root.crt".into()
            )
        }
    };
    if !path.exists() {
        return Err(format!(
            "root certificate file {} does not exist: give sslrootcert, use sslrootcert=system for the host's trusted roots, or lower sslmode",
            path.display()
        ));
    }
    let pem = std::fs::read(&path).map_err(|e| format!("read root certificate {}: {e}", path.display()))?;
    let mut store = RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        let cert = cert.map_err(|e| format!("parse root certificate {}: {e}", path.display()))?;
        // A system bundle may hold a certificate rustls cannot use; the rest still count.
        if let Err(e) = store.add(cert) {
            if !matches!(roots, Some(Roots::System)) {
                return Err(format!("use root certificate {}: {e}", path.display()));
            }
        }
    }
    if store.is_empty() {
        return Err(format!("no certificate found in {}", path.display()));
    }
    Ok(store)
}

/// A client certificate chain and its key. Like libpq, a key file others
/// can read is refused (root-owned keys may be group-readable, for a
/// shared group such as ssl-cert).
fn load_client_identity(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), PgError> {
    let pem =
        std::fs::read(cert).map_err(|e| PgError::Tls(format!("read client certificate {}: {e}", cert.display())))?;
    let chain: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| PgError::Tls(format!("parse client certificate {}: {e}", cert.display())))?;
    if chain.is_empty() {
        return Err(PgError::Tls(format!("no certificate found in {}", cert.display())));
    }
    let metadata = std::fs::metadata(key).map_err(|e| {
        PgError::Tls(format!("client certificate {} needs its key {}: {e}", cert.display(), key.display()))
    })?;
    let mode = metadata.permissions().mode();
    let allowed = if metadata.uid() == 0 { 0o640 } else { 0o600 };
    if mode & 0o777 & !allowed != 0 {
        return Err(PgError::Tls(format!(
            "private key file {} has group or world access; chmod 0600 it (0640 if owned by root)",
            key.display()
        )));
    }
    let pem = std::fs::read(key).map_err(|e| PgError::Tls(format!("read private key {}: {e}", key.display())))?;
    let parsed = rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| PgError::Tls(format!("parse private key {}: {e}", key.display())))?
        .ok_or_else(|| {
            PgError::Tls(format!("no unencrypted private key in {} (encrypted keys are not supported)", key.display()))
        })?;
    Ok((chain, parsed))
}

/// verify-ca: the chain must verify; a name mismatch is accepted.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForNameContext { .. })) => {
                Ok(ServerCertVerified::assertion())
            }
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// prefer/require: encryption without authentication of the server.
#[derive(Debug)]
struct NoVerification(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
