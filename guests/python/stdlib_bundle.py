"""The standard library in the isolate's Python.

componentize-py keeps, in the pre-initialised component, only the modules the
app imported at build time: the standard library's files are readable while
the component is built and gone when it runs. So this module, at build time:

- imports a few modules outright (``EAGER``): they are then in every new
  context at no cost to start it (and freezes the heap it made, see the end);
- compiles every other pure-Python module of the standard library it finds
  (and the ``tzdata`` package, the IANA time-zone files for ``zoneinfo``)
  into marshalled code, compressed, kept in the heap snapshot, and installs
  a finder that imports them on first use. Compiling happened at build
  time: an import at run time costs decompressing, unmarshalling and running
  the module's body, and nothing until then;
- installs stand-ins for modules that cannot work in WebAssembly
  (``UNSUPPORTED``): importing one raises ImportError naming the reason, so
  the code escalates to a container (native-extension);
- gives asyncio an event loop that needs no sockets (WASI has no
  ``socketpair`` for the selector loop's wake-up pipe).

docs/API.md, "Python standard library in isolates", lists what is shipped
and what is not, with the reasons.
"""

import gc
import marshal
import os
import sys
import zlib

# Imported at build time: common, and slow to import on first use (asyncio
# 30 ms, unittest 14 ms, a first ZoneInfo 10 ms in a fresh context), while
# importing them here does not slow a new context (docs/BENCHMARKS.md,
# "Python standard library in isolates"). The rest is imported on first use.
EAGER = ("asyncio", "unittest", "sqlite3", "zoneinfo", "logging", "importlib.resources", "tzdata.zoneinfo")

# Top-level names of the standard library left out of the bundle: the
# regression tests, GUI and terminal toolkits with no display or terminal in
# an isolate, and tools that install or build (packages, virtual
# environments, the interactive console).
EXCLUDED = frozenset(
    {
        "test", "idlelib", "tkinter", "turtle", "turtledemo", "ensurepip", "venv", "site-packages", "__phello__", "__hello__", "antigravity", "this",
        # ssl needs the _ssl extension: without it, `import ssl` stays a
        # network escalation (decided in app.py by the module's name).
        "ssl",
    }
)
# Modules for Windows only (they refuse to import elsewhere).
WINDOWS_ONLY = frozenset(
    {"asyncio.windows_events", "asyncio.windows_utils", "encodings.mbcs", "encodings.oem", "_pyrepl.windows_console",
     "_pyrepl.windows_eventqueue"}
)

# Modules that cannot work in an isolate, and why; importing one raises
# ImportError (not ModuleNotFoundError) with the reason, which the guest
# reports as an escalation to a container (native-extension).
UNSUPPORTED = {
    "ctypes": "ctypes loads native libraries at run time (dlopen) and calls them through libffi; "
    "WebAssembly can load neither, and this CPython has no _ctypes",
    "multiprocessing": "multiprocessing starts processes (fork, spawn) and needs the _multiprocessing "
    "and _posixshmem extensions; an isolate is one process with neither",
    "concurrent.futures.process": "a process pool starts processes; an isolate is one process",
    "concurrent.interpreters": "subinterpreters need the _interpreters extension and threads, which this CPython does not have",
    "concurrent.futures.interpreter": "an interpreter pool needs the _interpreters extension and threads, which this CPython does not have",
    "asyncio.tools": "asyncio.tools inspects the tasks of other processes (_remote_debugging); an isolate sees no other process",
    "lzma": "lzma needs the _lzma extension (liblzma), which componentize-py's CPython does not include",
    "bz2": "bz2 needs the _bz2 extension (libbz2), which componentize-py's CPython does not include",
    "compression.zstd": "compression.zstd needs the _zstd extension (libzstd), which componentize-py's CPython does not include",
    "curses": "curses needs the _curses extension and a terminal; an isolate has neither",
    "readline": "readline needs GNU readline and a terminal; an isolate has neither",
    "dbm.gnu": "dbm.gnu needs the _gdbm extension (GNU dbm), which componentize-py's CPython does not include",
    "dbm.ndbm": "dbm.ndbm needs the _dbm extension (ndbm), which componentize-py's CPython does not include",
    "pty": "pty forks a child on a pseudo-terminal; an isolate has neither",
    "tty": "tty needs termios, which WASI does not have",
    "termios": "termios controls terminals, which WASI does not have",
    "resource": "resource limits are the host's in an isolate; WASI has no getrlimit",
    "grp": "grp reads the host's group database, which WASI does not have",
    "pwd": "pwd reads the host's user database, which WASI does not have",
    "fcntl": "fcntl has no WASI equivalent in this CPython",
    "mmap": "mmap maps files into memory, which WASI does not have",
}


def _stdlib_dir():
    """Where the build finds the standard library: the first entry of the path
    holding os.py (os itself is frozen, so its __file__ names no real file)."""
    for entry in sys.path:
        if os.path.isfile(os.path.join(entry, "os.py")):
            return entry
    return None


# name -> (is_package, zlib-compressed marshalled code of the module, origin)
_COMPILED = {}
# package name -> {resource name: bytes}: data files of bundled packages (tzdata's zone files)
_RESOURCES = {}


def _module_name(relative):
    parts = relative[:-3].split(os.sep)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def _compile_tree(root, prefix=""):
    """Compiles every .py module under `root` (a package tree), keyed by module name."""
    for directory, subdirectories, files in os.walk(root):
        relative_dir = os.path.relpath(directory, root)
        top = (prefix + relative_dir).split(os.sep)[0] if relative_dir != "." else ""
        if top in EXCLUDED or "__pycache__" in directory:
            subdirectories[:] = []
            continue
        # Only packages (a directory with __init__.py) hold importable modules.
        if relative_dir != "." and "__init__.py" not in files:
            subdirectories[:] = []
            continue
        subdirectories[:] = sorted(d for d in subdirectories if d != "__pycache__")
        for file in sorted(files):
            path = os.path.join(directory, file)
            relative = os.path.join(prefix + relative_dir, file) if relative_dir != "." else prefix + file
            if not file.endswith(".py"):
                # Data files of a package (the standard library's top level is not one).
                package_dir = prefix + relative_dir if relative_dir != "." else prefix.rstrip(os.sep)
                if package_dir:
                    package = package_dir.replace(os.sep, ".")
                    with open(path, "rb") as data:
                        _RESOURCES.setdefault(package, {})[file] = data.read()
                continue
            name, is_package = _module_name(relative)
            # Modules imported already are compiled too: code that drops a module
            # from sys.modules and imports it again (importlib.reload, test
            # helpers importing a fresh copy) finds it here.
            if name.split(".")[0] in EXCLUDED or name in WINDOWS_ONLY or name in _COMPILED:
                continue
            if any(name == u or name.startswith(u + ".") for u in UNSUPPORTED):
                continue
            with open(path, "rb") as source:
                text = source.read()
            try:
                code = compile(text, path, "exec", dont_inherit=True)
            except SyntaxError:
                # Not Python this interpreter reads (a template or test data).
                continue
            _COMPILED[name] = (is_package, zlib.compress(marshal.dumps(code), 9), path)


class _ResourceReader:
    """importlib.resources for a bundled package's data files (what zoneinfo reads from tzdata)."""

    def __init__(self, package):
        self._files = _RESOURCES.get(package, {})

    def open_resource(self, resource):
        import io

        try:
            return io.BytesIO(self._files[resource])
        except KeyError:
            raise FileNotFoundError(resource) from None

    def resource_path(self, resource):
        raise FileNotFoundError(resource)

    def is_resource(self, name):
        return name in self._files

    def contents(self):
        return iter(self._files)


class Unsupported(ImportError):
    """Importing a module that cannot work in an isolate (UNSUPPORTED says why)."""


class BundleFinder:
    """Finds and loads the modules compiled at build time, and refuses the unsupported ones."""

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        from importlib.machinery import ModuleSpec

        if fullname in UNSUPPORTED:
            return ModuleSpec(fullname, cls, origin="unsupported")
        entry = _COMPILED.get(fullname)
        if entry is None:
            return None
        is_package, _, origin = entry
        spec = ModuleSpec(fullname, cls, origin=origin, is_package=is_package)
        spec.has_location = False
        return spec

    @staticmethod
    def create_module(spec):
        if spec.name in UNSUPPORTED:
            raise Unsupported(UNSUPPORTED[spec.name] + "; it runs in a container", name=spec.name)
        return None

    @staticmethod
    def exec_module(module):
        name = module.__spec__.name
        is_package, compressed, origin = _COMPILED[name]
        module.__file__ = origin
        exec(marshal.loads(zlib.decompress(compressed)), module.__dict__)
        after = _AFTER_IMPORT.get(name)
        if after is not None:
            after(module)

    @staticmethod
    def get_resource_reader(fullname):
        return _ResourceReader(fullname)

    @staticmethod
    def get_source(fullname):
        # Sources are not kept (only compiled code): tracebacks show file and line.
        return None


class _SleepSelector:
    """What the isolate's event loop waits on: only time passes in an isolate
    (no file descriptors to poll; sockets escalate), so waiting is sleeping
    until the next timer."""

    def select(self, timeout=None):
        if timeout is None:
            raise RuntimeError(
                "the event loop would wait forever: nothing is scheduled, and an isolate has no I/O to wait for"
            )
        if timeout > 0:
            import time

            time.sleep(timeout)
        return []

    def close(self):
        pass


def _patch_asyncio(asyncio):
    """Makes asyncio's default event loop one that needs no sockets.

    The selector loop opens a socketpair to wake itself, which WASI does not
    have (and which the guest turns into a network escalation). This loop
    runs coroutines, tasks, timers, queues, locks and timeouts; a subprocess
    started from it escalates as any subprocess does; network I/O escalates
    through the socket module."""
    from asyncio import base_events, unix_events

    class IsolateEventLoop(base_events.BaseEventLoop):
        def __init__(self):
            super().__init__()
            self._selector = _SleepSelector()

        def _process_events(self, event_list):
            pass

        def _write_to_self(self):
            # No other thread can be waiting to wake this loop.
            pass

        def run_in_executor(self, executor, func, *args):
            # An isolate cannot start threads: the default executor runs the
            # call in place (blocking the loop until it returns), so
            # asyncio.to_thread works and a resolver call reaches the socket
            # module (a network escalation).
            if executor is not None:
                return super().run_in_executor(executor, func, *args)
            self._check_closed()
            future = self.create_future()
            try:
                future.set_result(func(*args))
            except Exception as error:
                future.set_exception(error)
            return future

        async def shutdown_default_executor(self, timeout=None):
            self._executor_shutdown_called = True

        async def _make_subprocess_transport(self, protocol, args, shell, stdin, stdout, stderr, bufsize,
                                             extra=None, **kwargs):
            import subprocess

            # Escalates in the guest (subprocess.Popen is an escalation point).
            subprocess.Popen(args, shell=shell)
            raise NotImplementedError("subprocesses from asyncio in an isolate")

    IsolateEventLoop.__module__ = "asyncio"
    unix_events._UnixDefaultEventLoopPolicy._loop_factory = IsolateEventLoop
    unix_events.EventLoop = IsolateEventLoop
    asyncio.EventLoop = IsolateEventLoop
    asyncio.IsolateEventLoop = IsolateEventLoop


# Run after a bundled module's body, with the module.
_AFTER_IMPORT = {"asyncio": _patch_asyncio}


def shipped():
    """The names of the modules the bundle serves on first use (tests list them)."""
    return set(_COMPILED)


def _tzdata_root():
    """The tzdata package directory on the build's Python path, if any."""
    for entry in sys.path:
        candidate = os.path.join(entry, "tzdata")
        if os.path.isfile(os.path.join(candidate, "__init__.py")):
            return candidate
    return None


def _bundle():
    stdlib = _stdlib_dir()
    if stdlib is not None:
        _compile_tree(stdlib)
    tzdata = _tzdata_root()
    if tzdata is not None:
        _compile_tree(tzdata, "tzdata" + os.sep)
    sys.meta_path.append(BundleFinder)


def _adopt_imported():
    """Modules imported at build time were loaded from files that are gone at
    run time: their loader becomes the bundle's, so reloading one, or reading
    a package's data files (tzdata's zones), goes through the bundle."""
    for name, module in list(sys.modules.items()):
        spec = getattr(module, "__spec__", None)
        if name in _COMPILED and spec is not None and spec.origin == _COMPILED[name][2]:
            spec.loader = BundleFinder
            module.__loader__ = BundleFinder


_bundle()
for _name in EAGER:
    _module = __import__(_name)
    if _name in _AFTER_IMPORT:
        _AFTER_IMPORT[_name](_module)
_adopt_imported()
# Everything made so far lives as long as the interpreter: moved out of the
# collector's generations, the cyclic collector never walks (and so never
# writes to) these objects, which each context would otherwise copy from the
# shared snapshot: less memory per context than without the bundle.
gc.collect()
gc.freeze()
