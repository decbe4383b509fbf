"""What the service answers on its port before it serves: as a standby while another service
holds the lease, and while it starts (recovering clusters, connecting to its backend, which can
take a while with ZooKeeper or Mesos away).

The port listens from the start, so an orchestrator's liveness probe (``GET /livez``) sees a
healthy process, while ``/healthz`` (readiness) and every other path answer 503 saying why.
Once the service is ready, the responder stops and the same socket goes on to the real server.
"""

from __future__ import annotations

import http.server
import json
import socket
import threading

MESSAGES = {
    "standby": "standby: another service holds the lease; this one serves when it stops",
    "starting": "starting: recovering clusters and connecting to the backend",
}


class _Handler(http.server.BaseHTTPRequestHandler):
    timeout = 2  # a client that sends nothing holds its own thread, and not for long
    state = "standby"

    def _answer(self) -> None:
        live = self.path.split("?", 1)[0] == "/livez"
        state = type(self).state
        body = json.dumps({"status": state} if live else {"detail": MESSAGES[state]}).encode()
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


class Placeholder:
    """Answers on ``sock`` in a thread until :meth:`stop` (``sock`` stays open and listening,
    for the server that takes over)."""

    def __init__(self, sock: socket.socket, state: str) -> None:
        self._handler: type[_Handler] = type("Handler", (_Handler,), {"state": state})
        # A thread per request: one silent client never keeps a liveness probe waiting.
        self._server = http.server.ThreadingHTTPServer(sock.getsockname()[:2], self._handler,
                                                       bind_and_activate=False)
        self._server.daemon_threads = True
        self._server.socket.close()
        self._server.socket = sock
        sock.listen(128)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.2}, name="placeholder",
                                        daemon=True)
        self._thread.start()

    def become(self, state: str) -> None:
        self._handler.state = state

    def stop(self) -> None:
        """Blocking: returns once no request is being answered any more."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join()
