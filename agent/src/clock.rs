//! The wall clock, formatted as Tidemark stores and shows times.

use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::OffsetDateTime;

/// Now in UTC, RFC 3339 (`2026-11-25T02:15:30.123456Z`).
pub fn now_rfc3339() -> String {
    OffsetDateTime::now_utc().format(&Rfc3339).unwrap_or_else(|_| "1970-01-01T00:00:00Z".into())
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

/// Microseconds since the Unix epoch.
pub fn now_unix_micros() -> i64 {
    (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1000) as i64
}

/// A backup's id: its start in UTC to the second, `20261125T021530Z`, so ids
/// sort as times do.
pub fn backup_id(at: OffsetDateTime) -> String {
    let format = format_description!("[year][month][day]T[hour][minute][second]Z");
    at.to_offset(time::UtcOffset::UTC).format(&format).unwrap_or_else(|_| "19700101T000000Z".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backup_ids_are_utc_to_the_second() {
        let at = OffsetDateTime::from_unix_timestamp(1_795_400_130).expect("time");
        assert_eq!(backup_id(at), "20261123T021530Z");
        let elsewhere = at.to_offset(time::UtcOffset::from_hms(5, 30, 0).expect("offset"));
        assert_eq!(backup_id(elsewhere), "20261123T021530Z");
        assert!(OffsetDateTime::parse(&now_rfc3339(), &Rfc3339).is_ok());
    }
}
