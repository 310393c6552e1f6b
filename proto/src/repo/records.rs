//! Small JSON records the repository keeps beside WAL and backups:
//! protected restore points (`marks/`), the operations log (`events/`), the
//! leases that serialize agents and expire runs (`locks/`), and the journal
//! of an expire run in progress.
//!
//! ```text
//! marks/<LSN as 16 hex digits>.json   MarkRecord
//! events/<UTC time>-<nonce>.json      EventRecord (names sort by time)
//! locks/agent.json                    LeaseRecord of the streaming agent
//! locks/expire.json                   LeaseRecord of a running expire
//! locks/claims/<lease>-<generation>   created (if absent) to take over a lease
//! locks/expire-journal.json           ExpireJournal: what an expire run deletes
//! drills/<UTC time>-<nonce>.json      DrillRecord (names sort by time)
//! ```
//!
//! All are framed (and sealed in an encrypted repository) like every other
//! object. **API boundary:** stored formats; field names are stable.

use crate::{Lsn, TimelineId};
use serde::{Deserialize, Serialize};

pub const MARKS_PREFIX: &str = "marks/";
pub const EVENTS_PREFIX: &str = "events/";
pub const LOCKS_PREFIX: &str = "locks/";
pub const CLAIMS_PREFIX: &str = "locks/claims/";
pub const AGENT_LEASE_KEY: &str = "locks/agent.json";
pub const EXPIRE_LEASE_KEY: &str = "locks/expire.json";
pub const EXPIRE_JOURNAL_KEY: &str = "locks/expire-journal.json";
pub const DRILLS_PREFIX: &str = "drills/";

/// A restore point created by `tidemark-agent mark`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MarkRecord {
    pub name: String,
    pub lsn: Lsn,
    pub timeline: TimelineId,
    /// When it was created (RFC 3339, UTC).
    pub time: String,
    /// Until when retention keeps what restoring to it needs: an RFC 3339
    /// time, `forever`, or absent (not protected).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_until: Option<String>,
}

pub const KEEP_FOREVER: &str = "forever";

pub fn mark_key(lsn: Lsn) -> String {
    format!("{MARKS_PREFIX}{:016X}.json", lsn.0)
}

/// One entry of the operations log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    /// RFC 3339, UTC.
    pub time: String,
    pub host: String,
    /// The OS user that ran the command.
    pub user: String,
    /// `backup`, `mark`, `expire`, `rotate-key`, `reencrypt`.
    pub kind: String,
    /// A one-line description.
    pub summary: String,
    /// The details (what an expire deleted, a backup's id and LSNs, ...).
    #[serde(default)]
    pub details: serde_json::Value,
}

/// One restore drill (`tidemark-agent drill`): what was restored, what was
/// checked, how long until the restored server took writes, and the outcome.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DrillRecord {
    /// RFC 3339, UTC.
    pub started: String,
    pub finished: String,
    pub host: String,
    pub passed: bool,
    /// Why it failed, one line (names the object or check at fault).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// The target asked for: `latest` or `time <RFC 3339>`.
    pub target: String,
    #[serde(default)]
    pub backup_id: Option<String>,
    #[serde(default)]
    pub reached_lsn: Option<String>,
    #[serde(default)]
    pub reached_time: Option<String>,
    /// Seconds from the start of the restore until the restored server
    /// accepted a read-write connection.
    #[serde(default)]
    pub rto_seconds: Option<f64>,
    #[serde(default)]
    pub amcheck: AmcheckOutcome,
    #[serde(default)]
    pub checks: Vec<DrillCheck>,
    #[serde(default)]
    pub row_counts: Vec<TableRows>,
}

/// What `pg_amcheck` said of the restored cluster.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AmcheckOutcome {
    pub ran: bool,
    /// Why it did not run (no `pg_amcheck` binary), or what it found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    #[serde(default)]
    pub databases: Vec<String>,
    pub passed: bool,
}

/// One user check: an SQL query that must return true, or a command that must exit 0.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrillCheck {
    /// `sql` or `command`.
    pub kind: String,
    /// The query or command line.
    pub check: String,
    pub passed: bool,
    /// What it returned, or how the command exited (with its last lines of
    /// output only when the drill was asked to record them), or its error.
    pub detail: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableRows {
    pub database: String,
    /// Schema-qualified, quoted as PostgreSQL quotes it.
    pub table: String,
    pub rows: u64,
}

/// `drills/<time>-<nonce>.json`, like event names.
pub fn drill_key(compact_time: &str, nonce: u32) -> String {
    format!("{DRILLS_PREFIX}{compact_time}-{nonce:08x}.json")
}

/// `events/<time>-<nonce>.json`; `compact_time` is `20261128T221530.123456Z`.
pub fn event_key(compact_time: &str, nonce: u32) -> String {
    format!("{EVENTS_PREFIX}{compact_time}-{nonce:08x}.json")
}

/// Who holds a lease, until when.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    pub host: String,
    pub pid: u32,
    /// What the holder is (`agent with state directory /var/lib/tidemark`).
    pub holder: String,
    /// Counts takeovers: a new holder claims `generation + 1` first.
    pub generation: u64,
    pub acquired_at: String,
    /// Unix seconds; past it, another process may take the lease over.
    pub expires_unix: i64,
}

pub fn claim_key(lease_key: &str, generation: u64) -> String {
    let name = lease_key.trim_start_matches(LOCKS_PREFIX).trim_end_matches(".json");
    format!("{CLAIMS_PREFIX}{name}-{generation:012}")
}

/// The deletions an expire run decided on, written before the first one so
/// that a rerun after a crash finishes them first. In the order they run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpireJournal {
    pub created_at: String,
    pub deletions: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_json() {
        assert_eq!(mark_key(Lsn(0x3_0000_0028)), "marks/0000000300000028.json");
        assert_eq!(event_key("20261128T221530.000001Z", 0xab), "events/20261128T221530.000001Z-000000ab.json");
        assert_eq!(claim_key(AGENT_LEASE_KEY, 7), "locks/claims/agent-000000000007");
        let mark = MarkRecord {
            name: "before migration".into(),
            lsn: Lsn(0x3000028),
            timeline: TimelineId(1),
            time: "2026-11-28T22:00:00Z".into(),
            keep_until: Some(KEEP_FOREVER.into()),
        };
        let json = serde_json::to_string(&mark).expect("json");
        assert!(json.contains(r#""lsn":"0/3000028""#), "{json}");
        assert_eq!(serde_json::from_str::<MarkRecord>(&json).expect("back"), mark);
    }
}
