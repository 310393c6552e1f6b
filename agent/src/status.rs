//! `tidemark-agent status`: where the archive stands. Reads the index
//! read-only (so it works while `run` holds it) and asks the server for its
//! current position.

use crate::config::Settings;
use crate::index::Index;
use crate::session;
use anyhow::Context;
use serde::Serialize;
use std::time::Duration;
use tidemark_proto::repo::backup::{BackupManifest, BackupSummary};
use tidemark_proto::repo::records::DrillRecord;
use tidemark_proto::{Lsn, TimelineId};
use tidemark_repo::catalog::{self, Window};
use tidemark_repo::{Fail, RepoError, Repository};

/// The report. **Stable JSON** (`status --json`): field names and order.
#[derive(Debug, Serialize)]
pub struct Status {
    pub system_identifier: String,
    pub timeline: TimelineId,
    pub server_lsn: Option<Lsn>,
    pub archived_lsn: Option<Lsn>,
    pub flushed_lsn: Option<Lsn>,
    pub lag_bytes: Option<u64>,
    pub last_backup: Option<BackupSummary>,
    pub window: Option<Window>,
    pub archived_segments: usize,
    pub server_error: Option<String>,
    /// WAL durable in the spool but not yet in the repository: how far the
    /// repository is behind (it grows during an object-store outage).
    pub repository_behind_bytes: Option<u64>,
    /// Why the repository could not be read, if it could not (an outage).
    pub repository_error: Option<String>,
    /// The newest restore drill (`tidemark-agent drill`), if one was recorded.
    pub last_drill: Option<DrillRecord>,
    /// After the newest archive gap (the server no longer had WAL the
    /// archive needed): where streaming went on. Nothing before it can be
    /// restored to from a backup older than it.
    pub archive_gap_resumed_at: Option<GapPoint>,
}

#[derive(Debug, Serialize)]
pub struct GapPoint {
    pub timeline: TimelineId,
    pub lsn: Lsn,
}

/// What the repository says: the last backup, the window, the last drill;
/// or why it could not be read.
#[derive(Debug, Default)]
pub struct RepositoryView {
    pub last_backup: Option<BackupSummary>,
    pub window: Option<Window>,
    pub last_drill: Option<DrillRecord>,
    pub error: Option<String>,
}

pub async fn status(settings: &Settings) -> anyhow::Result<Status> {
    let index_dir = settings.state_dir.join("index");
    if !index_dir.is_dir() {
        return Err(Fail::new(
            format!("no agent state in {}", settings.state_dir.display()),
            "run `tidemark-agent init` first, or pass the --state-dir the agent uses",
        )
        .into());
    }
    // Opening read-only retries (with sleeps) while `run` rotates files.
    let index = tokio::task::spawn_blocking(move || Index::open_read_only(&index_dir))
        .await
        .context("join the index open")??;
    let meta = index.meta()?.ok_or_else(|| Fail::new("the index has no metadata", "run `tidemark-agent init`"))?;
    let segments = index.segments()?;
    let progress = index.progress()?;
    let archived = index.archived_end()?;
    let (server_lsn, server_error) = match server_position(settings).await {
        Ok(lsn) => (Some(lsn), None),
        Err(e) => (None, Some(format!("{e:#}"))),
    };
    let view = repository_view(settings, archived, index.last_commit()?).await?;
    let stream_start = meta.stream_start_lsn;
    let flushed = progress.as_ref().map(|p| p.flushed_lsn);
    Ok(Status {
        system_identifier: meta.system_identifier,
        timeline: progress.as_ref().map(|p| p.timeline).unwrap_or(meta.stream_start_timeline),
        server_lsn,
        archived_lsn: archived,
        flushed_lsn: flushed,
        lag_bytes: server_lsn.map(|s| s.saturating_sub(archived.unwrap_or(stream_start))),
        last_backup: view.last_backup,
        window: view.window,
        archived_segments: segments.len(),
        server_error,
        repository_behind_bytes: flushed.map(|f| f.saturating_sub(archived.unwrap_or(stream_start))),
        repository_error: view.error,
        last_drill: view.last_drill,
        archive_gap_resumed_at: index.gap()?.map(|(timeline, lsn)| GapPoint { timeline, lsn }),
    })
}

/// The last backup, the window and the last drill, as the repository says. An unreachable
/// repository is reported (it is what status is for during an outage); a
/// wrong key or an uninitialized repository is an error.
pub async fn repository_view(
    settings: &Settings,
    archived: Option<Lsn>,
    last_commit: Option<(i64, u64)>,
) -> anyhow::Result<RepositoryView> {
    let repo = settings.open_repo()?;
    let reachable = match tokio::time::timeout(Duration::from_secs(10), repo.read_meta()).await {
        // An altered or older repository.json fails status, as a wrong key does.
        Ok(Err(e @ RepoError::Metadata(_))) => return Err(e.into()),
        Ok(read) => read.map_err(|e| format!("{:#}", anyhow::Error::new(e))),
        Err(_) => Err(format!("no answer from {} within 10 s", repo.display)),
    };
    match reachable {
        Ok(Some(meta)) => repo.unlock_with(&meta)?,
        Ok(None) => return Err(RepoError::NotInitialized(repo.display.clone()).into()),
        Err(unreachable) => return Ok(RepositoryView { error: Some(unreachable), ..Default::default() }),
    }
    Ok(read_facts(&repo, archived, last_commit).await)
}

/// The last backup, the window and the last drill from an open repository;
/// a failed read is reported in `error`.
pub async fn read_facts(repo: &Repository, archived: Option<Lsn>, last_commit: Option<(i64, u64)>) -> RepositoryView {
    read_facts_with(repo, archived, last_commit, &mut FactsCache::default()).await
}

/// What `run` keeps between readings of the repository's facts: the
/// manifests read, which never change once written (one whose backup.json
/// is gone is forgotten). With the backups found by directory, a quiet
/// agent's CPU no longer grows with the repository (every chunk listed and
/// the oldest manifest parsed every 5 minutes, before).
#[derive(Default)]
pub struct FactsCache {
    manifests: std::collections::HashMap<String, std::sync::Arc<BackupManifest>>,
}

impl FactsCache {
    async fn manifest(&mut self, repo: &Repository, id: &str) -> Result<std::sync::Arc<BackupManifest>, RepoError> {
        if let Some(manifest) = self.manifests.get(id) {
            return Ok(manifest.clone());
        }
        let manifest = std::sync::Arc::new(catalog::read_manifest(repo, id).await?);
        self.manifests.insert(id.to_string(), manifest.clone());
        Ok(manifest)
    }
}

/// [`read_facts`] with what earlier readings learnt.
pub async fn read_facts_with(
    repo: &Repository,
    archived: Option<Lsn>,
    last_commit: Option<(i64, u64)>,
    cache: &mut FactsCache,
) -> RepositoryView {
    let found = async {
        let ids = catalog::complete_backups_by_dir(repo).await?;
        // Forget what expire removed.
        cache.manifests.retain(|id, _| ids.contains(id));
        let last_backup = match ids.last() {
            Some(id) => Some(cache.manifest(repo, id).await?.summary()),
            None => None,
        };
        let window = window(repo, &ids, archived, last_commit, cache).await?;
        let last_drill = tidemark_repo::drills::latest(repo).await?;
        Ok::<_, RepoError>(RepositoryView { last_backup, window, last_drill, error: None })
    };
    found.await.unwrap_or_else(|e| RepositoryView {
        error: Some(format!("{:#}", anyhow::Error::new(e))),
        ..Default::default()
    })
}

/// The restorable window as far as this agent knows: from the end of the
/// oldest backup whose WAL is archived to the newest archived commit the
/// summaries hold (the unsummarized tail, at most a segment and the partial,
/// is not counted; `tidemark-restore list` decodes it too).
async fn window(
    repo: &Repository,
    backup_ids: &[String],
    archived: Option<Lsn>,
    last_commit: Option<(i64, u64)>,
    cache: &mut FactsCache,
) -> Result<Option<Window>, RepoError> {
    let Some(archived) = archived else { return Ok(None) };
    for id in backup_ids {
        let manifest = cache.manifest(repo, id).await?;
        if manifest.end_lsn > archived {
            continue; // its WAL is not all archived yet
        }
        let latest =
            last_commit.filter(|(_, lsn)| *lsn >= manifest.end_lsn.0 && *lsn < archived.0).and_then(|(micros, _)| {
                time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1000)
                    .ok()?
                    .format(&time::format_description::well_known::Rfc3339)
                    .ok()
            });
        return Ok(Some(Window::from_backup(&manifest, archived, latest)));
    }
    Ok(None)
}

async fn server_position(settings: &Settings) -> anyhow::Result<Lsn> {
    let mut params = settings.conn.clone();
    params.connect_timeout_secs = Some(params.connect_timeout_secs.unwrap_or(5));
    params.application_name = Some(format!("{}_status", settings.application_name));
    let work = async {
        let mut conn = session::connect_replication(&params).await?;
        let identity = session::identify(&mut conn).await?;
        conn.close().await;
        Ok::<_, anyhow::Error>(identity.xlogpos)
    };
    tokio::time::timeout(Duration::from_secs(10), work).await.map_err(|_| anyhow::anyhow!("timed out"))?
}

pub fn render_text(status: &Status) -> String {
    let or_none = |v: &Option<Lsn>| v.map(|l| l.to_string()).unwrap_or_else(|| "none".into());
    let mut out = String::new();
    out.push_str(&format!("system identifier   {}\n", status.system_identifier));
    out.push_str(&format!("timeline            {}\n", status.timeline));
    match &status.server_error {
        Some(e) => out.push_str(&format!("server LSN          unknown ({e})\n")),
        None => out.push_str(&format!("server LSN          {}\n", or_none(&status.server_lsn))),
    }
    out.push_str(&format!("flushed LSN         {}   (durable in the local spool)\n", or_none(&status.flushed_lsn)));
    out.push_str(&format!("archived LSN        {}   (durable in the repository)\n", or_none(&status.archived_lsn)));
    if let Some(lag) = status.lag_bytes {
        out.push_str(&format!("lag                 {lag} bytes\n"));
    }
    if let Some(behind) = status.repository_behind_bytes.filter(|b| *b > 0) {
        out.push_str(&format!("repository behind   {behind} bytes   (waiting in the spool for the repository)\n"));
    }
    if let Some(e) = &status.repository_error {
        out.push_str(&format!("repository          UNREACHABLE: {e}\n"));
    }
    out.push_str(&format!("archived segments   {}\n", status.archived_segments));
    match &status.last_backup {
        Some(b) => out.push_str(&format!(
            "last backup         {} ended {} (WAL {} .. {})\n",
            b.id, b.end_time, b.start_lsn, b.end_lsn
        )),
        None => out.push_str("last backup         none\n"),
    }
    match &status.window {
        Some(w) => out.push_str(&format!(
            "restorable window   {} .. {} (WAL to {})\n",
            w.earliest,
            w.latest.as_deref().unwrap_or("(no commit archived since)"),
            w.latest_lsn
        )),
        None => out.push_str("restorable window   none yet (no backup with its WAL archived)\n"),
    }
    if let Some(gap) = &status.archive_gap_resumed_at {
        out.push_str(&format!(
            "ARCHIVE GAP         WAL before {} on timeline {} was lost to the archive; restores start after it\n",
            gap.lsn, gap.timeline
        ));
    }
    match &status.last_drill {
        Some(d) => out.push_str(&format!("last drill          {}\n", drill_line(d))),
        None => out.push_str("last drill          none (run `tidemark-agent drill`)\n"),
    }
    out
}

/// One line for a drill: outcome, when, RTO or why it failed.
pub fn drill_line(drill: &DrillRecord) -> String {
    match &drill.failure {
        None => format!(
            "passed {} (target {}, RTO {:.1} s)",
            drill.finished,
            drill.target,
            drill.rto_seconds.unwrap_or(0.0)
        ),
        Some(why) => format!("FAILED {}: {why}", drill.finished),
    }
}
