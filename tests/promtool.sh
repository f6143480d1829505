#!/usr/bin/env bash
# Checks the Prometheus files in deploy/prometheus with promtool:
#   promtool check rules  deploy/prometheus/alerts.yml
#   promtool test rules   deploy/prometheus/alerts_test.yml   (alert unit tests)
#   promtool check config deploy/prometheus/prometheus.yml    (also loads alerts.yml)
# As root on Debian it installs the `prometheus` package (which ships promtool) if needed.
# Every command is bounded by `timeout 120`. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v promtool >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing: prometheus (for promtool)"
    timeout 120 apt-get update -qq
    DEBIAN_FRONTEND=noninteractive timeout 120 apt-get install -y -qq prometheus >/dev/null
  else
    echo "missing tool: promtool (install the prometheus package, or run as root on Debian)" >&2
    exit 1
  fi
fi

echo "== $(promtool --version 2>&1 | head -n 1)"
status=0
run() {
  echo "== $*"
  if ! timeout 120 "$@"; then
    echo "FAILED: $*" >&2
    status=1
  fi
}

run promtool check rules deploy/prometheus/alerts.yml
# The test file names its rule files relative to itself, so this works from any directory.
run promtool test rules deploy/prometheus/alerts_test.yml
# rule_files in prometheus.yml are relative to the config file; promtool resolves them so.
run promtool check config deploy/prometheus/prometheus.yml

if [ "$status" -ne 0 ]; then
  echo "promtool checks FAILED" >&2
else
  echo "promtool checks passed"
fi
exit "$status"
