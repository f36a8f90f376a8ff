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
import re  # noqa: F401
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


def _value(result):
    if result is None:
        return None
    try:
        as_json = json.dumps(result, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        as_json = None
    return ev.Value(text=repr(result), json=as_json)


def _enter_workspace():
    # The workspace is preopened at run time, not when the module was pre-initialised.
    global _in_workspace
    if not _in_workspace:
        try:
            os.chdir(WORKSPACE)
            _in_workspace = True
        except OSError:
            pass


class Evaluator(exports.Evaluator):
    def eval(self, code: str):
        _enter_workspace()
        try:
            tree = ast.parse(code, CODE_FILENAME, "exec")
        except SyntaxError as error:
            raise Err(ev.EvalError_Syntax(_code_error(error, error.lineno)))
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = ast.Expression(tree.body.pop().value)
        try:
            exec(compile(tree, CODE_FILENAME, "exec"), _namespace)
            result = eval(compile(last, CODE_FILENAME, "eval"), _namespace) if last is not None else None
            return _value(result)
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
    """Runs the evaluation path once at build time, so the pre-initialised
    snapshot already holds what the first evaluation would otherwise build
    (parser and compiler state, caches) and a new context does not pay for it."""
    import io as _io
    import contextlib as _contextlib

    scratch = {"__name__": "__main__", "__builtins__": builtins}
    with _contextlib.redirect_stdout(_io.StringIO()):
        tree = ast.parse("x = [1, 2]\nprint(len(x))\nx", CODE_FILENAME, "exec")
        last = ast.Expression(tree.body.pop().value)
        exec(compile(tree, CODE_FILENAME, "exec"), scratch)
        _value(eval(compile(last, CODE_FILENAME, "eval"), scratch))
    try:
        ast.parse("def broken(:", CODE_FILENAME, "exec")
    except SyntaxError as error:
        _code_error(error, error.lineno)


_warm_up()
