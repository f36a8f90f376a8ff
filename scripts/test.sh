#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine with Rust (rustup) on it, as root:
# installs what the tests need (the wasm targets, componentize-py; docker.io, runsc and
# debootstrap through `airlock setup`, which also starts dockerd and builds the base image),
# builds the guests, checks lints, then runs every test, including one pass of each
# benchmark in test mode.
# Idempotent: everything already present is left as it is.
set -euo pipefail
cd "$(dirname "$0")/.."

need() {
    command -v "$1" >/dev/null 2>&1 || { echo "scripts/test.sh: $1 is missing: $2" >&2; exit 1; }
}
need cargo "install Rust with rustup (https://rustup.rs) first"
need rustup "the wasm targets are installed with rustup; install Rust with rustup"
need python3 "the Python interpreter guest is built with componentize-py: apt-get install python3 python3-venv"
python3 -c "import venv, ensurepip" 2>/dev/null || { echo "scripts/test.sh: Python venv support is missing: apt-get install python3-venv" >&2; exit 1; }

echo "==> wasm targets"
rustup target add wasm32-wasip2 wasm32-wasip1

echo "==> guests"
scripts/build-guests.sh

echo "==> container engine and base image (airlock setup)"
# Starts dockerd with no bridge and no iptables if it is not running, registers runsc,
# and builds airlock/base:<recipe-hash> from Debian packages when it is missing.
cargo run --locked --quiet -- setup

echo "==> lints"
rustup component add clippy >/dev/null 2>&1 || true
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "==> tests"
cargo test --workspace --all-targets --locked --no-fail-fast
cargo test --workspace --doc --locked

echo "==> schemathesis against /v1/openapi.json"
scripts/schemathesis.sh
