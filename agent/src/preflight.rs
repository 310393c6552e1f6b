//! Pure checks of what the server reports, each failing with a hint.

use tidemark_repo::Fail;

/// What `init` and `run` learn from the server before streaming.
#[derive(Debug, Clone)]
pub struct ServerFacts {
    pub server_version_num: u32,
    pub wal_level: String,
    pub max_wal_senders: u32,
    pub wal_segment_size: u64,
    /// `summarize_wal` (PostgreSQL 17+; `None` before).
    pub summarize_wal: Option<String>,
}

pub fn check(facts: &ServerFacts) -> Result<(), Fail> {
    if facts.server_version_num < 130000 {
        return Err(Fail::new(
            format!("PostgreSQL {} is not supported", facts.server_version_num),
            "Tidemark supports PostgreSQL 13 and later",
        ));
    }
    if facts.wal_level != "replica" && facts.wal_level != "logical" {
        return Err(Fail::new(
            format!("wal_level is {}; WAL streaming needs replica or logical", facts.wal_level),
            "set wal_level = replica in postgresql.conf and restart PostgreSQL",
        ));
    }
    if facts.max_wal_senders == 0 {
        return Err(Fail::new(
            "max_wal_senders is 0; the server accepts no replication connections",
            "set max_wal_senders = 10 (and wal_level = replica) in postgresql.conf and restart PostgreSQL",
        ));
    }
    if !tidemark_proto::segment::is_valid_segment_size(facts.wal_segment_size) {
        return Err(Fail::new(
            format!("unexpected wal_segment_size {}", facts.wal_segment_size),
            "report this as a bug",
        ));
    }
    Ok(())
}

/// What `init` advises without refusing: settings that make Tidemark
/// cheaper but are not needed for it to be correct.
pub fn advice(facts: &ServerFacts) -> Vec<String> {
    let mut advice = Vec::new();
    if facts.summarize_wal.as_deref().is_some_and(|value| value != "on") {
        advice.push(
            "summarize_wal is off: incremental backups read every file from the server (and store only the \
             changed blocks); set summarize_wal = on in postgresql.conf and reload PostgreSQL so that they \
             read only the changed blocks"
                .to_string(),
        );
    }
    advice
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> ServerFacts {
        ServerFacts {
            server_version_num: 150018,
            wal_level: "replica".into(),
            max_wal_senders: 10,
            wal_segment_size: 16 << 20,
            summarize_wal: None,
        }
    }

    #[test]
    fn advice_on_summarize_wal_only_where_it_exists() {
        assert!(advice(&facts()).is_empty());
        let on = ServerFacts { server_version_num: 170004, summarize_wal: Some("on".into()), ..facts() };
        assert!(advice(&on).is_empty());
        let off = ServerFacts { summarize_wal: Some("off".into()), ..on };
        assert!(advice(&off)[0].contains("summarize_wal = on"));
    }

    #[test]
    fn table_of_cases() {
        assert!(check(&facts()).is_ok());
        assert!(check(&ServerFacts { wal_level: "logical".into(), ..facts() }).is_ok());
        let cases = [
            (ServerFacts { wal_level: "minimal".into(), ..facts() }, "wal_level = replica"),
            (ServerFacts { max_wal_senders: 0, ..facts() }, "max_wal_senders = 10"),
            (ServerFacts { server_version_num: 120000, ..facts() }, "13 and later"),
            (ServerFacts { wal_segment_size: 12345, ..facts() }, "bug"),
        ];
        for (facts, hint) in cases {
            let fail = check(&facts).expect_err("must fail");
            assert!(fail.hint.contains(hint), "{} / {}", fail.message, fail.hint);
        }
    }
}
