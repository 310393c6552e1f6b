//! Leases in the repository: exactly one streaming agent per repository,
//! one expire run at a time, across machines.
//!
//! A lease is an object (`locks/agent.json`, `locks/expire.json`) created
//! with a conditional put, so of two processes starting at once one wins.
//! The holder renews it (rewrites its expiry) every third of its length.
//! Another process may take it over once it has expired, or at once when
//! it was held by a process of this host that is gone; a takeover first
//! creates the claim `locks/claims/<lease>-<generation + 1>` conditionally,
//! so of two processes taking over one lease, one wins. Nothing here
//! deletes: a lease is released by rewriting it as expired, so credentials
//! that cannot delete suffice.

use crate::error::{Fail, RepoError};
use crate::events::host_name;
use crate::store::Repository;
use std::time::Duration;
use tidemark_proto::repo::frame::{self, Compression};
use tidemark_proto::repo::records::{claim_key, LeaseRecord};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

pub struct Lease {
    repo: Repository,
    key: String,
    record: LeaseRecord,
    length: Duration,
}

/// Whether the lease can be taken: expired, or its holder ran on this host
/// and is gone.
fn can_take_over(existing: &LeaseRecord, now: i64) -> bool {
    if existing.expires_unix <= now {
        return true;
    }
    existing.host == host_name() && !process_alive(existing.pid)
}

fn process_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else { return false };
    // SAFETY: signal 0 only checks that the process exists.
    let result = unsafe { libc::kill(pid, 0) };
    result == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

fn encode(record: &LeaseRecord) -> Result<Vec<u8>, RepoError> {
    let json = serde_json::to_vec(record).map_err(|e| RepoError::corrupt("lease", e.to_string()))?;
    frame::encode(&json, Compression::None).map(|(f, _)| f).map_err(|e| RepoError::corrupt("lease", e.to_string()))
}

async fn read(repo: &Repository, key: &str) -> Result<Option<LeaseRecord>, RepoError> {
    let Some(raw) = repo.get(key).await? else { return Ok(None) };
    serde_json::from_slice(&raw).map(Some).map_err(|e| RepoError::corrupt(key, e.to_string()))
}

/// Why a lease could not be had: who holds it, until when.
pub fn held_by(existing: &LeaseRecord, what: &str) -> Fail {
    let until = OffsetDateTime::from_unix_timestamp(existing.expires_unix)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default();
    Fail::new(
        format!(
            "{what}: the repository is held by {} on host {} (pid {}), lease renewed until {until}",
            existing.holder, existing.host, existing.pid
        ),
        "stop that process first; if it is dead, its lease expires by itself and is then taken over",
    )
}

/// Whether a live process holds the lease at `key` (an agent streaming,
/// for the agent lease): it exists, has not expired, and its holder is not
/// a process of this host that is gone.
pub async fn is_held(repo: &Repository, key: &str) -> Result<bool, RepoError> {
    let now = OffsetDateTime::now_utc().unix_timestamp();
    Ok(read(repo, key).await?.is_some_and(|existing| !can_take_over(&existing, now)))
}

impl Lease {
    /// Takes the lease, or says who holds it (`Err(Some(record))`).
    pub async fn try_acquire(
        repo: &Repository,
        key: &str,
        holder: &str,
        length: Duration,
    ) -> Result<Result<Lease, LeaseRecord>, RepoError> {
        for _ in 0..5 {
            let now = OffsetDateTime::now_utc();
            let mut record = LeaseRecord {
                host: host_name(),
                pid: std::process::id(),
                holder: holder.to_string(),
                generation: 0,
                acquired_at: now.format(&Rfc3339).unwrap_or_default(),
                expires_unix: now.unix_timestamp() + length.as_secs() as i64,
            };
            if repo.put_new(key, encode(&record)?).await? {
                return Ok(Ok(Lease { repo: repo.clone(), key: key.to_string(), record, length }));
            }
            let Some(existing) = read(repo, key).await? else { continue };
            if !can_take_over(&existing, now.unix_timestamp()) {
                return Ok(Err(existing));
            }
            record.generation = existing.generation + 1;
            if !repo.put_new(&claim_key(key, record.generation), encode(&record)?).await? {
                // Another process is taking it over at this very moment.
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            repo.put(key, encode(&record)?).await?;
            if existing.expires_unix != 0 {
                // (0: released by its holder, the usual case, not worth a line.)
                tracing::info!(lease = key, previous = %existing.holder, "took over an expired lease");
            }
            return Ok(Ok(Lease { repo: repo.clone(), key: key.to_string(), record, length }));
        }
        match read(repo, key).await? {
            Some(existing) => Ok(Err(existing)),
            None => Err(RepoError::corrupt(key, "the lease keeps changing hands; try again")),
        }
    }

    /// Takes the lease or fails naming the holder.
    pub async fn acquire(
        repo: &Repository,
        key: &str,
        holder: &str,
        length: Duration,
        what: &str,
    ) -> anyhow::Result<Lease> {
        match Lease::try_acquire(repo, key, holder, length).await? {
            Ok(lease) => Ok(lease),
            Err(existing) => Err(held_by(&existing, what).into()),
        }
    }

    /// Waits (up to `patience`) for the lease, for runs that queue up.
    pub async fn wait_for(
        repo: &Repository,
        key: &str,
        holder: &str,
        length: Duration,
        patience: Duration,
        what: &str,
    ) -> anyhow::Result<Lease> {
        let deadline = tokio::time::Instant::now() + patience;
        let mut said = false;
        loop {
            match Lease::try_acquire(repo, key, holder, length).await? {
                Ok(lease) => return Ok(lease),
                Err(existing) if tokio::time::Instant::now() >= deadline => return Err(held_by(&existing, what).into()),
                Err(existing) => {
                    if !said {
                        eprintln!(
                            "waiting for {} on host {} (pid {}) to finish",
                            existing.holder, existing.host, existing.pid
                        );
                        said = true;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// How often to renew.
    pub fn renew_every(&self) -> Duration {
        self.length / 3
    }

    /// Extends the lease; fails if another process holds it now.
    pub async fn renew(&mut self) -> anyhow::Result<()> {
        match read(&self.repo, &self.key).await? {
            Some(current)
                if current.generation == self.record.generation
                    && current.pid == self.record.pid
                    && current.host == self.record.host => {}
            Some(current) => {
                return Err(Fail::new(
                    format!(
                        "lost the repository's lease to {} on host {} (pid {})",
                        current.holder, current.host, current.pid
                    ),
                    "two processes claimed the same repository: check which one should run",
                )
                .into())
            }
            None => {}
        }
        self.record.expires_unix = OffsetDateTime::now_utc().unix_timestamp() + self.length.as_secs() as i64;
        self.repo.put(&self.key, encode(&self.record)?).await?;
        Ok(())
    }

    /// Gives the lease up (rewritten as expired, if still ours).
    pub async fn release(mut self) {
        let ours = matches!(read(&self.repo, &self.key).await, Ok(Some(c)) if c.generation == self.record.generation && c.pid == self.record.pid);
        if ours {
            self.record.expires_unix = 0;
            if let Ok(bytes) = encode(&self.record) {
                let _ = self.repo.put(&self.key, bytes).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Create;
    use tidemark_proto::repo::records::AGENT_LEASE_KEY;

    #[tokio::test]
    async fn one_holder_then_takeover_after_release() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("file://{}/repo", dir.path().display());
        let repo = Repository::open(&url, &[], Create::Yes).expect("open").with_keyring(None);
        let length = Duration::from_secs(60);
        let first = Lease::try_acquire(&repo, AGENT_LEASE_KEY, "agent A", length).await.expect("io").expect("free");
        // This process is alive, and the lease has not expired: refused.
        let refused = Lease::try_acquire(&repo, AGENT_LEASE_KEY, "agent B", length).await.expect("io");
        let holder = refused.err().expect("held");
        assert_eq!(holder.holder, "agent A");
        assert!(held_by(&holder, "cannot stream").message.contains("held by agent A"));
        first.release().await;
        let second =
            Lease::try_acquire(&repo, AGENT_LEASE_KEY, "agent B", length).await.expect("io").expect("taken over");
        assert_eq!(second.record.generation, 1);
        assert!(repo.exists(&claim_key(AGENT_LEASE_KEY, 1)).await.expect("exists"));
        // A dead process of this host: taken over at once.
        let mut dead = second.record.clone();
        dead.pid = u32::MAX - 1;
        repo.put(AGENT_LEASE_KEY, encode(&dead).expect("encode")).await.expect("put");
        let third = Lease::try_acquire(&repo, AGENT_LEASE_KEY, "agent C", length).await.expect("io").expect("taken");
        assert_eq!(third.record.generation, 2);
    }
}
