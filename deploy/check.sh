#!/usr/bin/env bash
# Checks the deployment files in deploy/:
#   - prometheus/tidemark-rules.yml is valid (promtool check rules)
#   - its unit tests pass (promtool test rules prometheus/tidemark-rules.test.yml)
#   - the systemd units pass `systemd-analyze verify`, with ExecStart pointed
#     at /bin/true so that verify does not depend on the binaries being
#     installed, and the unmodified units have no complaint other than the
#     missing /usr/local/bin/tidemark-agent.
#
# Prints one "ok"/"FAIL" line per check (a failing check's output follows,
# indented) and exits 1 if any check failed. Works from any directory and
# without a terminal. Needs promtool (Debian: apt-get install prometheus) and
# systemd-analyze (Debian: systemd); a missing tool is a failed check.
#
# About `systemd-analyze verify`: its exit status only reports units that
# cannot be loaded at all (no ExecStart=, an unparsable timer) and missing
# executables. A misspelt directive (Tpye=notify), a bad value
# (Type=notiffy) or an unknown system call group are only warnings on
# stderr, with exit status 0. So a unit passes only with exit status 0 AND
# no output mentioning our units; SYSTEMD_LOG_LEVEL=warning keeps a
# caller's debug setting from adding chatter, SYSTEMD_LOG_TARGET=console
# keeps the warnings from going to the journal instead of to us.

set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
prom_dir="$here/prometheus"
unit_dir="$here/systemd"
units=(tidemark-agent.service tidemark-drill.service tidemark-drill.timer)

tmp=$(mktemp -d "${TMPDIR:-/tmp}/tidemark-check.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
trap 'exit 130' INT   # run the EXIT trap on these too
trap 'exit 143' TERM

failed=0

pass() { printf 'ok   %s\n' "$1"; }
fail() {
    printf 'FAIL %s\n' "$1"
    if [[ -n "${2:-}" ]]; then
        printf '%s\n' "$2" | sed 's/^/     | /'
    fi
    failed=1
}

need() {
    if ! command -v "$1" >/dev/null 2>&1; then
        fail "$2" "$1 not found in PATH"
        return 1
    fi
}

analyze() {
    SYSTEMD_LOG_LEVEL=warning SYSTEMD_LOG_TARGET=console SYSTEMD_LOG_COLOR=0 \
        systemd-analyze verify --no-pager --man=no --generators=no "$@" 2>&1
}

# 1. The rule file.
name="promtool check rules prometheus/tidemark-rules.yml"
if need promtool "$name"; then
    if out=$(promtool check rules "$prom_dir/tidemark-rules.yml" 2>&1); then
        pass "$name"
    else
        fail "$name" "$out"
    fi
fi

# 2. Its unit tests (rule_files in the test file are relative to its directory).
name="promtool test rules prometheus/tidemark-rules.test.yml"
if need promtool "$name"; then
    if out=$(cd "$prom_dir" && promtool test rules tidemark-rules.test.yml 2>&1); then
        pass "$name"
    else
        fail "$name" "$out"
    fi
fi

# 3. The units, ExecStart rewritten to an executable that exists.
name="systemd-analyze verify ${units[*]} (ExecStart=/bin/true)"
if need systemd-analyze "$name"; then
    copies=()
    problem=""
    for unit in "${units[@]}"; do
        sed 's#^ExecStart=/usr/local/bin/tidemark-agent #ExecStart=/bin/true #' \
            "$unit_dir/$unit" >"$tmp/$unit"
        if [[ $unit == *.service ]] && ! grep -q '^ExecStart=/bin/true ' "$tmp/$unit"; then
            problem+="$unit: no ExecStart=/usr/local/bin/tidemark-agent line to rewrite"$'\n'
        fi
        copies+=("$tmp/$unit")
    done
    status=0
    out=$(cd "$tmp" && analyze "${copies[@]}") || status=$?
    if [[ $status -ne 0 || -n "$problem" ]] || grep -q 'tidemark-' <<<"$out"; then
        fail "$name" "${problem}exit status $status"$'\n'"$out"
    else
        pass "$name"
    fi
fi

# 4. The units as shipped: the only complaint allowed is that the agent's
# binary is not installed on this machine.
name="systemd-analyze verify ${units[*]} (as shipped)"
if need systemd-analyze "$name"; then
    originals=()
    for unit in "${units[@]}"; do originals+=("$unit_dir/$unit"); done
    status=0
    out=$(cd "$tmp" && analyze "${originals[@]}") || status=$?
    missing_binary='^tidemark-(agent|drill)\.service: Command /usr/local/bin/tidemark-agent is not executable: No such file or directory$'
    other=$(grep 'tidemark-' <<<"$out" | grep -Ev "$missing_binary" || true)
    if [[ -n "$other" ]] || { [[ $status -ne 0 ]] && ! grep -Eq "$missing_binary" <<<"$out"; }; then
        fail "$name" "exit status $status"$'\n'"$out"
    else
        pass "$name"
    fi
fi

exit "$failed"
