//! The one thing Tidemark reads from an X.509 certificate: which hash
//! SCRAM-SHA-256-PLUS channel binding (`tls-server-end-point`, RFC 5929)
//! applies to the server's certificate.
//!
//! RFC 5929 §4.1: the hash of the certificate's own signature algorithm,
//! except that MD5 and SHA-1 become SHA-256. The server computes the same
//! (PostgreSQL's `be_tls_get_certificate_hash`), so a certificate signed
//! with SHA-384 must be hashed with SHA-384 or authentication fails.
//!
//! Only the outer layers of the DER are walked — Certificate ::= SEQUENCE
//! { tbsCertificate, signatureAlgorithm AlgorithmIdentifier, signature } —
//! so this is small enough to read and fuzz; the certificate itself was
//! already checked (or deliberately not) by the TLS layer.

use sha2::Digest;

/// A hash channel binding may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BindingHash {
    Sha224,
    Sha256,
    Sha384,
    Sha512,
}

impl BindingHash {
    /// The certificate's hash under this algorithm: the channel-binding data.
    pub fn digest(self, certificate: &[u8]) -> Vec<u8> {
        match self {
            BindingHash::Sha224 => sha2::Sha224::digest(certificate).to_vec(),
            BindingHash::Sha256 => sha2::Sha256::digest(certificate).to_vec(),
            BindingHash::Sha384 => sha2::Sha384::digest(certificate).to_vec(),
            BindingHash::Sha512 => sha2::Sha512::digest(certificate).to_vec(),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CertificateError {
    #[error("the server certificate is not valid DER ({0})")]
    Malformed(&'static str),
    #[error("the server certificate's signature algorithm (OID {0}) has no hash for channel binding")]
    NoHash(String),
}

/// The hash `tls-server-end-point` channel binding uses for this DER certificate.
pub fn binding_hash(certificate: &[u8]) -> Result<BindingHash, CertificateError> {
    let (cert, _) = element(certificate, SEQUENCE)?;
    let (_tbs, rest) = element(cert, SEQUENCE)?;
    let (algorithm, _) = element(rest, SEQUENCE)?;
    let (oid, params) = element(algorithm, OID)?;
    match oid {
        // md5WithRSAEncryption, sha1WithRSAEncryption, ecdsa-with-SHA1: SHA-256 by RFC 5929.
        [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x04 | 0x05] => Ok(BindingHash::Sha256),
        [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x01] => Ok(BindingHash::Sha256),
        // sha{256,384,512,224}WithRSAEncryption
        [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b] => Ok(BindingHash::Sha256),
        [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c] => Ok(BindingHash::Sha384),
        [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d] => Ok(BindingHash::Sha512),
        [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0e] => Ok(BindingHash::Sha224),
        // ecdsa-with-SHA{224,256,384,512}
        [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, n @ 0x01..=0x04] => Ok(sha2_family(*n)),
        // RSASSA-PSS: the hash is in its parameters (SHA-1 when absent).
        [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0a] => pss_hash(params),
        other => Err(CertificateError::NoHash(oid_text(other))),
    }
}

/// 1 = SHA-224, 2 = SHA-256, 3 = SHA-384, 4 = SHA-512 (the last arc of the ECDSA OIDs).
fn sha2_family(arc: u8) -> BindingHash {
    match arc {
        1 => BindingHash::Sha224,
        3 => BindingHash::Sha384,
        4 => BindingHash::Sha512,
        _ => BindingHash::Sha256,
    }
}

/// RSASSA-PSS-params ::= SEQUENCE { hashAlgorithm [0] AlgorithmIdentifier DEFAULT sha1, ... }
fn pss_hash(params: &[u8]) -> Result<BindingHash, CertificateError> {
    let (fields, _) = element(params, SEQUENCE)?;
    let Ok((explicit, _)) = element(fields, 0xa0) else { return Ok(BindingHash::Sha256) };
    let (algorithm, _) = element(explicit, SEQUENCE)?;
    let (oid, _) = element(algorithm, OID)?;
    match oid {
        // id-sha1
        [0x2b, 0x0e, 0x03, 0x02, 0x1a] => Ok(BindingHash::Sha256),
        // id-sha256 (1), id-sha384 (2), id-sha512 (3), id-sha224 (4) under 2.16.840.1.101.3.4.2
        [0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, n @ 0x01..=0x04] => Ok(match n {
            1 => BindingHash::Sha256,
            2 => BindingHash::Sha384,
            3 => BindingHash::Sha512,
            _ => BindingHash::Sha224,
        }),
        other => Err(CertificateError::NoHash(oid_text(other))),
    }
}

const SEQUENCE: u8 = 0x30;
const OID: u8 = 0x06;

/// The contents of the DER element at the start of `bytes` (which must have
/// tag `tag`), and what follows it.
fn element(bytes: &[u8], tag: u8) -> Result<(&[u8], &[u8]), CertificateError> {
    let (&found, rest) = bytes.split_first().ok_or(CertificateError::Malformed("truncated"))?;
    if found != tag {
        return Err(CertificateError::Malformed("unexpected element"));
    }
    let (&first, rest) = rest.split_first().ok_or(CertificateError::Malformed("truncated length"))?;
    let (length, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 || rest.len() < count {
            return Err(CertificateError::Malformed("bad length"));
        }
        let (digits, rest) = rest.split_at(count);
        (digits.iter().fold(0usize, |n, &d| (n << 8) | usize::from(d)), rest)
    };
    if rest.len() < length {
        return Err(CertificateError::Malformed("truncated contents"));
    }
    Ok(rest.split_at(length))
}

/// An OID's dotted form, for the error message.
fn oid_text(bytes: &[u8]) -> String {
    let mut arcs: Vec<u64> = Vec::new();
    let mut value: u64 = 0;
    for &byte in bytes {
        value = value.saturating_mul(128).saturating_add(u64::from(byte & 0x7f));
        if byte & 0x80 == 0 {
            if arcs.is_empty() {
                let first = (value / 40).min(2);
                arcs.push(first);
                arcs.push(value - first * 40);
            } else {
                arcs.push(value);
            }
            value = 0;
        }
    }
    arcs.iter().map(u64::to_string).collect::<Vec<_>>().join(".")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever a server sends as its certificate, the answer is a hash or an error.
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200), prefix in 0usize..3) {
            let mut shaped = [vec![0x30, 0x81, 0xc8], vec![0x30, 0x0a, 0x30, 0x00, 0x30], vec![]][prefix].clone();
            shaped.extend(bytes);
            let _ = binding_hash(&shaped);
        }
    }

    /// A certificate's outer shape with the given algorithm identifier contents.
    fn certificate(algorithm: &[u8]) -> Vec<u8> {
        let mut inner = vec![0x30, 0x03, 0x02, 0x01, 0x01]; // a stand-in tbsCertificate
        inner.push(0x30);
        inner.push(u8::try_from(algorithm.len()).expect("short"));
        inner.extend_from_slice(algorithm);
        inner.extend_from_slice(&[0x03, 0x02, 0x00, 0xff]); // signature
        let mut cert = vec![0x30, 0x81, u8::try_from(inner.len()).expect("short")];
        cert.extend(inner);
        cert
    }

    fn oid(bytes: &[u8]) -> Vec<u8> {
        let mut out = vec![0x06, u8::try_from(bytes.len()).expect("short")];
        out.extend_from_slice(bytes);
        out
    }

    #[test]
    fn hash_follows_the_signature_algorithm() {
        let rsa = |last: u8| certificate(&oid(&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, last]));
        assert_eq!(binding_hash(&rsa(0x0b)), Ok(BindingHash::Sha256));
        assert_eq!(binding_hash(&rsa(0x0c)), Ok(BindingHash::Sha384));
        assert_eq!(binding_hash(&rsa(0x0d)), Ok(BindingHash::Sha512));
        assert_eq!(binding_hash(&rsa(0x05)), Ok(BindingHash::Sha256), "SHA-1 becomes SHA-256");
        let ecdsa384 = certificate(&oid(&[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03]));
        assert_eq!(binding_hash(&ecdsa384), Ok(BindingHash::Sha384));
        let ed25519 = certificate(&oid(&[0x2b, 0x65, 0x70]));
        assert_eq!(binding_hash(&ed25519), Err(CertificateError::NoHash("1.3.101.112".into())));
        assert_eq!(BindingHash::Sha384.digest(b"x").len(), 48);
    }

    #[test]
    fn pss_reads_its_hash_parameter() {
        let sha512 = oid(&[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x03]);
        let mut algorithm_id = vec![0x30, u8::try_from(sha512.len()).expect("short")];
        algorithm_id.extend(sha512);
        let mut explicit = vec![0xa0, u8::try_from(algorithm_id.len()).expect("short")];
        explicit.extend(algorithm_id);
        let mut params = vec![0x30, u8::try_from(explicit.len()).expect("short")];
        params.extend(explicit);
        let mut algorithm = oid(&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0a]);
        algorithm.extend(params);
        assert_eq!(binding_hash(&certificate(&algorithm)), Ok(BindingHash::Sha512));
        let mut default = oid(&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0a]);
        default.extend([0x30, 0x00]);
        assert_eq!(binding_hash(&certificate(&default)), Ok(BindingHash::Sha256));
    }

    #[test]
    fn any_bytes_are_refused_without_panic() {
        for cut in 0..certificate(&oid(&[0x2a])).len() {
            let _ = binding_hash(&certificate(&oid(&[0x2a]))[..cut]);
        }
        assert!(binding_hash(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(binding_hash(&[]).is_err());
    }
}
