//! Restore drill records (`drills/`): each `tidemark-agent drill` stores
//! one, passed or failed, so `status`, `list` and the metrics show the last
//! drill whichever process ran it (the agent's schedule or a systemd timer).

use crate::error::RepoError;
use crate::events::compact;
use crate::store::Repository;
use tidemark_proto::repo::frame::{self, Compression};
use tidemark_proto::repo::records::{drill_key, DrillRecord, DRILLS_PREFIX};
use time::OffsetDateTime;

/// Stores `record` under a new name (never overwriting one).
pub async fn save(repo: &Repository, record: &DrillRecord) -> Result<String, RepoError> {
    let json = serde_json::to_vec(record).map_err(|e| RepoError::corrupt("drill", e.to_string()))?;
    let (object, _) =
        frame::encode(&json, Compression::Zstd { level: 3 }).map_err(|e| RepoError::corrupt("drill", e.to_string()))?;
    let mut nonce = [0u8; 4];
    let _ = getrandom::getrandom(&mut nonce);
    let key = drill_key(&compact(OffsetDateTime::now_utc()), u32::from_le_bytes(nonce));
    repo.put(&key, object).await?;
    Ok(key)
}

/// The newest drill, if any was recorded (names sort by time).
pub async fn latest(repo: &Repository) -> Result<Option<DrillRecord>, RepoError> {
    let mut keys = repo.list(DRILLS_PREFIX.trim_end_matches('/')).await?;
    keys.sort();
    let Some(key) = keys.pop() else { return Ok(None) };
    let Some(raw) = repo.get(&key).await? else { return Ok(None) };
    let record = serde_json::from_slice(&raw).map_err(|e| RepoError::corrupt(&key, e.to_string()))?;
    Ok(Some(record))
}
