//! A throwaway certificate authority and server certificate, made with openssl.

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct TestCa {
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl").current_dir(dir).args(args).output().expect("run openssl");
    assert!(output.status.success(), "openssl {:?} failed: {}", args, String::from_utf8_lossy(&output.stderr));
}

/// A CA and a server certificate valid for `san` (e.g. "IP:127.0.0.1"),
/// readable by the server's OS user.
pub fn make_ca(dir: &Path, name: &str, san: &str, owner: Option<&str>) -> TestCa {
    make_ca_signed(dir, name, san, owner, "sha256")
}

/// As [`make_ca`], with the server certificate signed with `digest`
/// (`sha256`, `sha384`, `sha512`): channel binding hashes the certificate
/// with its signature's hash.
pub fn make_ca_signed(dir: &Path, name: &str, san: &str, owner: Option<&str>, digest: &str) -> TestCa {
    let digest = format!("-{digest}");
    std::fs::create_dir_all(dir).expect("mkdir");
    let ca_key = format!("{name}-ca.key");
    let ca_cert = format!("{name}-ca.crt");
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-sha256",
            "-subj",
            &format!("/CN={name} test CA"),
            "-keyout",
            &ca_key,
            "-out",
            &ca_cert,
        ],
    );
    let extensions = format!("subjectAltName={san}\nbasicConstraints=CA:FALSE\n");
    issue(dir, name, "server", "/CN=tidemark-test-server", &extensions, &digest);
    let key = dir.join("server.key");
    if let Some(user) = owner {
        crate::cluster::chown(dir, user);
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod key");
    TestCa { ca_cert: dir.join(ca_cert), server_cert: dir.join("server.crt"), server_key: key }
}

/// A client certificate for user `cn`, signed by `ca` (made by [`make_ca`] in
/// `dir` under `name`), with its key mode 0600: (certificate, key).
pub fn make_client_cert(dir: &Path, name: &str, cn: &str) -> (PathBuf, PathBuf) {
    // Extensions make it an X.509 v3 certificate, which rustls requires.
    issue(dir, name, cn, &format!("/CN={cn}"), "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n", "-sha256");
    use std::os::unix::fs::PermissionsExt;
    let key = dir.join(format!("{cn}.key"));
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod key");
    (dir.join(format!("{cn}.crt")), key)
}

/// `FILE.key` and `FILE.crt` in `dir`: a new key, and a certificate for
/// `subject` with `extensions`, signed by the CA `name` with `digest`.
fn issue(dir: &Path, name: &str, file: &str, subject: &str, extensions: &str, digest: &str) {
    let (key, csr, cert, ext) =
        (format!("{file}.key"), format!("{file}.csr"), format!("{file}.crt"), format!("{file}.cnf"));
    openssl(dir, &["req", "-newkey", "rsa:2048", "-nodes", "-subj", subject, "-keyout", &key, "-out", &csr]);
    std::fs::write(dir.join(&ext), extensions).expect("write extensions");
    let (ca_cert, ca_key) = (format!("{name}-ca.crt"), format!("{name}-ca.key"));
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_cert,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            "2",
            digest,
            "-extfile",
            &ext,
            "-out",
            &cert,
        ],
    );
}
