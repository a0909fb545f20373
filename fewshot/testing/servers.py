"""A local HTTP server on 127.0.0.1 for the download tests and the bad-input registry: it serves files, or
fails as servers do (an error code, a transfer cut short, silence, a trickle of bytes).

    with Server({"/a.tar.gz": data}) as server:       # or Server(folder): every file in it, by name
        server.faults["/a.tar.gz"] = "trickle"
        urllib.request.urlopen(f"{server.url}/a.tar.gz")
"""
import http.server
import threading
import time
from pathlib import Path

TRICKLE_S = 0.05  # "trickle": one byte every TRICKLE_S, for as long as the client listens


class Server:
    """Files over HTTP on 127.0.0.1. files: {"/name": bytes}, or a folder whose files are served as /NAME.
    faults: {"/name": 500 | 404 | "short" | "stall" | "silent" | "trickle"}: "short" announces the whole length,
    sends half and closes; "stall" answers after 3 s; "silent" sends the headers and then nothing; "trickle"
    sends the headers, then one byte every TRICKLE_S. hits: {"/name": requests}."""

    def __init__(self, files=None):
        self.files = {f"/{p.name}": p.read_bytes() for p in sorted(Path(files).iterdir()) if p.is_file()} \
            if isinstance(files, (str, Path)) else dict(files or {})
        self.faults, self.hits, self.closing = {}, {}, threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.hits[self.path] = server.hits.get(self.path, 0) + 1
                fault, body = server.faults.get(self.path), server.files.get(self.path)
                if fault == "stall":  # a connection that stays silent before answering
                    server.closing.wait(3)
                if body is None or fault in (404, 500):
                    self.send_error(fault or 404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if fault == "silent":
                    self.wfile.flush()
                    server.closing.wait(30)
                    return
                if fault == "trickle":
                    for i in range(len(body)):
                        if server.closing.is_set():
                            return
                        self.wfile.write(body[i:i + 1])
                        self.wfile.flush()
                        time.sleep(TRICKLE_S)
                    return
                self.wfile.write(body[:len(body) // 2] if fault == "short" else body)
                if fault == "short":
                    self.close_connection = True

            def log_message(self, *args):  # quiet
                pass

            def handle(self):
                try:
                    super().handle()
                except (BrokenPipeError, ConnectionResetError):  # the client gave up: as it should
                    pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.closing.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def closed_port() -> int:
    """A port of 127.0.0.1 that nothing listens on: a connection to it is refused at once (as offline)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
