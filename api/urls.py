"""URLs the service hands out: built on its public URL, or on the request's own base URL."""

from __future__ import annotations

from starlette.requests import HTTPConnection

from api.dashboard_paths import LANDING
from clusters.runner import dashboard_prefix


def public_base(conn: HTTPConnection) -> str:
    """``PROVISIONER_PUBLIC_URL`` when the service sits behind a proxy, else the URL this
    request reached the service at; no trailing slash."""
    configured = conn.app.state.provisioner.settings.public_url
    base = (configured or str(conn.base_url)).rstrip("/")
    # A websocket's own URL is ws:// or wss://; the service's pages are http(s).
    return "http" + base[2:] if base.startswith(("ws://", "wss://")) else base


def dashboard_base(base: str, cluster_id: str) -> str:
    """Where the service serves a cluster's dashboard (its proxy)."""
    return base + dashboard_prefix(cluster_id)


def dashboard_url(base: str, cluster_id: str) -> str:
    """A cluster's dashboard landing page through the service."""
    return f"{dashboard_base(base, cluster_id)}/{LANDING}"


def is_secure(conn: HTTPConnection) -> bool:
    """Whether browsers reach the service over HTTPS (then its cookies are Secure)."""
    return public_base(conn).startswith("https://")
