//! Encryption at rest, key rotation and `verify`, end to end: an encrypted
//! repository and a plain one fed by the same server side by side, so the
//! plain one is the reference the encrypted one must match.

use crate::common::*;
use crate::restore::Restorer;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use tidemark_tests::agent::{keygen, AgentSetup};
use tidemark_tests::cluster::{Cluster, ClusterOptions};

/// Text the workload writes; it must never appear in an encrypted object.
const MARKER: &[u8] = b"TIDEMARK-PLAINTEXT-MARKER";

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read_dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The key id in a stored object's sealed header, as hex.
fn sealed_key_id(object: &Path) -> Option<String> {
    let bytes = std::fs::read(object).expect("read object");
    (bytes.get(..4) == Some(b"TMS\x01")).then(|| bytes[8..16].iter().map(|b| format!("{b:02x}")).collect())
}

/// Objects of a local repository, but its metadata.
fn objects(repo: &Path) -> Vec<PathBuf> {
    files_under(repo).into_iter().filter(|p| !p.ends_with("repository.json")).collect()
}

fn rows(cluster: &Cluster) -> Vec<String> {
    cluster.psql("SELECT id || ':' || note FROM secrets ORDER BY id").lines().map(str::to_string).collect()
}

fn setup(cluster: &Cluster, name: &str) -> AgentSetup {
    let base = cluster.dir.path().join(name);
    std::fs::create_dir_all(&base).expect("mkdir");
    let mut agent = AgentSetup::new(&base, cluster.url("postgres"));
    agent.extra_args = vec!["--slot".into(), name.into()];
    agent
}

#[test]
fn encrypted_repository_hides_authenticates_rotates_and_verifies() {
    let cluster = Cluster::start(ClusterOptions::default());
    cluster.psql("CREATE TABLE secrets (id serial PRIMARY KEY, note text NOT NULL)");
    let keys = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(keys.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let (key_a, key_b, key_c) = (keys.path().join("a.key"), keys.path().join("b.key"), keys.path().join("c.key"));
    let id_a = keygen(&key_a);
    let id_b = keygen(&key_b);
    assert_ne!(id_a, id_b);
    assert_eq!(std::fs::metadata(&key_a).expect("stat").permissions().mode() & 0o077, 0, "key files are owner-only");

    let mut secret = setup(&cluster, "secret");
    secret.key_files = vec![key_a.clone()];
    let plain = setup(&cluster, "plain");
    secret.init();
    plain.init();
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(secret.repo.join("repository.json")).expect("meta")).expect("json");
    assert_eq!(meta["format_version"], 3, "{meta}");
    assert_eq!(meta["encryption"]["current_key"].as_str(), Some(id_a.as_str()), "{meta}");
    let running_secret = secret.spawn();
    let running_plain = plain.spawn();
    for agent in [&secret, &plain] {
        let output = agent.run_command(&["backup", "--json"]);
        assert!(output.status.success(), "backup: {}", stderr(&output));
    }
    cluster.psql("INSERT INTO secrets (note) SELECT 'TIDEMARK-PLAINTEXT-MARKER ' || g FROM generate_series(1, 2000) g");
    let target = cluster.current_lsn();
    cluster.psql("INSERT INTO secrets (note) SELECT 'after the target ' || g FROM generate_series(1, 50) g");
    let end = cluster.switch_wal();
    wait_archived(&secret, end);
    wait_archived(&plain, end);

    // The marker is in the archived WAL as wal-get gives it back (so the
    // search works), and in no encrypted object as stored.
    let fetched = keys.path().join("fetched");
    let in_wal = files_under(&secret.repo.join("wal/00000001")).iter().any(|object| {
        // A segment's name, from its complete object or any of its partial ones.
        let file = object.file_name().expect("name").to_string_lossy().into_owned();
        let name = file.split(".partial").next().unwrap_or_default().to_string();
        assert!(secret.wal_get(&name, &fetched).status.success(), "wal-get {name}");
        contains(&std::fs::read(&fetched).expect("read"), MARKER)
    });
    assert!(in_wal, "the workload's marker should be in the archived WAL");
    let sealed = objects(&secret.repo);
    assert!(sealed.len() > 10, "{} objects", sealed.len());
    for object in &sealed {
        assert!(!contains(&std::fs::read(object).expect("read"), MARKER), "{} holds plaintext", object.display());
        assert_eq!(
            sealed_key_id(object).as_deref(),
            Some(id_a.as_str()),
            "{} is not sealed with key A",
            object.display()
        );
        let mode = std::fs::metadata(object).expect("stat").permissions().mode();
        assert_eq!(mode & 0o077, 0, "{} is readable by others", object.display());
    }

    // A wrong key and no key are refused at once, by both binaries.
    let mut wrong = secret.clone();
    wrong.key_files = vec![key_b.clone()];
    let output = Restorer::new(&wrong, keys.path()).run(&["list"]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("not a key of this repository"), "{}", stderr(&output));
    let output = wrong.run_command(&["status"]);
    assert!(
        !output.status.success() && stderr(&output).contains("not a key of this repository"),
        "{}",
        stderr(&output)
    );
    let mut keyless = secret.clone();
    keyless.key_files.clear();
    let output = Restorer::new(&keyless, keys.path()).run(&["list"]);
    assert!(!output.status.success() && stderr(&output).contains("is encrypted"), "{}", stderr(&output));

    // A swapped object (one segment copied over another, in a copy of the
    // repository) fails to authenticate, named.
    let copy = keys.path().join("swapped");
    let status = Command::new("cp").arg("-a").arg(&secret.repo).arg(&copy).status().expect("cp");
    assert!(status.success());
    let segments: Vec<PathBuf> = files_under(&copy.join("wal/00000001"))
        .into_iter()
        .filter(|p| !p.to_string_lossy().contains(".partial"))
        .collect();
    assert!(segments.len() >= 2);
    std::fs::copy(&segments[0], &segments[1]).expect("swap");
    let victim = segments[1].file_name().expect("name").to_string_lossy().into_owned();
    let mut swapped = secret.clone();
    swapped.url = Some(format!("file://{}", copy.display()));
    let output = swapped.wal_get(&victim, &keys.path().join("out"));
    assert_eq!(output.status.code(), Some(200), "{}", stderr(&output));
    assert!(stderr(&output).contains(&format!("wal/00000001/{victim}")), "{}", stderr(&output));
    assert!(stderr(&output).contains("does not authenticate"), "{}", stderr(&output));

    // Restores from both repositories are identical, and exactly the source's rows before the target.
    let secret_restorer = Restorer::new(&secret, keys.path());
    let plain_restorer = Restorer::new(&plain, keys.path());
    let target_text = target.to_string();
    let (from_secret, _) = secret_restorer.restore_and_start(&["--lsn", &target_text]);
    let (from_plain, _) = plain_restorer.restore_and_start(&["--lsn", &target_text]);
    // Owner-only: the agent's spool and index, and the restored recovery settings.
    let mut local_files = files_under(&secret.state_dir);
    local_files.push(from_secret.data.join("postgresql.auto.conf"));
    local_files.push(key_a.clone());
    for file in &local_files {
        let mode = std::fs::metadata(file).expect("stat").permissions().mode();
        assert_eq!(mode & 0o077, 0, "{} has mode {mode:o}", file.display());
    }
    let restored = rows(&from_secret);
    assert_eq!(restored.len(), 2000);
    assert_eq!(restored, rows(&from_plain));
    assert_eq!(restored, rows(&cluster)[..2000].to_vec());
    drop((from_secret, from_plain));
    let name = segments[0].file_name().expect("name").to_string_lossy().into_owned();
    let (a, b) = (keys.path().join("a.seg"), keys.path().join("b.seg"));
    assert!(secret.wal_get(&name, &a).status.success() && plain.wal_get(&name, &b).status.success());
    assert!(std::fs::read(&a).expect("a") == std::fs::read(&b).expect("b"), "WAL differs between repositories");

    // Rotation: new objects use key C, old ones stay readable with both keys.
    assert!(running_secret.stop(), "agent did not stop cleanly");
    drop(running_plain);
    let id_c = keygen(&key_c);
    let output = secret.run_command(&["rotate-key", "--new-key-file", key_c.to_str().expect("utf-8"), "--json"]);
    assert!(output.status.success(), "rotate-key: {}", stderr(&output));
    let rotation: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
    assert_eq!(
        (rotation["old_key"].as_str(), rotation["new_key"].as_str()),
        (Some(id_a.as_str()), Some(id_c.as_str()))
    );
    let mut only_c = secret.clone();
    only_c.key_files = vec![key_c.clone()];
    let mut both = secret.clone();
    both.key_files = vec![key_a.clone(), key_c.clone()];
    let running = both.spawn();
    cluster.psql("INSERT INTO secrets (note) SELECT 'after rotation ' || g FROM generate_series(1, 500) g");
    let end = cluster.switch_wal();
    wait_archived(&both, end);
    let ids: Vec<Option<String>> = objects(&secret.repo).iter().map(|o| sealed_key_id(o)).collect();
    assert!(ids.contains(&Some(id_a.clone())) && ids.contains(&Some(id_c.clone())), "objects under both keys");
    let (latest, _) = Restorer::new(&both, keys.path()).restore_and_start(&["--latest"]);
    assert_eq!(rows(&latest), rows(&cluster));
    drop(latest);
    // Key C alone cannot read what key A sealed...
    let (_dir, pgdata) = Restorer::target_dir();
    let output =
        Restorer::new(&only_c, keys.path()).run(&["restore", "--pgdata", pgdata.to_str().expect("utf-8"), "--latest"]);
    assert!(!output.status.success() && stderr(&output).contains("which was not given"), "{}", stderr(&output));
    // ...until the old objects are re-encrypted.
    let output = both.run_command(&["reencrypt", "--json"]);
    assert!(output.status.success(), "reencrypt: {}", stderr(&output));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
    assert!(report["resealed"].as_u64() > Some(10), "{report}");
    assert!(running.stop(), "agent did not stop cleanly");
    let output = both.run_command(&["reencrypt", "--json"]);
    let again: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
    assert_eq!(again["resealed"].as_u64(), Some(0), "a second run finds nothing left: {again}");
    for object in objects(&secret.repo) {
        assert_eq!(sealed_key_id(&object).as_deref(), Some(id_c.as_str()), "{} not re-sealed", object.display());
    }
    let restorer_c = Restorer::new(&only_c, keys.path());
    let (latest, _) = restorer_c.restore_and_start(&["--latest"]);
    assert_eq!(rows(&latest), rows(&cluster));
    drop(latest);
    // The operations log names the rotation and the re-encryption (sealed too).
    let output = restorer_c.run(&["events", "--json"]);
    assert!(output.status.success(), "events: {}", stderr(&output));
    let events: serde_json::Value = serde_json::from_slice(&output.stdout).expect("events JSON");
    let kinds: Vec<&str> = events.as_array().expect("list").iter().filter_map(|e| e["kind"].as_str()).collect();
    assert!(kinds.contains(&"rotate-key") && kinds.contains(&"reencrypt"), "{kinds:?}");

    // verify: all sound, then one flipped byte is named.
    let output = restorer_c.run(&["verify", "--json"]);
    assert!(output.status.success(), "verify: {}", stderr(&output));
    let clean: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
    assert!(clean["objects_checked"].as_u64() > Some(10), "{clean}");
    // The newest complete segment: after every backup's start, so needed.
    let victim = objects(&secret.repo)
        .into_iter()
        .rfind(|p| p.to_string_lossy().contains("/wal/00000001/") && !p.to_string_lossy().contains(".partial"))
        .expect("a segment object");
    let mut bytes = std::fs::read(&victim).expect("read");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&victim, &bytes).expect("write");
    let output = restorer_c.run(&["verify"]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let key = victim.strip_prefix(&secret.repo).expect("in repo").to_string_lossy().into_owned();
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let bad: Vec<&str> = text.lines().filter(|l| l.starts_with("BAD ")).collect();
    assert_eq!(bad.len(), 1, "{text}");
    assert!(bad[0].starts_with(&format!("BAD {key}: ")) && bad[0].contains("does not authenticate"), "{text}");
}

#[test]
fn a_passphrase_repository_refuses_a_wrong_passphrase() {
    let cluster = Cluster::start(ClusterOptions::default());
    cluster.psql("CREATE TABLE secrets (id serial PRIMARY KEY, note text NOT NULL)");
    let keys = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(keys.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let (right, wrong) = (keys.path().join("right.pass"), keys.path().join("wrong.pass"));
    std::fs::write(&right, "correct horse battery staple\n").expect("write");
    std::fs::write(&wrong, "correct horse battery stapler\n").expect("write");
    let mut agent = setup(&cluster, "phrase");
    agent.key_files = vec![right.clone()];
    // A key file others may read is refused with one line, before anything is written.
    std::fs::set_permissions(&right, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let output = agent.run_command(&["init"]);
    let text = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "one error line and one hint:\n{text}");
    assert!(lines[0].starts_with("tidemark-agent: error: key file ") && lines[0].contains("(mode 0644)"), "{text}");
    assert!(lines[1].starts_with("hint: ") && lines[1].contains("chmod 600"), "{text}");
    assert!(!agent.repo.exists() && !agent.state_dir.exists(), "nothing written");
    assert_eq!(cluster.psql("SELECT count(*) FROM pg_replication_slots"), "0");
    for key in [&right, &wrong] {
        std::fs::set_permissions(key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    agent.init();
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(agent.repo.join("repository.json")).expect("meta")).expect("json");
    assert_eq!(meta["encryption"]["kdf"]["algorithm"], "argon2id", "{meta}");
    let running = agent.spawn();
    let output = agent.run_command(&["backup", "--json"]);
    assert!(output.status.success(), "backup: {}", stderr(&output));
    cluster.psql("INSERT INTO secrets (note) SELECT 'TIDEMARK-PLAINTEXT-MARKER ' || g FROM generate_series(1, 100) g");
    let end = cluster.switch_wal();
    wait_archived(&agent, end);
    assert!(running.stop());
    for object in objects(&agent.repo) {
        assert!(!contains(&std::fs::read(&object).expect("read"), MARKER), "{} holds plaintext", object.display());
    }
    let restorer = Restorer::new(&agent, keys.path());
    let (restored, _) = restorer.restore_and_start(&["--latest"]);
    assert_eq!(rows(&restored), rows(&cluster));
    drop(restored);
    // tidemark-restore takes key_files from tidemark.toml, as the agent does,
    // and refuses an exposed one in the same words.
    let config = keys.path().join("tidemark.toml");
    std::fs::write(&config, format!("key_files = [{:?}]\n", right.display().to_string())).expect("config");
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let mut configured = agent.clone();
    configured.key_files.clear();
    configured.env.push(("TIDEMARK_CONFIG".into(), config.display().to_string()));
    let configured = Restorer::new(&configured, keys.path());
    let output = configured.run(&["list", "--json"]);
    assert!(output.status.success(), "list with key_files from tidemark.toml: {}", stderr(&output));
    std::fs::set_permissions(&right, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    configured.refused(&["list"], "(mode 0640)");
    std::fs::set_permissions(&right, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let mut mistyped = agent.clone();
    mistyped.key_files = vec![wrong];
    let output = Restorer::new(&mistyped, keys.path()).run(&["list"]);
    assert!(
        !output.status.success() && stderr(&output).contains("not a key of this repository"),
        "{}",
        stderr(&output)
    );
    let output = mistyped.run_command(&["backup"]);
    assert!(
        !output.status.success() && stderr(&output).contains("not a key of this repository"),
        "{}",
        stderr(&output)
    );
}
