#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls exactly this).
# As root on Debian it installs what the tests need (curl, nftables, iproute2, openssl,
# iputils-ping, python3, prometheus, make for the jemalloc build, and the clients
# tests/denials_e2e.rs and tests/clients_e2e.rs run: wget, git, node, npm, dig, pip, requests;
# clients_e2e.rs installs undici from the npm registry; keepalived for tests/ha_pair_e2e.rs).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for pair in curl:curl nft:nftables ip:iproute2 openssl:openssl ping:iputils-ping python3:python3 prometheus:prometheus \
  make:make wget:wget git:git node:nodejs npm:npm dig:bind9-dnsutils keepalived:keepalived; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
done
python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
# tests/clients_e2e.rs: Python's requests (apt and git http-backend come with apt and git).
python3 -c 'import requests' >/dev/null 2>&1 || need+=(python3-requests)
if [ "${#need[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing: ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "missing tools: ${need[*]} (run as root on Debian to install them)" >&2
    exit 1
  fi
fi

cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
# The shipped build's feature (jemalloc as the allocator) must pass the same lints. It only
# touches the binary's entry point (src/main.rs), so the binary is the target to check.
cargo clippy --bin portcullis --locked --features jemalloc -- -D warnings
cargo test --all-targets --locked
bash tests/promtool.sh
bash tests/systemd.sh
bash tests/package.sh
bash tests/fuzz.sh
