"""Airlock's helpers for code in the Python isolate.

`fetch(url, method=..., headers=..., body=...)` makes one HTTP request over
wasi:http. The host sends it under the sandbox's network policy (adding any
credentials the policy's rules name, which the code never sees) or refuses
it; a refusal raises `FetchError` whose message names the host and the
policy. `install()` routes `urllib.request.urlopen` and `http.client`'s
connections through `fetch`.

`display` (also a builtin) shows rich outputs; `HTML`, `Markdown`, `SVG`,
`JSON` and `Image` wrap data so that displaying it (or leaving it as the
last value) shows it as that type, as IPython.display's classes do.
"""

import io
import json

from componentize_py_types import Err
from wit_world.imports import outgoing_handler as _handler
from wit_world.imports import streams as _streams
from wit_world.imports import types as _http

# Bytes read from a response per call, and written to a request per call
# (wasi:http's blocking-write-and-flush takes at most 4096).
_READ_CHUNK = 65536
_WRITE_CHUNK = 4096

_METHODS = {
    "GET": _http.Method_Get, "HEAD": _http.Method_Head, "POST": _http.Method_Post, "PUT": _http.Method_Put,
    "DELETE": _http.Method_Delete, "OPTIONS": _http.Method_Options, "PATCH": _http.Method_Patch,
    "TRACE": _http.Method_Trace, "CONNECT": _http.Method_Connect,
}


class FetchError(OSError):
    """A request the host refused or that failed; the message says why."""


class Response:
    """A whole HTTP response: `status`, `ok`, `headers` (a list of (name, value)), `body` (bytes)."""

    def __init__(self, url, status, headers, body):
        self.url = url
        self.status = status
        self.ok = 200 <= status < 300
        self.headers = headers
        self.body = body

    def header(self, name, default=None):
        name = name.lower()
        values = [value for key, value in self.headers if key.lower() == name]
        return ", ".join(values) if values else default

    def text(self, encoding="utf-8"):
        return self.body.decode(encoding, "replace")

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return f"<Response [{self.status}] {self.url}>"


def _error_text(code):
    if isinstance(code, _http.ErrorCode_InternalError) and code.value:
        return code.value
    name = type(code).__name__.replace("ErrorCode_", "")
    value = getattr(code, "value", None)
    return name if value is None else f"{name}: {value}"


def _stream_error_text(error):
    if isinstance(error, _streams.StreamError_LastOperationFailed):
        code = _http.http_error_code(error.value)
        return _error_text(code) if code is not None else error.value.to_debug_string()
    return "the stream closed"


def _split(url):
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in ("http", "https"):
        raise FetchError(f"{url!r} is not an absolute http:// or https:// URL")
    rest = rest.split("#", 1)[0]
    cut = min([i for i in (rest.find("/"), rest.find("?")) if i >= 0], default=len(rest))
    authority, path = rest[:cut], rest[cut:] or "/"
    if not authority:
        raise FetchError(f"{url!r} names no host")
    if path.startswith("?"):
        path = "/" + path
    return (_http.Scheme_Http() if scheme == "http" else _http.Scheme_Https()), authority, path


def _header_items(headers):
    if headers is None:
        return []
    if hasattr(headers, "items"):
        return list(headers.items())
    return list(headers)


def fetch(url, method="GET", headers=None, body=None):
    """Sends one request and returns its whole `Response`; raises `FetchError`."""
    scheme, authority, path = _split(url)
    method = method.upper()
    if isinstance(body, str):
        body = body.encode("utf-8")
    items = _header_items(headers)
    if body is not None and not any(str(name).lower() == "content-length" for name, _ in items):
        # A known length, so the request is not sent chunked.
        items.append(("Content-Length", str(len(body))))
    fields = _http.Fields()
    for name, value in items:
        value = value if isinstance(value, bytes) else str(value).encode("latin-1")
        try:
            fields.append(str(name), value)
        except Err as error:
            raise FetchError(f"header {name!r}: {error.value}") from None
    request = _http.OutgoingRequest(fields)
    try:
        request.set_method(_METHODS[method]() if method in _METHODS else _http.Method_Other(method))
        request.set_scheme(scheme)
        request.set_authority(authority)
        request.set_path_with_query(path)
    except Err:
        raise FetchError(f"invalid request: {method} {url}") from None
    outgoing = request.body()
    try:
        pending = _handler.handle(request, None)
    except Err as error:
        raise FetchError(_error_text(error.value)) from None
    if body:
        with outgoing.write() as stream:
            for at in range(0, len(body), _WRITE_CHUNK):
                try:
                    stream.blocking_write_and_flush(body[at:at + _WRITE_CHUNK])
                except Err as error:
                    raise FetchError(_stream_error_text(error.value)) from None
    try:
        _http.OutgoingBody.finish(outgoing, None)
    except Err as error:
        raise FetchError(_error_text(error.value)) from None
    with pending:
        answer = pending.get()
        while answer is None:
            with pending.subscribe() as ready:
                ready.block()
            answer = pending.get()
    if isinstance(answer, Err):
        raise FetchError("the response was already taken")
    answer = answer.value
    if isinstance(answer, Err):
        raise FetchError(_error_text(answer.value))
    with answer.value as response:
        status = response.status()
        with response.headers() as fields:
            got = [(name, value.decode("latin-1")) for name, value in fields.entries()]
        with response.consume() as incoming:
            chunks = []
            with incoming.stream() as stream:
                while True:
                    try:
                        chunks.append(stream.blocking_read(_READ_CHUNK))
                    except Err as error:
                        if isinstance(error.value, _streams.StreamError_Closed):
                            break
                        raise FetchError(_stream_error_text(error.value)) from None
    return Response(url, status, got, b"".join(chunks))


def _message(headers):
    import http.client

    message = http.client.HTTPMessage()
    for name, value in headers:
        message[name] = value
    return message


class _HTTPResponse(io.BufferedIOBase):
    """What `http.client.HTTPConnection.getresponse` answers, over a whole `Response`."""

    def __init__(self, response):
        import http.client

        self.status = self.code = response.status
        self.reason = http.client.responses.get(response.status, "")
        self.version = 11
        self.url = response.url
        self.msg = self.headers = _message(response.headers)
        self._fp = io.BytesIO(response.body)

    def readable(self):
        return True

    def read(self, amt=None):
        return self._fp.read(amt)

    def read1(self, amt=-1):
        return self._fp.read1(amt)

    def readinto(self, buffer):
        return self._fp.readinto(buffer)

    def readline(self, limit=-1):
        return self._fp.readline(limit)

    def getheader(self, name, default=None):
        values = self.msg.get_all(name)
        return ", ".join(values) if values else default

    def getheaders(self):
        return list(self.msg.items())

    def getcode(self):
        return self.status

    def info(self):
        return self.msg

    def geturl(self):
        return self.url


class HTTPConnection:
    """`http.client.HTTPConnection` for the isolate: each request goes through `fetch`."""

    _scheme = "http"
    default_port = 80

    def __init__(self, host, port=None, timeout=None, source_address=None, blocksize=8192, **_kwargs):
        if port is None and host.rpartition(":")[2].isdigit() and not host.endswith("]"):
            host, _, port = host.rpartition(":")
        self.host = host
        self.port = int(port) if port is not None else self.default_port
        self.timeout = timeout
        self._pending = None
        self._response = None

    def _authority(self):
        return self.host if self.port == self.default_port else f"{self.host}:{self.port}"

    def set_debuglevel(self, level):
        pass

    def set_tunnel(self, host, port=None, headers=None):
        raise FetchError("proxies are not available in the isolate (the host applies the sandbox's network policy)")

    def connect(self):
        pass

    def close(self):
        self._pending = None

    def request(self, method, url, body=None, headers=None, *, encode_chunked=False):
        if hasattr(body, "read"):
            body = body.read()
        if body is not None and not isinstance(body, (bytes, bytearray, str)):
            body = b"".join(part.encode("latin-1") if isinstance(part, str) else bytes(part) for part in body)
        target = url if "://" in url else f"{self._scheme}://{self._authority()}{url}"
        self._response = _HTTPResponse(fetch(target, method, headers or {}, body))

    def putrequest(self, method, url, skip_host=False, skip_accept_encoding=False):
        self._pending = (method, url, [], [])

    def putheader(self, header, *values):
        self._pending[2].append((header, ", ".join(str(v) for v in values)))

    def endheaders(self, message_body=None, *, encode_chunked=False):
        if message_body is not None:
            self._pending[3].append(message_body)

    def send(self, data):
        self._pending[3].append(data)

    def getresponse(self):
        if self._pending is not None:
            method, url, headers, parts = self._pending
            self._pending = None
            self.request(method, url, b"".join(bytes(p) for p in parts) or None, headers)
        if self._response is None:
            raise FetchError("no request was sent")
        response, self._response = self._response, None
        return response


class HTTPSConnection(HTTPConnection):
    _scheme = "https"
    default_port = 443

    def __init__(self, host, port=None, *args, context=None, **kwargs):
        super().__init__(host, port, *args, **kwargs)


class _Rich:
    """Data shown as one MIME type when displayed."""

    def __init__(self, data):
        self.data = data

    def __repr__(self):
        return f"<{type(self).__name__} object>"


class HTML(_Rich):
    def _repr_html_(self):
        return self.data


class Markdown(_Rich):
    def _repr_markdown_(self):
        return self.data


class SVG(_Rich):
    def _repr_svg_(self):
        return self.data


class JSON(_Rich):
    def _repr_json_(self):
        return self.data


class Image:
    """A PNG or JPEG image, from bytes or a file in the workspace."""

    def __init__(self, data=None, filename=None, format=None):
        if filename is not None:
            with open(filename, "rb") as file:
                data = file.read()
            if format is None and str(filename).lower().endswith((".jpg", ".jpeg")):
                format = "jpeg"
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError("Image takes bytes or a filename")
        self.data = bytes(data)
        self.format = format or ("jpeg" if self.data[:2] == b"\xff\xd8" else "png")

    def _repr_png_(self):
        return self.data if self.format == "png" else None

    def _repr_jpeg_(self):
        return self.data if self.format == "jpeg" else None

    def __repr__(self):
        return f"<Image {self.format}, {len(self.data)} bytes>"


def display(*objs, raw=False):
    """Shows rich outputs (the interpreter replaces this with its own at start)."""
    raise RuntimeError("display() is only available inside an evaluation")


def install():
    """Routes `http.client` connections and `urllib.request.urlopen` through `fetch`."""
    import socket

    # The socket module this CPython has may be a stand-in: give it what
    # http.client and urllib need at import time.
    for name, value in (("_GLOBAL_DEFAULT_TIMEOUT", object()), ("error", OSError), ("timeout", TimeoutError),
                        ("gaierror", OSError), ("herror", OSError)):
        if not hasattr(socket, name):
            setattr(socket, name, value)
    import http.client
    import urllib.error
    import urllib.request
    import urllib.response

    http.client.HTTPConnection = HTTPConnection
    http.client.HTTPSConnection = HTTPSConnection

    class AirlockHandler(urllib.request.BaseHandler):
        handler_order = 100

        def _open(self, request):
            body = request.data
            if hasattr(body, "read"):
                body = body.read()
            try:
                response = fetch(request.full_url, request.get_method(), request.header_items(), body)
            except FetchError as error:
                raise urllib.error.URLError(str(error)) from None
            answer = urllib.response.addinfourl(io.BytesIO(response.body), _message(response.headers),
                                                request.full_url, response.status)
            answer.msg = http.client.responses.get(response.status, "")
            return answer

        http_open = _open
        https_open = _open

    opener = urllib.request.OpenerDirector()
    for handler in (AirlockHandler(), urllib.request.HTTPDefaultErrorHandler(), urllib.request.HTTPRedirectHandler(),
                    urllib.request.HTTPErrorProcessor(), urllib.request.UnknownHandler()):
        opener.add_handler(handler)
    urllib.request.install_opener(opener)
