"""Poll ``GET /healthz`` until stdin closes, then print the latencies (seconds) as JSON.

Runs as its own process so the measuring side never competes for a GIL with the load it
measures: ``python -m bench.healthz_probe URL [interval]``.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import httpx


def main() -> int:
    url = sys.argv[1]
    interval = float(sys.argv[2]) if len(sys.argv) > 2 else 0.005
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    latencies: list[tuple[float, float]] = []
    with httpx.Client(base_url=url, timeout=30) as http:
        while not stop.is_set():
            t = time.perf_counter()
            http.get("/healthz").raise_for_status()
            latencies.append((time.time(), time.perf_counter() - t))
            stop.wait(interval)
    json.dump(latencies, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
