//! Settings: the TOML file, then `TIDEMARK_*` variables, then flags; later wins.
//! clap already puts flags over their variables; the file fills what both left unset.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tidemark_proto::conninfo::ConnParams;
use tidemark_repo::retention::{parse_duration, Policy, DEFAULT_ORPHAN_GRACE};
use tidemark_repo::Fail;

/// The config file's keys. Unknown keys are refused, so a typo is not silently ignored.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub repo: Option<String>,
    pub pg_url: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub slot: Option<String>,
    pub application_name: Option<String>,
    pub partial_upload_interval_secs: Option<u64>,
    pub status_interval_secs: Option<u64>,
    pub backup_interval_secs: Option<u64>,
    /// `fast` or `spread`: the checkpoint a base backup starts with.
    pub backup_checkpoint: Option<String>,
    /// Most incremental backups in a row before the next is full (default 7; 0: always full).
    pub max_incremental_chain: Option<u32>,
    /// PostgreSQL 13–16: incremental backups read only changed blocks over SQL (default true).
    pub read_changed_blocks: Option<bool>,
    /// Key files of an encrypted repository (the current key and any older ones).
    pub key_files: Option<Vec<PathBuf>>,
    /// Most WAL (MiB) the spool holds waiting for the repository; 0 = no limit.
    pub spool_limit_mb: Option<u64>,
    /// The credentials cannot delete: the agent never tries (see `expire`).
    pub no_delete: Option<bool>,
    /// Seconds the repository's agent lease lasts without renewal.
    pub lease_secs: Option<u64>,
    pub retention: Option<RetentionConfig>,
    /// `run` serves /metrics and /healthz here (e.g. `127.0.0.1:9187`); off when unset.
    pub listen: Option<String>,
    pub drill: Option<DrillConfig>,
}

/// `[drill]`: restore drills (`tidemark-agent drill`, and `run` when `interval` is set).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrillConfig {
    /// `run` starts a drill this often (`30d`, `7d`, `12h`); off when unset.
    pub interval: Option<String>,
    /// `latest` (default) or `random` (a random time inside the window).
    pub target: Option<String>,
    /// SQL file: each query must return true.
    pub check_sql: Option<PathBuf>,
    /// The database the SQL checks and row counts start from (default postgres).
    pub check_database: Option<String>,
    /// A shell command run against the restored server (DATABASE_URL, PG* set); must exit 0.
    pub check_cmd: Option<String>,
    /// Where the scratch data directory goes (default: the state directory).
    pub scratch_dir: Option<PathBuf>,
    /// PostgreSQL's bin directory for the restored server (default: from the backup's version).
    pub pg_bin: Option<PathBuf>,
    /// Longest a drill may take before it is stopped and recorded as failed (default 6h).
    pub timeout: Option<String>,
    /// Keep the check command's output (its last lines) in the drill record
    /// (default false: the record, kept in the repository for good, says
    /// only how it exited, since the output may hold data or secrets).
    pub record_check_output: Option<bool>,
}

/// `[drill]` checked and resolved; flags of `drill` override it field by field.
#[derive(Debug, Clone, PartialEq)]
pub struct DrillSettings {
    pub interval: Option<Duration>,
    pub random_target: bool,
    pub check_sql: Option<PathBuf>,
    pub check_database: String,
    pub check_cmd: Option<String>,
    pub scratch_dir: Option<PathBuf>,
    pub pg_bin: Option<PathBuf>,
    pub timeout: Duration,
    pub record_check_output: bool,
}

impl DrillConfig {
    pub fn resolve(&self) -> Result<DrillSettings, Fail> {
        let duration = |name: &str, text: &Option<String>| -> Result<Option<Duration>, Fail> {
            let parsed = text
                .as_deref()
                .map(parse_duration)
                .transpose()
                .map_err(|e| Fail::new(format!("drill {name}: {e}"), "durations look like 30d, 12h, 15m or 90s"))?;
            Ok(parsed.map(|d| Duration::from_secs(d.whole_seconds().max(0) as u64)))
        };
        let interval = duration("interval", &self.interval)?.filter(|d| !d.is_zero());
        if interval.is_some_and(|d| d < Duration::from_secs(3600)) {
            return Err(Fail::new(
                "drill interval is shorter than an hour",
                "a drill restores the whole cluster: run it daily at most (e.g. interval = \"30d\")",
            ));
        }
        let random_target = match self.target.as_deref() {
            None | Some("latest") => false,
            Some("random") => true,
            Some(other) => return Err(Fail::new(format!("invalid drill target {other:?}"), "use latest or random")),
        };
        Ok(DrillSettings {
            interval,
            random_target,
            check_sql: self.check_sql.clone(),
            check_database: self.check_database.clone().unwrap_or_else(|| "postgres".into()),
            check_cmd: self.check_cmd.clone(),
            scratch_dir: self.scratch_dir.clone(),
            pg_bin: self.pg_bin.clone(),
            timeout: duration("timeout", &self.timeout)?.unwrap_or(Duration::from_secs(6 * 3600)),
            record_check_output: self.record_check_output.unwrap_or(false),
        })
    }
}

/// `[retention]`: durations as text (`30d`, `12h`, `90s`).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    pub recovery_window: Option<String>,
    pub keep_daily: Option<u32>,
    pub keep_weekly: Option<u32>,
    pub keep_monthly: Option<u32>,
    pub min_backups: Option<u32>,
    pub audit_window: Option<String>,
    /// How old leftovers of interrupted uploads must be to count as orphans (default 1d).
    pub orphan_grace: Option<String>,
}

impl RetentionConfig {
    /// Fields set here win over `base`'s.
    pub fn over(self, base: RetentionConfig) -> RetentionConfig {
        RetentionConfig {
            recovery_window: self.recovery_window.or(base.recovery_window),
            keep_daily: self.keep_daily.or(base.keep_daily),
            keep_weekly: self.keep_weekly.or(base.keep_weekly),
            keep_monthly: self.keep_monthly.or(base.keep_monthly),
            min_backups: self.min_backups.or(base.min_backups),
            audit_window: self.audit_window.or(base.audit_window),
            orphan_grace: self.orphan_grace.or(base.orphan_grace),
        }
    }

    /// The policy and orphan grace, or what is wrong with them.
    pub fn resolve(&self) -> Result<(Policy, time::Duration), Fail> {
        let duration = |name: &str, text: &Option<String>| -> Result<Option<time::Duration>, Fail> {
            text.as_deref()
                .map(parse_duration)
                .transpose()
                .map_err(|e| Fail::new(format!("retention {name}: {e}"), "durations look like 30d, 12h, 15m or 90s"))
        };
        let policy = Policy {
            recovery_window: duration("recovery_window", &self.recovery_window)?,
            keep_daily: self.keep_daily,
            keep_weekly: self.keep_weekly,
            keep_monthly: self.keep_monthly,
            min_backups: self.min_backups,
            audit_window: duration("audit_window", &self.audit_window)?,
        };
        policy.check().map_err(|e| Fail::new(e, "fix the [retention] table or the expire flags"))?;
        let grace = duration("orphan_grace", &self.orphan_grace)?.unwrap_or(DEFAULT_ORPHAN_GRACE);
        Ok((policy, grace))
    }
}

/// What the command line (with its variables) said; `None` where it said nothing.
#[derive(Debug, Default, Clone)]
pub struct CliConfig {
    pub config: Option<PathBuf>,
    pub repo: Option<String>,
    pub pg_url: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub slot: Option<String>,
    pub application_name: Option<String>,
    pub partial_upload_interval_secs: Option<u64>,
    pub backup_interval_secs: Option<u64>,
    pub backup_checkpoint: Option<String>,
    pub max_incremental_chain: Option<u32>,
    pub read_changed_blocks: Option<bool>,
    pub key_files: Vec<PathBuf>,
    pub spool_limit_mb: Option<u64>,
    pub no_delete: bool,
    pub listen: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub repo_url: String,
    pub conn: ConnParams,
    pub state_dir: PathBuf,
    pub slot: String,
    pub application_name: String,
    /// How often the segment still being filled is uploaded as a partial object.
    pub partial_upload_interval: Duration,
    /// How often a standby status update is sent when nothing else prompts one.
    pub status_interval: Duration,
    /// Time between scheduled base backups in `run` (default a day); 0 turns them off.
    pub backup_interval: Option<Duration>,
    /// Start backups with an immediate checkpoint (`fast`, the default) or
    /// let it spread over checkpoint_completion_target (`spread`: less I/O
    /// burst, but the backup may wait minutes to start).
    pub backup_fast_checkpoint: bool,
    /// Most incremental backups in a row on one full backup (0: every backup is full).
    pub max_incremental_chain: u32,
    /// PostgreSQL 13–16: an incremental backup reads only the blocks the
    /// WAL map names, over SQL (`backup/sql.rs`), instead of every file.
    pub read_changed_blocks: bool,
    /// Key files of an encrypted repository; empty for a plain one.
    pub key_files: Vec<PathBuf>,
    /// Most complete-segment bytes the spool holds waiting for the
    /// repository before streaming pauses; `None` = only the disk limits it.
    pub spool_limit: Option<u64>,
    /// Never delete from the repository (credentials without delete rights).
    pub no_delete: bool,
    pub lease_length: Duration,
    pub retention: RetentionConfig,
    /// Where `run` serves /metrics and /healthz.
    pub listen: Option<std::net::SocketAddr>,
    pub drill: DrillSettings,
}

impl Settings {
    /// The repository for writing, as these settings allow: with `no_delete`
    /// the handle refuses every delete before the store is asked.
    pub async fn open_repository(
        &self,
    ) -> Result<(tidemark_repo::Repository, tidemark_proto::repo::layout::RepositoryMeta), tidemark_repo::RepoError>
    {
        let (repo, meta) = self.open_initialized(true).await?;
        Ok((if self.no_delete { repo.forbid_deletes() } else { repo }, meta))
    }

    /// The repository, opened (without creating it), remembering its keys
    /// in the state directory ([`tidemark_repo::trust`]).
    pub fn open_repo(&self) -> Result<tidemark_repo::Repository, tidemark_repo::RepoError> {
        let repo = tidemark_repo::Repository::open(&self.repo_url, &self.key_files, tidemark_repo::Create::No)?;
        Ok(repo.remembering(self.repo_memory_file()))
    }

    /// [`tidemark_repo::Repository::open_initialized`], remembering the
    /// repository's keys in the state directory.
    pub async fn open_initialized(
        &self,
        writes: bool,
    ) -> Result<(tidemark_repo::Repository, tidemark_proto::repo::layout::RepositoryMeta), tidemark_repo::RepoError>
    {
        self.open_repo()?.initialized(writes).await
    }

    /// Where the agent remembers the repository's keys and current key.
    pub fn repo_memory_file(&self) -> PathBuf {
        self.state_dir.join("known-repository.json")
    }
}

pub const DEFAULT_CONFIG: &str = "tidemark.toml";

/// A week of daily incremental backups on one full one: a restore reads at
/// most eight backups, and a full one still comes weekly.
pub const DEFAULT_MAX_INCREMENTAL_CHAIN: u32 = 7;

pub fn load_file(path: Option<&Path>) -> Result<FileConfig, Fail> {
    let (path, explicit) = match path {
        Some(p) => (p.to_path_buf(), true),
        None => (PathBuf::from(DEFAULT_CONFIG), false),
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => toml::from_str(&text).map_err(|e| {
            Fail::new(
                format!("config file {} is invalid: {}", path.display(), e.message()),
                "fix the file; known keys are repo, pg_url, state_dir, slot, application_name, partial_upload_interval_secs, status_interval_secs, backup_interval_secs, backup_checkpoint, max_incremental_chain, read_changed_blocks, key_files, spool_limit_mb, no_delete, lease_secs, listen, a [retention] table (recovery_window, keep_daily, keep_weekly, keep_monthly, min_backups, audit_window, orphan_grace) and a [drill] table (interval, target, check_sql, check_database, check_cmd, scratch_dir, pg_bin, timeout, record_check_output)",
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => Ok(FileConfig::default()),
        Err(e) => Err(Fail::new(format!("cannot read config file {}: {e}", path.display()), "check --config")),
    }
}

/// Merges file and command line into settings. `env` holds the process
/// environment (for `DATABASE_URL` and libpq's `PG*` variables).
pub fn resolve(file: FileConfig, cli: CliConfig, env: &BTreeMap<String, String>) -> Result<Settings, Fail> {
    let pg_url = cli.pg_url.or(file.pg_url).or_else(|| env.get("DATABASE_URL").cloned());
    let mut conn = tidemark_pg::settings::resolve_in(pg_url.as_deref(), env)
        .map_err(|e| Fail::new(e.message, format!("{}; see --pg-url", e.hint)))?;
    if conn.user.is_none() {
        conn.user = env.get("USER").cloned().or_else(|| Some("postgres".into()));
    }
    let application_name = cli
        .application_name
        .or(file.application_name)
        .or_else(|| conn.application_name.clone())
        .unwrap_or_else(|| "tidemark".into());
    conn.application_name = Some(application_name.clone());
    let slot = cli.slot.or(file.slot).unwrap_or_else(|| "tidemark".into());
    if slot.is_empty()
        || !slot.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        || slot.len() > 63
    {
        return Err(Fail::new(
            format!("invalid slot name {slot:?}"),
            "slot names use lower-case letters, digits and underscores, at most 63 characters",
        ));
    }
    let partial = cli.partial_upload_interval_secs.or(file.partial_upload_interval_secs).unwrap_or(10);
    let status = file.status_interval_secs.unwrap_or(10);
    if partial == 0 || status == 0 {
        return Err(Fail::new(
            "intervals must be at least 1 second",
            "fix partial_upload_interval_secs / status_interval_secs",
        ));
    }
    let backup_fast_checkpoint = match cli.backup_checkpoint.or(file.backup_checkpoint).as_deref() {
        None | Some("fast") => true,
        Some("spread") => false,
        Some(other) => {
            return Err(Fail::new(format!("invalid backup checkpoint {other:?}"), "use fast or spread"));
        }
    };
    // Two minutes: a renewal (a read and a durable write) every 40 s costs
    // a quiet agent half of what it did at 60 s, and a lease only
    // has to run out when its holder's host died (a dead process on the
    // same host is taken over at once).
    let lease = file.lease_secs.unwrap_or(120);
    if lease < 3 {
        return Err(Fail::new("lease_secs must be at least 3", "the agent renews its lease every third of it"));
    }
    let retention = file.retention.clone().unwrap_or_default();
    retention.resolve()?;
    let listen = match cli.listen.or(file.listen.clone()).filter(|l| !l.is_empty()) {
        None => None,
        Some(text) => Some(text.parse().map_err(|_| {
            Fail::new(
                format!("invalid listen address {text:?}"),
                "give an IP address and port, e.g. 127.0.0.1:9187 ([::1]:9187 for IPv6)",
            )
        })?),
    };
    let drill = file.drill.clone().unwrap_or_default().resolve()?;
    Ok(Settings {
        listen,
        drill,
        no_delete: cli.no_delete || file.no_delete.unwrap_or(false),
        lease_length: Duration::from_secs(lease),
        retention,
        repo_url: cli.repo.or(file.repo).unwrap_or_else(|| "./tidemark-repo".into()),
        conn,
        state_dir: cli.state_dir.or(file.state_dir).unwrap_or_else(|| PathBuf::from("./tidemark-state")),
        slot,
        application_name,
        partial_upload_interval: Duration::from_secs(partial),
        status_interval: Duration::from_secs(status),
        backup_interval: match cli.backup_interval_secs.or(file.backup_interval_secs).unwrap_or(86_400) {
            0 => None,
            secs => Some(Duration::from_secs(secs)),
        },
        backup_fast_checkpoint,
        max_incremental_chain: cli
            .max_incremental_chain
            .or(file.max_incremental_chain)
            .unwrap_or(DEFAULT_MAX_INCREMENTAL_CHAIN),
        read_changed_blocks: cli.read_changed_blocks.or(file.read_changed_blocks).unwrap_or(true),
        key_files: if cli.key_files.is_empty() { file.key_files.unwrap_or_default() } else { cli.key_files },
        spool_limit: match cli.spool_limit_mb.or(file.spool_limit_mb).unwrap_or(0) {
            0 => None,
            mb => Some(mb << 20),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_over_file_over_defaults() {
        let file: FileConfig =
            toml::from_str("repo = 'file:///from-file'\nslot = 'fileslot'\npartial_upload_interval_secs = 3")
                .expect("toml");
        let cli = CliConfig { repo: Some("file:///from-flag".into()), ..Default::default() };
        let settings = resolve(file, cli, &BTreeMap::new()).expect("resolve");
        assert_eq!(settings.repo_url, "file:///from-flag");
        assert_eq!(settings.slot, "fileslot");
        assert_eq!(settings.partial_upload_interval, Duration::from_secs(3));
        assert_eq!(settings.state_dir, PathBuf::from("./tidemark-state"));
    }

    #[test]
    fn unknown_keys_and_bad_slots_refused() {
        assert!(toml::from_str::<FileConfig>("rep = 'x'").is_err());
        let cli = CliConfig { slot: Some("Bad-Slot".into()), ..Default::default() };
        assert!(resolve(FileConfig::default(), cli, &BTreeMap::new()).is_err());
        assert!(toml::from_str::<FileConfig>("[retention]\nrecovery_windw = '1d'").is_err());
    }

    #[test]
    fn retention_table() {
        let file: FileConfig =
            toml::from_str("[retention]\nrecovery_window = '150s'\nmin_backups = 2\nkeep_daily = 7").expect("toml");
        let settings = resolve(file, CliConfig::default(), &BTreeMap::new()).expect("resolve");
        let (policy, grace) = settings.retention.resolve().expect("policy");
        assert_eq!(policy.recovery_window, Some(time::Duration::seconds(150)));
        assert_eq!((policy.min_backups, policy.keep_daily), (Some(2), Some(7)));
        assert_eq!(grace, time::Duration::DAY);
        let bad: FileConfig = toml::from_str("[retention]\nrecovery_window = 'soon'").expect("toml");
        let error = resolve(bad, CliConfig::default(), &BTreeMap::new()).unwrap_err();
        assert!(error.message.contains("recovery_window"), "{error:?}");
        let nothing: FileConfig = toml::from_str("[retention]\nrecovery_window = '0s'").expect("toml");
        assert!(resolve(nothing, CliConfig::default(), &BTreeMap::new())
            .unwrap_err()
            .message
            .contains("keeps nothing"));
    }

    #[test]
    fn listen_and_drill_settings() {
        let file: FileConfig =
            toml::from_str("listen = '127.0.0.1:9187'\n[drill]\ninterval = '30d'\ntarget = 'random'").expect("toml");
        let settings = resolve(file, CliConfig::default(), &BTreeMap::new()).expect("resolve");
        assert_eq!(settings.listen, Some("127.0.0.1:9187".parse().expect("addr")));
        assert_eq!(settings.drill.interval, Some(Duration::from_secs(30 * 86_400)));
        assert!(settings.drill.random_target);
        assert_eq!(settings.drill.check_database, "postgres");
        assert!(!settings.drill.record_check_output, "a check command's output stays out of the record unless asked");
        let keep: FileConfig = toml::from_str("[drill]\nrecord_check_output = true").expect("toml");
        assert!(resolve(keep, CliConfig::default(), &BTreeMap::new()).expect("resolve").drill.record_check_output);
        let cli = CliConfig { listen: Some("localhost".into()), ..Default::default() };
        assert!(resolve(FileConfig::default(), cli, &BTreeMap::new()).unwrap_err().message.contains("listen"));
        let bad: FileConfig = toml::from_str("[drill]\ninterval = '5m'").expect("toml");
        assert!(resolve(bad, CliConfig::default(), &BTreeMap::new()).unwrap_err().message.contains("hour"));
        assert!(toml::from_str::<FileConfig>("[drill]\ninterval = '30d'\ncheck = 'x'").is_err());
    }

    #[test]
    fn database_url_used_when_no_flag() {
        let env: BTreeMap<String, String> = [("DATABASE_URL".to_string(), "postgresql://u@h:7/d".to_string())].into();
        let settings = resolve(FileConfig::default(), CliConfig::default(), &env).expect("resolve");
        assert_eq!(settings.conn.port, 7);
        assert_eq!(settings.conn.user.as_deref(), Some("u"));
    }
}
