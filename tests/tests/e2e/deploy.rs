//! The deployment files: the Prometheus alert rules pass `promtool check
//! rules` and their unit tests (`promtool test rules`, every rule fired and
//! held back), and the systemd units pass `systemd-analyze verify`. The
//! checks live in `deploy/check.sh`, so an operator can run them too.

use std::path::Path;
use std::process::Command;

#[test]
fn alert_rules_and_service_units_pass_their_checks() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/check.sh");
    let output = Command::new("bash").arg(&script).output().expect("run deploy/check.sh");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "{text}{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(text.lines().filter(|l| l.starts_with("ok ")).count(), 4, "{text}");
    assert!(!text.contains("FAIL"), "{text}");
}
