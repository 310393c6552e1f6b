//! The audit cache's keys: a prefix, then big-endian numbers, so byte
//! order is numeric order. Times are stored with the sign bit flipped so
//! byte order is time order too.

pub(super) fn time_key(time: i64) -> [u8; 8] {
    ((time as u64) ^ (1 << 63)).to_be_bytes()
}

/// `tm` or `tt`+table+0: a transaction by time, then LSN.
pub(super) fn tx_key(prefix: &[u8], time: i64, lsn: u64) -> Vec<u8> {
    let mut key = prefix.to_vec();
    key.extend_from_slice(&time_key(time));
    key.extend_from_slice(&lsn.to_be_bytes());
    key
}

/// The time of a `tm`/`tt` key: the 8 bytes before its trailing LSN.
pub(super) fn time_of_key(key: &[u8]) -> Option<i64> {
    let bytes: [u8; 8] = key.get(key.len().checked_sub(16)?..key.len() - 8)?.try_into().ok()?;
    Some((u64::from_be_bytes(bytes) ^ (1 << 63)) as i64)
}

/// The hour of a `tc` key: its last 8 bytes.
pub(super) fn time_of_hour_key(key: &[u8]) -> i64 {
    let bytes: [u8; 8] = key.get(key.len().saturating_sub(8)..).and_then(|b| b.try_into().ok()).unwrap_or([0; 8]);
    (u64::from_be_bytes(bytes) ^ (1 << 63)) as i64
}

/// `tc` + table + 0 + hour: how many transactions that hour.
pub(super) fn count_key(table: &str, hour: i64) -> Vec<u8> {
    let mut key = b"tc".to_vec();
    key.extend_from_slice(table.as_bytes());
    key.push(0);
    key.extend_from_slice(&time_key(hour));
    key
}

/// `tt` + table + 0: the prefix of one table's transactions.
pub(super) fn table_prefix(table: &str) -> Vec<u8> {
    let mut key = b"tt".to_vec();
    key.extend_from_slice(table.as_bytes());
    key.push(0);
    key
}

/// `xi` + xid (+ lsn): a transaction by xid.
pub(super) fn xid_key(xid: u32, lsn: Option<u64>) -> Vec<u8> {
    let mut key = b"xi".to_vec();
    key.extend_from_slice(&xid.to_be_bytes());
    if let Some(lsn) = lsn {
        key.extend_from_slice(&lsn.to_be_bytes());
    }
    key
}

/// `rp` + lsn: a restore point.
pub(super) fn restore_point_key(lsn: u64) -> Vec<u8> {
    let mut key = b"rp".to_vec();
    key.extend_from_slice(&lsn.to_be_bytes());
    key
}

/// `hi` + table: the table's rows-per-transaction histogram.
pub(super) fn histogram_key(table: &str) -> Vec<u8> {
    let mut key = b"hi".to_vec();
    key.extend_from_slice(table.as_bytes());
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_keys_sort_like_times() {
        assert!(time_key(-5) < time_key(0));
        assert!(time_key(0) < time_key(7));
        assert!(time_key(i64::MIN) < time_key(i64::MAX));
        assert_eq!(time_of_key(&tx_key(b"tm", -42, 9)), Some(-42));
        assert_eq!(time_of_hour_key(&count_key("public.a", 17)), 17);
    }
}
