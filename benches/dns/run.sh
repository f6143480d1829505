#!/usr/bin/env bash
# DNS forwarder benchmark: cached queries/s of portcullis vs dnsmasq, same upstream, same
# load generator (dnsperf), same run.
#
#   dnsmasq #1 (authoritative stand-in): allowed.test → 93.184.216.34, TTL 300
#   portcullis   127.0.0.1:$PC_PORT  → dnsmasq #1   (filtering forwarder, cache)
#   dnsmasq #2   127.0.0.1:$DM_PORT  → dnsmasq #1   (plain caching forwarder)
#
# Both caches are warmed, then dnsperf asks the same cached names for $SECS s, $RUNS times
# each (alternating), with the same concurrency (one socket, $OUTSTANDING queries in
# flight), and the median is printed as a markdown table with the ratio.
# With 2+ CPUs the servers are pinned to CPU 0 and dnsperf to CPU 1 (taskset), so both
# forwarders get exactly one core (portcullis then runs one UDP receive thread, like
# dnsmasq's single loop) and the load generator never competes with them.
# The answer address is public on purpose: a 203.0.113.x (TEST-NET) answer would be removed
# by the rebinding filter and every query would be an empty, logged NOERROR.
# As root on Debian it installs dnsmasq and dnsperf.
set -euo pipefail
cd "$(dirname "$0")/../.."

SECS=${SECS:-10}
RUNS=${RUNS:-3}
UP_PORT=${UP_PORT:-25353}
PC_PORT=${PC_PORT:-25354}
DM_PORT=${DM_PORT:-25355}
OUTSTANDING=${OUTSTANDING:-200}

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

if command -v taskset >/dev/null 2>&1 && [ "$(nproc)" -ge 2 ]; then
  server=(taskset -c 0)
  load=(taskset -c 1)
  pinning="servers pinned to CPU 0, dnsperf to CPU 1"
else
  server=()
  load=()
  pinning="not pinned (needs taskset and 2 CPUs)"
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
"${server[@]}" dnsmasq "${dnsmasq_common[@]}" --port="$UP_PORT" --local-ttl=300 \
  --address=/allowed.test/93.184.216.34 --cache-size=0 &
up_pid=$!
pids+=("$up_pid")
"${server[@]}" dnsmasq "${dnsmasq_common[@]}" --port="$DM_PORT" --server="127.0.0.1#$UP_PORT" \
  --cache-size=10000 &
dm_pid=$!
pids+=("$dm_pid")

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
"${server[@]}" target/release/portcullis --config "$work/portcullis.toml" run >"$work/portcullis.out" 2>&1 &
pc_pid=$!
pids+=("$pc_pid")

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
wait_up "$UP_PORT"
wait_up "$PC_PORT"
wait_up "$DM_PORT"
# Each server must be ours and answer with the upstream's record: a port already taken by
# someone else's server would otherwise be measured silently.
for pid in "$up_pid" "$dm_pid" "$pc_pid"; do
  kill -0 "$pid" 2>/dev/null || { echo "a server exited (port in use?)" >&2; exit 1; }
done
for port in "$UP_PORT" "$PC_PORT" "$DM_PORT"; do
  got=$(python3 tests/e2e/client.py dns 127.0.0.1 "$port" udp host1.allowed.test)
  [ "$got" = "NOERROR 93.184.216.34" ] || { echo "port $port answered: $got" >&2; exit 1; }
done
load_before=$(cut -d' ' -f1-3 /proc/loadavg)

# CPU time (user + system, all threads) a server has used, in clock ticks.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)

# One dnsperf run against port $1 (server pid $2): "queries/s queries-per-CPU-second".
# The second figure is the server's efficiency whatever else the machine is running (the
# other CPU's share of a shared box does not count against it); the first is the rate.
qps() {
  local before after out
  before=$(cpu_ticks "$2")
  out=$("${load[@]}" dnsperf -s 127.0.0.1 -p "$1" -d "$work/queries" -l "$SECS" -q "$OUTSTANDING" 2>&1)
  after=$(cpu_ticks "$2")
  awk -v t=$((after - before)) -v hz="$hz" '
    /Queries completed/ {done = $3}
    /Queries per second/ {rate = $4}
    END {printf "%.0f %.0f\n", rate, (t > 0 ? done * hz / t : 0)}' <<<"$out"
  # Every answer must be the cached NOERROR, or the run measured something else.
  grep -q 'Response codes: *NOERROR [0-9]* (100.00%)' <<<"$out" ||
    { echo "not all answers NOERROR on port $1: $(grep 'Response codes' <<<"$out")" >&2; return 1; }
}

pc=() pc_cpu=() dm=() dm_cpu=()
for run in $(seq 1 "$RUNS"); do
  got=$(qps "$PC_PORT" "$pc_pid")
  read -r rate per_cpu <<<"$got"
  pc+=("$rate") pc_cpu+=("$per_cpu")
  got=$(qps "$DM_PORT" "$dm_pid")
  read -r rate per_cpu <<<"$got"
  dm+=("$rate") dm_cpu+=("$per_cpu")
  echo "run $run: portcullis ${pc[-1]} q/s (${pc_cpu[-1]} per CPU-s), dnsmasq ${dm[-1]} q/s (${dm_cpu[-1]} per CPU-s)" >&2
done
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", (b > 0 ? a / b : 0)}'; }

pcm=$(median "${pc[@]}")
dmm=$(median "${dm[@]}")
pcc=$(median "${pc_cpu[@]}")
dmc=$(median "${dm_cpu[@]}")
cpu=$(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)

cat <<EOF

$(date -u +%Y-%m-%d), $(uname -m) ${cpu:-unknown CPU}, $(nproc) CPUs; $pinning.

| forwarder (cached A queries, 127.0.0.1, dnsperf -q $OUTSTANDING, ${SECS} s × ${RUNS}) | median q/s | runs | median queries per CPU-second | runs |
|---|---:|---|---:|---|
| portcullis (filtering: identify, rate limit, policy, cache, rebinding filter) | $pcm | ${pc[*]} | $pcc | ${pc_cpu[*]} |
| dnsmasq $(dnsmasq --version | awk 'NR==1 {print $3}') (caching forwarder) | $dmm | ${dm[*]} | $dmc | ${dm_cpu[*]} |

portcullis / dnsmasq: $(ratio "$pcm" "$dmm") in q/s, $(ratio "$pcc" "$dmc") in queries per CPU-second; load average before: $load_before; log lines written by portcullis: $(wc -l <"$work/connections.log").
EOF
