#!/usr/bin/env bash
# Builds every guest in guests/ into guests/out/: Rust guests for wasm32-wasip2
# (components; js is the JavaScript interpreter), hello and handle-hog also for
# wasm32-wasip1 (core modules), the Python interpreter with componentize-py, and the .wat
# sources copied as they are (Airlock loads wasm text directly).
set -euo pipefail
cd "$(dirname "$0")/../guests"
rustup target add wasm32-wasip2 wasm32-wasip1 >/dev/null
cargo build --release --target wasm32-wasip2 --quiet
cargo build --release --target wasm32-wasip1 --quiet -p hello -p handle-hog
mkdir -p out
for wasm in target/wasm32-wasip2/release/*.wasm; do
    cp "$wasm" "out/$(basename "$wasm")"
done
cp target/wasm32-wasip1/release/hello.wasm out/hello-p1.wasm
cp target/wasm32-wasip1/release/handle-hog.wasm out/handle-hog-p1.wasm
cp wat/*.wat out/

# The Python interpreter: CPython and guests/python/app.py, pre-initialised at build time.
# componentize-py lives in a virtualenv of its own under guests/target, pinned.
COMPONENTIZE_PY_VERSION=0.25.1
TOOLS=target/tools-venv
if [ ! -x "$TOOLS/bin/python" ]; then
    python3 -m venv "$TOOLS"
fi
if [ "$("$TOOLS/bin/python" -m pip show componentize-py 2>/dev/null | sed -n 's/^Version: //p')" != "$COMPONENTIZE_PY_VERSION" ]; then
    "$TOOLS/bin/python" -m pip install --quiet "componentize-py==$COMPONENTIZE_PY_VERSION"
fi
# The IANA time-zone data for zoneinfo (the pure-Python tzdata package, pinned), which
# guests/python/stdlib_bundle.py bundles with the standard library at build time.
TZDATA_VERSION=2026.6
PY_DEPS=target/python-deps
if [ "$(sed -n 's/^Version: //p' "$PY_DEPS"/tzdata-*.dist-info/METADATA 2>/dev/null)" != "$TZDATA_VERSION" ]; then
    rm -rf "$PY_DEPS"
    "$TOOLS/bin/python" -m pip install --quiet --no-deps --target "$PY_DEPS" "tzdata==$TZDATA_VERSION"
fi
# Its world is the interpreter world plus wasi:http/outgoing-handler (guests/python/airlock.py).
# The wasi:http WIT comes from where cargo already has it: the wasmtime-wasi-http crate the host
# links (its wit/ directory, found through cargo metadata); nothing of it is kept in this repository.
HTTP_CRATE=$(cargo metadata --format-version 1 --manifest-path ../Cargo.toml 2>/dev/null \
    | python3 -c 'import json, sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"] == "wasmtime-wasi-http"))')
HTTP_WIT="$(dirname "$HTTP_CRATE")/wit"
HTTP_VERSION=$(sed -n 's/^package wasi:http@\(.*\);$/\1/p' "$HTTP_WIT/deps/http.wit")
PY_WIT=target/python-wit
rm -rf "$PY_WIT"
mkdir -p "$PY_WIT/deps/airlock-sandbox"
cp ../wit/interpreter.wit "$PY_WIT/deps/airlock-sandbox/"
cp "$HTTP_WIT"/deps/*.wit "$PY_WIT/deps/"
cat > "$PY_WIT/world.wit" <<WIT
package airlock:python-build;

world python-interpreter {
    include airlock:sandbox/interpreter@0.1.0;
    import wasi:http/outgoing-handler@$HTTP_VERSION;
}
WIT
"$TOOLS/bin/python" -c 'import sys, componentize_py; sys.argv[0] = "componentize-py"; sys.exit(componentize_py.script())' \
    -d "$PY_WIT" -w python-interpreter componentize app -p python -p "$PY_DEPS" -o out/python.wasm >/dev/null
echo "guests built into guests/out: $(ls out | tr '\n' ' ')"
