#!/usr/bin/env bash
# Builds every guest in guests/ into guests/out/: Rust guests for wasm32-wasip2
# (components), hello also for wasm32-wasip1 (a core module), and the .wat
# sources copied as they are (Airlock loads wasm text directly).
set -euo pipefail
cd "$(dirname "$0")/../guests"
rustup target add wasm32-wasip2 wasm32-wasip1 >/dev/null
cargo build --release --target wasm32-wasip2 --quiet
cargo build --release --target wasm32-wasip1 --quiet -p hello
mkdir -p out
for wasm in target/wasm32-wasip2/release/*.wasm; do
    cp "$wasm" "out/$(basename "$wasm")"
done
cp target/wasm32-wasip1/release/hello.wasm out/hello-p1.wasm
cp wat/*.wat out/
echo "guests built into guests/out: $(ls out | tr '\n' ' ')"
