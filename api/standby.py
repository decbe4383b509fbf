"""What a standby service answers on its port while another service holds the lease.

A standby listens from the start, so an orchestrator's liveness probe (``GET /livez``) sees
a healthy process, while ``/healthz`` (readiness) and every other path answer 503: requests
go to the active service. Once the lease is this service's, the responder stops and the same
socket is handed to the real server.
"""

from __future__ import annotations

import http.server
import json
import socket
import threading
from collections.abc import Callable

MESSAGE = "standby: another service holds the lease; this one serves when it stops"


class _Handler(http.server.BaseHTTPRequestHandler):
    timeout = 10  # a client that sends nothing does not hold the one serving thread

    def _answer(self) -> None:
        live = self.path.split("?", 1)[0] == "/livez"
        body = json.dumps({"status": "standby"} if live else {"detail": MESSAGE}).encode()
        self.send_response(200 if live else 503)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.send_header("connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = _answer

    def log_message(self, format: str, *args: object) -> None:
        pass  # probes every few seconds: nothing worth a log line


def answer_while_standing_by(sock: socket.socket) -> Callable[[], None]:
    """Answer on ``sock`` in a thread; returns the call that stops answering (``sock`` stays
    open and listening, for the server that takes over)."""
    server = http.server.HTTPServer(sock.getsockname()[:2], _Handler, bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    sock.listen(128)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                              name="standby-answer", daemon=True)
    thread.start()

    def stop() -> None:
        server.shutdown()
        thread.join()

    return stop
