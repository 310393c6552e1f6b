//! pg_waldump as the oracle of our WAL decoder: both sides turned into the
//! same per-record facts (LSN, previous LSN, rmgr, xid, lengths, record type,
//! block references, commit times, subtransactions, restore point names), and
//! the `--stats` totals, so a test can compare them one by one.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use tidemark_proto::wal::{self, rmgr, PgMajor, WalReader};
use tidemark_proto::Lsn;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockFact {
    pub id: u8,
    pub rel: String,
    pub fork: String,
    pub block: u32,
    pub image: bool,
}

/// What both decoders say about one record. `kind` is compared only where
/// ours names the record type; `time_micros`, `subxacts`, `restore_point`
/// only for the records they belong to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordFact {
    pub lsn: Lsn,
    pub previous: Lsn,
    pub rmgr: String,
    pub xid: u32,
    pub rec_len: u32,
    pub tot_len: u32,
    pub kind: Option<String>,
    pub blocks: Vec<BlockFact>,
    pub time_micros: Option<i64>,
    pub subxacts: Vec<u32>,
    pub restore_point: Option<String>,
    /// The record started in one segment and ended in another.
    pub crosses_segment: bool,
}

/// Per-rmgr totals as `pg_waldump --stats` prints them: (count, record bytes, image bytes).
pub type Stats = BTreeMap<String, (u64, u64, u64)>;

fn fork_name(fork: u8) -> String {
    match fork {
        0 => "main".into(),
        1 => "fsm".into(),
        2 => "vm".into(),
        3 => "init".into(),
        n => format!("fork{n}"),
    }
}

/// Decodes the WAL files `first..=last` (segment file names) in `dir` with
/// our decoder. Returns the records and why reading stopped.
pub fn decode_with_tidemark(
    dir: &Path,
    names: &[String],
    start: Lsn,
    segment_size: u64,
) -> (Vec<RecordFact>, Option<wal::EndOfWal>) {
    let mut reader = WalReader::new(start, segment_size);
    let mut facts = Vec::new();
    let mut failure = None;
    for name in names {
        let data = std::fs::read(dir.join(name)).expect("read segment");
        let major = reader.major().unwrap_or(PgMajor(15));
        reader.feed(&data, |raw| {
            let major = major.max(PgMajor(13));
            match wal::decode(raw.lsn, raw.end, raw.bytes, major) {
                Ok(record) => facts.push(fact_of(&record, major, segment_size)),
                Err(e) => failure = Some(e.to_string()),
            }
        });
    }
    assert!(failure.is_none(), "decoder refused a record pg_waldump accepts: {failure:?}");
    (facts, reader.end().cloned())
}

pub fn fact_of(record: &wal::Record<'_>, major: PgMajor, segment_size: u64) -> RecordFact {
    let blocks = record
        .blocks
        .iter()
        .map(|b| BlockFact {
            id: b.id,
            rel: b.rel.to_string(),
            fork: fork_name(b.fork),
            block: b.block,
            image: b.image.is_some(),
        })
        .collect();
    let end = rmgr::parse_xact_end(record, major);
    RecordFact {
        lsn: record.lsn,
        previous: record.previous,
        rmgr: rmgr::rmgr_name(record.rmid).map(str::to_string).unwrap_or_else(|| format!("rmid{}", record.rmid)),
        xid: record.xid,
        rec_len: record.total_len - record.image_bytes(),
        tot_len: record.total_len,
        kind: rmgr::record_type_name(record.rmid, record.info, major),
        blocks,
        time_micros: end.as_ref().map(|e| e.time_micros),
        subxacts: end
            .map(|e| e.subxacts)
            .or_else(|| rmgr::parse_assignment(record).map(|(_, subs)| subs))
            .unwrap_or_default(),
        restore_point: rmgr::parse_restore_point(record).map(|(name, _)| name),
        crosses_segment: record.lsn.segment_no(segment_size) != Lsn(record.end.0 - 1).segment_no(segment_size),
    }
}

pub fn stats_of(facts: &[RecordFact]) -> Stats {
    let mut stats = Stats::new();
    for f in facts {
        let entry = stats.entry(f.rmgr.clone()).or_default();
        entry.0 += 1;
        entry.1 += u64::from(f.rec_len);
        entry.2 += u64::from(f.tot_len - f.rec_len);
    }
    stats
}

/// Runs pg_waldump (UTC times) over `names` in `dir`.
pub fn run_pg_waldump(bin: &Path, dir: &Path, first: &str, last: &str, extra: &[&str]) -> String {
    let output = Command::new(bin.join("pg_waldump"))
        .env("TZ", "UTC")
        .args(extra)
        .arg("-p")
        .arg(dir)
        .arg(first)
        .arg(last)
        .output()
        .expect("run pg_waldump");
    let stderr = String::from_utf8_lossy(&output.stderr);
    // It ends with an error only when the WAL stops before `last` ends.
    assert!(output.status.success() || stderr.contains("invalid record length"), "pg_waldump failed: {stderr}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = line.find(key)? + key.len();
    let rest = line.get(start..)?.trim_start();
    let end = rest.find(|c: char| c == ',' || c.is_whitespace()).unwrap_or(rest.len());
    rest.get(..end)
}

/// Parses pg_waldump's default output, one record per line.
pub fn parse_pg_waldump(text: &str, segment_size: u64) -> Vec<RecordFact> {
    let mut facts = Vec::new();
    for line in text.lines().filter(|l| l.starts_with("rmgr: ")) {
        let rmgr = field(line, "rmgr:").expect("rmgr").to_string();
        let lens = line.split("len (rec/tot):").nth(1).expect("len").split(',').next().expect("len");
        let (rec, tot) = lens.split_once('/').expect("rec/tot");
        let xid: u32 = field(line, "tx:").expect("tx").parse().expect("tx number");
        let lsn: Lsn = field(line, "lsn:").expect("lsn").parse().expect("lsn");
        let previous: Lsn = field(line, "prev").expect("prev").parse().expect("prev");
        let desc = line.split_once("desc: ").map(|(_, d)| d).unwrap_or("");
        let (body, blockrefs) = match desc.find(", blkref #") {
            Some(i) => (&desc[..i], &desc[i..]),
            None => (desc, ""),
        };
        let kind = body.split_whitespace().next().unwrap_or("").trim_end_matches(';').to_string();
        let blocks = blockrefs
            .split(", blkref #")
            .filter(|s| !s.is_empty())
            .map(|b| {
                let (id, rest) = b.split_once(": rel ").expect("blkref");
                let mut words = rest.split_whitespace();
                let rel = words.next().expect("rel").to_string();
                let mut fork = "main".to_string();
                let mut block = 0;
                while let Some(word) = words.next() {
                    match word {
                        "fork" => fork = words.next().expect("fork").to_string(),
                        "blk" => block = words.next().expect("blk").trim_end_matches(';').parse().expect("blk"),
                        _ => {}
                    }
                }
                BlockFact { id: id.parse().expect("block id"), rel, fork, block, image: rest.contains("FPW") }
            })
            .collect();
        let is_end =
            rmgr == "Transaction" && matches!(kind.as_str(), "COMMIT" | "ABORT" | "COMMIT_PREPARED" | "ABORT_PREPARED");
        let time_micros = if is_end { parse_utc_time(body) } else { None };
        let subxacts = body
            .split("subxacts: ")
            .nth(1)
            .map(|s| s.split(';').next().unwrap_or("").split_whitespace().filter_map(|x| x.parse().ok()).collect())
            .unwrap_or_default();
        let restore_point = (rmgr == "XLOG" && kind == "RESTORE_POINT")
            .then(|| body.strip_prefix("RESTORE_POINT ").unwrap_or("").to_string());
        let tot_len: u32 = tot.trim().parse().expect("tot");
        facts.push(RecordFact {
            lsn,
            previous,
            rmgr,
            xid,
            rec_len: rec.trim().parse().expect("rec"),
            tot_len,
            kind: Some(kind),
            blocks,
            time_micros,
            subxacts,
            restore_point,
            crosses_segment: lsn.segment_no(segment_size)
                != Lsn(lsn.0 + u64::from(tot_len) - 1).segment_no(segment_size),
        });
    }
    facts
}

/// Finds `YYYY-MM-DD HH:MM:SS[.ffffff] UTC` in a description.
fn parse_utc_time(text: &str) -> Option<i64> {
    let at = text.find(" UTC")?;
    let head = text.get(..at)?;
    let mut words = head.split_whitespace().rev();
    let (clock, date) = (words.next()?, words.next()?);
    let stamp = format!("{date} {clock}");
    let format = time::macros::format_description!(
        "[year]-[month]-[day] [hour]:[minute]:[second][optional [.[subsecond digits:1+]]]"
    );
    let t = time::PrimitiveDateTime::parse(&stamp, format).ok()?.assume_utc();
    Some((t.unix_timestamp_nanos() / 1000) as i64)
}

/// Parses `pg_waldump --stats` (per rmgr): name → (count, record bytes, image bytes).
pub fn parse_stats(text: &str) -> Stats {
    let mut stats = Stats::new();
    for line in text.lines() {
        // "Heap  N ( pct)  rec ( pct)  fpi ( pct)  combined ( pct)": drop the percentages.
        let mut plain = String::new();
        let mut depth = 0;
        for c in line.chars() {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                _ if depth == 0 => plain.push(c),
                _ => {}
            }
        }
        let words: Vec<&str> = plain.split_whitespace().collect();
        if let [name, n, rec, fpi, _combined] = words.as_slice() {
            if let (Ok(n), Ok(rec), Ok(fpi)) = (n.parse::<u64>(), rec.parse(), fpi.parse()) {
                if n > 0 && *name != "Total" {
                    stats.insert(name.to_string(), (n, rec, fpi));
                }
            }
        }
    }
    stats
}
