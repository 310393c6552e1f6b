//! A repository is data from outside, and `restore` may run as root: a
//! crafted backup manifest (a link out of the target with a file written
//! through it, `..`, an absolute name, a tablespace located outside, a link
//! where the restore writes its own settings, a delta restore through a link
//! already in the directory) is refused naming the entry, and nothing is
//! created outside the target (a canary directory is listed before and
//! after). Restoring as root needs --allow-root.

use crate::common::*;
use std::path::Path;
use std::process::{Command, Output};
use tidemark_proto::repo::backup::{BackupFile, BackupManifest, FileKind, Tablespace};
use tidemark_proto::repo::frame::{self, Compression};
use tidemark_tests::agent::{bin, AgentSetup};
use tidemark_tests::cluster::{Cluster, ClusterOptions};

/// `tidemark-restore` as this process's user (root when the suite runs as root).
fn restore_tool(agent: &AgentSetup, args: &[&str]) -> Output {
    Command::new(bin("tidemark-restore"))
        .arg("--repo")
        .arg(agent.repo_url())
        .args(args)
        .env_remove("TIDEMARK_KEY_FILE")
        .output()
        .expect("run tidemark-restore")
}

fn write_manifest(key: &Path, manifest: &BackupManifest) {
    let (object, _) = frame::encode(&manifest.to_json().expect("manifest JSON"), Compression::None).expect("frame");
    std::fs::write(key, object).expect("write backup.json");
}

/// Refused: exit 1, one error line with `needle`, one hint.
fn assert_refused(output: &Output, needle: &str) {
    let text = stderr(output);
    assert_eq!(output.status.code(), Some(1), "{text}");
    let errors: Vec<&str> = text.lines().filter(|l| l.starts_with("tidemark-restore: error:")).collect();
    assert_eq!(errors.len(), 1, "{text}");
    assert!(errors[0].contains(needle), "{needle:?} not in: {text}");
    assert_eq!(text.lines().filter(|l| l.starts_with("hint: ")).count(), 1, "{text}");
}

#[test]
fn a_crafted_manifest_writes_nothing_outside_the_target() {
    let cluster = Cluster::start(ClusterOptions::default());
    let agent = AgentSetup::new(cluster.dir.path(), cluster.url("postgres"));
    agent.init();
    let running = agent.spawn();
    let output = agent.run_command(&["backup", "--json"]);
    assert!(output.status.success(), "backup: {}", stderr(&output));
    let backup: serde_json::Value = serde_json::from_slice(&output.stdout).expect("backup JSON");
    let id = backup["id"].as_str().expect("id").to_string();
    let end = cluster.switch_wal();
    wait_archived(&agent, end);
    assert!(running.stop());

    let key = agent.repo.join(format!("backups/{id}/backup.json"));
    let genuine = std::fs::read(&key).expect("backup.json");
    let original = BackupManifest::from_json(&frame::decode(&genuine).expect("frame")).expect("manifest");
    let work = tempfile::tempdir().expect("tempdir");
    let canary = work.path().join("canary");
    std::fs::create_dir(&canary).expect("mkdir canary");
    std::fs::write(canary.join("keep"), "canary").expect("write canary");
    let canary_before = listing(&canary);
    let pgdata = work.path().join("restored");
    let pgdata_arg = pgdata.to_str().expect("utf-8").to_string();
    // A real file's chunks give the crafted entries content.
    let pg_version = original.files.iter().find(|f| f.archive == "base" && f.path == "PG_VERSION").expect("PG_VERSION");
    let file = |path: &str| BackupFile { path: path.into(), ..pg_version.clone() };
    let link = |path: &str, target: &Path| BackupFile {
        path: path.into(),
        kind: FileKind::Symlink,
        size: 0,
        chunks: Vec::new(),
        link_target: Some(target.display().to_string()),
        ..pg_version.clone()
    };
    let outside_tablespace = format!("{pgdata_arg}/../canary/ts");
    let auto_conf_link = |m: &mut BackupManifest| {
        let entry = m.files.iter_mut().find(|f| f.path == "postgresql.auto.conf").expect("postgresql.auto.conf");
        *entry = link("postgresql.auto.conf", &canary.join("auto.conf"));
    };
    type Craft<'a> = Box<dyn Fn(&mut BackupManifest) + 'a>;
    let cases: Vec<(&str, Craft, String)> = vec![
        (
            "a link out of the target and a file through it",
            Box::new(|m| m.files.extend([link("x", &canary), file("x/.ssh/authorized_keys")])),
            "x/.ssh/authorized_keys passes through the link x".into(),
        ),
        ("a name with ..", Box::new(|m| m.files.push(file("../canary/escaped"))), "../canary/escaped".into()),
        (
            "an absolute name",
            Box::new(|m| m.files.push(file(&format!("{}/absolute", canary.display())))),
            format!("{}/absolute", canary.display()),
        ),
        (
            "a tablespace located outside the target",
            Box::new(|m| {
                m.tablespaces.push(Tablespace { oid: 99999, location: outside_tablespace.clone() });
                m.files.push(BackupFile { archive: "99999".into(), ..file("PG_15_202209061/x") });
            }),
            "tablespace 99999 of the backup is at".into(),
        ),
        (
            "a link where the restore writes its settings",
            Box::new(auto_conf_link),
            "postgresql.auto.conf is a link".into(),
        ),
    ];
    let beside_before = listing(work.path());
    for (what, craft, needle) in &cases {
        let mut manifest = original.clone();
        craft(&mut manifest);
        write_manifest(&key, &manifest);
        let output = restore_tool(&agent, &["restore", "--allow-root", "--pgdata", &pgdata_arg, "--latest"]);
        assert_refused(&output, needle);
        assert_eq!(listing(&canary), canary_before, "{what}: something was written outside the target");
        assert!(!pgdata.exists(), "{what}: the target was written");
        assert_eq!(listing(work.path()), beside_before, "{what}: something was left beside the target");
    }

    // As root, only when asked; with a link in the backup (made last,
    // written through by nothing) the restore works.
    let mut manifest = original.clone();
    manifest.files.push(link("server.crt", &canary.join("keep")));
    write_manifest(&key, &manifest);
    let output = restore_tool(&agent, &["restore", "--pgdata", &pgdata_arg, "--latest"]);
    assert_refused(&output, "will not run as root");
    assert!(!pgdata.exists());
    let output = restore_tool(&agent, &["restore", "--allow-root", "--pgdata", &pgdata_arg, "--latest"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(pgdata.join("PG_VERSION").is_file());
    assert!(pgdata.join("server.crt").symlink_metadata().expect("the link").file_type().is_symlink());
    assert_eq!(listing(&canary), canary_before);

    // --delta onto that directory, with a link to the canary already in it
    // and a manifest writing through it: refused before anything is written.
    std::os::unix::fs::symlink(&canary, pgdata.join("x")).expect("link in the target");
    let mut manifest = original.clone();
    let ssh = BackupFile { kind: FileKind::Directory, size: 0, chunks: Vec::new(), ..file("x/.ssh") };
    manifest.files.extend([link("x", &canary), ssh, file("x/.ssh/authorized_keys")]);
    write_manifest(&key, &manifest);
    let before = listing(&pgdata);
    let output = restore_tool(&agent, &["restore", "--allow-root", "--delta", "--pgdata", &pgdata_arg, "--latest"]);
    assert_refused(&output, "x/.ssh passes through the link x");
    assert_eq!(listing(&canary), canary_before, "the delta restore wrote through the link");
    assert_eq!(listing(&pgdata), before, "the refused delta restore changed the directory");
    std::fs::write(&key, &genuine).expect("put the genuine manifest back");
}
