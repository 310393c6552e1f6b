//! Helpers the end-to-end tests share.

use std::path::Path;
use std::time::Duration;
use tidemark_proto::segment::SegmentId;
use tidemark_proto::{Lsn, TimelineId};
use tidemark_tests::agent::AgentSetup;
use tidemark_tests::cluster::Cluster;
use tidemark_tests::wait::wait_until;

pub const SEGMENT_SIZE: u64 = 16 << 20;

/// Waits until the repository holds everything before `lsn`.
pub fn wait_archived(agent: &AgentSetup, lsn: Lsn) {
    wait_until(&format!("archived_lsn >= {lsn}"), Duration::from_secs(180), || {
        agent.archived_lsn().filter(|a| *a >= lsn)
    });
}

/// Fetches segment `name` with `wal-get` into `destination` (served
/// zero-padded when only its partial objects exist) and asserts it is a
/// whole segment whose bytes before `end` are those of the server's file
/// `server_segment`. Returns what was fetched.
pub fn assert_wal_get_matches_up_to(
    agent: &AgentSetup,
    name: &str,
    destination: &Path,
    server_segment: &Path,
    end: Lsn,
) -> Vec<u8> {
    let output = agent.wal_get(name, destination);
    assert!(output.status.success(), "wal-get {name} failed: {}", stderr(&output));
    let ours = std::fs::read(destination).expect("read what wal-get wrote");
    assert_eq!(ours.len() as u64, SEGMENT_SIZE, "wal-get {name} did not give a whole segment");
    let servers = std::fs::read(server_segment).expect("the server's segment");
    let upto = end.segment_offset(SEGMENT_SIZE) as usize;
    assert!(ours[..upto] == servers[..upto], "{name} differs from the server's bytes before {end}");
    ours
}

/// Proves every segment from the one holding `from` up to (not including) the
/// one holding `to` is in the repository and byte-identical, through
/// `wal-get`, to the server's own file in pg_wal. Returns how many were checked.
pub fn assert_segments_identical(cluster: &Cluster, agent: &AgentSetup, from: Lsn, to: Lsn) -> usize {
    assert_timeline_segments_identical(cluster, agent, TimelineId(1), from, to)
}

/// As [`assert_segments_identical`], for the segments of `timeline`.
pub fn assert_timeline_segments_identical(
    cluster: &Cluster,
    agent: &AgentSetup,
    timeline: TimelineId,
    from: Lsn,
    to: Lsn,
) -> usize {
    let first = from.segment_no(SEGMENT_SIZE);
    let last = to.segment_no(SEGMENT_SIZE);
    assert!(last > first, "no complete segment between {from} and {to}");
    let scratch = cluster.dir.path().join("fetched");
    std::fs::create_dir_all(&scratch).expect("mkdir scratch");
    if agent.os_user.is_some() {
        // wal-get runs as the agent's OS user and writes here.
        tidemark_tests::cluster::chown(&scratch, tidemark_tests::cluster::PG_USER_OS);
    }
    for segment_no in first..last {
        let name = SegmentId { timeline, segment_no }.file_name(SEGMENT_SIZE);
        let destination = scratch.join(&name);
        let output = agent.wal_get(&name, &destination);
        assert!(output.status.success(), "wal-get {name} failed: {}", String::from_utf8_lossy(&output.stderr));
        let ours = std::fs::read(&destination).expect("read fetched segment");
        let servers =
            std::fs::read(cluster.wal_dir().join(&name)).expect("read server segment (kept by wal_keep_size)");
        assert!(ours == servers, "segment {name} differs from the server's pg_wal copy");
        std::fs::remove_file(&destination).expect("remove fetched");
    }
    (last - first) as usize
}

pub fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Every path under `dir` with its size (directories 0), links not
/// followed, sorted: compared before and after to see that nothing changed.
pub fn listing(dir: &Path) -> Vec<(std::path::PathBuf, u64)> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(next) = pending.pop() {
        for entry in std::fs::read_dir(&next).expect("read_dir").flatten() {
            let meta = entry.path().symlink_metadata().expect("metadata");
            if meta.is_dir() {
                pending.push(entry.path());
            }
            found.push((entry.path(), if meta.is_dir() { 0 } else { meta.len() }));
        }
    }
    found.sort();
    found
}

/// Whether a directory is absent or empty (nothing was written there).
pub fn empty_or_absent(path: &Path) -> bool {
    match std::fs::read_dir(path) {
        Ok(mut entries) => entries.next().is_none(),
        Err(_) => true,
    }
}

/// Starts `agent`'s `run` again and again until one keeps running (its
/// lease taken), within `deadline`.
pub fn run_when_the_lease_is_free(
    agent: &tidemark_tests::agent::AgentSetup,
    deadline: Duration,
) -> tidemark_tests::agent::RunningAgent {
    wait_until("the agent takes the repository's lease", deadline, || {
        let mut candidate = agent.spawn();
        wait_until("the agent streams or exits", Duration::from_secs(60), || {
            (!candidate.is_running() || candidate.log_text().contains("streaming")).then_some(())
        });
        candidate.is_running().then_some(candidate)
    })
}

/// What `pg_verifybackup -n` checks of a restored directory: every file the
/// backup_manifest lists is there with its size and CRC-32C, and the
/// manifest's own SHA-256 is right.
pub fn check_backup_manifest(pgdata: &Path) {
    use sha2::Digest;
    let text = std::fs::read_to_string(pgdata.join("backup_manifest")).expect("read backup_manifest");
    let body_end = text.rfind("\"Manifest-Checksum\"").expect("a Manifest-Checksum");
    let digest: String =
        sha2::Sha256::digest(&text.as_bytes()[..body_end]).iter().map(|b| format!("{b:02x}")).collect();
    let manifest: serde_json::Value = serde_json::from_str(&text).expect("backup_manifest is JSON");
    assert_eq!(manifest["Manifest-Checksum"].as_str(), Some(digest.as_str()), "the manifest's SHA-256");
    let files = manifest["Files"].as_array().expect("Files");
    assert!(files.len() > 100, "{} files", files.len());
    for file in files {
        let path = file["Path"].as_str().expect("Path");
        assert!(!path.contains("INCREMENTAL."), "{path}");
        let bytes = std::fs::read(pgdata.join(path)).unwrap_or_else(|e| panic!("read {path}: {e}"));
        assert_eq!(Some(bytes.len() as u64), file["Size"].as_u64(), "size of {path}");
        let crc: String = crc32c::crc32c(&bytes).to_le_bytes().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(file["Checksum"].as_str(), Some(crc.as_str()), "CRC-32C of {path}");
    }
}
