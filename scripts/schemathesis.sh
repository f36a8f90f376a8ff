#!/usr/bin/env bash
# schemathesis (PyPI) against the server's own OpenAPI document: every documented
# operation is called with generated input, and the run fails on any 5xx answer or any
# answer that does not match the document (its status, schema and problem bodies).
#
# Starts `airlock serve` (the debug build) on a temporary home on an ephemeral loopback
# port, runs schemathesis with the admin token the server made, stops the server with
# SIGTERM and removes the home. Nothing leaves loopback: sandboxes schemathesis makes are
# containers with no network, and isolates with none.
# schemathesis lives in a virtualenv of its own under target/, pinned; installed once.
# Bounded: at most SCHEMATHESIS_EXAMPLES examples per operation and SCHEMATHESIS_MAX_TIME
# seconds in all (about 3 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
# Loopback only, whatever proxy the environment names.
export NO_PROXY="127.0.0.1,localhost${NO_PROXY:+,$NO_PROXY}" no_proxy="127.0.0.1,localhost${no_proxy:+,$no_proxy}"

SCHEMATHESIS_VERSION=4.32.5
EXAMPLES=${SCHEMATHESIS_EXAMPLES:-15}
MAX_TIME=${SCHEMATHESIS_MAX_TIME:-110}
VENV=target/schemathesis-venv
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
if [ "$("$VENV/bin/python" -m pip show schemathesis 2>/dev/null | sed -n 's/^Version: //p')" != "$SCHEMATHESIS_VERSION" ]; then
    "$VENV/bin/python" -m pip install --quiet "schemathesis==$SCHEMATHESIS_VERSION"
fi

cargo build --locked --quiet --bin airlock
HOME_DIR=$(mktemp -d -t airlock-schemathesis-XXXXXX)
OUT="$HOME_DIR.out"
SERVER=
ADDRESS=
TOKEN=
cleanup() {
    if [ -n "$SERVER" ] && kill -0 "$SERVER" 2>/dev/null; then
        # The sandboxes schemathesis made are destroyed through the API first, so no
        # container outlives the home that is removed below.
        if [ -n "$ADDRESS" ] && [ -n "$TOKEN" ]; then
            "$VENV/bin/python" - "http://$ADDRESS/v1/sandboxes" "$TOKEN" <<'PY' || true
import json, sys, urllib.parse, urllib.request as u
base, token = sys.argv[1], sys.argv[2]
opener = u.build_opener(u.ProxyHandler({}))
headers = {"Authorization": "Bearer " + token}
with opener.open(u.Request(base, headers=headers), timeout=30) as answer:
    sandboxes = json.load(answer)
for sandbox in sandboxes:
    name = urllib.parse.quote(sandbox["name"], safe="")
    opener.open(u.Request(base + "/" + name, method="DELETE", headers=headers), timeout=60).close()
print(f"scripts/schemathesis.sh: destroyed the {len(sandboxes)} sandboxes schemathesis made", file=sys.stderr)
PY
        fi
        kill -TERM "$SERVER"
        wait "$SERVER" || true
    fi
    rm -rf "$HOME_DIR" "$OUT"
}
trap cleanup EXIT
# A signal to this script (a timeout, ctrl-c) still stops the server and removes the home.
trap 'exit 143' TERM INT

target/debug/airlock serve --listen 127.0.0.1:0 --home "$HOME_DIR" >"$OUT" 2>&1 &
SERVER=$!
for _ in $(seq 1 600); do
    ADDRESS=$(sed -n 's|^airlock: listening on http://\([^/]*\)/v1$|\1|p' "$OUT")
    [ -n "$ADDRESS" ] && break
    kill -0 "$SERVER" 2>/dev/null || { cat "$OUT" >&2; echo "scripts/schemathesis.sh: the server did not start" >&2; exit 1; }
    sleep 0.1
done
[ -n "$ADDRESS" ] || { cat "$OUT" >&2; echo "scripts/schemathesis.sh: the server did not say where it listens" >&2; exit 1; }
TOKEN=$(cat "$HOME_DIR/admin.token")
# Ready first: /readyz answers 503 while the interpreters load (as documented), and
# schemathesis counts any 5xx as a failure.
# Bounded in time, not tries: at most READY_WITHIN seconds (a fresh home compiles the
# interpreters once).
READY_WITHIN=${SCHEMATHESIS_READY_WITHIN:-300}
READY=
GIVE_UP=$((SECONDS + READY_WITHIN))
while [ "$SECONDS" -lt "$GIVE_UP" ]; do
    if "$VENV/bin/python" -c 'import sys, urllib.request as u; u.build_opener(u.ProxyHandler({})).open(sys.argv[1], timeout=5)' \
        "http://$ADDRESS/readyz" 2>/dev/null; then
        READY=1
        break
    fi
    kill -0 "$SERVER" 2>/dev/null || { cat "$OUT" >&2; echo "scripts/schemathesis.sh: the server exited" >&2; exit 1; }
    sleep 0.5
done
[ -n "$READY" ] || { cat "$OUT" >&2; echo "scripts/schemathesis.sh: the server was not ready within ${READY_WITHIN}s" >&2; exit 1; }

# Excluded, and why:
# - the pty route is a WebSocket; schemathesis speaks plain HTTP, so all it could
#   check is the refusal of a request that is no upgrade (tests/http_api.rs covers the pty).
# - the preview URLs forward any request to a dev server in a sandbox: their answers are
#   that server's, not the document's (tests/http_preview.rs covers them).
# - the event streams (exec and code with `Accept: text/event-stream`, events, followed
#   logs) are not negotiated by schemathesis, which asks for JSON: their JSON side is
#   tested; GET .../events is nothing but a stream that stays open, so it is excluded.
"$VENV/bin/schemathesis" run "http://$ADDRESS/v1/openapi.json" \
    --url "http://$ADDRESS" \
    -H "Authorization: Bearer $TOKEN" \
    --checks not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance \
    --max-examples "$EXAMPLES" \
    --max-time "$MAX_TIME" \
    --request-timeout 30 \
    --workers 2 \
    --seed 7870 \
    --generation-deterministic \
    --exclude-path-regex '^/v1/sandboxes/\{name\}/(pty|events)$|^/preview/' \
    --no-color
