//! A private, throwaway copy of the cluster as of a target, for `extract`
//! and `repair`: restored from the repository (with `restore --start
//! --pause`, so nothing but reads happen to it) into a new directory under
//! `--scratch-dir`, its tablespaces moved inside it too, started isolated
//! (`isolate.rs`: reachable only over its own socket in that directory, no
//! subscriptions, no synchronous standby); stopped and removed when dropped.
//! `advance_to_xid` moves its recovery forward to just after a transaction,
//! so `repair` reads both sides of one transaction from one restore.

use crate::restore::{probe_recovery, restore, RestoreOptions};
use crate::target::Target;
use anyhow::Context;
use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tidemark_repo::{Fail, Repository};
use tokio_postgres::Client;

pub struct ScratchOptions {
    /// Where the scratch directory is made (default: the system's temp dir).
    pub parent: Option<PathBuf>,
    pub pg_bin: Option<PathBuf>,
    pub cache_dir: Option<PathBuf>,
    pub wait_timeout: Duration,
}

pub struct Scratch {
    dir: PathBuf,
    /// Bytes fetched, and bytes of other databases left out.
    pub fetched_bytes: u64,
    pub left_out_bytes: u64,
    pub pgdata: PathBuf,
    pub port: u16,
    /// `--pg-bin`, else the Debian directory of the restored version.
    pg_bin: Option<PathBuf>,
}

fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("find a free port for the scratch server")?;
    Ok(listener.local_addr()?.port())
}

impl Scratch {
    /// Restores the cluster as of `target` and starts it, paused there;
    /// with `only_database`, that user database's files alone are fetched.
    pub async fn start(
        repo: &Repository,
        repo_url: &str,
        target: Target,
        only_database: Option<u32>,
        options: &ScratchOptions,
    ) -> anyhow::Result<Scratch> {
        let parent = options.parent.clone().unwrap_or_else(std::env::temp_dir);
        let mut random = [0u8; 4];
        getrandom::getrandom(&mut random).context("random scratch name")?;
        let dir = parent.join(format!("tidemark-scratch-{}-{:08x}", std::process::id(), u32::from_le_bytes(random)));
        std::fs::DirBuilder::new().mode(0o700).create(&dir).with_context(|| format!("create {}", dir.display()))?;
        let mut scratch = Scratch {
            dir: dir.clone(),
            fetched_bytes: 0,
            left_out_bytes: 0,
            pgdata: dir.join("data"),
            port: free_port()?,
            pg_bin: options.pg_bin.clone(),
        };
        // Paused at the target (a hot standby, read-only); --latest has no
        // target to pause at: recovery ends and the copy promotes.
        let pause = !matches!(target, Target::Latest);
        let restore_options = RestoreOptions {
            pgdata: scratch.pgdata.clone(),
            target,
            backup_id: None,
            timeline: None,
            dry_run: false,
            force: false,
            // A scratch restore runs PostgreSQL (--start), which refuses root first.
            allow_root: false,
            delta: false,
            start: true,
            port: scratch.port,
            pause,
            pg_bin: options.pg_bin.clone(),
            wait_timeout: options.wait_timeout,
            prefetch: true,
            cache_dir: options.cache_dir.clone(),
            tablespace_map: Vec::new(),
            // Inside the scratch directory, never where the live server's are.
            tablespaces_under: Some(dir.clone()),
            only_databases: only_database.map(|oid| vec![oid]),
            // The inert configuration: it must reach nothing the source reaches.
            isolate: true,
        };
        let report = restore(repo, repo_url, restore_options).await?;
        (scratch.fetched_bytes, scratch.left_out_bytes) = (report.bytes_to_fetch, report.bytes_left_out);
        if let Some(found) = report.pg_bin {
            scratch.pg_bin = Some(PathBuf::from(found));
        }
        Ok(scratch)
    }

    /// A read-only session on `database` with the canonical output style.
    pub async fn connect(&self, database: &str) -> anyhow::Result<Client> {
        let (client, connection) = tokio_postgres::Config::new()
            .host_path(&self.pgdata)
            .port(self.port)
            .user("postgres")
            .dbname(database)
            .connect(tokio_postgres::NoTls)
            .await
            .with_context(|| format!("connect to database {database:?} of the scratch restore"))?;
        tokio::spawn(connection);
        crate::rows::canonical_session(&client).await?;
        // Only reads happen here, and `--where` runs the user's SQL: a copy
        // that promoted (--latest) would otherwise accept writes and
        // functions with side effects.
        client
            .batch_execute("SET default_transaction_read_only = on")
            .await
            .context("make the scratch session read-only")?;
        Ok(client)
    }

    /// Stops the server, moves the recovery target to just after `xid`
    /// commits, and starts it again: recovery continues from where it
    /// paused (targets may move forward, never back) and pauses there.
    pub async fn advance_to_xid(&self, xid: u32, timeout: Duration) -> anyhow::Result<()> {
        self.pg_ctl(&["stop", "-w", "-t", "300", "-m", "fast"]).await?;
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(self.pgdata.join("postgresql.auto.conf"))
            .context("open the scratch postgresql.auto.conf")?;
        writeln!(file, "\n# tidemark: on to just after transaction {xid}")?;
        writeln!(file, "recovery_target_xid = '{xid}'\nrecovery_target_inclusive = 'on'")?;
        drop(file);
        let options =
            format!("-p {} -c listen_addresses='' -c unix_socket_directories='{}'", self.port, self.pgdata.display());
        let log = self.pgdata.join("tidemark-scratch.log");
        let log_text = log.display().to_string();
        self.pg_ctl(&["start", "-W", "-l", &log_text, "-o", &options]).await?;
        let started = Instant::now();
        loop {
            if let Ok(Some(probe)) = probe_recovery(&self.pgdata, self.port).await {
                if !probe.in_recovery || probe.paused {
                    return Ok(());
                }
            }
            if crate::restore::running_postmaster(&self.pgdata).is_none() && started.elapsed() > Duration::from_secs(5)
            {
                anyhow::bail!("the scratch server stopped while replaying to transaction {xid}; see {}", log.display());
            }
            if started.elapsed() > timeout {
                anyhow::bail!("replay to transaction {xid} did not finish within {} s", timeout.as_secs());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn pg_ctl_program(&self) -> PathBuf {
        let bin = self.pg_bin.clone().unwrap_or_else(|| {
            let major = std::fs::read_to_string(self.pgdata.join("PG_VERSION")).unwrap_or_default();
            PathBuf::from(format!("/usr/lib/postgresql/{}/bin", major.trim()))
        });
        bin.join("pg_ctl")
    }

    async fn pg_ctl(&self, args: &[&str]) -> anyhow::Result<()> {
        let program = self.pg_ctl_program();
        let output = tokio::process::Command::new(&program)
            .arg("-D")
            .arg(&self.pgdata)
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .with_context(|| format!("run {}", program.display()))?;
        if !output.status.success() {
            return Err(Fail::new(
                format!(
                    "{} {} failed: {}",
                    program.display(),
                    args.join(" "),
                    String::from_utf8_lossy(&output.stderr).trim()
                ),
                "see the scratch server's log; --pg-bin names PostgreSQL's bin directory",
            )
            .into());
        }
        Ok(())
    }

    /// Stops the server and removes everything (also on error paths, from Drop).
    fn remove(&self) {
        if crate::restore::running_postmaster(&self.pgdata).is_some() {
            let _ = std::process::Command::new(self.pg_ctl_program())
                .arg("-D")
                .arg(&self.pgdata)
                .args(["stop", "-w", "-t", "60", "-m", "immediate"])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// One line on what the scratch restore fetched, for people.
    pub fn summary(&self) -> String {
        let mb = |b: u64| b as f64 / 1e6;
        match self.left_out_bytes {
            0 => format!("scratch restore: {:.1} MB fetched", mb(self.fetched_bytes)),
            left => format!(
                "scratch restore: {:.1} MB fetched, {:.1} MB of other databases left out",
                mb(self.fetched_bytes),
                mb(left)
            ),
        }
    }
}

/// The OID of the live database `live` is connected to, when it is the
/// cluster the repository holds (same system identifier): a scratch restore
/// then fetches that database alone. `None` (fetch everything) otherwise,
/// or when the live server will not say.
pub async fn live_database_oid(repo: &Repository, live: &Client) -> Option<u32> {
    let system: String =
        live.query_one("SELECT system_identifier::text FROM pg_control_system()", &[]).await.ok()?.get(0);
    if system != repo.meta().await.ok()?.system_identifier {
        return None;
    }
    live.query_one("SELECT oid FROM pg_database WHERE datname = current_database()", &[]).await.ok().map(|r| r.get(0))
}

impl Drop for Scratch {
    fn drop(&mut self) {
        self.remove();
    }
}
