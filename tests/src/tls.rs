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
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-sha256",
            "-subj",
            "/CN=tidemark-test-server",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
    );
    std::fs::write(dir.join("ext.cnf"), format!("subjectAltName={san}\nbasicConstraints=CA:FALSE\n"))
        .expect("write ext");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            &ca_cert,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            "2",
            &digest,
            "-extfile",
            "ext.cnf",
            "-out",
            "server.crt",
        ],
    );
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
    let (key, csr, cert) = (format!("{cn}.key"), format!("{cn}.csr"), format!("{cn}.crt"));
    openssl(
        dir,
        &["req", "-newkey", "rsa:2048", "-nodes", "-subj", &format!("/CN={cn}"), "-keyout", &key, "-out", &csr],
    );
    let (ca_cert, ca_key) = (format!("{name}-ca.crt"), format!("{name}-ca.key"));
    // Extensions make it an X.509 v3 certificate, which rustls requires.
    let extensions = format!("{cn}.cnf");
    std::fs::write(dir.join(&extensions), "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n")
        .expect("write ext");
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
            "-sha256",
            "-extfile",
            &extensions,
            "-out",
            &cert,
        ],
    );
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.join(&key), std::fs::Permissions::from_mode(0o600)).expect("chmod key");
    (dir.join(cert), dir.join(key))
}
