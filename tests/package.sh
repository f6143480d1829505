#!/usr/bin/env bash
# The Debian package: build it with cargo-deb ([profile.deb]: release minus debuginfo),
# then install it into a scratch root WITHOUT touching the host and check it:
# - the files it must ship exist (binary, unit, config and rules as conffiles, dashboards,
#   alerts, nftables example, keepalived, kill-switch sender, docs) with the right modes;
# - control: name, architecture, dependencies; every /etc file is a conffile;
# - postinst, run against stub commands: a fresh install creates the `portcullis` system
#   user and neither enables nor starts the service; an upgrade creates nobody;
# - the installed binary validates the installed config, run inside the scratch root
#   (chroot, with the glibc libraries it links and nft for the `nft -c` ruleset check),
#   and rejects a broken rules file there (proof that it read the root's files).
# Needs: dpkg-deb, ldd, nft; root for the chroot (otherwise an unprivileged user+net
# namespace via unshare). Installs cargo-deb (pinned) when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_DEB_VERSION=3.8.0

if [ "$(cargo deb --version 2>/dev/null | awk '{print $NF}' | tr -d v)" != "$CARGO_DEB_VERSION" ]; then
  echo "installing cargo-deb $CARGO_DEB_VERSION"
  cargo install cargo-deb --locked --version "$CARGO_DEB_VERSION"
fi
for tool in dpkg-deb ldd nft; do
  command -v "$tool" >/dev/null || { echo "FAIL: $tool is missing" >&2; exit 1; }
done

fail() {
  echo "FAIL: $*" >&2
  exit 1
}

# 1. build ([profile.deb], what ships; deploy/README.md section 13 says what it costs).
start=$(date +%s)
# The build's output goes on to stderr through the inherited descriptor: `tee /dev/stderr`
# would reopen it, and when stderr is a file (a saved test log) truncate that file.
deb=$(cargo deb --locked 2>&1 | tee >(cat >&2) | tail -n 1)
echo "package: $deb ($(($(date +%s) - start)) s to build)"
[ -f "$deb" ] || fail "cargo deb produced no .deb (last line: $deb)"

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
root="$scratch/root"
ctl="$scratch/control"
dpkg-deb -x "$deb" "$root"
dpkg-deb -e "$deb" "$ctl"

# 2. files
files=(
  usr/bin/portcullis
  usr/lib/systemd/system/portcullis.service
  etc/portcullis/portcullis.toml
  usr/share/portcullis/grafana/portcullis.json
  usr/share/portcullis/prometheus/alerts.yml
  usr/share/portcullis/prometheus/alerts_test.yml
  usr/share/portcullis/prometheus/prometheus.yml
  usr/share/portcullis/nftables/portcullis.nft
  usr/share/portcullis/keepalived/keepalived-a.conf
  usr/share/portcullis/keepalived/keepalived-b.conf
  usr/share/portcullis/keepalived/portcullis-notify.sh
  usr/share/portcullis/kill-switch/send.sh
  usr/share/portcullis/logging/vector.toml
  usr/share/doc/portcullis/README.md
  usr/share/doc/portcullis/deploy-guide.md
  usr/share/doc/portcullis/kill-switch.md
  usr/share/doc/portcullis/logging.md
  usr/share/doc/portcullis/docs/kill-switch.md
  usr/share/doc/portcullis/docs/fairness.md
  usr/share/doc/portcullis/docs/memory.md
  usr/share/doc/portcullis/docs/denials.md
  usr/share/doc/portcullis/docs/dns.md
  usr/share/doc/portcullis/docs/proxy-auth.md
  usr/share/doc/portcullis/docs/addresses.md
  usr/share/doc/portcullis/docs/threat-model.md
  usr/share/doc/portcullis/docs/architecture.md
  usr/share/doc/portcullis/docs/configuration.md
  usr/share/doc/portcullis/docs/limits.md
  usr/share/doc/portcullis/docs/observability.md
  usr/share/doc/portcullis/docs/performance.md
  usr/share/doc/portcullis/docs/selftest.md
  usr/share/doc/portcullis/docs/transparent.md
  usr/share/doc/portcullis/docs/inspect.md
  usr/share/doc/portcullis/docs/cluster.md
  usr/share/doc/portcullis/portcullis.toml.reference
  usr/share/doc/portcullis/copyright
)
for f in rules/agents/*.toml rules/lists/*.toml; do
  files+=("etc/portcullis/$f")
done
for f in "${files[@]}"; do
  [ -f "$root/$f" ] || fail "the package lacks /$f"
done
for f in usr/bin/portcullis usr/share/portcullis/keepalived/portcullis-notify.sh usr/share/portcullis/kill-switch/send.sh; do
  [ -x "$root/$f" ] || fail "/$f is not executable"
done
cmp -s deploy/systemd/portcullis.service "$root/usr/lib/systemd/system/portcullis.service" \
  || fail "the packaged unit differs from deploy/systemd/portcullis.service"
cmp -s deploy/debian/portcullis.toml "$root/etc/portcullis/portcullis.toml" \
  || fail "the packaged config differs from deploy/debian/portcullis.toml"
echo "files: ${#files[@]} expected files present"

# 3. control and conffiles
field() { sed -n "s/^$1: //p" "$ctl/control"; }
[ "$(field Package)" = portcullis ] || fail "Package: $(field Package)"
[ "$(field Architecture)" = "$(dpkg --print-architecture)" ] || fail "Architecture: $(field Architecture)"
depends=$(field Depends)
for dep in libc6 passwd nftables; do
  grep -qE "(^|, )$dep( |,|$)" <<<"$depends" || fail "Depends lacks $dep: $depends"
done
# The binary links glibc (and libgcc_s) only: libc6 in Depends covers it.
ldd "$root/usr/bin/portcullis" >"$scratch/ldd.txt" || fail "ldd usr/bin/portcullis"
if grep -vE 'linux-vdso|ld-linux|lib(c|m|gcc_s|pthread|dl|rt)\.so' "$scratch/ldd.txt"; then
  fail "usr/bin/portcullis links more than glibc (see above)"
fi
# Symbol names stay (a panic's backtrace names functions; [profile.deb] drops only DWARF), and
# what ships allocates with jemalloc (the `jemalloc` feature, [package.metadata.deb]), linked
# in statically: its entry point is among those symbols.
nm "$root/usr/bin/portcullis" >"$scratch/symbols.txt" 2>&1 \
  || fail "nm usr/bin/portcullis failed: $(head -c 200 "$scratch/symbols.txt")"
grep -qE ' T main$' "$scratch/symbols.txt" \
  || fail "usr/bin/portcullis has no symbol main (stripped?): $(head -c 200 "$scratch/symbols.txt")"
grep -qE ' T _rjem_malloc$' "$scratch/symbols.txt" \
  || fail "usr/bin/portcullis is not built with jemalloc (feature jemalloc)"
(cd "$root" && find etc -type f | sed 's|^|/|' | sort) >"$scratch/etc-files"
sort "$ctl/conffiles" >"$scratch/conffiles"
diff -u "$scratch/etc-files" "$scratch/conffiles" || fail "conffiles != the files under /etc"
echo "control: Depends: $depends; $(wc -l <"$scratch/conffiles") conffiles"

# 4. maintainer scripts, run against stubs that log their calls (nothing on the host changes)
for s in postinst postrm; do
  [ -x "$ctl/$s" ] || fail "no executable $s"
  sh -n "$ctl/$s" || fail "$s: syntax"
  grep -q '#DEBHELPER#' "$ctl/$s" && fail "$s: #DEBHELPER# was not replaced"
done
# The systemd snippets come once, after our own code (a stray token, e.g. in a comment,
# would run them before `set -e` and the user creation).
[ "$(grep -c 'systemctl --system daemon-reload' "$ctl/postinst")" = 1 ] || fail "postinst: the systemd snippet is not there exactly once"
[ "$(grep -n 'systemctl --system daemon-reload' "$ctl/postinst" | cut -d: -f1)" -gt "$(grep -n '^create_user() {' "$ctl/postinst" | cut -d: -f1)" ] \
  || fail "postinst: the systemd snippet runs before the user is created"
stubs="$scratch/stubs"
mkdir -p "$stubs"
calls="$scratch/calls"
for cmd in useradd deb-systemd-helper deb-systemd-invoke systemctl; do
  printf '#!/bin/sh\necho "%s $*" >>"%s"\nexit 0\n' "$cmd" "$calls" >"$stubs/$cmd"
done
# getent: the user and group exist only when PORTCULLIS_USER_EXISTS=1.
printf '#!/bin/sh\necho "getent $*" >>"%s"\n[ "${PORTCULLIS_USER_EXISTS:-0}" = 1 ]\n' "$calls" >"$stubs/getent"
# debian-installed: the unit is known; was-enabled: no (the operator never enabled it).
printf '#!/bin/sh\necho "deb-systemd-helper $*" >>"%s"\ncase "$1" in was-enabled|--quiet) exit 1;; esac\nexit 0\n' \
  "$calls" >"$stubs/deb-systemd-helper"
chmod 755 "$stubs"/*
# The systemd snippets act only where /run/systemd/system exists. As root, run postinst in
# a private mount namespace with a tmpfs /run that has it (the host's /run is untouched), so
# the booted-with-systemd path is the one tested.
fake_systemd=0
postinst() {
  if [ "$(id -u)" = 0 ]; then
    fake_systemd=1
    PATH="$stubs:$PATH" unshare --mount --propagation private \
      sh -c 'mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/system && exec sh "$@"' \
      postinst "$ctl/postinst" "$@"
  else
    PATH="$stubs:$PATH" sh "$ctl/postinst" "$@"
  fi
}

: >"$calls"
postinst configure "" >"$scratch/postinst.out" || fail "postinst configure (fresh) failed"
grep -q '^useradd --system --user-group --home-dir /var/lib/portcullis --no-create-home --shell /usr/sbin/nologin .* portcullis$' "$calls" \
  || { cat "$calls" >&2; fail "fresh install: the portcullis system user was not created"; }
if grep -E 'deb-systemd-invoke (start|restart|try-restart)|systemctl .*(enable|start)|deb-systemd-helper enable' "$calls"; then
  fail "fresh install: the service was enabled or started"
fi
grep -q 'NOT enabled' "$scratch/postinst.out" || fail "fresh install: no next-steps message"

: >"$calls"
PORTCULLIS_USER_EXISTS=1 postinst configure 0.0.1 >/dev/null || fail "postinst configure (upgrade) failed"
grep -q '^useradd' "$calls" && fail "upgrade: useradd ran although the user exists"
if grep -E 'deb-systemd-invoke (start|restart) |deb-systemd-helper enable' "$calls"; then
  fail "upgrade: a stopped service would be started or enabled"
fi
if [ "$fake_systemd" = 1 ]; then
  grep -q '^systemctl --system daemon-reload$' "$calls" || fail "upgrade: no daemon-reload"
  grep -q '^deb-systemd-invoke try-restart portcullis.service$' "$calls" \
    || { cat "$calls" >&2; fail "upgrade: no try-restart of a running service"; }
fi
echo "maintainer scripts: fresh install creates the user and starts nothing; upgrade try-restarts"

# 5. the installed binary checks the installed config inside the root
copy_libs() {
  ldd "$1" | grep -oE '/[^ ]+' | while read -r lib; do
    mkdir -p "$root$(dirname "$lib")"
    [ -e "$root$lib" ] || cp -L "$lib" "$root$lib"
  done
}
copy_libs "$root/usr/bin/portcullis"
nft=$(command -v nft)
mkdir -p "$root$(dirname "$nft")"
cp -L "$nft" "$root$nft"
copy_libs "$nft"
in_root() {
  if [ "$(id -u)" = 0 ]; then
    env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin chroot "$root" "$@"
  else
    env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin unshare --map-root-user --net --root="$root" "$@"
  fi
}
if ! in_root /usr/bin/portcullis check --config /etc/portcullis/portcullis.toml >"$scratch/check.txt" 2>&1; then
  cat "$scratch/check.txt" >&2
  fail "portcullis check rejects the packaged config"
fi
cat "$scratch/check.txt"
grep -q '^rules:  /etc/portcullis/rules$' "$scratch/check.txt" || fail "check did not read /etc/portcullis/rules"
grep -q '^ruleset: ok (nft -c)$' "$scratch/check.txt" || fail "check did not validate the ruleset with nft -c"
# Negative control: a broken rules file inside the root must make the same check fail.
printf 'name = "broken"\nunknown_key = 1\n' >"$root/etc/portcullis/rules/agents/broken.toml"
if in_root /usr/bin/portcullis check --config /etc/portcullis/portcullis.toml >"$scratch/check-bad.txt" 2>&1; then
  fail "check accepted a broken rules file in the root"
fi
grep -q 'broken.toml' "$scratch/check-bad.txt" || { cat "$scratch/check-bad.txt" >&2; fail "check's error does not name the broken file"; }
echo "package.sh: ok"
