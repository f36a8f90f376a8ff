"""Airlock's Python interpreter guest.

Built into a WebAssembly component by componentize-py (see
scripts/build-guests.sh), which also pre-initialises CPython and this module at
build time, so a new context starts with the interpreter ready.

One component instance is one context: `_namespace` persists across `eval`
calls. The host captures stdout/stderr and enforces every limit; this module
turns what the code did into the `airlock:sandbox/evaluator` result, including
the cases where the code needs a real Linux (escalation).
"""

import ast
import builtins
import json
import os
import sys
import traceback
import types

# The standard library users expect, imported at build time: componentize-py
# bundles the modules the app imports, and pre-initialisation makes their
# import free in every new context.
import base64  # noqa: F401
import bisect  # noqa: F401
import collections  # noqa: F401
import copy  # noqa: F401
import csv  # noqa: F401
import dataclasses  # noqa: F401
import datetime  # noqa: F401
import decimal  # noqa: F401
import enum  # noqa: F401
import fractions  # noqa: F401
import functools  # noqa: F401
import hashlib  # noqa: F401
import heapq  # noqa: F401
import io  # noqa: F401
import itertools  # noqa: F401
import math  # noqa: F401
import operator  # noqa: F401
import pathlib  # noqa: F401
import random  # noqa: F401
import re
import statistics  # noqa: F401
import string  # noqa: F401
import textwrap  # noqa: F401
import time  # noqa: F401
import typing  # noqa: F401
import uuid  # noqa: F401

from componentize_py_types import Err
from wit_world import exports
from wit_world.exports import evaluator as ev

CODE_FILENAME = "<code>"
WORKSPACE = "/workspace"


class _Escalate(BaseException):
    """Raised where the code needs what an isolate cannot give. A BaseException so
    that the code's own `except Exception:` cannot swallow it."""

    def __init__(self, escalation):
        super().__init__(type(escalation).__name__)
        self.escalation = escalation


def _needs_subprocess(*_args, **_kwargs):
    raise _Escalate(ev.Escalation_Subprocess())


def _needs_network(*_args, **_kwargs):
    raise _Escalate(ev.Escalation_Network())


def _install_escalation_points():
    """Replaces every way to start a process or open a socket with an escalation."""
    # fork is replaced only where it exists: the standard library takes its
    # presence to mean os.register_at_fork exists too.
    for name in ("fork", "forkpty"):
        if hasattr(os, name):
            setattr(os, name, _needs_subprocess)
    for name in (
        "system", "popen", "posix_spawn", "posix_spawnp",
        "execv", "execve", "execvp", "execvpe", "execl", "execle", "execlp", "execlpe",
        "spawnv", "spawnve", "spawnvp", "spawnvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe",
    ):
        setattr(os, name, _needs_subprocess)
    subprocess = _module_or_stand_in("subprocess")
    for name in ("Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"):
        setattr(subprocess, name, _needs_subprocess)
    socket = _module_or_stand_in("socket")
    for name in ("socket", "create_connection", "create_server", "getaddrinfo", "gethostbyname", "socketpair", "fromfd"):
        setattr(socket, name, _needs_network)


def _module_or_stand_in(name):
    """The standard module `name`, or an empty stand-in registered under its name
    when this CPython build cannot import it, so its entry points can still be replaced."""
    try:
        return __import__(name)
    except ImportError:
        module = types.ModuleType(name)
        sys.modules[name] = module
        return module


_install_escalation_points()
# Outbound HTTP goes through the host's wasi:http hook under the sandbox's
# network policy: `airlock.fetch`, `urllib.request.urlopen` and `http.client`.
import airlock  # noqa: E402

airlock.install()
_namespace = {"__name__": "__main__", "__builtins__": builtins}
_in_workspace = False


def _code_error(error, line=None):
    """Formats an exception with only the frames of the evaluated code."""
    tb = error.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != CODE_FILENAME:
        tb = tb.tb_next
    text = "".join(traceback.format_exception(type(error), error, tb))
    if line is None:
        frame = tb
        while frame is not None:
            if frame.tb_frame.f_code.co_filename == CODE_FILENAME:
                line = frame.tb_lineno
            frame = frame.tb_next
    return ev.CodeError(kind=type(error).__name__, message=str(error), traceback=text, line=line)


def _escalation_for_import(error):
    """An import that fails because the module is not in this interpreter."""
    name = getattr(error, "name", None) or ""
    root = name.split(".")[0]
    if root in ("_posixsubprocess",):
        return ev.Escalation_Subprocess()
    if root in ("_socket", "_ssl", "ssl", "select", "selectors"):
        return ev.Escalation_Network()
    if isinstance(error, ModuleNotFoundError):
        return ev.Escalation_MissingModule(root or str(error))
    # ImportError that is not "not found": a module that exists but cannot load here.
    return ev.Escalation_NativeExtension(root or str(error))


# One encoder for every value: json.dumps with a non-default option builds a
# new encoder on each call, which costs more than encoding a small value.
_JSON = json.JSONEncoder(allow_nan=False)


def _value(result):
    if result is None:
        return None
    text = repr(result)
    if type(result) is int:
        return ev.Value(text=text, json=text)
    try:
        as_json = _JSON.encode(result)
    except (TypeError, ValueError, RecursionError):
        as_json = None
    return ev.Value(text=text, json=as_json)


def _enter_workspace():
    # The workspace is preopened at run time, not when the module was pre-initialised.
    global _in_workspace
    if not _in_workspace:
        try:
            os.chdir(WORKSPACE)
            _in_workspace = True
        except OSError:
            pass


# The start of a line that is a statement and never an expression: a keyword
# that only statements begin with, or a plain assignment (`x = ...`,
# `a.b, c = ...`, `x += ...`).
_STATEMENT_START = re.compile(
    r"(?:assert|async|break|class|continue|def|del|for|from|global|if|import|nonlocal|pass|raise|return|try|while|with)\b"
    r"|[A-Za-z_][\w.]*(?:\s*,\s*[A-Za-z_][\w.]*)*\s*(?:[-+*/%&|^@]|//|\*\*|>>|<<)?=(?!=)"
)
# Lines at column 0 that continue the statement above them.
_CONTINUATION = re.compile(r"[)\]}#]|(?:else|elif|except|finally|case)\b")


def _split_last_statement(code):
    """Splits `code` where its last top-level statement starts: the last line
    at column 0 that is not blank, a comment, a closing bracket or a clause of
    a compound statement (decorators go with what they decorate). Returns
    (head, tail, tail's first line), the tail padded with newlines so its
    line numbers stay those of `code`; or None when there is no such line,
    or when a split could be wrong in a way compiling would not catch: a `;`
    may put an expression after a statement on one line, and a `__future__`
    import in the head changes how the tail compiles."""
    if ";" in code or "__future__" in code:
        return None
    if "\n" not in code:
        return "", code, code
    lines = code.split("\n")
    at = len(lines) - 1
    while at >= 0:
        line = lines[at]
        if line[:1] and not line[:1].isspace() and not _CONTINUATION.match(line):
            break
        at -= 1
    if at < 0:
        return None
    while at > 0 and lines[at - 1][:1] == "@":
        at -= 1
    return "\n".join(lines[:at]), "\n" * at + "\n".join(lines[at:]), lines[at]


def _compiled(code):
    """Compiles `code` into (head, statements, last_expression): code objects
    to run in turn, any of them None; the value of the last expression is the
    evaluation's value.

    The fast path compiles the source directly, split before its last
    statement, and lets CPython's compiler confirm the split: the head and the
    tail must each compile on their own, the tail as one expression or (when
    its first line is a statement) as statements. Otherwise the exact path
    goes through the syntax tree: ast.parse, then compile twice, which costs
    about half as much again for a small snippet."""
    split = _split_last_statement(code)
    if split is not None:
        head, tail, tail_line = split
        try:
            head_code = compile(head, CODE_FILENAME, "exec") if head and not head.isspace() else None
            if _STATEMENT_START.match(tail_line):
                return head_code, compile(tail, CODE_FILENAME, "exec"), None
            return head_code, None, compile(tail, CODE_FILENAME, "eval")
        except SyntaxError:
            pass
    tree = ast.parse(code, CODE_FILENAME, "exec")
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = compile(ast.Expression(tree.body.pop().value), CODE_FILENAME, "eval")
    return None, compile(tree, CODE_FILENAME, "exec"), last


def _evaluate_in_scratch(code):
    """Evaluates `code` as `eval` does, in a namespace of its own: for warming up."""
    scratch = {"__name__": "__main__", "__builtins__": builtins}
    for part in _compiled(code):
        if part is not None:
            _value(eval(part, scratch))


_warmed_at_run_time = False


class Evaluator(exports.Evaluator):
    def eval(self, code: str):
        if not code:
            # The host warms contexts it makes ahead with an empty snippet,
            # before it gives them a workspace: so this touches neither the
            # workspace nor real output, and runs the evaluation path once to
            # pay this instance's first-use costs (its first writes to the
            # pre-initialised heap) before a caller waits on them.
            global _warmed_at_run_time
            if not _warmed_at_run_time:
                _warmed_at_run_time = True
                _evaluate_in_scratch("_ = [1]\n_")
            return None
        _enter_workspace()
        try:
            head, statements, last = _compiled(code)
        except SyntaxError as error:
            raise Err(ev.EvalError_Syntax(_code_error(error, error.lineno)))
        except ValueError as error:
            # Source the compiler refuses before parsing it.
            raise Err(ev.EvalError_Syntax(_code_error(error, None)))
        try:
            if head is not None:
                exec(head, _namespace)
            if statements is not None:
                exec(statements, _namespace)
            return _value(eval(last, _namespace)) if last is not None else None
        except _Escalate as escalate:
            raise Err(ev.EvalError_NeedsEscalation(escalate.escalation))
        except ImportError as error:
            raise Err(ev.EvalError_NeedsEscalation(_escalation_for_import(error)))
        except Exception as error:
            raise Err(ev.EvalError_Runtime(_code_error(error)))
        except KeyboardInterrupt as error:
            raise Err(ev.EvalError_Runtime(_code_error(error)))
        except SystemExit as error:
            # exit() in a context ends the snippet, not the interpreter.
            raise Err(ev.EvalError_Runtime(_code_error(error)))
        finally:
            sys.stdout.flush()
            sys.stderr.flush()


def _warm_up():
    """Runs the evaluation path once at build time (both ways of compiling,
    and a syntax error), so the pre-initialised snapshot already holds what
    the first evaluation would otherwise build (parser and compiler state,
    caches) and a new context does not pay for it."""
    import io as _io
    import contextlib as _contextlib

    with _contextlib.redirect_stdout(_io.StringIO()):
        for code in ("x = [1, 2]\nprint(len(x))\nx", "y = 1; y"):
            _evaluate_in_scratch(code)
    try:
        _compiled("def broken(:")
    except SyntaxError as error:
        _code_error(error, error.lineno)


_warm_up()
