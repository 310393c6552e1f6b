//! Restore targets as the user gives them, and their PostgreSQL settings.

use std::fmt;
use tidemark_proto::{Lsn, Xid};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Time(OffsetDateTime),
    Lsn(Lsn),
    /// Stop just after this transaction commits.
    Xid(Xid),
    /// Stop just before this transaction commits.
    BeforeXid(Xid),
    /// A restore point made with `tidemark-agent mark` or pg_create_restore_point().
    Name(String),
    /// Everything archived.
    Latest,
    /// The backup's own consistent point.
    Immediate,
}

/// Parses RFC 3339 (`2026-11-25T10:31:00Z`) or PostgreSQL's
/// `2026-11-25 10:31:00[.ffffff]+01[:00]`. A time without a zone is refused:
/// guessing one could restore the wrong hour.
pub fn parse_time(text: &str) -> Result<OffsetDateTime, String> {
    let mut normal = text.trim().replacen(' ', "T", 1);
    let has_zone = normal.ends_with('Z') || normal.ends_with('z') || {
        let time_part = normal.split_once('T').map(|(_, t)| t).unwrap_or("");
        time_part.contains('+') || time_part.contains('-')
    };
    if !has_zone {
        return Err(format!(
            "the time {text:?} has no time zone; add one, e.g. \"{} +00\" or \"{}Z\"",
            text.trim(),
            normal
        ));
    }
    // PostgreSQL prints offsets as +01 or +0100; RFC 3339 wants +01:00.
    if let Some(pos) = normal.rfind(['+', '-']).filter(|p| *p > 10) {
        let offset = &normal[pos + 1..];
        let fixed = match offset.len() {
            2 => format!("{offset}:00"),
            4 if !offset.contains(':') => format!("{}:{}", &offset[..2], &offset[2..]),
            _ => offset.to_string(),
        };
        normal = format!("{}{}", &normal[..=pos], fixed);
    }
    OffsetDateTime::parse(&normal, &Rfc3339).map_err(|e| format!("cannot read the time {text:?}: {e}"))
}

pub fn format_time(time: OffsetDateTime) -> String {
    time.format(&Rfc3339).unwrap_or_default()
}

impl Target {
    /// recovery.conf-style settings for postgresql.auto.conf.
    pub fn settings(&self) -> Vec<(String, String)> {
        let s = |k: &str, v: String| (k.to_string(), v);
        match self {
            // Always with an explicit offset: a zoneless value would be read in
            // the restored server's TimeZone.
            Target::Time(t) => vec![s("recovery_target_time", pg_time(*t))],
            Target::Lsn(lsn) => vec![s("recovery_target_lsn", lsn.to_string())],
            Target::Xid(xid) => vec![s("recovery_target_xid", xid.to_string())],
            Target::BeforeXid(xid) => {
                vec![s("recovery_target_xid", xid.to_string()), s("recovery_target_inclusive", "off".into())]
            }
            Target::Name(name) => vec![s("recovery_target_name", name.clone())],
            Target::Latest => vec![],
            Target::Immediate => vec![s("recovery_target", "immediate".into())],
        }
    }
}

/// `2026-11-25 10:31:00.123456+00:00`, which PostgreSQL reads exactly.
fn pg_time(t: OffsetDateTime) -> String {
    let utc = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:06}+00",
        utc.year(),
        u8::from(utc.month()),
        utc.day(),
        utc.hour(),
        utc.minute(),
        utc.second(),
        utc.microsecond()
    )
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Time(t) => write!(f, "time {}", format_time(*t)),
            Target::Lsn(lsn) => write!(f, "LSN {lsn}"),
            Target::Xid(xid) => write!(f, "just after transaction {xid}"),
            Target::BeforeXid(xid) => write!(f, "just before transaction {xid}"),
            Target::Name(name) => write!(f, "restore point {name:?}"),
            Target::Latest => write!(f, "the latest archived WAL"),
            Target::Immediate => write!(f, "the end of the backup"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_with_zones() {
        let want = parse_time("2026-11-25T10:31:00Z").expect("rfc3339");
        assert_eq!(parse_time("2026-11-25 10:31:00+00").expect("pg"), want);
        assert_eq!(parse_time("2026-11-25 11:31:00+01:00").expect("pg"), want);
        assert_eq!(parse_time("2026-11-25 11:31:00+0100").expect("pg"), want);
        assert_eq!(parse_time("2026-11-25 05:31:00-05").expect("pg"), want);
        let micro = parse_time("2026-11-25 10:31:00.123456+00").expect("fraction");
        assert_eq!(micro.microsecond(), 123456);
    }

    #[test]
    fn zoneless_times_refused_with_a_hint() {
        let error = parse_time("2026-11-25 10:31:00").expect_err("no zone");
        assert!(error.contains("no time zone"), "{error}");
        assert!(parse_time("yesterday+00").is_err());
    }

    #[test]
    fn settings() {
        assert_eq!(
            Target::BeforeXid(Xid(7)).settings(),
            vec![("recovery_target_xid".into(), "7".into()), ("recovery_target_inclusive".into(), "off".into())]
        );
        let t = parse_time("2026-11-25 10:31:00.5+01").expect("time");
        assert_eq!(Target::Time(t).settings()[0].1, "2026-11-25 09:31:00.500000+00");
    }
}
