//! The repository's own metadata and what it binds (issue 34, item 6):
//! `repository.json` put back from an older copy, edited by hand, or asking
//! for a huge Argon2id cost is refused by both binaries; an object copied
//! from another repository sealed with the same key does not open; an older
//! `.partial` put back over a newer one is refused by `wal-get`. Each
//! refusal is one error line and a hint, a non-zero exit, nothing written.

use crate::common::*;
use crate::restore::Restorer;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;
use tidemark_proto::segment::SegmentId;
use tidemark_proto::{Lsn, TimelineId};
use tidemark_tests::agent::{keygen, AgentSetup};
use tidemark_tests::cluster::{chown, Cluster, ClusterOptions, PG_USER_OS};

const SEGMENT_SIZE: u64 = 16 << 20;

fn setup(cluster: &Cluster, name: &str) -> AgentSetup {
    let base = cluster.dir.path().join(name);
    std::fs::create_dir_all(&base).expect("mkdir");
    let mut agent = AgentSetup::new(&base, cluster.url("postgres"));
    agent.extra_args = vec!["--slot".into(), name.into()];
    agent
}

/// A directory the restore tool (run as the server's OS user) may write.
fn pg_dir(path: &Path) -> &Path {
    std::fs::create_dir_all(path).expect("mkdir");
    chown(path, PG_USER_OS);
    path
}

fn edit_meta(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut meta: serde_json::Value = serde_json::from_slice(&std::fs::read(path).expect("read")).expect("json");
    edit(&mut meta);
    std::fs::write(path, serde_json::to_vec_pretty(&meta).expect("json")).expect("write");
}

/// `wal-get` refused with exit 200 (recovery stops), `needle` named, a hint, nothing written.
fn wal_get_refused(restorer: &Restorer, name: &str, destination: &Path, needle: &str) {
    let output = restorer.run(&["wal-get", name, destination.to_str().expect("utf-8")]);
    let text = stderr(&output);
    assert_eq!(output.status.code(), Some(200), "{text}");
    assert!(text.contains(needle) && text.contains("hint:"), "{text}");
    assert!(!destination.exists(), "wal-get wrote {}", destination.display());
}

#[test]
fn an_older_or_altered_repository_json_and_an_object_from_another_repository_are_refused() {
    let cluster = Cluster::start(ClusterOptions::default());
    let keys = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(keys.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let (key_a, key_c) = (keys.path().join("a.key"), keys.path().join("c.key"));
    let id_a = keygen(&key_a);
    // Two repositories of the same cluster sealed with the same key.
    let (mut one, mut two) = (setup(&cluster, "one"), setup(&cluster, "two"));
    one.key_files = vec![key_a.clone()];
    two.key_files = vec![key_a.clone()];
    // Where the restore tool remembers the repository's keys.
    let state_home = pg_dir(&keys.path().join("state-home")).to_path_buf();
    one.env.push(("XDG_STATE_HOME".into(), state_home.display().to_string()));
    one.init();
    two.init();
    let (running_one, running_two) = (one.spawn(), two.spawn());
    let end = cluster.switch_wal();
    wait_archived(&one, end);
    wait_archived(&two, end);
    assert!(running_one.stop() && running_two.stop(), "agents did not stop cleanly");
    let name = SegmentId::containing(TimelineId(1), Lsn(end.0 - 1), SEGMENT_SIZE).file_name(SEGMENT_SIZE);
    let out = pg_dir(&keys.path().join("out")).to_path_buf();
    let fetched = out.join("RECOVERYXLOG");

    // The same segment copied from the other repository: same cluster, same
    // key, same name, and still refused (it is bound to that repository).
    let ours = one.repo.join(format!("wal/00000001/{name}"));
    let original = std::fs::read(&ours).expect("read our segment");
    std::fs::copy(two.repo.join(format!("wal/00000001/{name}")), &ours).expect("copy theirs over ours");
    let restorer = Restorer::new(&one, keys.path());
    wal_get_refused(&restorer, &name, &fetched, "does not authenticate");
    std::fs::write(&ours, &original).expect("put ours back");
    let output = restorer.run(&["wal-get", &name, fetched.to_str().expect("utf-8")]);
    assert!(output.status.success(), "our own object: {}", stderr(&output));
    std::fs::remove_file(&fetched).expect("rm");

    // Rotate to key C; both binaries see C current and remember it.
    let meta_path = one.repo.join("repository.json");
    let before_rotation = std::fs::read(&meta_path).expect("read");
    let id_c = keygen(&key_c);
    let output = one.run_command(&["rotate-key", "--new-key-file", key_c.to_str().expect("utf-8")]);
    assert!(output.status.success(), "rotate-key: {}", stderr(&output));
    one.key_files = vec![key_a.clone(), key_c.clone()];
    let restorer = Restorer::new(&one, keys.path());
    let output = restorer.run(&["list"]);
    assert!(output.status.success(), "list: {}", stderr(&output));
    let rotated = std::fs::read(&meta_path).expect("read");

    // The genuine older repository.json (key A current, tagged by key A)
    // put back: refused by the restore tool and the agent, nothing written.
    std::fs::write(&meta_path, &before_rotation).expect("put the older copy back");
    let rolled_back = format!("lists keys {id_a}, but listed {id_a}, {id_c} when last opened here");
    restorer.refused(&["list"], &rolled_back);
    let (_target, pgdata) = Restorer::target_dir();
    restorer.refused(&["restore", "--pgdata", pgdata.to_str().expect("utf-8"), "--latest"], &rolled_back);
    assert!(empty_or_absent(&pgdata), "restore wrote into {}", pgdata.display());
    wal_get_refused(&restorer, &name, &fetched, &rolled_back);
    let output = one.run_command(&["status"]);
    assert!(!output.status.success() && stderr(&output).contains(&rolled_back), "{}", stderr(&output));
    assert!(stderr(&output).contains("hint:"), "{}", stderr(&output));
    let output = one.run_command(&["backup"]);
    assert!(!output.status.success() && stderr(&output).contains(&rolled_back), "{}", stderr(&output));
    assert_eq!(std::fs::read(&meta_path).expect("read"), before_rotation, "the agent rewrote repository.json");

    // Edited by hand to make key A current again: its tags no longer match,
    // even for a restore host that never saw the repository before.
    std::fs::write(&meta_path, &rotated).expect("write");
    edit_meta(&meta_path, |meta| meta["encryption"]["current_key"] = id_a.clone().into());
    let mut newcomer = one.clone();
    newcomer.env = vec![("XDG_STATE_HOME".into(), pg_dir(&keys.path().join("fresh")).display().to_string())];
    Restorer::new(&newcomer, keys.path()).refused(&["list"], "does not authenticate with key");
    let output = one.run_command(&["status"]);
    assert!(!output.status.success() && stderr(&output).contains("repository.json"), "{}", stderr(&output));

    // A huge Argon2id cost: refused before anything is derived.
    std::fs::write(&meta_path, &rotated).expect("write");
    edit_meta(&meta_path, |meta| meta["encryption"]["kdf"]["memory_kib"] = u32::MAX.into());
    restorer.refused(&["list"], "Argon2id memory");
    let output = one.run_command(&["status"]);
    assert!(!output.status.success() && stderr(&output).contains("Argon2id memory"), "{}", stderr(&output));

    // The repository's own newest repository.json opens again everywhere.
    std::fs::write(&meta_path, &rotated).expect("write");
    let output = restorer.run(&["list"]);
    assert!(output.status.success(), "list: {}", stderr(&output));
    let output = one.run_command(&["status", "--json"]);
    assert!(output.status.success(), "status: {}", stderr(&output));
}

#[test]
fn an_older_partial_put_back_over_a_newer_one_is_refused_by_wal_get() {
    let cluster = Cluster::start(ClusterOptions::default());
    cluster.psql("CREATE TABLE quiet (note text)");
    let mut agent = AgentSetup::new(cluster.dir.path(), cluster.url("postgres"));
    agent.extra_args = vec!["--partial-upload-interval".into(), "1".into()];
    agent.init();
    let running = agent.spawn();
    // A fresh segment: its first prefix is small, so a few pieces outweigh it and fold.
    cluster.switch_wal();
    cluster.psql("INSERT INTO quiet VALUES ('first')");
    let first = cluster.current_lsn();
    wait_archived(&agent, first);
    let segment = SegmentId::containing(TimelineId(1), first, SEGMENT_SIZE);
    let name = segment.file_name(SEGMENT_SIZE);
    let dir = agent.repo.join("wal/00000001");
    let prefix = dir.join(format!("{name}.partial"));
    let older = std::fs::read(&prefix).expect("the segment's prefix object");
    // The frame's raw length: where the older prefix's bytes end.
    let older_end = u64::from_le_bytes(older[8..16].try_into().expect("frame header"));
    let pieces_past = |end: u64| -> Vec<u64> {
        let names = std::fs::read_dir(&dir).expect("list").map(|e| e.expect("entry").file_name());
        let offsets = names.filter_map(|n| {
            let n = n.to_string_lossy().into_owned();
            u64::from_str_radix(n.strip_prefix(&format!("{name}.partial."))?, 16).ok()
        });
        offsets.filter(|offset| *offset > end).collect()
    };

    // Small commits until the agent has folded its pieces into a newer
    // prefix (and deleted them) and continued that with a piece.
    let first_piece = dir.join(format!("{name}.partial.{older_end:08X}"));
    let listing = || -> Vec<String> {
        let names = std::fs::read_dir(&dir).expect("list").map(|e| e.expect("entry").file_name());
        names.map(|n| n.to_string_lossy().into_owned()).filter(|n| n.starts_with(name.as_str())).collect()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(240);
    for n in 0.. {
        cluster.psql(&format!("INSERT INTO quiet SELECT 'row {n} ' || g FROM generate_series(1, 20) g"));
        std::thread::sleep(Duration::from_millis(1200));
        let folded = std::fs::read(&prefix).is_ok_and(|now| now != older) && !first_piece.exists();
        if folded && !pieces_past(older_end).is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no newer prefix continued by a piece past {older_end:#X}: {:?}",
            listing()
        );
    }
    // Killed, so no last upload folds the newer chain away.
    running.kill9();
    assert!(!dir.join(&name).exists(), "the segment was completed; the test needs it partial");

    std::fs::write(&prefix, &older).expect("put the older prefix back");
    let destination = cluster.dir.path().join("RECOVERYXLOG");
    let output = agent.wal_get(&name, &destination);
    let text = stderr(&output);
    assert_eq!(output.status.code(), Some(200), "{text}");
    assert!(text.contains("an older partial object was put back") && text.contains("hint:"), "{text}");
    assert!(!destination.exists(), "wal-get wrote a shorter segment");
}
