#!/usr/bin/env bash
# Send a signed kill (or revive) request to portcullis, as Standard Webhooks signs it:
#   webhook-signature: v1,base64(HMAC-SHA256(secret, "<id>.<timestamp>.<body>"))
#
#   send.sh kill   [AGENT] [REASON]      # no AGENT: every agent
#   send.sh revive TOTP_CODE [AGENT]     # revive needs the current TOTP code too
#
# Environment:
#   PORTCULLIS_URL     admin base URL            (default http://127.0.0.1:9090)
#   PORTCULLIS_SECRET  whsec_… secret, or PORTCULLIS_SECRET_FILE with it
# Needs: bash, openssl, curl, base64.
set -euo pipefail

url=${PORTCULLIS_URL:-http://127.0.0.1:9090}
secret=${PORTCULLIS_SECRET:-}
if [ -z "$secret" ] && [ -n "${PORTCULLIS_SECRET_FILE:-}" ]; then
  secret=$(tr -d ' \n\r' < "$PORTCULLIS_SECRET_FILE")
fi
[ -n "$secret" ] || { echo "set PORTCULLIS_SECRET or PORTCULLIS_SECRET_FILE" >&2; exit 2; }

action=${1:-}
json_escape() { printf '%s' "$1" | sed 's/\\/\\\\/g; s/"/\\"/g'; }
case "$action" in
  kill)
    agent=${2:-}; reason=$(json_escape "${3:-kill switch webhook}")
    if [ -n "$agent" ]; then
      body="{\"scope\":\"agent\",\"agent\":\"$(json_escape "$agent")\",\"reason\":\"$reason\"}"
    else
      body="{\"scope\":\"all\",\"reason\":\"$reason\"}"
    fi ;;
  revive)
    code=${2:?usage: send.sh revive TOTP_CODE [AGENT]}; agent=${3:-}
    if [ -n "$agent" ]; then
      body="{\"scope\":\"agent\",\"agent\":\"$(json_escape "$agent")\",\"totp\":\"$code\"}"
    else
      body="{\"scope\":\"all\",\"totp\":\"$code\"}"
    fi ;;
  *) echo "usage: send.sh kill [AGENT] [REASON] | send.sh revive TOTP_CODE [AGENT]" >&2; exit 2 ;;
esac

id="msg_$(date +%s%N)_$$"
ts=$(date +%s)
# The key is the base64 part after "whsec_"; HMAC takes it as raw bytes (hex for openssl).
key_hex=$(printf '%s' "${secret#whsec_}" | base64 -d | od -An -tx1 | tr -d ' \n')
sig=$(printf '%s.%s.%s' "$id" "$ts" "$body" \
  | openssl dgst -sha256 -mac HMAC -macopt "hexkey:$key_hex" -binary | base64 | tr -d '\n')

curl -sS --max-time 10 -X POST "$url/v1/$action" \
  -H "content-type: application/json" \
  -H "webhook-id: $id" -H "webhook-timestamp: $ts" -H "webhook-signature: v1,$sig" \
  --data-binary "$body"
echo
