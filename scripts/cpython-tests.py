#!/usr/bin/env python3
"""Runs CPython's own test files in a Python isolate and prints a Markdown
table of the pass rate per test module (and, on stderr, the first problems of
each). Each module runs in a fresh context through `airlock run --lang python`.

    scripts/cpython-tests.py [test module ...]

A test that kills its context (a limit of the isolate: the 512 KiB wasm stack,
the deadline) is counted as an error named after the limit, and the module is
run again from a fresh context without it, until every test has an outcome.

CPYTHON_TESTS   CPython's Lib/test directory. Default /usr/lib/python3.11/test
                (Debian's libpython3.11-testsuite, installed when missing and
                apt-get can). The isolate runs CPython 3.14: the tests of
                another version also count what changed between the versions.
AIRLOCK         the airlock binary (default target/release/airlock, else target/debug/airlock).
AIRLOCK_INTERPRETERS  the interpreter directory (airlock's own variable; default guests/out).
TEST_TIMEOUT    deadline of one run (default 600s); TEST_MEMORY its memory cap (default 1GiB).

docs/API.md, "Python standard library in isolates", has the table it printed.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile

DEFAULT_MODULES = [
    "test_json", "test_re", "test_datetime", "test_collections", "test_itertools", "test_math",
    "test_statistics", "test_sqlite3",
    "test_asyncio.test_futures", "test_asyncio.test_tasks", "test_asyncio.test_locks",
    "test_asyncio.test_queues", "test_asyncio.test_pep492", "test_asyncio.test_runners",
    "test_asyncio.test_taskgroups", "test_asyncio.test_timeouts", "test_asyncio.test_waitfor",
    "test_asyncio.test_context",
]
# Most fresh runs of one module (each after a test that killed its context).
MAX_RUNS = 40

# Runs in the isolate: the module's tests minus those in /workspace/.skip, one
# line per test start and outcome, flushed, so a run cut short by a limit still
# tells how far it got.
RUNNER = r'''
import io, sys, time, unittest, warnings
sys.path.insert(0, "/workspace")
sys.argv = ["cpython-tests"]
warnings.simplefilter("ignore")
skip = set(open("/workspace/.skip").read().split())
out = sys.__stdout__

def emit(*parts):
    out.write("@@ " + " ".join(str(p).replace("\n", " ")[:200] for p in parts) + "\n")
    out.flush()

def prune(suite):
    kept = unittest.TestSuite()
    for test in suite:
        if isinstance(test, unittest.TestSuite):
            kept.addTest(prune(test))
        elif test.id() not in skip:
            kept.addTest(test)
    return kept

def last_line(error):
    import traceback
    return "".join(traceback.format_exception_only(error[0], error[1])).strip().splitlines()[-1]

class Result(unittest.TextTestResult):
    def startTest(self, test):
        emit("start", test.id())
        super().startTest(test)
    def addSuccess(self, test):
        emit("pass", test.id()); super().addSuccess(test)
    def addFailure(self, test, err):
        emit("fail", test.id(), last_line(err)); super().addFailure(test, err)
    def addError(self, test, err):
        emit("error", test.id(), last_line(err)); super().addError(test, err)
    def addSkip(self, test, reason):
        emit("skip", test.id()); super().addSkip(test, reason)
    def addExpectedFailure(self, test, err):
        emit("pass", test.id()); super().addExpectedFailure(test, err)
    def addUnexpectedSuccess(self, test):
        emit("fail", test.id(), "unexpected success"); super().addUnexpectedSuccess(test)
    def addSubTest(self, test, subtest, err):
        if err is not None:
            kind = "fail" if issubclass(err[0], test.failureException) else "error"
            emit(kind, subtest.id(), last_line(err))
        super().addSubTest(test, subtest, err)

name = "test.%s"
if name.startswith("test.test_asyncio."):
    # CPython skips the whole test_asyncio package where sockets do not work
    # (its __init__ requires them); its modules are loaded here without it.
    import types
    package = types.ModuleType("test.test_asyncio")
    package.__path__ = ["/workspace/test/test_asyncio"]
    sys.modules["test.test_asyncio"] = package
    import test
    test.test_asyncio = package
    # Their helper (3.11) asks the policy for a child watcher, which 3.14
    # removed: answer as a policy without one does.
    import asyncio.events
    def get_child_watcher(self):
        raise NotImplementedError
    asyncio.events._BaseDefaultEventLoopPolicy.get_child_watcher = get_child_watcher
if name.startswith("test.test_sqlite3"):
    # 3.11's tests read sqlite3.version, the module's own version string,
    # which 3.14 removed (deprecated since 3.12): set it to what 3.11 had.
    import sqlite3
    if not hasattr(sqlite3, "version"):
        sqlite3.version = "2.6.0"
        sqlite3.version_info = (2, 6, 0)
suite = prune(unittest.defaultTestLoader.loadTestsFromName(name))
unittest.TextTestRunner(stream=io.StringIO(), verbosity=0, resultclass=Result).run(suite)
emit("done")
'''


def airlock_binary():
    if os.environ.get("AIRLOCK"):
        return os.environ["AIRLOCK"]
    for build in ("release", "debug"):
        if os.access(f"target/{build}/airlock", os.X_OK):
            return f"target/{build}/airlock"
    sys.exit("no airlock binary: cargo build --release first, or set AIRLOCK")


def run_module(airlock, workspace, module):
    """Outcomes by test id ('pass', 'fail', 'error', 'skip') and the first problems."""
    outcomes, problems, skip = {}, [], []
    runner = os.path.join(os.path.dirname(workspace), "runner.py")
    with open(runner, "w") as file:
        file.write(RUNNER % module)
    for _ in range(MAX_RUNS):
        with open(os.path.join(workspace, ".skip"), "w") as file:
            file.write("\n".join(skip))
        command = [
            airlock, "run", "--lang", "python", "--workspace", workspace,
            "--timeout", os.environ.get("TEST_TIMEOUT", "600s"), "--memory", os.environ.get("TEST_MEMORY", "1GiB"),
            "--output-limit", "16MiB", "--file", runner,
        ]
        done, running = subprocess.run(command, capture_output=True, text=True), None
        finished = False
        for line in done.stdout.splitlines():
            if not line.startswith("@@ "):
                continue
            kind, _, rest = line[3:].partition(" ")
            test, _, message = rest.partition(" ")
            if kind == "start":
                running = test
            elif kind == "done":
                finished = True
            else:
                # A test with failing subtests counts once, as failed.
                if outcomes.get(test) not in ("fail", "error") or kind in ("fail", "error"):
                    outcomes[test.split(" ")[0]] = kind
                if kind in ("fail", "error") and len(problems) < 40 and test not in (p[0] for p in problems):
                    problems.append([test, message])
                running = None if test == running else running
        if finished:
            break
        reason = (done.stderr.strip().splitlines() or ["ended without a result"])[-1]
        if running is None or running in skip:
            problems.append(["(the run)", reason])
            break
        # The test that was running when the context died.
        outcomes[running] = "error"
        problems.append([running, "killed its context: " + reason])
        skip.append(running)
    return outcomes, problems


def main():
    os.chdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    modules = sys.argv[1:] or DEFAULT_MODULES
    tests = os.environ.get("CPYTHON_TESTS", "/usr/lib/python3.11/test")
    if not os.path.isfile(os.path.join(tests, "support", "__init__.py")) and "CPYTHON_TESTS" not in os.environ:
        subprocess.run(["apt-get", "install", "-y", "-qq", "libpython3.11-testsuite"], check=False,
                       stdout=subprocess.DEVNULL)
    if not os.path.isfile(os.path.join(tests, "support", "__init__.py")):
        sys.exit(f"no CPython test directory at {tests} (set CPYTHON_TESTS)")
    airlock = airlock_binary()
    print("| module | tests | passed | failed | errors | skipped | pass rate (of tests − skipped) |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as work:
        workspace = os.path.join(work, "workspace")
        os.mkdir(workspace)
        shutil.copytree(tests, os.path.join(workspace, "test"), ignore=shutil.ignore_patterns("__pycache__"))
        for module in modules:
            top = module.split(".")[0]
            if not os.path.exists(os.path.join(tests, top + ".py")) and not os.path.isdir(os.path.join(tests, top)):
                print(f"| {module} | — | — | — | — | — | not in {tests} |", flush=True)
                continue
            outcomes, problems = run_module(airlock, workspace, module)
            counts = {kind: sum(1 for o in outcomes.values() if o == kind) for kind in ("pass", "fail", "error", "skip")}
            counted = len(outcomes) - counts["skip"]
            rate = f"{100 * counts['pass'] / counted:.1f} %" if counted else "—"
            print(f"| {module} | {len(outcomes)} | {counts['pass']} | {counts['fail']} | {counts['error']} "
                  f"| {counts['skip']} | {rate} |", flush=True)
            print(json.dumps({"module": module, "counts": counts, "first_problems": problems}), file=sys.stderr)


if __name__ == "__main__":
    main()
