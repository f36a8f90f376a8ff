#!/usr/bin/env bash
# Runs every benchmark in docs/BENCHMARKS.md in one sequence, so all numbers
# share one machine state: whole-process timings (hyperfine) against the
# Wasmtime CLI, the criterion benches, memory per context, and the PyPI peer.
#
# Needs: hyperfine (apt-get install hyperfine); the wasmtime CLI 48
# (cargo install wasmtime-cli --version 48.0.8 --locked), set WASMTIME if it is
# not on PATH; a virtualenv with llm-wasm-sandbox, set PEER_PYTHON to its python;
# root, for the Docker engine and base image (`airlock setup`).
set -euo pipefail
cd "$(dirname "$0")/.."
WASMTIME=${WASMTIME:-wasmtime}
PEER_PYTHON=${PEER_PYTHON:-python3}
export AIRLOCK_HOME=${AIRLOCK_HOME:-$(mktemp -d)}
work=$(mktemp -d)
mkdir -p "$work/ws"

scripts/build-guests.sh
cargo build --release
cargo bench --no-run
for guest in python js hello; do
    "$WASMTIME" compile "guests/out/$guest.wasm" -o "$work/$guest.cwasm"
done
# Warm Airlock's cache, as the CLI's precompiled files are warm.
./target/release/airlock run --workspace "$work/ws" --lang python -c 'print(1+1)' >/dev/null
./target/release/airlock run --workspace "$work/ws" --lang js -c 'console.log(1+1)' >/dev/null
./target/release/airlock run --workspace "$work/ws" guests/out/hello.wasm -- x >/dev/null 2>&1

wt="$WASMTIME run --allow-precompiled --dir $work/ws::/workspace"
hyperfine -N --warmup 5 --runs 40 --export-json "$work/process.json" \
  -n "wasmtime CLI, python" "$wt --invoke 'eval(\"print(1+1)\")' $work/python.cwasm" \
  -n "airlock run --lang python" "./target/release/airlock run --workspace $work/ws --lang python -c 'print(1+1)'" \
  -n "wasmtime CLI, js" "$wt --invoke 'eval(\"console.log(1+1)\")' $work/js.cwasm" \
  -n "airlock run --lang js" "./target/release/airlock run --workspace $work/ws --lang js -c 'console.log(1+1)'" \
  -n "wasmtime CLI, hello" "$WASMTIME run --allow-precompiled $work/hello.cwasm x" \
  -n "airlock run hello.wasm" "./target/release/airlock run --workspace $work/ws guests/out/hello.wasm -- x"
python3 benches/summarize.py hyperfine "$work/process.json"

cargo bench --bench isolate_startup
cargo bench --bench interpreters
python3 benches/summarize.py criterion us \
  target/criterion/hello-instantiate-and-run/{airlock,wasmtime-pooling,wasmtime-default} \
  target/criterion/{one-shot,one-shot-warm,one-shot-warm-back-to-back}/{python,javascript} \
  target/criterion/eval-in-context/{python,python-value,python-exact-path,js,js-value}
cargo bench --bench context_memory

# The container tier, and the Docker peer of the interpreters: a fresh container per snippet.
image=$(./target/release/airlock setup 2>/dev/null)
hyperfine -N --warmup 3 --runs 20 --export-json "$work/docker.json" \
  -n "airlock run --lang python" "./target/release/airlock run --workspace $work/ws --lang python -c 'print(1+1)'" \
  -n "docker run --rm (runc) python3 -c" "docker run --rm --network none $image python3 -c 'print(1+1)'" \
  -n "docker run --rm (runsc) python3 -c" "docker run --rm --network none --runtime runsc $image python3 -c 'print(1+1)'"
python3 benches/summarize.py hyperfine "$work/docker.json"
cargo bench --bench container_startup
python3 benches/summarize.py criterion ms $(ls -d target/criterion/container_*/*/new | xargs -n1 dirname)
"$PEER_PYTHON" benches/peers/llm_wasm_sandbox.py 10 2>/dev/null
