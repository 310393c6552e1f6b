//! `timeline --html` end to end: attendance traffic and one UPDATE of
//! hundreds of rows; the page the real binary writes, opened in headless
//! Chromium, shows the flagged xid and its repair command, logs nothing to
//! the console and makes no network request.
//!
//! How "no network request" is checked: Chromium writes a net log
//! (`--log-net-log`) naming every URL request it starts, with the request's
//! initiator and network isolation key. Chromium's own background requests
//! (component updates, network time, account checks — a fresh profile makes
//! some whatever the flags) have no initiator and another isolation key;
//! anything the page causes has the page as initiator or its site (`file://`)
//! in the key. Those are counted. A control page with one `<img>` from
//! elsewhere proves the count sees a fetch, so a Chromium that stopped
//! logging requests fails the test instead of passing it. Nothing can leave
//! the machine meanwhile: the proxy is a closed port and no name resolves.

use crate::audit::{attendance_traffic, transaction, SCHEMA};
use crate::common::*;
use crate::restore::Restorer;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;
use tidemark_tests::agent::AgentSetup;
use tidemark_tests::cluster::{Cluster, ClusterOptions};
use tidemark_tests::wait::wait_until;

/// What headless Chromium made of one page.
struct Rendered {
    /// The DOM after scripts ran (`--dump-dom`).
    dom: String,
    /// Messages the page wrote to the console, uncaught exceptions included.
    console: Vec<String>,
    /// URLs of the requests made for the page.
    page_requests: Vec<String>,
    /// Every URL request in the net log, Chromium's own included (for failure messages).
    all_requests: Vec<String>,
}

/// Opens `page` in headless Chromium with a fresh profile and no way out,
/// saving a 1400x1000 screenshot to `screenshot`.
fn open_in_chromium(page: &Path, screenshot: &Path) -> Rendered {
    let dir = tempfile::tempdir().expect("tempdir");
    let net_log = dir.path().join("net-log.json");
    let (stdout, stderr) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let url = format!("file://{}", page.display());
    assert!(url.chars().all(|c| c.is_ascii_graphic()), "a page path that needs escaping in a URL: {url}");
    let mut command = Command::new("chromium");
    command
        .args([
            "--headless",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--enable-logging=stderr",
            // Nothing leaves the machine: every request goes to a closed
            // port, and no name resolves.
            "--proxy-server=127.0.0.1:1",
            "--host-resolver-rules=MAP * ~NOTFOUND",
            "--window-size=1400,1000",
            "--hide-scrollbars",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", dir.path().join("profile").display()))
        .arg(format!("--log-net-log={}", net_log.display()))
        .arg(format!("--screenshot={}", screenshot.display()))
        .arg(&url)
        // A writable HOME for whatever Chromium keeps beside the profile.
        .env("HOME", dir.path())
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout).expect("stdout file"))
        .stderr(std::fs::File::create(&stderr).expect("stderr file"));
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        // Chromium's sandbox refuses to run as root.
        command.arg("--no-sandbox");
    }
    let mut child = command.spawn().expect("run chromium (the Debian package `chromium`; ./dev test installs it)");
    let status = wait_until("headless Chromium to render the page and exit", Duration::from_secs(180), || {
        child.try_wait().expect("wait for chromium")
    });
    let log = std::fs::read_to_string(&stderr).expect("chromium's log");
    assert!(status.success(), "chromium failed ({status}):\n{log}");
    let console = log.lines().filter(|l| l.contains(":CONSOLE")).map(str::to_string).collect();
    let (page_requests, all_requests) = requests_in(&net_log);
    Rendered { dom: std::fs::read_to_string(&stdout).expect("dumped DOM"), console, page_requests, all_requests }
}

/// The URL requests of a net log: (those made for the page, all of them).
fn requests_in(net_log: &Path) -> (Vec<String>, Vec<String>) {
    let text = std::fs::read_to_string(net_log).expect("chromium's net log");
    let log: serde_json::Value = serde_json::from_str(&text).expect("the net log is JSON (Chromium exited cleanly)");
    // Event types are numbered per build; the constants name them. A build
    // without this event would log no requests at all and pass vacuously.
    let start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
        .as_u64()
        .expect("the net log names URL_REQUEST_START_JOB");
    let (mut page, mut all) = (Vec::new(), Vec::new());
    for event in log["events"].as_array().expect("net log events") {
        if event["type"].as_u64() != Some(start) {
            continue;
        }
        let params = &event["params"];
        // The job's end is logged under the same type, without the URL.
        let Some(url) = params["url"].as_str().map(str::to_string) else { continue };
        let initiator = params["initiator"].as_str().unwrap_or("");
        let isolation = params["network_isolation_key"].as_str().unwrap_or("");
        // "not an origin": no document asked for it (Chromium's own request).
        if initiator != "not an origin" || isolation.starts_with("file://") {
            page.push(url.clone());
        }
        all.push(format!("{url} (initiator {initiator}, isolation key {isolation})"));
    }
    (page, all)
}

/// The screenshot's width and height, from the PNG header.
fn png_size(png: &[u8]) -> (u32, u32) {
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 24, "not a PNG");
    let number = |at: usize| u32::from_be_bytes(png[at..at + 4].try_into().expect("4 bytes"));
    (number(16), number(20))
}

/// Where screenshots stay after the test: `$CARGO_TARGET_DIR/test-artifacts`
/// (the target directory is also three levels above this test binary).
fn artifacts_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| {
        let exe = std::env::current_exe().expect("current_exe");
        exe.ancestors().nth(3).expect("target directory").to_path_buf()
    });
    let dir = target.join("test-artifacts");
    std::fs::create_dir_all(&dir).expect("mkdir test-artifacts");
    dir
}

#[test]
fn the_timeline_page_renders_offline_in_chromium() {
    // The net-log check sees a page that fetches (the control for the
    // assertion at the end, on this Chromium).
    let control_dir = tempfile::tempdir().expect("tempdir");
    let control = control_dir.path().join("fetches.html");
    std::fs::write(&control, "<!DOCTYPE html><p>control</p><img src=\"http://tidemark-control.invalid/x.png\">")
        .expect("write control page");
    let seen = open_in_chromium(&control, &control_dir.path().join("control.png"));
    assert!(
        seen.page_requests.iter().any(|u| u.contains("tidemark-control.invalid")),
        "the net log did not show the control page's image request: {:#?}",
        seen.all_requests
    );

    // Hundreds of attendance rows from before the agent (not audited), then
    // one-row transactions, then the bad UPDATE of them all.
    let cluster = Cluster::start(ClusterOptions::default());
    cluster.psql_file(SCHEMA);
    cluster.psql(
        "INSERT INTO \"AttendanceRecord\" (\"studentId\", day, status) \
         SELECT 1 + g % 40, date '2026-08-01' + g % 30, 'present' FROM generate_series(1, 400) g",
    );
    cluster.switch_wal();
    let agent = AgentSetup::new(cluster.dir.path(), cluster.url("postgres"));
    agent.init();
    let running = agent.spawn();
    attendance_traffic(&cluster, 0, 60, 0.1);
    let present: u64 =
        cluster.psql("SELECT count(*) FROM \"AttendanceRecord\" WHERE status = 'present'").parse().expect("count");
    assert!(present >= 400, "{present}");
    let bad_xid = transaction(&cluster, "UPDATE \"AttendanceRecord\" SET status = NULL WHERE status = 'present'");
    attendance_traffic(&cluster, 60, 30, 0.1);
    let end = cluster.switch_wal();
    wait_archived(&agent, end);

    let scratch = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(scratch.path(), std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let restorer = Restorer::new(&agent, scratch.path());
    let cache = scratch.path().join("audit-cache");
    let cache_arg = cache.to_str().expect("utf-8").to_string();
    let timeline = |args: &[&str]| -> String {
        let mut all = vec!["timeline", "--cache-dir", &cache_arg];
        all.extend_from_slice(args);
        let output = restorer.run(&all);
        assert!(output.status.success(), "timeline {args:?}: {}", stderr(&output));
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    // The agent names tables once it has summarized the segment.
    wait_until("the audit names the bad UPDATE's table", Duration::from_secs(180), || {
        let json: serde_json::Value =
            serde_json::from_str(&timeline(&["--xid", &bad_xid.to_string(), "--json"])).expect("timeline JSON");
        json["transactions"][0]["tables"].as_array().is_some_and(|c| !c.is_empty()).then_some(())
    });
    assert!(running.stop(), "agent did not stop cleanly");

    let page = scratch.path().join("timeline.html");
    let page_arg = page.to_str().expect("utf-8");
    let said = timeline(&["--table", "\"AttendanceRecord\"", "--html", page_arg]);
    assert_eq!(said.lines().count(), 1, "one line, not the table: {said}");
    assert!(said.contains(page_arg) && said.contains("1 flagged"), "{said}");
    let html = std::fs::read_to_string(&page).expect("the page");
    assert!(!scratch.path().join(".timeline.html.tidemark-tmp").exists(), "the temporary name is left");

    // Statically: no URL on the page leads anywhere but to the page itself.
    assert!(!html.to_ascii_lowercase().contains("http"), "a URL on the page");
    assert!(html.split(" href=\"").skip(1).all(|link| link.starts_with('#')), "a link out of the page");
    assert!(!html.contains(" src=") && !html.contains("url("), "an embedded resource");

    let screenshot = artifacts_dir().join("timeline.png");
    let _ = std::fs::remove_file(&screenshot);
    let rendered = open_in_chromium(&page, &screenshot);

    let repo = agent.repo_url();
    let repair =
        format!("tidemark-restore --repo {repo} repair --xid {bad_xid} --dry-run --into postgresql://USER@HOST/DB");
    let restore = format!("tidemark-restore --repo {repo} restore --before-xid {bad_xid} --pgdata /path/to/new/data");
    assert!(rendered.dom.contains(&format!("<tr id=\"xid-{bad_xid}\">")), "no row for xid {bad_xid}");
    assert!(rendered.dom.contains(&format!("href=\"#xid-{bad_xid}\"")), "no marker for xid {bad_xid}");
    assert_eq!(rendered.dom.matches("class=\"marker\"").count(), 1, "only the bad UPDATE is flagged");
    assert!(rendered.dom.contains(&repair), "no repair command: {repair}");
    assert!(rendered.dom.contains(&restore), "no restore command: {restore}");
    assert!(rendered.dom.contains("public.\"AttendanceRecord\""), "no table name");
    assert!(rendered.dom.contains("<svg class=\"chart\""), "no chart");
    assert!(rendered.console.is_empty(), "the page wrote to the console: {:#?}", rendered.console);
    assert!(
        rendered.page_requests.is_empty(),
        "the page made network requests: {:#?}\n(all requests: {:#?})",
        rendered.page_requests,
        rendered.all_requests
    );

    let png = std::fs::read(&screenshot).expect("the screenshot");
    assert_eq!(png_size(&png), (1400, 1000));
    assert!(png.len() > 10 * 1024, "a {}-byte screenshot is blank or nearly", png.len());
    eprintln!("screenshot of the timeline page: {}", screenshot.display());
}
