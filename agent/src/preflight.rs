//! Pure checks of what the server reports, each failing with a hint.

use tidemark_repo::Fail;

/// What `init` and `run` learn from the server before streaming.
#[derive(Debug, Clone)]
pub struct ServerFacts {
    pub server_version_num: u32,
    pub wal_level: String,
    pub max_wal_senders: u32,
    pub wal_segment_size: u64,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> ServerFacts {
        ServerFacts {
            server_version_num: 150018,
            wal_level: "replica".into(),
            max_wal_senders: 10,
            wal_segment_size: 16 << 20,
        }
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
