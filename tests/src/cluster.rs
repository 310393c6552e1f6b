//! Throwaway PostgreSQL clusters for tests.
//!
//! PostgreSQL refuses to run as root, so when the tests run as root (as CI
//! does) the server runs as the OS user `tidemark_pg`, created on first use.

use std::fs;
use std::io::Write;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

pub const PG_USER_OS: &str = "tidemark_pg";

/// Where PostgreSQL's binaries are: TIDEMARK_PG_BIN, else Debian's PostgreSQL 15.
pub fn pg_bin() -> PathBuf {
    std::env::var_os("TIDEMARK_PG_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin"))
}

fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Creates the OS user that runs PostgreSQL when we are root (once per process).
fn ensure_os_user() -> Option<&'static str> {
    static DONE: OnceLock<bool> = OnceLock::new();
    if !running_as_root() {
        return None;
    }
    DONE.get_or_init(|| {
        let exists = Command::new("id").arg("-u").arg(PG_USER_OS).output().map(|o| o.status.success()).unwrap_or(false);
        if !exists {
            let status = Command::new("useradd")
                .args(["--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_USER_OS])
                .status()
                .expect("run useradd");
            assert!(status.success(), "useradd {PG_USER_OS} failed");
        }
        true
    });
    Some(PG_USER_OS)
}

/// The uid and gid of the OS user that runs PostgreSQL, when we are root.
pub fn pg_os_ids() -> Option<(u32, u32)> {
    let user = ensure_os_user()?;
    let id = |flag: &str| -> u32 {
        let output = Command::new("id").arg(flag).arg(user).output().expect("run id");
        String::from_utf8_lossy(&output.stdout).trim().parse().expect("numeric id")
    };
    Some((id("-u"), id("-g")))
}

/// Settings of a cluster; `Default` gives a streaming-ready server.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    pub wal_level: String,
    pub max_wal_senders: u32,
    pub synchronous_standby_names: Option<String>,
    pub wal_keep_size: Option<String>,
    pub track_commit_timestamp: bool,
    /// pg_hba.conf lines placed before the defaults (first match wins).
    pub hba: Vec<String>,
    /// Extra postgresql.conf lines.
    pub conf: Vec<String>,
    /// Server certificate and key for ssl = on.
    pub ssl: Option<(PathBuf, PathBuf)>,
    /// Directory of initdb, pg_ctl and postgres (default: [`pg_bin`]); the
    /// client tools (psql, pgbench, pg_basebackup) always come from [`pg_bin`].
    pub server_bin: Option<PathBuf>,
    /// Debian's layout: postgresql.conf, pg_hba.conf and pg_ident.conf in
    /// `<dir>/etc`, outside the data directory (as pg_createcluster puts
    /// them in /etc/postgresql), the server started with `config_file`.
    pub config_outside: bool,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            wal_level: "replica".into(),
            max_wal_senders: 10,
            synchronous_standby_names: None,
            wal_keep_size: Some("2GB".into()),
            track_commit_timestamp: false,
            hba: Vec::new(),
            conf: Vec::new(),
            ssl: None,
            server_bin: None,
            config_outside: false,
        }
    }
}

/// PostgreSQL 14's server binaries (see [`server_bin_for`]).
pub fn pg14_bin() -> PathBuf {
    server_bin_for(14)
}

/// The server binaries of PostgreSQL `major`: Debian's for 15
/// ([`pg_bin`]), else npm's embedded-postgres build that `./dev install`
/// puts in place (TIDEMARK_PG<major>_BIN, else where `./dev` puts them).
pub fn server_bin_for(major: u32) -> PathBuf {
    if major == 15 {
        return pg_bin();
    }
    if let Some(dir) = std::env::var_os(format!("TIDEMARK_PG{major}_BIN")) {
        return PathBuf::from(dir);
    }
    let dir = if running_as_root() {
        PathBuf::from(format!("/opt/tidemark/postgresql-{major}"))
    } else {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(format!(".cache/tidemark/postgresql-{major}"))
    };
    let bin = dir.join("native/bin");
    assert!(
        bin.join("postgres").exists(),
        "PostgreSQL {major} is not installed in {}: run `./dev install`",
        bin.display()
    );
    bin
}

pub struct Cluster {
    /// Holds every file of the test; removed when the cluster is dropped.
    pub dir: tempfile::TempDir,
    pub data: PathBuf,
    pub port: u16,
    pub log: PathBuf,
    os_user: Option<&'static str>,
    /// Where initdb, pg_ctl and postgres come from.
    server_bin: PathBuf,
    /// The configuration file outside the data directory (Debian's layout).
    config_file: Option<PathBuf>,
    /// psql connects over the Unix socket in this directory instead of TCP
    /// (an isolated copy listens on no TCP port).
    socket_dir: Option<PathBuf>,
}

/// A free port on 127.0.0.1 (bound, then released; the caller retries on a clash).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("bind 127.0.0.1:0")
}

impl Cluster {
    pub fn start(options: ClusterOptions) -> Cluster {
        let os_user = ensure_os_user();
        let dir = tempfile::Builder::new().prefix("tidemark-test-").tempdir().expect("tempdir");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod test dir");
        let data = dir.path().join("data");
        let log = dir.path().join("postgresql.log");
        let server_bin = options.server_bin.clone().unwrap_or_else(pg_bin);
        let mut cluster = Cluster { data, port: 0, log, os_user, dir, server_bin, config_file: None, socket_dir: None };
        cluster.initdb(&options);
        if options.config_outside {
            cluster.move_config_outside();
        }
        // Retry with another port if someone took ours between probe and bind.
        for attempt in 0..5 {
            cluster.port = free_port();
            cluster.write_port();
            if cluster
                .pg_ctl(&["start", "-w", "-t", "120", "-l", cluster.log.to_str().expect("utf-8 path")])
                .status
                .success()
            {
                return cluster;
            }
            let log = fs::read_to_string(&cluster.log).unwrap_or_default();
            if !log.contains("could not bind") || attempt == 4 {
                panic!("PostgreSQL did not start; log {}:\n{log}", cluster.log.display());
            }
        }
        unreachable!()
    }

    /// A streaming standby of `primary` (pg_basebackup -R), itself accepting
    /// replication connections, so an agent can stream from it and see the
    /// timeline end when it is promoted.
    pub fn standby_of(primary: &Cluster) -> Cluster {
        let os_user = ensure_os_user();
        let dir = tempfile::Builder::new().prefix("tidemark-standby-").tempdir().expect("tempdir");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod test dir");
        let data = dir.path().join("data");
        let log = dir.path().join("postgresql.log");
        let server_bin = primary.server_bin.clone();
        let mut standby = Cluster { data, port: 0, log, os_user, dir, server_bin, config_file: None, socket_dir: None };
        if let Some(user) = os_user {
            chown(standby.dir.path(), user);
        }
        let output = standby
            .as_pg_user(&pg_bin().join("pg_basebackup"))
            .args(["-h", "127.0.0.1", "-U", "postgres", "-X", "stream", "-R", "-c", "fast", "-D"])
            .arg(&standby.data)
            .arg("-p")
            .arg(primary.port.to_string())
            .output()
            .expect("run pg_basebackup");
        assert!(output.status.success(), "pg_basebackup failed: {}", String::from_utf8_lossy(&output.stderr));
        let conf = standby.data.join("postgresql.conf");
        let text = fs::read_to_string(&conf).expect("read conf");
        let text = text.replace(
            &format!("unix_socket_directories = '{}'", primary.dir.path().display()),
            &format!("unix_socket_directories = '{}'", standby.dir.path().display()),
        );
        fs::write(&conf, text).expect("write conf");
        standby.port = free_port();
        standby.write_port();
        let output = standby.pg_ctl(&["start", "-w", "-t", "120", "-l", standby.log.to_str().expect("utf-8")]);
        assert!(output.status.success(), "standby did not start; see {}", standby.log.display());
        standby
    }

    /// Starts PostgreSQL on a data directory made elsewhere (a restored
    /// backup) inside `dir`, with extra settings appended (recovery ones).
    /// Does not wait for recovery to finish: poll for that.
    pub fn start_existing(dir: tempfile::TempDir, data: PathBuf, extra_conf: &[String]) -> Cluster {
        Cluster::start_existing_with(pg_bin(), dir, data, extra_conf)
    }

    /// As [`Cluster::start_existing`], with the server binaries in `server_bin`.
    pub fn start_existing_with(
        server_bin: PathBuf,
        dir: tempfile::TempDir,
        data: PathBuf,
        extra_conf: &[String],
    ) -> Cluster {
        let os_user = ensure_os_user();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod dir");
        let log = dir.path().join("postgresql.log");
        let port = free_port();
        let cluster = Cluster { data, port, log, os_user, dir, server_bin, config_file: None, socket_dir: None };
        let mut conf = vec![format!("unix_socket_directories = '{}'", cluster.dir.path().display())];
        conf.extend(extra_conf.iter().cloned());
        let mut file =
            fs::OpenOptions::new().append(true).open(cluster.data.join("postgresql.conf")).expect("open conf");
        writeln!(file, "\n# restored-cluster settings\n{}", conf.join("\n")).expect("write conf");
        cluster.write_port();
        if let Some(user) = os_user {
            chown(cluster.dir.path(), user);
        }
        let output = cluster.pg_ctl(&["start", "-w", "-t", "300", "-l", cluster.log.to_str().expect("utf-8")]);
        assert!(
            output.status.success(),
            "restored server did not start: {}",
            fs::read_to_string(&cluster.log).unwrap_or_default()
        );
        cluster
    }

    /// Wraps a server someone else started (a restore with --start) on `data`
    /// inside `dir`, listening on 127.0.0.1:`port`, so the test can query it
    /// and stops it in Drop.
    pub fn adopt_running(dir: tempfile::TempDir, data: PathBuf, port: u16) -> Cluster {
        let log = data.join("tidemark-restore.log");
        let os_user = ensure_os_user();
        Cluster { data, port, log, os_user, dir, server_bin: pg_bin(), config_file: None, socket_dir: None }
    }

    /// As [`Cluster::adopt_running`], for a copy started with `--isolate`:
    /// reached over its Unix socket in the data directory, as it listens
    /// on no TCP port.
    pub fn adopt_isolated(dir: tempfile::TempDir, data: PathBuf, port: u16) -> Cluster {
        let mut cluster = Cluster::adopt_running(dir, data.clone(), port);
        cluster.socket_dir = Some(data);
        cluster
    }

    /// Debian's layout: the configuration files moved to `<dir>/etc`, which
    /// names the data directory, and the server started with `config_file`.
    fn move_config_outside(&mut self) {
        let etc = self.dir.path().join("etc");
        fs::create_dir(&etc).expect("mkdir etc");
        for name in ["postgresql.conf", "pg_hba.conf", "pg_ident.conf"] {
            fs::rename(self.data.join(name), etc.join(name)).expect("move a configuration file");
        }
        let mut file = fs::OpenOptions::new().append(true).open(etc.join("postgresql.conf")).expect("open conf");
        writeln!(
            file,
            "data_directory = '{}'\nhba_file = '{}'\nident_file = '{}'",
            self.data.display(),
            etc.join("pg_hba.conf").display(),
            etc.join("pg_ident.conf").display()
        )
        .expect("write conf");
        if let Some(user) = self.os_user {
            chown(&etc, user);
        }
        self.config_file = Some(etc.join("postgresql.conf"));
    }

    /// Promotes a standby and waits until it accepts writes.
    pub fn promote(&self) {
        let output = self.pg_ctl(&["promote", "-w", "-t", "120"]);
        assert!(output.status.success(), "promote failed: {}", String::from_utf8_lossy(&output.stderr));
    }

    /// A command for `program`, run as the server's OS user when we are root.
    pub fn as_pg_user(&self, program: &Path) -> Command {
        match self.os_user {
            Some(user) => {
                let mut command = Command::new("runuser");
                command.arg("-u").arg(user).arg("--").arg(program);
                command
            }
            None => Command::new(program),
        }
    }

    fn initdb(&self, options: &ClusterOptions) {
        fs::create_dir(&self.data).expect("mkdir data");
        if let Some(user) = self.os_user {
            chown(self.dir.path(), user);
            chown(&self.data, user);
        }
        let output = self
            .as_pg_user(&self.server_bin.join("initdb"))
            .args([
                "-D",
                self.data.to_str().expect("utf-8"),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ])
            .output()
            .expect("run initdb");
        assert!(output.status.success(), "initdb failed: {}", String::from_utf8_lossy(&output.stderr));
        let mut conf = vec![
            "listen_addresses = '127.0.0.1'".to_string(),
            format!("unix_socket_directories = '{}'", self.dir.path().display()),
            format!("wal_level = {}", options.wal_level),
            format!("max_wal_senders = {}", options.max_wal_senders),
            "max_replication_slots = 10".into(),
            "shared_buffers = 64MB".into(),
            "fsync = off".into(),
            "max_prepared_transactions = 5".into(),
            "log_min_messages = info".into(),
            "wal_sender_timeout = 60s".into(),
        ];
        if options.max_wal_senders == 0 {
            conf.push("max_replication_slots = 0".into());
        }
        if let Some(names) = &options.synchronous_standby_names {
            conf.push(format!("synchronous_standby_names = '{names}'"));
        }
        if let Some(size) = &options.wal_keep_size {
            conf.push(format!("wal_keep_size = '{size}'"));
        }
        if options.track_commit_timestamp {
            conf.push("track_commit_timestamp = on".into());
        }
        if let Some((cert, key)) = &options.ssl {
            conf.push("ssl = on".into());
            conf.push(format!("ssl_cert_file = '{}'", cert.display()));
            conf.push(format!("ssl_key_file = '{}'", key.display()));
        }
        conf.extend(options.conf.iter().cloned());
        let mut file = fs::OpenOptions::new().append(true).open(self.data.join("postgresql.conf")).expect("open conf");
        writeln!(file, "\n# tidemark test settings\n{}", conf.join("\n")).expect("write conf");
        let mut hba = options.hba.clone();
        hba.push("local all all trust".into());
        hba.push("host all postgres 127.0.0.1/32 trust".into());
        hba.push("host replication postgres 127.0.0.1/32 trust".into());
        fs::write(self.data.join("pg_hba.conf"), hba.join("\n") + "\n").expect("write pg_hba.conf");
    }

    fn write_port(&self) {
        let path = self.data.join("postgresql.auto.conf");
        let text = fs::read_to_string(&path).unwrap_or_default();
        let kept: Vec<&str> = text.lines().filter(|l| !l.starts_with("port =")).collect();
        fs::write(&path, format!("{}\nport = {}\n", kept.join("\n"), self.port)).expect("write port");
    }

    fn pg_ctl(&self, args: &[&str]) -> Output {
        let mut command = self.as_pg_user(&self.server_bin.join("pg_ctl"));
        command.arg("-D").arg(&self.data);
        if let (Some(file), Some(&"start")) = (&self.config_file, args.first()) {
            command.arg("-o").arg(format!("-c config_file='{}'", file.display()));
        }
        command.args(args).stdin(Stdio::null()).output().expect("run pg_ctl")
    }

    /// A connection URL for `user` (no password).
    pub fn url(&self, user: &str) -> String {
        format!("postgresql://{user}@127.0.0.1:{}/postgres", self.port)
    }

    /// Runs SQL as the superuser; returns stdout, unaligned, tuples only.
    pub fn psql(&self, sql: &str) -> String {
        let output = self.psql_output(sql);
        assert!(output.status.success(), "psql failed: {}\nSQL: {sql}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    }

    /// psql as the superuser over TCP: unaligned, tuples only, stop on error.
    fn psql_command(&self) -> Command {
        let mut command = Command::new(pg_bin().join("psql"));
        command
            .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-U", "postgres", "-d", "postgres"])
            .arg("-h")
            .arg(self.socket_dir.as_deref().unwrap_or(Path::new("127.0.0.1")))
            .arg("-p")
            .arg(self.port.to_string());
        command
    }

    pub fn psql_output(&self, sql: &str) -> Output {
        self.psql_command().arg("-c").arg(sql).stdin(Stdio::null()).output().expect("run psql")
    }

    /// Runs a psql script from a file (for many statements in one session).
    pub fn psql_file(&self, script: &str) -> String {
        let path = self.dir.path().join(format!("script-{}.sql", std::process::id()));
        fs::write(&path, script).expect("write script");
        let output = self.psql_command().arg("-f").arg(&path).output().expect("run psql");
        assert!(output.status.success(), "psql script failed: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    }

    pub fn pgbench_init(&self, scale: u32) {
        let output = self.pgbench_command(&["-i", "-q", "-s", &scale.to_string()]).output().expect("run pgbench -i");
        assert!(output.status.success(), "pgbench -i failed: {}", String::from_utf8_lossy(&output.stderr));
    }

    /// A pgbench run in the background; wait on it with `Child::wait`.
    pub fn pgbench_spawn(&self, args: &[&str]) -> Child {
        self.pgbench_command(args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("spawn pgbench")
    }

    fn pgbench_command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(pg_bin().join("pgbench"));
        command
            .args(["-h", "127.0.0.1", "-U", "postgres"])
            .arg("-p")
            .arg(self.port.to_string())
            .args(args)
            .arg("postgres");
        command.stdin(Stdio::null());
        command
    }

    pub fn stop(&self, mode: &str) {
        let output = self.pg_ctl(&["stop", "-w", "-t", "120", "-m", mode]);
        assert!(output.status.success(), "pg_ctl stop failed: {}", String::from_utf8_lossy(&output.stderr));
    }

    pub fn start_again(&self) {
        let output = self.pg_ctl(&["start", "-w", "-t", "120", "-l", self.log.to_str().expect("utf-8")]);
        assert!(output.status.success(), "pg_ctl start failed; see {}", self.log.display());
    }

    pub fn wal_dir(&self) -> PathBuf {
        self.data.join("pg_wal")
    }

    /// `pg_switch_wal()` after making sure there is something to switch from.
    /// Returns the start of the next segment: pg_switch_wal() itself returns
    /// the end of the switch record, but the rest of that segment is skipped,
    /// so the switched segment is complete only at its end.
    pub fn switch_wal(&self) -> tidemark_proto::Lsn {
        self.psql("SELECT txid_current()");
        let lsn: tidemark_proto::Lsn = self.psql("SELECT pg_switch_wal()").parse().expect("switch LSN");
        let size = 16 << 20;
        if lsn.segment_offset(size) == 0 {
            lsn
        } else {
            tidemark_proto::Lsn(lsn.segment_start(size).0 + size)
        }
    }

    pub fn current_lsn(&self) -> tidemark_proto::Lsn {
        self.psql("SELECT pg_current_wal_lsn()").parse().expect("LSN")
    }

    pub fn system_identifier(&self) -> String {
        self.psql("SELECT system_identifier FROM pg_control_system()")
    }

    fn postmaster_pid(&self) -> Option<i32> {
        fs::read_to_string(self.data.join("postmaster.pid")).ok()?.lines().next()?.trim().parse().ok()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- last lines of {} ---", self.log.display());
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
        let stopped = self.pg_ctl(&["stop", "-w", "-t", "30", "-m", "immediate"]).status.success();
        if !stopped {
            if let Some(pid) = self.postmaster_pid() {
                // SAFETY: kill on the pid of the postmaster this test started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        // Files written by the server belong to tidemark_pg; TempDir removes them as root.
        let _ = Duration::from_secs(0);
    }
}

pub fn chown(path: &Path, user: &str) {
    let status = Command::new("chown").arg("-R").arg(user).arg(path).status().expect("run chown");
    assert!(status.success(), "chown {} failed", path.display());
}
