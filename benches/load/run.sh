#!/usr/bin/env bash
# Load benchmark: portcullis against a direct connection and the proxies people would
# otherwise deploy, on this machine, in one run (issue #10 item 3).
#
#   backend   loadgen backend on 127.0.0.2:9443 (fake TLS: reads the ClientHello, answers
#             64 bytes, then sources or echoes bytes on command)       taskset -c 1
#   dnsmasq   127.0.0.1:15353, backend.bench.test → 127.0.0.2 (portcullis resolves with it)
#   proxies   one at a time, fresh process per config and run         taskset -c 0
#     portcullis SNI      transparent listener 127.0.0.1:9443, interception = "tproxy"
#     portcullis CONNECT  explicit listener 127.0.0.1:3128
#     HAProxy             127.0.0.1:15002, mode tcp, req.ssl_sni → backend   (nbthread 1)
#     nginx               127.0.0.1:15003, stream + ssl_preread, map SNI → backend (1 worker)
#     Squid               127.0.0.1:3129, CONNECT to backend.bench.test:9443 (workers 1)
#     relay_splice        127.0.0.1:15004, loadgen relay: the smallest relay there is (a
#     relay_copy          127.0.0.1:15005  blocking thread per direction, splice or copy,
#                         no policy); bulk tests only. What they reach is the ceiling of
#                         any relay on this machine's loopback (gen/src/relay.rs)
#   loadgen client        taskset -c 1, the same core as the backend
#
# Transparent mode on loopback without nftables: with interception = "tproxy" portcullis
# takes the original destination from the socket's local address, so a listener on
# 127.0.0.1:9443 sees "original destination port 9443" exactly as if TPROXY had delivered
# the connection; it then resolves the SNI name itself (→ 127.0.0.2) and dials that. No NAT
# and no conntrack, like HAProxy and nginx, which simply get a listen port. Nothing in
# portcullis' decision path is skipped: identify, ClientHello parse, policy, resolve,
# address check (allow_cidrs covers 127.0.0.2:9443), limits, connection log.
#
# Everything runs in a private network namespace (unshare --net) so that the sysctls it
# sets (port range, TIME_WAIT reuse) and the ports it binds touch nothing else on the host.
# Every figure is the median of $RUNS runs; runs interleave the configs so that noise from
# other work on the machine spreads over all of them. Needs root (namespace, packages,
# IP_TRANSPARENT); on Debian it installs squid, haproxy, nginx + libnginx-mod-stream, dnsmasq.
#
#   bash benches/load/run.sh            # RUNS=3 SECS=3 IDLE=5000 CONCURRENCY=64 by default
#   CONFIGS="direct pc_sni haproxy" TESTS=bulk1,newconn RUNS=1 OUT=/tmp/t.md SKIP_BUILD=1 \
#     bash benches/load/run.sh          # a quick look at a few figures
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$(pwd)

RUNS=${RUNS:-3}
SECS=${SECS:-3}
IDLE=${IDLE:-5000}
CONCURRENCY=${CONCURRENCY:-64}
TESTS=${TESTS:-idlecpu,rss,bulk1,bulk8,conns,ping,newconn}   # a subset for quick looks
OUT=${OUT:-$repo/benches/load/results.md}
GEN=$repo/benches/load/gen/target/release/portcullis-loadgen
PC=$repo/target/release/portcullis
# PC_B: a second portcullis binary for A/B runs (config pc_sni_b, the SNI setup with it)
PC_B=${PC_B:-$PC}

if [ -z "${PCB_INNER:-}" ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "run as root: network namespace, IP_TRANSPARENT, package installs" >&2
    exit 1
  fi
  need=()
  for pair in squid:squid haproxy:haproxy nginx:nginx dnsmasq:dnsmasq unshare:util-linux \
    taskset:util-linux ip:iproute2; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
  done
  [ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || need+=(libnginx-mod-stream)
  if [ "${#need[@]}" -gt 0 ]; then
    command -v apt-get >/dev/null 2>&1 || { echo "missing: ${need[*]}" >&2; exit 1; }
    apt-get update -qq
    # policy-rc.d on build machines keeps the packaged services from starting; stop them
    # anyway if they did, so they do not share the cores with the benchmark.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "${need[@]}" >/dev/null
    for s in squid haproxy nginx dnsmasq; do
      systemctl stop "$s" >/dev/null 2>&1 || true
    done
  fi
  if [ -z "${SKIP_BUILD:-}" ]; then   # SKIP_BUILD=1: use the binaries already built
    # What ships (the Debian package) allocates with jemalloc: measure that build.
    cargo build --release --locked --quiet --features jemalloc
    (cd benches/load/gen && cargo build --release --quiet)
  fi
  exec unshare --net -- env PCB_INNER=1 bash "$0" "$@"
fi

# ---------------------------------------------------------------- inside the namespace

ip link set lo up
# Ephemeral ports above every fixed listen port (an outgoing socket on 3128 would make the
# explicit listener fail with EADDRINUSE); ~45k tunnels per 3 s test.
sysctl -qw net.ipv4.ip_local_port_range="20000 65000"
sysctl -qw net.ipv4.tcp_tw_reuse=1
# 5,000 idle tunnels = 10,000 fds in the proxy. Raising the hard limit needs
# CAP_SYS_RESOURCE, which containers often drop: use the hard limit as it is.
ulimit -n "$(ulimit -Hn)"
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt $((2 * IDLE + 1000)) ]; then
  echo "open-files limit $(ulimit -n) is too low for IDLE=$IDLE (need $((2 * IDLE + 1000)))" >&2
  exit 1
fi

work=$(mktemp -d /tmp/pcbench.XXXXXX)
chmod 755 "$work"
pids=()
cleanup() {
  local p
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for _ in $(seq 1 30); do
    local alive=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ -n "${KEEP_WORK:-}" ]; then echo "kept $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_port() {   # host port
  local _
  for _ in $(seq 1 300); do
    (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listening on $1:$2; the proxies' logs end with:" >&2
  tail -n 5 "$work"/pc-*/out.log "$work"/haproxy.log "$work"/nginx/out.log \
    "$work"/nginx/error.log "$work"/squid/out.log "$work"/squid/cache.log >&2 2>/dev/null || true
  return 1
}

stop() {   # pid: TERM, up to 5 s, then KILL; forgotten afterwards (pids get reused)
  local _ p rest=()
  kill -TERM "$1" 2>/dev/null || true
  for _ in $(seq 1 50); do
    kill -0 "$1" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
  for p in "${pids[@]}"; do [ "$p" = "$1" ] || rest+=("$p"); done
  pids=("${rest[@]}")
}

# ---------------------------------------------------------------- fixed infrastructure

taskset -c 1 "$GEN" backend --listen 127.0.0.2:9443 &
pids+=($!)
taskset -c 1 dnsmasq --keep-in-foreground --no-resolv --no-hosts --bind-interfaces \
  --listen-address=127.0.0.1 --port=15353 --user=root --log-facility=/dev/null \
  --local-ttl=300 --address=/bench.test/127.0.0.2 &
pids+=($!)
wait_port 127.0.0.2 9443

# ---------------------------------------------------------------- configs

for mode in sni connect; do
  d=$work/pc-$mode
  mkdir -p "$d/rules/agents" "$d/rules/lists" "$d/state"
  cat >"$d/rules/agents/bench.toml" <<EOF
name = "bench"
sources = ["127.0.0.0/8"]
allow = ["backend.bench.test:9443"]
allow_cidrs = ["127.0.0.2/32:9443"]   # the backend name resolves to loopback
EOF
  if [ "$mode" = sni ]; then
    listen='explicit = "127.0.0.1:0"
transparent = ["127.0.0.1:9443"]'
  else
    listen='explicit = "127.0.0.1:3128"'
  fi
  cat >"$d/portcullis.toml" <<EOF
rules_dir = "rules"
state_dir = "state"
[listen]
$listen
admin = "127.0.0.1:0"
[transparent]
interception = "tproxy"   # original destination = local address (see the header)
tls_ports = [9443]
http_ports = []
[resolver]
upstreams = ["127.0.0.1:15353"]
[log]
destination = "connections.log"
[timeouts]
drain_secs = 1
[caps]
max_connections_per_source = 16384   # default 1024; the idle test opens 5,000 from one address
max_connections_per_agent = 16384    # default 4096; the same 5,000 are one agent's
EOF
done

cat >"$work/haproxy.cfg" <<EOF
global
  nbthread 1
  # no maxconn: HAProxy derives it from the open-files limit (about 10,000 here)
defaults
  mode tcp
  timeout connect 5s
  timeout client 300s
  timeout server 300s
frontend sni
  bind 127.0.0.1:15002
  tcp-request inspect-delay 5s
  tcp-request content accept if { req.ssl_hello_type 1 }
  use_backend bench if { req.ssl_sni -i backend.bench.test }
backend bench
  server b1 127.0.0.2:9443
EOF

mkdir -p "$work/nginx/logs"
cat >"$work/nginx/nginx.conf" <<EOF
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes 1;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log;
events { worker_connections 16384; }
stream {
  map \$ssl_preread_server_name \$upstream {
    backend.bench.test 127.0.0.2:9443;
    default            127.0.0.1:1;   # any other name: refused
  }
  server {
    listen 127.0.0.1:15003;
    ssl_preread on;
    proxy_pass \$upstream;
  }
}
EOF

mkdir -p "$work/squid"
echo "127.0.0.2 backend.bench.test" >"$work/squid/hosts"
cat >"$work/squid/squid.conf" <<EOF
http_port 127.0.0.1:3129
workers 1
acl CONNECT method CONNECT
acl bench_dst dstdomain backend.bench.test
acl bench_port port 9443
http_access allow CONNECT bench_dst bench_port
http_access deny all
hosts_file $work/squid/hosts
pid_filename $work/squid/squid.pid
cache_log $work/squid/cache.log
access_log stdio:$work/squid/access.log
coredump_dir $work/squid
cache_effective_user proxy
pinger_enable off
shutdown_lifetime 1 seconds
max_filedescriptors $(ulimit -n)
EOF
chown -R proxy:proxy "$work/squid" 2>/dev/null || true

# name | loadgen path | address the client dials | how to start (pinned to core 0)
start_proxy() {   # config → sets $proxy_pid (0 for direct)
  case "$1" in
    direct) proxy_pid=0; return 0 ;;
    pc_sni)
      (cd "$work/pc-sni" && exec taskset -c 0 "$PC" --config portcullis.toml run \
        >>"$work/pc-sni/out.log" 2>&1) &
      proxy_pid=$!; pids+=("$proxy_pid"); wait_port 127.0.0.1 9443 ;;
    pc_sni_b)
      (cd "$work/pc-sni" && exec taskset -c 0 "$PC_B" --config portcullis.toml run \
        >>"$work/pc-sni/out-b.log" 2>&1) &
      proxy_pid=$!; pids+=("$proxy_pid"); wait_port 127.0.0.1 9443 ;;
    pc_connect)
      (cd "$work/pc-connect" && exec taskset -c 0 "$PC" --config portcullis.toml run \
        >>"$work/pc-connect/out.log" 2>&1) &
      proxy_pid=$!; pids+=("$proxy_pid"); wait_port 127.0.0.1 3128 ;;
    haproxy)
      taskset -c 0 haproxy -f "$work/haproxy.cfg" -db >>"$work/haproxy.log" 2>&1 &
      proxy_pid=$!; pids+=("$proxy_pid"); wait_port 127.0.0.1 15002 ;;
    nginx)
      taskset -c 0 nginx -p "$work/nginx/" -c "$work/nginx/nginx.conf" -g 'daemon off;' \
        >>"$work/nginx/out.log" 2>&1 &
      proxy_pid=$!; pids+=("$proxy_pid"); wait_port 127.0.0.1 15003 ;;
    squid)
      taskset -c 0 squid -N -f "$work/squid/squid.conf" >>"$work/squid/out.log" 2>&1 &
      proxy_pid=$!; pids+=("$proxy_pid"); wait_port 127.0.0.1 3129 ;;
    relay_splice)
      taskset -c 0 "$GEN" relay --listen 127.0.0.1:15004 --to 127.0.0.2:9443 &
      proxy_pid=$!; pids+=("$proxy_pid"); wait_port 127.0.0.1 15004 ;;
    relay_copy)
      taskset -c 0 "$GEN" relay --listen 127.0.0.1:15005 --to 127.0.0.2:9443 --copy &
      proxy_pid=$!; pids+=("$proxy_pid"); wait_port 127.0.0.1 15005 ;;
  esac
  sleep 0.3   # let it finish starting (nginx forks its worker after binding)
}
client_args() {
  case "$1" in
    direct) echo "--path direct --addr 127.0.0.2:9443" ;;
    pc_sni | pc_sni_b) echo "--path sni --addr 127.0.0.1:9443" ;;
    pc_connect) echo "--path connect --addr 127.0.0.1:3128" ;;
    haproxy) echo "--path sni --addr 127.0.0.1:15002" ;;
    nginx) echo "--path sni --addr 127.0.0.1:15003" ;;
    squid) echo "--path connect --addr 127.0.0.1:3129" ;;
    relay_splice) echo "--path sni --addr 127.0.0.1:15004" ;;
    relay_copy) echo "--path sni --addr 127.0.0.1:15005" ;;
  esac
}
tests_for() {   # config → the tests it runs: the reference relays only the bulk ones
  case "$1" in
    relay_*) tr ',' '\n' <<<"$TESTS" | { grep -E '^bulk' || true; } | paste -sd, - ;;
    *) echo "$TESTS" ;;
  esac
}

read -r -a configs <<<"${CONFIGS:-direct pc_sni pc_connect haproxy nginx squid relay_splice relay_copy}"
mkdir -p "$work/res"
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
t_start=$(date +%s)
for run in $(seq 1 "$RUNS"); do
  for c in "${configs[@]}"; do
    tests=$(tests_for "$c")
    [ -n "$tests" ] || continue
    start_proxy "$c"
    nstat -n >/dev/null 2>&1 || true   # this namespace's TCP counters, from here
    # shellcheck disable=SC2046 # word splitting of the client arguments is intended
    taskset -c 1 "$GEN" client $(client_args "$c") --pid "$proxy_pid" \
      --clk-tck "$(getconf CLK_TCK)" --secs "$SECS" --idle "$IDLE" \
      --concurrency "$CONCURRENCY" --tests "$tests" \
      >"$work/res/$c.$run" 2>"$work/res/$c.$run.err" || true
    # Retransmitted segments over the whole client run (nearly all in the bulk tests): on
    # loopback they are reorderings, not losses (benches/load/results.md, "What the profiles show").
    nstat -z TcpRetransSegs 2>/dev/null |
      awk '$1 == "TcpRetransSegs" {print "tcp_retrans_segs", $2}' >>"$work/res/$c.$run" || true
    [ "$proxy_pid" = 0 ] || stop "$proxy_pid"
    echo "run $run $c: $(tr '\n' ' ' <"$work/res/$c.$run")" >&2
  done
done
load_end=$(cut -d' ' -f1-3 /proc/loadavg)
elapsed=$(( $(date +%s) - t_start ))

# ---------------------------------------------------------------- the table

med() {   # config key → median over the runs, or empty (also for a config not run)
  { cat "$work"/res/"$1".[0-9]* 2>/dev/null || true; } | awk -v k="$2" '$1 == k && $2 != "nan" {print $2}' |
    sort -g | awk '{a[NR] = $1} END {if (NR) print a[int((NR + 1) / 2)]}'
}
runs_of() {   # config key → the values of every run
  for r in $(seq 1 "$RUNS"); do
    awk -v k="$2" '$1 == k {print $2}' "$work/res/$1.$r" 2>/dev/null | head -1
  done | paste -sd' ' -
}
fmt() { [ -n "$1" ] && printf '%.*f' "$2" "$1" || printf '—'; }
ratio() { { [ -n "$1" ] && [ -n "$2" ]; } && awk -v a="$1" -v b="$2" 'BEGIN {if (b != 0) printf "%.2f", a / b; else printf "—"}' || printf '—'; }
sub_() { { [ -n "$1" ] && [ -n "$2" ]; } && awk -v a="$1" -v b="$2" 'BEGIN {printf "%.4f", a - b}' || true; }

declare -A label=(
  [sni]="SNI" [connect]="CONNECT"
  [haproxy]="HAProxy" [nginx]="nginx" [squid]="Squid"
)
row() {   # key title better(hi|lo) kind(plain|added|proxyonly) decimals
  local key=$1 title=$2 better=$3 kind=$4 dec=$5 path
  local d; d=$(med direct "$key")
  for path in sni connect; do
    local pc peers=() cells=() best="" bestname="" p v
    if [ "$path" = sni ]; then pc=$(med pc_sni "$key"); peers=(haproxy nginx)
    else pc=$(med pc_connect "$key"); peers=(squid); fi
    if [ "$kind" = added ]; then pc=$(sub_ "$pc" "$d"); fi
    declare -A val=()
    for p in haproxy nginx squid; do
      v=""
      if [[ " ${peers[*]} " == *" $p "* ]]; then
        v=$(med "$p" "$key")
        [ "$kind" = added ] && v=$(sub_ "$v" "$d")
        if [ -n "$v" ]; then
          if [ -z "$best" ] || awk -v a="$v" -v b="$best" -v hi="$better" \
            'BEGIN {exit !((hi == "hi") ? a > b : a < b)}'; then
            best=$v; bestname=${label[$p]}
          fi
        fi
      fi
      val[$p]=$v
    done
    local dcell vs_direct
    case "$kind" in
      plain) dcell=$(fmt "$d" "$dec"); vs_direct=$(ratio "$pc" "$d") ;;
      added) dcell="$(fmt "$d" "$dec") (base)"; vs_direct="—" ;;
      proxyonly) dcell="—"; vs_direct="—" ;;
    esac
    local vs_best="—"
    [ -n "$best" ] && vs_best="$(ratio "$pc" "$best") ($bestname)"
    printf '| %s, %s path %s | %s | %s | %s | %s | %s | %s | %s |\n' "$title" "${label[$path]}" \
      "$([ "$better" = hi ] && echo '↑' || echo '↓')" "$dcell" "$(fmt "$pc" "$dec")" \
      "$(fmt "${val[haproxy]}" "$dec")" "$(fmt "${val[nginx]}" "$dec")" \
      "$(fmt "${val[squid]}" "$dec")" "$vs_direct" "$vs_best"
    unset val
  done
}

cpu=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)
{
  echo "# portcullis load benchmark"
  echo
  echo "$(date -u '+%Y-%m-%d %H:%M UTC'), kernel $(uname -r), $(nproc) × $cpu;"
  echo "portcullis $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo '?'),"
  echo "$(haproxy -v 2>/dev/null | awk 'NR==1 {print "HAProxy " $3}'),"
  echo "$(nginx -v 2>&1 | sed 's|nginx version: nginx/|nginx |'),"
  echo "$(squid -v 2>/dev/null | awk 'NR==1 {print "Squid " $4}')."
  echo "Proxy on core 0 (taskset -c 0), load generator and backend on core 1. Median of $RUNS runs;"
  echo "${SECS} s per throughput/rate test; $IDLE idle tunnels; $CONCURRENCY concurrent for new tunnels/s."
  echo "Load average (1/5/15 min) at start: $load_start, at end: $load_end; run took ${elapsed} s."
  echo
  echo "| figure (↑ higher is better, ↓ lower) | direct | portcullis | HAProxy | nginx | Squid | portcullis ÷ direct | portcullis ÷ best peer |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|"
  row bulk1_gbit_per_s "bulk throughput, 1 stream, Gbit/s" hi plain 2
  row bulk8_gbit_per_s "bulk throughput, 8 streams, Gbit/s" hi plain 2
  row conns_per_s "new tunnels/s, 64 concurrent" hi plain 0
  row cpu_us_per_conn "proxy CPU per new tunnel, µs" lo proxyonly 1
  row ping_p50_us "added latency p50, 64 B round trip in an open tunnel, µs" lo added 1
  row ping_p99_us "added latency p99, 64 B round trip in an open tunnel, µs" lo added 1
  row newconn_p50_us "added latency p50, new tunnel (connect → hello → answer), µs" lo added 1
  row newconn_p99_us "added latency p99, new tunnel (connect → hello → answer), µs" lo added 1
  row rss_kib_per_tunnel "RSS per idle tunnel, KiB" lo proxyonly 2
  row idle_cpu_ms_per_s "proxy CPU with no traffic, ms/s" lo proxyonly 1
  echo
  echo "portcullis: the SNI rows are its transparent listener, the CONNECT rows its explicit"
  echo "proxy; HAProxy and nginx only have an SNI path, Squid only a CONNECT path; \"direct\" is"
  echo "the same client talking to the backend itself (its latency cells are the base the other"
  echo "columns add to). Best peer: the best of HAProxy and nginx (SNI) or Squid (CONNECT)."
  echo
  if [ -n "$(med relay_splice bulk1_gbit_per_s)$(med relay_copy bulk1_gbit_per_s)" ]; then
    echo "The ceiling: the smallest relay there is (\`loadgen relay\`, a blocking thread per"
    echo "direction, no policy), by splice through a 256 KiB pipe and by copy through a 256 KiB"
    echo "buffer, on the same core, in the same run."
    echo
    echo "| figure (↑) | direct | minimal relay, splice | minimal relay, copy | portcullis SNI ÷ splice relay | portcullis CONNECT ÷ splice relay | splice relay ÷ direct |"
    echo "|---|---:|---:|---:|---:|---:|---:|"
    for n in 1 8; do
      k=bulk${n}_gbit_per_s
      printf '| bulk throughput, %s, Gbit/s | %s | %s | %s | %s | %s | %s |\n' \
        "$([ "$n" = 1 ] && echo '1 stream' || echo "$n streams")" \
        "$(fmt "$(med direct "$k")" 2)" "$(fmt "$(med relay_splice "$k")" 2)" \
        "$(fmt "$(med relay_copy "$k")" 2)" \
        "$(ratio "$(med pc_sni "$k")" "$(med relay_splice "$k")")" \
        "$(ratio "$(med pc_connect "$k")" "$(med relay_splice "$k")")" \
        "$(ratio "$(med relay_splice "$k")" "$(med direct "$k")")"
    done
    echo
  fi
  echo "<details><summary>every run</summary>"
  echo
  echo "| config | figure | runs |"
  echo "|---|---|---|"
  for c in "${configs[@]}"; do
    for key in idle_cpu_ms_per_s bulk1_gbit_per_s bulk8_gbit_per_s conns_per_s cpu_us_per_conn ping_p50_us \
      ping_p99_us newconn_p50_us newconn_p99_us rss_kib_per_tunnel idle_tunnels idle_errors \
      bulk1_errors bulk8_errors conns_errors newconn_errors ping_samples newconn_samples \
      tcp_retrans_segs; do
      v=$(runs_of "$c" "$key")
      [ -n "$v" ] && echo "| $c | $key | $v |"
    done
  done
  echo
  echo "</details>"
} >"$work/table.md"

errs=$(cat "$work"/res/*.err 2>/dev/null | head -20)
if [ -n "$errs" ]; then
  { echo; echo "load generator stderr:"; echo '```'; echo "$errs"; echo '```'; } >>"$work/table.md"
fi
cp "$work/table.md" "$OUT"
cat "$work/table.md"
