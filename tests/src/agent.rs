//! Running the real binaries: `tidemark-agent` (as a daemon or a command)
//! and `tidemark-restore`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

/// A built binary of this workspace: beside this executable (a bench binary
/// in target/debug) or one level up (a test in target/debug/deps).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("executable directory");
    let candidates = [dir.join(name), dir.parent().map(|p| p.join(name)).unwrap_or_default()];
    candidates
        .iter()
        .find(|p| p.exists())
        .cloned()
        .unwrap_or_else(|| panic!("{name} is missing beside {}: run `cargo build --bins` first", dir.display()))
}

/// `tidemark-agent keygen PATH`: a new random key file; returns its key id.
pub fn keygen(path: &Path) -> String {
    let output = Command::new(bin("tidemark-agent")).arg("keygen").arg(path).output().expect("run keygen");
    assert!(output.status.success(), "keygen failed: {}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.split_whitespace().nth(1).expect("keygen prints the key id").to_string()
}

/// Whether s3s-fs (the tests' S3 server) is installed, for benchmarks that add S3 lines.
pub fn have_s3_server() -> bool {
    crate::s3::binary().exists() || Command::new("s3s-fs").arg("--version").output().is_ok()
}

/// Where one agent keeps its state and repository, and how it reaches the server.
#[derive(Clone, Debug)]
pub struct AgentSetup {
    pub repo: PathBuf,
    pub state_dir: PathBuf,
    pub pg_url: String,
    pub extra_args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// A repository URL other than the local `repo` directory (an S3 bucket).
    pub url: Option<String>,
    /// Key files of an encrypted repository, passed to both binaries.
    pub key_files: Vec<PathBuf>,
    /// Run the binaries as this OS user (uid, gid) from `bin_dir`: see [`AgentSetup::run_as_pg_user`].
    pub os_user: Option<(u32, u32)>,
    pub bin_dir: Option<PathBuf>,
}

impl AgentSetup {
    pub fn new(base: &Path, pg_url: String) -> AgentSetup {
        AgentSetup {
            repo: base.join("repo"),
            state_dir: base.join("state"),
            pg_url,
            extra_args: Vec::new(),
            // Scheduled backups off unless a test asks: they would add load
            // and checkpoints to tests about streaming.
            env: vec![("TIDEMARK_BACKUP_INTERVAL".into(), "0".into())],
            url: None,
            key_files: Vec::new(),
            os_user: None,
            bin_dir: None,
        }
    }

    /// Runs the agent (and the `tidemark-restore` it calls) as the
    /// PostgreSQL OS user when we are root, as a deployment does: drills
    /// start PostgreSQL, which refuses root. `base` (holding the state
    /// directory and repository) becomes that user's; the binaries are
    /// linked into `base/bin`, which that user can reach.
    pub fn run_as_pg_user(&mut self, base: &Path) {
        let Some((uid, gid)) = crate::cluster::pg_os_ids() else { return };
        fs::create_dir_all(base).expect("mkdir base");
        crate::cluster::chown(base, crate::cluster::PG_USER_OS);
        // Linked after the chown: a link shares the build's file, whose owner stays.
        let dir = base.join("bin");
        fs::create_dir_all(&dir).expect("mkdir bin");
        for name in ["tidemark-agent", "tidemark-restore"] {
            link_binary(&bin(name), &dir.join(name));
        }
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(base, fs::Permissions::from_mode(0o755)).expect("chmod base");
        self.os_user = Some((uid, gid));
        self.bin_dir = Some(dir);
    }

    /// An initialized agent for `pg_url`, its state and repository in
    /// `base`, run as the PostgreSQL OS user ([`AgentSetup::run_as_pg_user`]).
    pub fn init_as_pg_user(base: &Path, pg_url: String) -> AgentSetup {
        fs::create_dir_all(base).expect("mkdir");
        let mut agent = AgentSetup::new(base, pg_url);
        agent.run_as_pg_user(base);
        agent.init();
        agent
    }

    /// A command for one of our binaries, as the configured OS user.
    pub fn program(&self, name: &str) -> Command {
        let mut command = match &self.bin_dir {
            Some(dir) => Command::new(dir.join(name)),
            None => Command::new(bin(name)),
        };
        if let Some((uid, gid)) = self.os_user {
            use std::os::unix::process::CommandExt;
            command.uid(uid).gid(gid);
            if let Some(parent) = self.state_dir.parent() {
                command.current_dir(parent);
            }
            command.env("HOME", self.state_dir.parent().unwrap_or(Path::new("/")));
        }
        command
    }

    pub fn repo_url(&self) -> String {
        self.url.clone().unwrap_or_else(|| format!("file://{}", self.repo.display()))
    }

    /// `--key-file` for each key file.
    pub fn key_args(&self) -> Vec<String> {
        self.key_files.iter().flat_map(|k| ["--key-file".to_string(), k.display().to_string()]).collect()
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = self.program("tidemark-agent");
        command
            .arg("--repo")
            .arg(self.repo_url())
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--pg-url")
            .arg(&self.pg_url)
            .args(&self.extra_args)
            .args(self.key_args())
            .args(args)
            .env_remove("PGPASSWORD")
            .env_remove("TIDEMARK_KEY_FILE")
            .env_remove("DATABASE_URL")
            .env_remove("TIDEMARK_CONFIG")
            .stdin(Stdio::null());
        for (key, value) in &self.env {
            command.env(key, value);
        }
        command
    }

    pub fn run_command(&self, args: &[&str]) -> Output {
        retry_busy(|| self.command(args).output())
    }

    /// `init`, asserting success.
    pub fn init(&self) {
        let output = self.run_command(&["init"]);
        assert!(output.status.success(), "init failed: {}", String::from_utf8_lossy(&output.stderr));
    }

    /// `status --json` as a JSON value.
    pub fn status(&self) -> serde_json::Value {
        let output = self.run_command(&["status", "--json"]);
        assert!(output.status.success(), "status failed: {}", String::from_utf8_lossy(&output.stderr));
        serde_json::from_slice(&output.stdout).expect("status JSON")
    }

    /// The archived LSN from status, if any.
    pub fn archived_lsn(&self) -> Option<tidemark_proto::Lsn> {
        self.status().get("archived_lsn")?.as_str()?.parse().ok()
    }

    pub fn spawn(&self) -> RunningAgent {
        let log = self.state_dir.with_extension(format!(
            "log.{}",
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
        ));
        let file = fs::File::create(&log).expect("create agent log");
        let child = retry_busy(|| {
            self.command(&["run"])
                .env("TIDEMARK_LOG", "info")
                .stdout(Stdio::null())
                .stderr(file.try_clone().expect("log file"))
                .spawn()
        });
        RunningAgent { child: Some(child), log }
    }

    /// `tidemark-restore wal-get NAME DEST` against this repository.
    pub fn wal_get(&self, name: &str, destination: &Path) -> Output {
        let mut command = self.program("tidemark-restore");
        command.arg("--repo").arg(self.repo_url()).args(self.key_args()).args(["wal-get", name]).arg(destination);
        command.envs(self.env.iter().map(|(k, v)| (k, v))).output().expect("run tidemark-restore wal-get")
    }
}

/// Puts `from` at `to` for another user to run: a hard link, which opens
/// nothing for writing (so no child another test thread forked can hold it
/// busy), else a copy. Whatever was at `to` goes first: copying onto a
/// link of `from` itself would truncate `from`.
pub fn link_binary(from: &Path, to: &Path) {
    match fs::remove_file(to) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => panic!("remove {}: {e}", to.display()),
    }
    if fs::hard_link(from, to).is_err() {
        fs::copy(from, to).unwrap_or_else(|e| panic!("copy {} to {}: {e}", from.display(), to.display()));
    }
}

/// Runs `start` again while it fails with ETXTBSY: a copied binary's write
/// descriptor lives on in children other test threads forked meanwhile,
/// until they exec (a short window).
pub fn retry_busy<T>(mut start: impl FnMut() -> std::io::Result<T>) -> T {
    for _ in 0..50 {
        match start() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => std::thread::sleep(Duration::from_millis(100)),
            other => return other.expect("start a tidemark binary"),
        }
    }
    start().expect("start a tidemark binary")
}

/// `tidemark-agent run` in the background; stopped (SIGTERM, then SIGKILL) in Drop.
pub struct RunningAgent {
    child: Option<Child>,
    pub log: PathBuf,
}

impl RunningAgent {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait for a clean exit; returns whether it exited 0.
    pub fn stop(mut self) -> bool {
        self.terminate()
    }

    fn terminate(&mut self) -> bool {
        let Some(mut child) = self.child.take() else { return true };
        // SAFETY: signalling the child process this harness started.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + Duration::from_secs(90);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- agent log {} ---\n{}", self.log.display(), self.log_text());
        }
        self.terminate();
    }
}
