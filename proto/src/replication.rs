//! Messages inside the CopyBoth stream of a physical replication connection,
//! and small parsers for replication command results.
//!
//! All integers are big-endian on the wire.

use crate::Lsn;
use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01 UTC).
pub const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// A message the server sends inside CopyData.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerMessage {
    /// `w`: WAL bytes starting at `start`.
    XLogData { start: Lsn, server_wal_end: Lsn, data: Bytes },
    /// `k`: the server's end of WAL; answer at once if `reply_requested`.
    Keepalive { server_wal_end: Lsn, reply_requested: bool },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MessageError {
    #[error("replication message is empty")]
    Empty,
    #[error("replication message {tag:?} is truncated: {len} bytes")]
    Truncated { tag: char, len: usize },
    #[error("unknown replication message type {0:?}")]
    UnknownTag(char),
}

impl ServerMessage {
    /// Decodes the payload of one CopyData message.
    pub fn parse(mut payload: Bytes) -> Result<ServerMessage, MessageError> {
        let len = payload.len();
        let tag = payload.try_get_u8().map_err(|_| MessageError::Empty)? as char;
        let truncated = |_| MessageError::Truncated { tag, len };
        match tag {
            'w' => {
                let start = Lsn(payload.try_get_u64().map_err(truncated)?);
                let server_wal_end = Lsn(payload.try_get_u64().map_err(truncated)?);
                let _send_time = payload.try_get_i64().map_err(truncated)?;
                Ok(ServerMessage::XLogData { start, server_wal_end, data: payload })
            }
            'k' => {
                let server_wal_end = Lsn(payload.try_get_u64().map_err(truncated)?);
                let _send_time = payload.try_get_i64().map_err(truncated)?;
                let reply_requested = payload.try_get_u8().map_err(truncated)? != 0;
                Ok(ServerMessage::Keepalive { server_wal_end, reply_requested })
            }
            other => Err(MessageError::UnknownTag(other)),
        }
    }
}

/// The `r` message: what we have written and flushed (each the LSN just past
/// the last byte). `apply` is always 0: we replay nothing, and PostgreSQL's
/// own pg_receivewal does the same.
pub fn standby_status_update(written: Lsn, flushed: Lsn, now_unix_micros: i64, reply_requested: bool) -> Bytes {
    let mut buf = BytesMut::with_capacity(34);
    buf.put_u8(b'r');
    buf.put_u64(written.0);
    buf.put_u64(flushed.0);
    buf.put_u64(0);
    buf.put_i64(now_unix_micros - PG_EPOCH_OFFSET_MICROS);
    buf.put_u8(u8::from(reply_requested));
    buf.freeze()
}

/// Parses `SHOW wal_segment_size` output such as `16MB` or `1GB` into bytes.
pub fn parse_size_with_unit(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits.parse().ok()?;
    let factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "kB" => 1 << 10,
        "MB" => 1 << 20,
        "GB" => 1 << 30,
        "TB" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(factor)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_xlogdata() {
        let mut msg = BytesMut::new();
        msg.put_u8(b'w');
        msg.put_u64(0x0B00_0000);
        msg.put_u64(0x0B00_0100);
        msg.put_i64(1);
        msg.put_slice(b"walbytes");
        let parsed = ServerMessage::parse(msg.freeze()).expect("valid");
        assert_eq!(
            parsed,
            ServerMessage::XLogData {
                start: Lsn(0x0B00_0000),
                server_wal_end: Lsn(0x0B00_0100),
                data: Bytes::from_static(b"walbytes")
            }
        );
    }

    #[test]
    fn parses_keepalive_and_rejects_short() {
        let mut msg = BytesMut::new();
        msg.put_u8(b'k');
        msg.put_u64(42);
        msg.put_i64(7);
        msg.put_u8(1);
        let parsed = ServerMessage::parse(msg.clone().freeze()).expect("valid");
        assert_eq!(parsed, ServerMessage::Keepalive { server_wal_end: Lsn(42), reply_requested: true });
        msg.truncate(10);
        assert!(matches!(ServerMessage::parse(msg.freeze()), Err(MessageError::Truncated { .. })));
        assert_eq!(ServerMessage::parse(Bytes::new()), Err(MessageError::Empty));
    }

    #[test]
    fn status_update_layout() {
        let msg = standby_status_update(Lsn(0x10), Lsn(0x8), PG_EPOCH_OFFSET_MICROS + 5, true);
        assert_eq!(msg.len(), 34);
        assert_eq!(msg[0], b'r');
        assert_eq!(&msg[1..9], &0x10u64.to_be_bytes());
        assert_eq!(&msg[9..17], &0x8u64.to_be_bytes());
        assert_eq!(&msg[17..25], &0u64.to_be_bytes());
        assert_eq!(&msg[25..33], &5i64.to_be_bytes());
        assert_eq!(msg[33], 1);
    }

    #[test]
    fn sizes_with_units() {
        assert_eq!(parse_size_with_unit("16MB"), Some(16 << 20));
        assert_eq!(parse_size_with_unit("1GB"), Some(1 << 30));
        assert_eq!(parse_size_with_unit("8kB"), Some(8192));
        assert_eq!(parse_size_with_unit("16 parsecs"), None);
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = ServerMessage::parse(Bytes::from(bytes));
        }
    }
}
