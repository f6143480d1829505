#!/usr/bin/env bash
# DNS forwarder benchmark: cached queries/s of portcullis vs dnsmasq, same upstream, same
# load generator (dnsperf), same run.
#
#   dnsmasq #1 (authoritative stand-in): allowed.test → 93.184.216.34, TTL 300
#   portcullis   127.0.0.1:$PC_PORT  → dnsmasq #1   (filtering forwarder, cache)
#   dnsmasq #2   127.0.0.1:$DM_PORT  → dnsmasq #1   (plain caching forwarder)
#
# Both caches are warmed, then dnsperf asks the same cached names for $SECS s, $RUNS times
# each (alternating), and the median is printed as a markdown table.
# The answer address is public on purpose: a 203.0.113.x (TEST-NET) answer would be removed
# by the rebinding filter and every query would be an empty, logged NOERROR.
# As root on Debian it installs dnsmasq and dnsperf.
set -euo pipefail
cd "$(dirname "$0")/../.."

SECS=${SECS:-10}
RUNS=${RUNS:-3}
UP_PORT=${UP_PORT:-15353}
PC_PORT=${PC_PORT:-15354}
DM_PORT=${DM_PORT:-15355}

need=()
for pair in dnsmasq:dnsmasq dnsperf:dnsperf; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
done
if [ "${#need[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "missing: ${need[*]} (run as root on Debian to install them)" >&2
    exit 1
  fi
fi

[ -n "${SKIP_BUILD:-}" ] || cargo build --release --quiet   # SKIP_BUILD=1: use the existing binary
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

dnsmasq_common=(--keep-in-foreground --no-resolv --no-hosts --bind-interfaces
  --listen-address=127.0.0.1 --user=root --log-facility=/dev/null)
dnsmasq "${dnsmasq_common[@]}" --port="$UP_PORT" --local-ttl=300 \
  --address=/allowed.test/93.184.216.34 --cache-size=0 &
pids+=($!)
dnsmasq "${dnsmasq_common[@]}" --port="$DM_PORT" --server="127.0.0.1#$UP_PORT" \
  --cache-size=10000 &
pids+=($!)

mkdir -p "$work/rules/agents" "$work/rules/lists"
cat >"$work/rules/agents/bench.toml" <<EOF
name = "bench"
sources = ["127.0.0.0/8"]
allow = [".allowed.test"]
EOF
cat >"$work/portcullis.toml" <<EOF
rules_dir = "rules"
state_dir = "state"
[listen]
explicit = "127.0.0.1:0"
admin = "127.0.0.1:0"
dns = ["127.0.0.1:$PC_PORT"]
[resolver]
upstreams = ["127.0.0.1:$UP_PORT"]
[log]
destination = "connections.log"
[dns]
queries_per_second = 100000000   # the benchmark measures the forwarder, not the limit
EOF
target/release/portcullis --config "$work/portcullis.toml" run >"$work/portcullis.out" 2>&1 &
pids+=($!)

# The names asked: cached after the warm-up.
: >"$work/queries"
for i in $(seq 1 50); do echo "host$i.allowed.test A" >>"$work/queries"; done

wait_up() {
  for _ in $(seq 1 100); do
    dnsperf -s 127.0.0.1 -p "$1" -d "$work/queries" -n 1 >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "server on port $1 did not come up" >&2
  exit 1
}
wait_up "$PC_PORT"
wait_up "$DM_PORT"

qps() {
  dnsperf -s 127.0.0.1 -p "$1" -d "$work/queries" -l "$SECS" -q 200 2>&1 |
    awk '/Queries per second/ {printf "%.0f\n", $4}'
}
lost() {
  awk '/Queries lost/ {print $3}' <<<"$1"
}

pc=()
dm=()
for run in $(seq 1 "$RUNS"); do
  pc+=("$(qps "$PC_PORT")")
  dm+=("$(qps "$DM_PORT")")
  echo "run $run: portcullis ${pc[-1]} q/s, dnsmasq ${dm[-1]} q/s" >&2
done
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

cat <<EOF

| forwarder (cached A queries, 127.0.0.1, dnsperf -q 200, ${SECS} s × ${RUNS}) | median q/s | runs |
|---|---:|---|
| portcullis (filtering: identify, rate limit, policy, cache, rebinding filter) | $(median "${pc[@]}") | ${pc[*]} |
| dnsmasq $(dnsmasq --version | awk 'NR==1 {print $3}') (caching forwarder) | $(median "${dm[@]}") | ${dm[*]} |

$(nproc) cores shared by the servers and dnsperf; log lines written: $(wc -l <"$work/connections.log").
EOF
