#!/usr/bin/env bash
# Fuzz every untrusted parser for a short, bounded time (libFuzzer via cargo-fuzz, nightly):
# client_hello, http_head, dns_message, rules_file, config_file, webhook, http_path. Each target starts
# from its checked-in seeds (fuzz/corpus/<target>/, read-only here: new inputs go to a temp
# dir) and runs FUZZ_SECONDS (default 20). Any crash, panic, leak, timeout or OOM fails the
# script and leaves the reproducer in fuzz/artifacts/<target>/.
# Reproduce:  cd fuzz && cargo +nightly fuzz run <target> artifacts/<target>/<file>
# Longer run: FUZZ_SECONDS=300 bash tests/fuzz.sh
#
# Needs the nightly toolchain (libFuzzer's instrumentation is nightly-only). Without it this
# script FAILS: the machine kind CI runs on carries nightly, so its absence is a broken
# machine, not a reason to skip. Installs cargo-fuzz (pinned) when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_FUZZ_VERSION=0.13.2
seconds=${FUZZ_SECONDS:-20}
targets=(client_hello http_head dns_message rules_file config_file webhook http_path)

if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "FAIL: fuzzing needs the nightly toolchain (cargo +nightly), which is missing." >&2
  echo "      install it with: rustup toolchain install nightly --profile minimal" >&2
  exit 1
fi
if [ "$(cargo fuzz --version 2>/dev/null | awk '{print $NF}')" != "$CARGO_FUZZ_VERSION" ]; then
  echo "installing cargo-fuzz $CARGO_FUZZ_VERSION"
  cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION"
fi

# Every target in fuzz/Cargo.toml is run here: a new target cannot be forgotten.
declared=$(sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^portcullis-fuzz$' | sort)
listed=$(printf '%s\n' "${targets[@]}" | sort)
if [ "$declared" != "$listed" ]; then
  echo "FAIL: fuzz/Cargo.toml declares [$(echo $declared)], tests/fuzz.sh runs [$(echo $listed)]" >&2
  exit 1
fi

cd fuzz
# Address Sanitizer off: portcullis forbids unsafe outside src/sys and the fuzzers look for
# panics and broken invariants; without ASan the build is quicker and runs ~2x more inputs.
# 16 codegen units: a faster build for slightly slower execution (CI time is the budget).
build_flags=(--sanitizer none --codegen-units 16)
start=$(date +%s)
cargo +nightly fuzz build "${build_flags[@]}"
echo "fuzz build: $(($(date +%s) - start)) s"

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for t in "${targets[@]}"; do
  [ -n "$(ls -A "corpus/$t" 2>/dev/null)" ] || { echo "FAIL: no seed corpus in fuzz/corpus/$t" >&2; exit 1; }
  mkdir -p "$scratch/$t" "artifacts/$t"
  start=$(date +%s)
  # TMPDIR: dns_message keeps its gateway's state dir there; removed with the scratch dir.
  if ! TMPDIR="$scratch" cargo +nightly fuzz run "${build_flags[@]}" "$t" "$scratch/$t" "corpus/$t" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix="artifacts/$t/" >"$scratch/$t.log" 2>&1; then
    tail -n 60 "$scratch/$t.log" >&2
    echo "FAIL: fuzz target $t crashed; reproducer in fuzz/artifacts/$t/" >&2
    exit 1
  fi
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$scratch/$t.log")
  echo "fuzz $t: ${runs:-?} runs in $(($(date +%s) - start)) s, no crash"
done
echo "fuzz.sh: ok"
