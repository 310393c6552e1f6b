//! A real S3-protocol server on loopback: `s3s-fs`, which keeps objects as
//! files under a directory, so it can be stopped and started again (an
//! outage) without losing what it stored. `./dev test` installs it.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub const BUCKET: &str = "tidemark";
const ACCESS_KEY: &str = "tidemark-test";
const SECRET_KEY: &str = "tidemark-test-secret";

pub struct S3Server {
    pub port: u16,
    /// Objects live in `root/<bucket>/<key>`.
    pub root: PathBuf,
    child: Option<Child>,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

/// The s3s-fs binary: in ~/.cargo/bin (where `cargo install` puts it) or on PATH.
pub fn binary() -> PathBuf {
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let in_cargo = Path::new(&home).join(".cargo/bin/s3s-fs");
    if in_cargo.exists() {
        return in_cargo;
    }
    PathBuf::from("s3s-fs")
}

impl S3Server {
    pub fn start() -> S3Server {
        let dir = tempfile::Builder::new().prefix("tidemark-s3-").tempdir().expect("tempdir");
        let root = dir.path().join("objects");
        std::fs::create_dir_all(root.join(BUCKET)).expect("create bucket directory");
        let mut server = S3Server {
            port: crate::cluster::free_port(),
            log: dir.path().join("s3s-fs.log"),
            root,
            child: None,
            _dir: dir,
        };
        server.start_again();
        server
    }

    /// Starts the server (again) on the same port and directory.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "the S3 server is already running");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("log");
        let child = Command::new(binary())
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(&self.root)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect(
                "start s3s-fs (install it with `cargo install --locked s3s-fs --version 0.14.1 --features binary`)",
            );
        self.child = Some(child);
        let port = self.port;
        crate::wait::wait_until("the S3 server accepts connections", Duration::from_secs(60), || {
            TcpStream::connect(("127.0.0.1", port)).ok()
        });
    }

    /// Stops the server (SIGKILL, as a crash or a network cut would look).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The repository URL for `prefix` in the bucket.
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{BUCKET}/{prefix}")
    }

    /// The variables the agent and restore tool read to reach this server.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID".into(), ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY".into(), SECRET_KEY.into()),
            ("AWS_REGION".into(), "us-east-1".into()),
            ("AWS_ENDPOINT_URL".into(), format!("http://127.0.0.1:{}", self.port)),
            ("AWS_ALLOW_HTTP".into(), "true".into()),
        ]
    }

    /// Where an object of repository `prefix` lies on disk.
    pub fn object_path(&self, prefix: &str, key: &str) -> PathBuf {
        self.root.join(BUCKET).join(prefix).join(key)
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- s3s-fs log ---\n{}", std::fs::read_to_string(&self.log).unwrap_or_default());
        }
        self.stop();
    }
}
