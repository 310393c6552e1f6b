//! The operations log: each backup, mark, expire, key rotation and
//! re-encryption appends one small object under `events/` (time, host, OS
//! user, what), so "what was done to this repository, by whom" is answered
//! from the repository alone (`tidemark-restore events`).

use crate::error::RepoError;
use crate::store::Repository;
use tidemark_proto::repo::frame::{self, Compression};
use tidemark_proto::repo::records::{event_key, EventRecord, EVENTS_PREFIX};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// This machine's host name.
pub fn host_name() -> String {
    let mut buffer = [0u8; 256];
    // SAFETY: gethostname writes at most buffer.len() bytes into the buffer we own.
    let ok = unsafe { libc::gethostname(buffer.as_mut_ptr().cast(), buffer.len()) } == 0;
    let end = buffer.iter().position(|b| *b == 0).unwrap_or(buffer.len());
    match buffer.get(..end) {
        Some(name) if ok && !name.is_empty() => String::from_utf8_lossy(name).into_owned(),
        _ => "unknown-host".into(),
    }
}

/// The OS user running this process.
pub fn os_user() -> String {
    // SAFETY: getuid has no preconditions; getpwuid returns a pointer into
    // static storage that we copy out of before any other call.
    unsafe {
        let uid = libc::getuid();
        let entry = libc::getpwuid(uid);
        if !entry.is_null() && !(*entry).pw_name.is_null() {
            return std::ffi::CStr::from_ptr((*entry).pw_name).to_string_lossy().into_owned();
        }
        format!("uid {uid}")
    }
}

pub(crate) fn compact(time: OffsetDateTime) -> String {
    let t = time.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}.{:06}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.microsecond()
    )
}

/// Appends an event. Objects are never overwritten: the name carries the
/// time to the microsecond and a random number.
pub async fn append(
    repo: &Repository,
    kind: &str,
    summary: impl Into<String>,
    details: serde_json::Value,
) -> Result<(), RepoError> {
    let now = OffsetDateTime::now_utc();
    let record = EventRecord {
        time: now.format(&Rfc3339).unwrap_or_default(),
        host: host_name(),
        user: os_user(),
        kind: kind.to_string(),
        summary: summary.into(),
        details,
    };
    let json = serde_json::to_vec(&record).map_err(|e| RepoError::corrupt("event", e.to_string()))?;
    let (object, _) =
        frame::encode(&json, Compression::Zstd { level: 3 }).map_err(|e| RepoError::corrupt("event", e.to_string()))?;
    let mut nonce = [0u8; 4];
    let _ = getrandom::getrandom(&mut nonce);
    repo.put(&event_key(&compact(now), u32::from_le_bytes(nonce)), object).await
}

/// Appends an event, and only warns if it cannot: the operation it records
/// has already happened.
pub async fn record(repo: &Repository, kind: &str, summary: impl Into<String>, details: serde_json::Value) {
    if let Err(e) = append(repo, kind, summary, details).await {
        tracing::warn!("could not add the {kind} event to the operations log: {e}");
    }
}

/// Events at or after `since` (all when `None`), oldest first.
pub async fn list(repo: &Repository, since: Option<OffsetDateTime>) -> Result<Vec<EventRecord>, RepoError> {
    let mut keys = repo.list(EVENTS_PREFIX.trim_end_matches('/')).await?;
    keys.sort();
    if let Some(since) = since {
        // Names sort by time: skip the older ones without reading them.
        let first = format!("{EVENTS_PREFIX}{}", compact(since));
        keys.retain(|k| k.as_str() >= first.as_str());
    }
    let mut events = Vec::with_capacity(keys.len());
    for key in keys {
        let Some(raw) = repo.get(&key).await? else { continue };
        let event: EventRecord = serde_json::from_slice(&raw).map_err(|e| RepoError::corrupt(&key, e.to_string()))?;
        events.push(event);
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_sort_by_time() {
        let a = OffsetDateTime::from_unix_timestamp(1_795_400_130).expect("time");
        let b = a + time::Duration::microseconds(1);
        assert_eq!(compact(a), "20261123T021530.000000Z");
        assert!(compact(a) < compact(b));
        assert!(!host_name().is_empty() && !os_user().is_empty());
    }
}
