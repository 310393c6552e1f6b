//! `tidemark-agent status`: where the archive stands. Reads the index
//! read-only (so it works while `run` holds it) and asks the server for its
//! current position.

use crate::config::Settings;
use crate::fail::Fail;
use crate::index::{archived_end, Index};
use crate::pg::session;
use serde::Serialize;
use std::time::Duration;
use tidemark_proto::Lsn;

/// The report; field names are the stable JSON of DESIGN.md.
#[derive(Debug, Serialize)]
pub struct Status {
    pub system_identifier: String,
    pub timeline: u32,
    pub server_lsn: Option<String>,
    pub archived_lsn: Option<String>,
    pub flushed_lsn: Option<String>,
    pub lag_bytes: Option<u64>,
    pub last_backup: Option<serde_json::Value>,
    pub window: Option<serde_json::Value>,
    pub archived_segments: usize,
    pub server_error: Option<String>,
    /// WAL durable in the spool but not yet in the repository: how far the
    /// repository is behind (it grows during an object-store outage).
    pub repository_behind_bytes: Option<u64>,
    /// Why the repository could not be read, if it could not (an outage).
    pub repository_error: Option<String>,
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
    let index = Index::open_read_only(&index_dir)?;
    let meta = index.meta()?.ok_or_else(|| Fail::new("the index has no metadata", "run `tidemark-agent init`"))?;
    let segments = index.segments()?;
    let partials = index.partials()?;
    let progress = index.progress()?;
    let archived = archived_end(&segments, &partials);
    let (server_lsn, server_error) = match server_position(settings).await {
        Ok(lsn) => (Some(lsn), None),
        Err(e) => (None, Some(format!("{e:#}"))),
    };
    let timeline = progress.as_ref().map(|p| p.timeline).unwrap_or(meta.stream_start_timeline);
    // An unreachable repository is reported (it is what status is for during
    // an outage); a wrong key or another cluster's repository is an error.
    let repo = crate::store::Repository::open(&settings.repo_url, false)?;
    let meta_read = tokio::time::timeout(Duration::from_secs(10), repo.read_meta())
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer from {} within 10 s", repo.display)));
    let last_commit = index.last_commit()?;
    let (last_backup, window, repository_error) = match meta_read {
        Ok(Some(repo_meta)) => {
            let mut repo = repo;
            repo.set_keyring(crate::store::unlock(&repo_meta, &repo.display, &settings.key_files)?);
            let found = async {
                Ok::<_, anyhow::Error>((last_backup(&repo).await?, window(&repo, archived, last_commit).await?))
            };
            match found.await {
                Ok((backup, window)) => (backup, window, None),
                Err(e) => (None, None, Some(format!("{e:#}"))),
            }
        }
        Ok(None) => {
            return Err(Fail::new(
                format!("repository {} is not initialized", repo.display),
                "run `tidemark-agent init` with the same --repo",
            )
            .into())
        }
        Err(e) => (None, None, Some(format!("{e:#}"))),
    };
    let flushed = progress.as_ref().map(|p| Lsn(p.flushed_lsn));
    let repository_behind_bytes =
        flushed.map(|f| f.0.saturating_sub(archived.map(|a| a.0).unwrap_or(meta.stream_start_lsn)));
    Ok(Status {
        system_identifier: meta.system_identifier,
        timeline,
        server_lsn: server_lsn.map(|l| l.to_string()),
        archived_lsn: archived.map(|l| l.to_string()),
        flushed_lsn: progress.map(|p| Lsn(p.flushed_lsn).to_string()),
        lag_bytes: server_lsn.map(|s| s.saturating_sub(archived.unwrap_or(Lsn(meta.stream_start_lsn)))),
        last_backup,
        window,
        archived_segments: segments.len(),
        server_error,
        repository_behind_bytes,
        repository_error,
    })
}

/// The restorable window as far as this agent knows: from the end of the
/// oldest backup whose WAL is archived to the newest archived commit the
/// summaries hold (the unsummarized tail, at most a segment and the partial,
/// is not counted; `tidemark-restore list` decodes it too).
async fn window(
    repo: &crate::store::Repository,
    archived: Option<Lsn>,
    last_commit: Option<(i64, u64)>,
) -> anyhow::Result<Option<serde_json::Value>> {
    let Some(archived) = archived else { return Ok(None) };
    for id in crate::backup::complete_backups(repo).await? {
        let manifest = crate::backup::read_manifest(repo, &id).await?;
        let Ok(end) = manifest.end_lsn.parse::<Lsn>() else { continue };
        if end > archived {
            continue; // its WAL is not all archived yet
        }
        let latest = last_commit.filter(|(_, lsn)| *lsn >= end.0 && *lsn < archived.0).and_then(|(micros, _)| {
            time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1000)
                .ok()?
                .format(&time::format_description::well_known::Rfc3339)
                .ok()
        });
        return Ok(Some(serde_json::json!({
            "earliest": manifest.end_time,
            "latest": latest,
            "earliest_lsn": manifest.end_lsn,
            "latest_lsn": archived.to_string(),
        })));
    }
    Ok(None)
}

async fn last_backup(repo: &crate::store::Repository) -> anyhow::Result<Option<serde_json::Value>> {
    let Some(id) = crate::backup::complete_backups(repo).await?.pop() else { return Ok(None) };
    let m = crate::backup::read_manifest(repo, &id).await?;
    Ok(Some(m.summary()))
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
    let or_none = |v: &Option<String>| v.clone().unwrap_or_else(|| "none".into());
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
            b["id"].as_str().unwrap_or("?"),
            b["end_time"].as_str().unwrap_or("?"),
            b["start_lsn"].as_str().unwrap_or("?"),
            b["end_lsn"].as_str().unwrap_or("?")
        )),
        None => out.push_str("last backup         none\n"),
    }
    match &status.window {
        Some(w) => out.push_str(&format!(
            "restorable window   {} .. {} (WAL to {})\n",
            w["earliest"].as_str().unwrap_or("?"),
            w["latest"].as_str().unwrap_or("(no commit archived since)"),
            w["latest_lsn"].as_str().unwrap_or("?")
        )),
        None => out.push_str("restorable window   none yet (no backup with its WAL archived)\n"),
    }
    out
}
