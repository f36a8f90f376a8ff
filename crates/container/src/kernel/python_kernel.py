"""Airlock's Python kernel: one persistent interpreter per code context, in a
sandbox container (see crates/container/src/kernel.rs for the host's side).

The host starts it as `python3 -u -c <this source>` through the sandbox's
agent, as the sandbox's user in /workspace, with a pipe on stdin.

Protocol
- stdin, host to kernel, one JSON object per line: first the hello
  `{"nonce": ...}`, then one `{"id": n, "code": ...}` per evaluation, one
  at a time (the next only after this one's end frames).
- stdout and stderr carry the user's output (the kernel's children's too) and
  the kernel's frames: MARK + JSON + "\\n", where MARK is "\\x1e" "airlock:"
  nonce "\\x1f". JSON as written here is pure ASCII with no raw control
  characters, so a frame is one line. Frames: `ready` (stdout, once, with the
  pid), `display` (stdout, a MIME bundle), `end` (stdout, with the result,
  then stderr): the host knows both pipes hold everything of an evaluation
  once it has seen its end on both.

The nonce does not protect against the user's code, which runs in this very
process and may write anything; it keeps output that merely resembles a
frame (a test printing a marker, a child process) from being taken for one.
The host treats every frame as untrusted.
"""

import ast
import base64
import builtins
import json
import os
import sys
import traceback
import types

CODE_FILENAME = "<code>"
# Longest value text, traceback or repr the kernel sends, in characters: a
# huge repr() stays in the kernel instead of filling the host's frame buffer.
TEXT_CHARS = 1 << 20
# The flag that makes a code object a coroutine (inspect.CO_COROUTINE), for
# snippets with a top-level await.
CO_COROUTINE = 0x80
TOP_LEVEL_AWAIT = getattr(ast, "PyCF_ALLOW_TOP_LEVEL_AWAIT", 0)
# The matplotlib backend this kernel provides (as module://<name>), made at
# import time by _BackendFinder, never a file.
BACKEND_MODULE = "airlock_kernel_backend"
# Rich representations, in Jupyter's order of preference.
REPR_METHODS = (
    ("image/png", "_repr_png_"),
    ("image/jpeg", "_repr_jpeg_"),
    ("image/svg+xml", "_repr_svg_"),
    ("text/html", "_repr_html_"),
    ("text/markdown", "_repr_markdown_"),
    ("text/latex", "_repr_latex_"),
    ("application/json", "_repr_json_"),
)
BINARY_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp", "image/bmp")


def _open_channels():
    """Takes the request pipe and the frame pipes for the kernel alone: the
    requests move to a private descriptor and fd 0 becomes /dev/null, so
    neither the user's code nor its children can read them; frames go to
    private copies of fd 1 and 2, which the user's code may redirect."""
    requests = os.fdopen(os.dup(0), "rb")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    sys.stdin = open(os.devnull, "r")
    return requests, os.dup(1), os.dup(2)


_requests, _out_fd, _err_fd = _open_channels()
_hello = json.loads(_requests.readline() or b"{}")
_MARK = ("\x1eairlock:" + str(_hello.get("nonce", "")) + "\x1f").encode("ascii")
del _hello
_figure_formats = ["png"]


def _clean(text):
    """`text` as a str JSON can carry (lone surrogates replaced), at most TEXT_CHARS."""
    if not isinstance(text, str):
        text = str(text)
    if len(text) > TEXT_CHARS:
        text = text[:TEXT_CHARS] + "... [truncated]"
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")


def _flush_user_streams():
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except Exception:
            pass


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _send(message, fd=None):
    """Writes one frame, after what the user's code wrote so far."""
    _flush_user_streams()
    body = json.dumps(message, ensure_ascii=True, separators=(",", ":"))
    _write_all(_out_fd if fd is None else fd, _MARK + body.encode("ascii") + b"\n")


# --- rich output ---------------------------------------------------------


def _figure_class():
    module = sys.modules.get("matplotlib.figure")
    return getattr(module, "Figure", None) if module is not None else None


def _is_figure(obj):
    figure = _figure_class()
    return figure is not None and isinstance(obj, figure)


def _figure_data(figure):
    import io

    data = {}
    for fmt in _figure_formats:
        buffer = io.BytesIO()
        figure.savefig(buffer, format=fmt, bbox_inches="tight")
        raw = buffer.getvalue()
        if fmt == "svg":
            data["image/svg+xml"] = raw.decode("utf-8", "replace")
        elif fmt in ("jpg", "jpeg"):
            data["image/jpeg"] = base64.b64encode(raw).decode("ascii")
        else:
            data["image/png"] = base64.b64encode(raw).decode("ascii")
    data["text/plain"] = _clean(repr(figure))
    return data


def _close_figure(figure):
    """Closes `figure` if pyplot manages it, so it is not shown again at the end."""
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        try:
            if figure in [m.canvas.figure for m in _figure_managers()]:
                pyplot.close(figure)
        except Exception:
            pass


def _figure_managers():
    helpers = sys.modules.get("matplotlib._pylab_helpers")
    if helpers is None:
        return []
    return list(helpers.Gcf.get_all_fig_managers())


def _emit_open_figures():
    """Shows every figure pyplot holds, and closes them (Jupyter's inline backend)."""
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is None:
        return
    for manager in _figure_managers():
        figure = manager.canvas.figure
        try:
            _send_display(_figure_data(figure))
        except Exception as error:
            print(f"could not draw figure {manager.num}: {error!r}", file=sys.stderr)
    try:
        pyplot.close("all")
    except Exception:
        pass


def _encode_representation(mime, value):
    if isinstance(value, tuple) and value:
        # (data, metadata), as _repr_*_ methods may answer.
        value = value[0]
    if value is None:
        return None
    if mime in BINARY_TYPES or (mime.startswith("image/") and mime != "image/svg+xml"):
        if isinstance(value, (bytes, bytearray, memoryview)):
            return base64.b64encode(bytes(value)).decode("ascii")
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", "replace")
    if mime == "application/json" or mime.endswith("+json"):
        return value if isinstance(value, str) else json.dumps(value, default=repr)
    return _clean(value)


def _rich_data(obj):
    """The representations of `obj` beside text/plain (empty if it has none)."""
    if _is_figure(obj):
        return _figure_data(obj)
    if isinstance(obj, type):
        # A class's _repr_*_ attributes are unbound functions, not its representations.
        return {}
    data = {}
    mimebundle = getattr(obj, "_repr_mimebundle_", None)
    if callable(mimebundle):
        try:
            answer = mimebundle(include=None, exclude=None)
            if isinstance(answer, tuple):
                answer = answer[0]
            if isinstance(answer, dict):
                for mime, value in answer.items():
                    encoded = _encode_representation(str(mime), value)
                    if encoded is not None:
                        data[str(mime)] = encoded
        except Exception:
            pass
    for mime, name in REPR_METHODS:
        if mime in data:
            continue
        method = getattr(obj, name, None)
        if not callable(method):
            continue
        try:
            encoded = _encode_representation(mime, method())
        except Exception:
            continue
        if encoded is not None:
            data[mime] = encoded
    return data


def _plain(obj):
    try:
        return _clean(repr(obj))
    except Exception as error:
        return f"<{type(obj).__name__} (repr failed: {error!r})>"


def _send_display(data):
    _send({"t": "display", "data": {_clean(k): _clean(v) for k, v in data.items()}})


def display(*objs, raw=False, **_options):
    """Shows each object as a rich output (Jupyter's display): its _repr_*_
    representations and its repr(); with raw=True, each object is a MIME
    bundle already ({"text/html": "<b>hi</b>"}; bytes of binary types are
    base64-encoded here)."""
    for obj in objs:
        if raw and isinstance(obj, dict):
            data = {}
            for mime, value in obj.items():
                encoded = _encode_representation(str(mime), value)
                if encoded is not None:
                    data[str(mime)] = encoded
        else:
            data = _rich_data(obj)
            data.setdefault("text/plain", _plain(obj))
            if _is_figure(obj):
                _close_figure(obj)
        if data:
            _send_display(data)


def set_matplotlib_formats(*formats):
    """Chooses how figures are shown: any of "png", "svg", "jpeg" (default png)."""
    chosen = [f.lower() for f in formats if isinstance(f, str) and f.lower() in ("png", "svg", "jpeg", "jpg")]
    if not chosen:
        raise ValueError("choose one or more of 'png', 'svg', 'jpeg'")
    _figure_formats[:] = chosen


builtins.display = display
builtins.set_matplotlib_formats = set_matplotlib_formats


# --- matplotlib ------------------------------------------------------------


def _show(*_args, **_kwargs):
    """pyplot.show(): every open figure becomes a display output, then closes."""
    _emit_open_figures()


class _BackendFinder:
    """Makes `module://airlock_kernel_backend` importable without a file,
    and points matplotlib at it when it is first imported (unless the
    environment chose a backend other than Agg). Nothing is imported until
    the user's code imports matplotlib, so the kernel starts fast; children
    of the kernel see MPLBACKEND=Agg and never this backend."""

    def find_spec(self, name, path=None, target=None):
        if name == BACKEND_MODULE:
            import importlib.machinery

            return importlib.machinery.ModuleSpec(name, self)
        if name == "matplotlib" and self not in _hooked:
            _hooked.append(self)
            import importlib.util

            sys.meta_path.remove(self)
            try:
                spec = importlib.util.find_spec(name)
            finally:
                sys.meta_path.insert(0, self)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                original = spec.loader.exec_module

                def exec_module(module):
                    original(module)
                    chosen = os.environ.get("MPLBACKEND", "").lower()
                    if chosen in ("", "agg"):
                        try:
                            module.rcParams["backend"] = "module://" + BACKEND_MODULE
                        except Exception:
                            pass

                spec.loader.exec_module = exec_module
            return spec
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        from matplotlib.backend_bases import FigureManagerBase
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        module.FigureCanvas = FigureCanvasAgg
        module.FigureManager = FigureManagerBase
        module.show = _show


_hooked = []
sys.meta_path.insert(0, _BackendFinder())


# --- evaluation ------------------------------------------------------------


def _code_error(error, line=None):
    """The error as the host reports it: only the frames of the user's code."""
    tb = error.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != CODE_FILENAME:
        tb = tb.tb_next
    try:
        text = "".join(traceback.format_exception(type(error), error, tb))
    except Exception:
        text = f"{type(error).__name__}: <unprintable>"
    if line is None:
        frame = tb
        while frame is not None:
            if frame.tb_frame.f_code.co_filename == CODE_FILENAME:
                line = frame.tb_lineno
            frame = frame.tb_next
    try:
        message = str(error)
    except Exception:
        message = "<unprintable>"
    return {
        "kind": type(error).__name__,
        "message": _clean(message),
        "traceback": _clean(text),
        "line": line if isinstance(line, int) and line > 0 else None,
    }


def _value(result):
    if result is None:
        return None
    text = _plain(result)
    if type(result) is int:
        return {"text": text, "json": text}
    try:
        as_json = json.dumps(result, allow_nan=False)
    except (TypeError, ValueError, RecursionError, OverflowError):
        as_json = None
    if as_json is not None and len(as_json) > TEXT_CHARS:
        as_json = None
    return {"text": text, "json": as_json}


def _compile(code):
    """(statements, last expression): code objects; the last expression's
    value is the evaluation's value (Jupyter's rule)."""
    tree = ast.parse(code, CODE_FILENAME, "exec")
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Expression(tree.body.pop().value)
    statements = compile(tree, CODE_FILENAME, "exec", flags=TOP_LEVEL_AWAIT, dont_inherit=True)
    if last is not None:
        last = compile(last, CODE_FILENAME, "eval", flags=TOP_LEVEL_AWAIT, dont_inherit=True)
    return statements, last


def _run(compiled, namespace):
    answer = eval(compiled, namespace)
    if compiled.co_flags & CO_COROUTINE:
        import asyncio

        answer = asyncio.run(answer)
    return answer


# The user's namespace is a module of its own, installed as __main__ so that
# pickle and multiprocessing find what the code defines.
_main = types.ModuleType("__main__")
_main.__dict__["__builtins__"] = builtins
sys.modules["__main__"] = _main
_namespace = _main.__dict__


def _evaluate(code):
    try:
        statements, last = _compile(code)
    except (SyntaxError, ValueError, OverflowError, MemoryError, RecursionError) as error:
        line = getattr(error, "lineno", None) if isinstance(error, SyntaxError) else None
        return {"status": "syntax", "error": _code_error(error, line)}
    try:
        _run(statements, _namespace)
        value = _run(last, _namespace) if last is not None else None
    except BaseException as error:
        return {"status": "runtime", "error": _code_error(error)}
    result = {"status": "ok", "value": _value(value)}
    if value is not None:
        # A rich last value (a DataFrame, a figure) is also shown, as Jupyter does.
        try:
            rich = _rich_data(value)
            if rich:
                rich.setdefault("text/plain", result["value"]["text"])
                _send_display(rich)
                if _is_figure(value):
                    _close_figure(value)
        except Exception as error:
            print(f"could not show the value: {error!r}", file=sys.stderr)
    return result


_KERNEL_PID = os.getpid()


def _serve():
    _send({"t": "ready", "pid": _KERNEL_PID})
    while True:
        line = _requests.readline()
        if not line:
            return
        try:
            request = json.loads(line)
            eval_id = int(request["id"])
            code = str(request["code"])
        except Exception as error:
            print(f"airlock kernel: bad request: {error!r}", file=sys.__stderr__)
            continue
        result = _evaluate(code)
        if os.getpid() != _KERNEL_PID:
            # A child the code forked (os.fork) and left to run on: it must
            # neither answer for the kernel nor read its requests.
            _flush_user_streams()
            os._exit(0)
        try:
            _emit_open_figures()
        except BaseException as error:
            print(f"airlock kernel: showing figures failed: {error!r}", file=sys.__stderr__)
        try:
            _send({"t": "end", "id": eval_id, "result": result})
        except BaseException as error:
            fallback = {"status": "runtime", "error": _code_error(error)}
            _send({"t": "end", "id": eval_id, "result": fallback})
        _send({"t": "end", "id": eval_id}, fd=_err_fd)


_serve()
