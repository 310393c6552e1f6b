//! moto's S3 server on loopback with IAM enforced: one user per policy file
//! in `deploy/iam` (the policies we ship are the ones tested), set up by
//! `tests/moto_iam.py`. `./dev test` installs moto with pip.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub const BUCKET: &str = "tidemark-roles";

pub struct MotoServer {
    pub port: u16,
    /// Access key id and secret per user (`admin`, `dba`, `readonly`, `developer`).
    pub users: BTreeMap<String, (String, String)>,
    child: Option<Child>,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

fn repository_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

impl MotoServer {
    pub fn start() -> MotoServer {
        let dir = tempfile::Builder::new().prefix("tidemark-moto-").tempdir().expect("tempdir");
        let port = crate::cluster::free_port();
        let log = dir.path().join("moto.log");
        let file = std::fs::File::create(&log).expect("log");
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .env_remove("INITIAL_NO_AUTH_ACTION_COUNT")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log"))
            .stderr(file)
            .spawn()
            .expect("start moto_server (install it with `pip install 'moto[server]==5.2.5' boto3`)");
        let mut server = MotoServer { port, users: BTreeMap::new(), child: Some(child), log, _dir: dir };
        let endpoint = server.endpoint();
        crate::wait::wait_until("moto answers", Duration::from_secs(60), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
        let output = crate::wait::wait_until("moto's IAM set up", Duration::from_secs(60), || {
            let output = Command::new("python3")
                .arg(repository_root().join("tests/moto_iam.py"))
                .args([&endpoint, BUCKET])
                .arg(repository_root().join("deploy/iam"))
                .output()
                .ok()?;
            output.status.success().then_some(output)
        });
        let keys: serde_json::Value = serde_json::from_slice(&output.stdout).expect("keys JSON");
        for (user, key) in keys.as_object().expect("object") {
            let id = key["access_key_id"].as_str().expect("id").to_string();
            let secret = key["secret_access_key"].as_str().expect("secret").to_string();
            server.users.insert(user.clone(), (id, secret));
        }
        server
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{BUCKET}/{prefix}")
    }

    /// The variables that make a binary act as `user`.
    pub fn env(&self, user: &str) -> Vec<(String, String)> {
        let (id, secret) = self.users.get(user).unwrap_or_else(|| panic!("no user {user}")).clone();
        vec![
            ("AWS_ACCESS_KEY_ID".into(), id),
            ("AWS_SECRET_ACCESS_KEY".into(), secret),
            ("AWS_REGION".into(), "us-east-1".into()),
            ("AWS_ENDPOINT_URL".into(), self.endpoint()),
            ("AWS_ALLOW_HTTP".into(), "true".into()),
        ]
    }

    /// Delete requests the server saw so far (single and batch; not the
    /// abort of a multipart upload), from its request log.
    pub fn delete_requests(&self) -> Vec<String> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines()
            .filter(|line| {
                let single = line.contains("\"DELETE /") && !line.contains("uploadId=");
                let batch = line.contains("\"POST /") && line.contains("?delete");
                single || batch
            })
            .map(str::to_string)
            .collect()
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            eprintln!("--- moto log (last lines) ---\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
