#!/bin/sh
# keepalived notify script for portcullis (install as /etc/keepalived/portcullis-notify.sh,
# root-owned, mode 0755). keepalived calls it as: <script> GROUP|INSTANCE <name> <state> <prio>
# On every transition it re-applies the nftables ruleset, atomically and idempotently, with
# this node's kill state (killed sources are re-added in the same batch), so a node that
# becomes MASTER never serves the agents with a stale or missing ruleset.
set -u
state=${3:-UNKNOWN}
logger -t portcullis-keepalived "VRRP ${2:-?} -> $state: re-applying the ruleset"
if ! /usr/bin/portcullis --config /etc/portcullis/portcullis.toml apply-ruleset; then
    logger -p daemon.err -t portcullis-keepalived "apply-ruleset failed on transition to $state"
    # Failing MASTER without a ruleset is worse than failing over: stop answering VRRP by
    # stopping portcullis (the health check then puts this node in FAULT).
    [ "$state" = MASTER ] && systemctl stop portcullis
fi
exit 0
