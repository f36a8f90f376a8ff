"""Airlock's Python interpreter guest.

Built into a WebAssembly component by componentize-py (see
scripts/build-guests.sh), which also pre-initialises CPython and this module at
build time, so a new context starts with the interpreter ready.

One component instance is one context: `_namespace` persists across `eval`
calls. The host captures stdout/stderr (streamed line by line) and enforces
every limit; this module turns what the code did into the
`airlock:sandbox/evaluator` result, including the cases where the code needs
a real Linux (escalation). Through the world's `host` import it also reports
rich outputs (`display()`, and a last value with a `_repr_*_` method) and the
file changes an audit hook sees while the code runs (side effects).
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
import stdlib_bundle  # noqa: F401  (the rest of the standard library, on first use)

from componentize_py_types import Err
from wit_world import exports
from wit_world.exports import evaluator as ev
from wit_world.imports import host as _host

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

# Output reaches the host a line at a time, so the caller sees it while the
# code runs (not when the evaluation ends, as a block-buffered stdout would).
if hasattr(sys.stdout, "reconfigure"):
    sys.stdout.reconfigure(line_buffering=True)


# Rich outputs, in Jupyter's MIME-bundle convention.
_REPR_METHODS = (
    ("_repr_html_", "text/html"),
    ("_repr_markdown_", "text/markdown"),
    ("_repr_svg_", "image/svg+xml"),
    ("_repr_png_", "image/png"),
    ("_repr_jpeg_", "image/jpeg"),
    ("_repr_json_", "application/json"),
    ("_repr_latex_", "text/latex"),
)


def _display_data(mime, value):
    """One representation for the host: bytes as they are (the host
    base64-encodes binary types), text as it is, a JSON type's value as JSON."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _host.DisplayData_Bytes(bytes(value))
    if isinstance(value, str):
        return _host.DisplayData_Text(value)
    if mime == "application/json" or mime.endswith("+json"):
        return _host.DisplayData_Text(json.dumps(value))
    return _host.DisplayData_Text(str(value))


def _call_repr(obj, name):
    """What `obj`'s representation method `name` answers, or None when its
    class has none or it fails (left out, as Jupyter leaves it out)."""
    if not callable(getattr(type(obj), name, None)):
        return None
    try:
        got = getattr(obj, name)()
    except Exception:
        return None
    if isinstance(got, tuple) and len(got) == 2 and isinstance(got[1], dict):
        got = got[0]  # (data, metadata), as IPython allows
    return got


def _rich_pairs(obj):
    """The (mime, data) pairs of `obj`'s rich representations, if any: what
    `_repr_mimebundle_` gives first, then the `_repr_*_` methods for the
    types it did not give."""
    pairs = []
    bundle = _call_repr(obj, "_repr_mimebundle_")
    if isinstance(bundle, dict):
        for mime, value in bundle.items():
            data = _display_data(str(mime), value)
            if data is not None:
                pairs.append((str(mime), data))
    given = {mime for mime, _ in pairs}
    for name, mime in _REPR_METHODS:
        if mime in given:
            continue
        data = _display_data(mime, _call_repr(obj, name))
        if data is not None:
            pairs.append((mime, data))
    return pairs


def _with_plain(pairs, obj):
    """`pairs` and, unless they have one, `obj`'s repr as text/plain."""
    if not any(mime == "text/plain" for mime, _ in pairs):
        pairs.append(("text/plain", _host.DisplayData_Text(_plain(obj))))
    return pairs


def _plain(obj):
    try:
        return repr(obj)
    except Exception:
        return object.__repr__(obj)


def display(*objs, raw=False):
    """Shows each object as a rich output beside the evaluation's value: its
    `_repr_html_`, `_repr_markdown_`, `_repr_svg_`, `_repr_png_`,
    `_repr_jpeg_`, `_repr_json_`, `_repr_latex_` and `_repr_mimebundle_`
    representations, and its repr as text/plain. With raw=True each object
    is a dict of MIME type -> data shown as given (bytes for binary types
    such as image/png, or base64 text)."""
    for obj in objs:
        if raw:
            if not isinstance(obj, dict):
                raise TypeError(f"display(raw=True) takes a dict of MIME type -> data, not {type(obj).__name__}")
            pairs = []
            for mime, value in obj.items():
                data = _display_data(str(mime), value)
                if data is not None:
                    pairs.append((str(mime), data))
        else:
            pairs = _with_plain(_rich_pairs(obj), obj)
        if pairs:
            _host.display(pairs)


# Types whose values never have a rich representation: a last value of one
# of them skips looking for `_repr_*_` methods (the common case, kept cheap).
_PLAIN_TYPES = frozenset((int, float, complex, str, bytes, bool, list, tuple, dict, set, frozenset, range))


def _display_last_value(value):
    """A last value with a rich representation is shown as a display too."""
    if type(value) in _PLAIN_TYPES:
        return
    pairs = _rich_pairs(value)
    if pairs:
        _host.display(_with_plain(pairs, value))


builtins.display = display


def _file_change_recorder():
    """Installs an audit hook (which code cannot remove) that reports to the
    host the file changes the evaluated code makes: opening for writing,
    removing, renaming, making directories, links, truncating, changing
    modes and times, shutil's copies, moves and tree removals. Returns its
    state: an evaluation sets "on" (and empties "seen") while the code runs;
    otherwise the hook does nothing.
    Reads record nothing. A cooperative record for the caller (what
    re-running the code would repeat), not a security boundary."""
    # Changes reported per evaluation; one past it tells the host some were dropped.
    most = 64
    state = {"on": False, "seen": set()}
    report = _host.file_changed
    fspath, fsdecode = os.fspath, os.fsdecode
    write_bits = os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def named(path):
        if isinstance(path, int) or path is None:
            return None  # a descriptor: its opening was recorded
        path = fspath(path)
        return fsdecode(path) if isinstance(path, bytes) else path

    def record(operation, path):
        path = named(path)
        if path is None:
            return
        key = (operation, path)
        seen = state["seen"]
        if key in seen or len(seen) > most:
            return
        seen.add(key)
        report(operation, path)

    def writes(mode, flags):
        if isinstance(mode, str) and any(c in mode for c in "wax+"):
            return True
        if isinstance(flags, int) and flags:
            return bool(
                flags & write_bits
                or flags & os.O_WRONLY == os.O_WRONLY
                or flags & os.O_RDWR == os.O_RDWR
            )
        return False

    def on_open(args):
        path, mode, flags = (tuple(args) + (None, None, None))[:3]
        if writes(mode, flags):
            record("write", path)

    def first(operation):
        return lambda args: record(operation, args[0])

    def second(operation):
        return lambda args: record(operation, args[1])

    def rename(operation):
        def handler(args):
            record(operation, args[0])
            record(operation + "-to", args[1])
        return handler

    def sqlite(args):
        if args and args[0] not in (":memory:", b":memory:", ""):
            record("write", args[0])

    handlers = {
        "open": on_open,
        "os.remove": first("remove"),
        "os.rename": rename("rename"),
        "os.mkdir": first("mkdir"),
        "os.rmdir": first("rmdir"),
        "os.symlink": second("symlink"),
        "os.link": second("link"),
        "os.truncate": first("truncate"),
        "os.chmod": first("chmod"),
        "os.chown": first("chown"),
        "os.chflags": first("chflags"),
        "os.lchflags": first("chflags"),
        "os.utime": first("utime"),
        "os.setxattr": first("setxattr"),
        "os.removexattr": first("removexattr"),
        "shutil.copyfile": second("copy"),
        "shutil.copymode": second("chmod"),
        "shutil.copystat": second("utime"),
        "shutil.copytree": second("copy"),
        "shutil.rmtree": first("remove"),
        "shutil.move": rename("rename"),
        "shutil.chown": first("chown"),
        "shutil.make_archive": first("write"),
        "shutil.unpack_archive": second("write"),
        "tempfile.mkstemp": first("write"),
        "tempfile.mkdtemp": first("mkdir"),
        "sqlite3.connect": sqlite,
    }
    get = handlers.get

    def hook(event, args):
        if not state["on"]:
            return
        handler = get(event)
        if handler is not None:
            try:
                handler(args)
            except Exception:
                pass

    sys.addaudithook(hook)
    return state


_recording = _file_change_recorder()
# Outbound HTTP goes through the host's wasi:http hook under the sandbox's
# network policy: `airlock.fetch`, `urllib.request.urlopen` and `http.client`.
import airlock  # noqa: E402

airlock.install()
airlock.display = display
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
        if _recording["seen"]:
            _recording["seen"] = set()
        _recording["on"] = True
        try:
            if head is not None:
                exec(head, _namespace)
            if statements is not None:
                exec(statements, _namespace)
            if last is None:
                return None
            result = eval(last, _namespace)
            if result is not None:
                _display_last_value(result)
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
            _recording["on"] = False
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
