# A dev server for tests/http_preview.rs, run inside a sandbox (Python stdlib only):
# GET /headers answers with the request's headers as JSON; POST /echo answers with
# its body; GET /ws with a WebSocket handshake echoes every frame back. Hostile
# answers: GET /huge-head (a 100 KiB header), /many-headers (500 headers), /cut
# (promises 1000 bytes, sends 10, closes).
import base64, hashlib, json, struct, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def answer(self, status, body, kind="application/json"):
        self.send_response(status)
        self.send_header("content-type", kind)
        self.send_header("content-length", str(len(body)))
        self.send_header("set-cookie", "wide=1; Domain=localhost")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path.startswith("/headers"):
            pairs = [[k.lower(), v] for k, v in self.headers.items()]
            self.answer(200, json.dumps({"path": self.path, "headers": pairs}).encode())
        elif self.path == "/ws" and self.headers.get("upgrade", "").lower() == "websocket":
            key = self.headers["sec-websocket-key"]
            accept = base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()
            self.send_response(101)
            self.send_header("upgrade", "websocket")
            self.send_header("connection", "Upgrade")
            self.send_header("sec-websocket-accept", accept)
            self.end_headers()
            self.wfile.flush()
            self.echo_frames()
            self.close_connection = True
        elif self.path == "/huge-head":
            self.wfile.write(b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * 100_000 + b"\r\ncontent-length: 0\r\n\r\n")
            self.close_connection = True
        elif self.path == "/many-headers":
            lines = b"".join(b"x-h%d: 1\r\n" % i for i in range(500))
            self.wfile.write(b"HTTP/1.1 200 OK\r\n" + lines + b"content-length: 0\r\n\r\n")
            self.close_connection = True
        elif self.path == "/cut":
            self.wfile.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n0123456789")
            self.wfile.flush()
            self.close_connection = True
        else:
            self.answer(404, b"{}")

    def do_POST(self):
        length = int(self.headers.get("content-length", "0"))
        body = self.rfile.read(length)
        self.answer(200, body, "application/octet-stream")

    def echo_frames(self):
        while True:
            head = self.rfile.read(2)
            if len(head) < 2:
                return
            opcode, length = head[0] & 0x0F, head[1] & 0x7F
            if length == 126:
                length = struct.unpack(">H", self.rfile.read(2))[0]
            elif length == 127:
                length = struct.unpack(">Q", self.rfile.read(8))[0]
            mask = self.rfile.read(4) if head[1] & 0x80 else b"\0\0\0\0"
            data = bytes(b ^ mask[i % 4] for i, b in enumerate(self.rfile.read(length)))
            if length < 126:
                out = bytes([0x80 | opcode, length])
            elif length < 65536:
                out = bytes([0x80 | opcode, 126]) + struct.pack(">H", length)
            else:
                out = bytes([0x80 | opcode, 127]) + struct.pack(">Q", length)
            self.wfile.write(out + data)
            self.wfile.flush()
            if opcode == 8:
                return


ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
