"""Which path on a scheduler a dashboard request may reach: its cluster's prefix, nothing else.

The scheduler serves its dashboard under :func:`clusters.runner.dashboard_prefix` and the
service's own control routes beside it (``/dask-provisioner/...``). The upstream path is
built here from the request's *raw* path, segment by segment: each segment is decoded once,
``.``/``..`` and control characters are refused, and the segment is encoded again, so an
encoded slash stays inside its segment (the dashboard's own links use them, e.g. a worker's
address in ``info/worker/tls%3A%2F%2F...html``) and nothing can climb out of the prefix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import (
    quote,
    quote_from_bytes,
    unquote,
    unquote_plus,
    unquote_to_bytes,
    urljoin,
    urlsplit,
)

from clusters.runner import dashboard_prefix

MAX_PATH = 4096
MAX_QUERY = 4096
#: Characters a path segment keeps unencoded (RFC 3986 pchar less "%" and "/").
_SEGMENT_SAFE = "!$&'()*+,;=:@-._~"
#: The dashboard's landing page, where the bare prefix sends a browser.
LANDING = "status"


class BadPath(ValueError):
    """A path that is not a page of this cluster's dashboard."""


@dataclass(frozen=True, slots=True)
class Target:
    """Where one request goes."""

    #: A link token given in the path, as ``t/<token>/`` right after the prefix.
    link: str | None
    #: The path on the scheduler, always under the cluster's prefix.
    upstream: str
    #: The prefix as the browser sees it (with ``t/<token>`` when given): redirects start there.
    mount: str
    #: Nothing after the prefix: the service itself sends the browser to the landing page.
    root: bool


def _segment(raw: bytes) -> str:
    decoded = unquote_to_bytes(raw)
    # A dot segment even inside one (behind an encoded slash or backslash): harmless to
    # Tornado, which never decodes a slash in a path, but refused in case anything does.
    pieces = decoded.replace(b"\\", b"/").split(b"/")
    if any(p in (b".", b"..") for p in pieces) or any(b < 0x20 or b == 0x7F for b in decoded):
        raise BadPath("path segment not allowed")
    return quote(decoded, safe=_SEGMENT_SAFE)


def target(raw_path: bytes, cluster_id: str) -> Target:
    """The target of a request whose raw path is ``raw_path`` (query excluded or not)."""
    raw = raw_path.split(b"?", 1)[0]
    if len(raw) > MAX_PATH:
        raise BadPath("path too long")
    prefix = dashboard_prefix(cluster_id)
    head = prefix.encode()
    if raw != head and not raw.startswith(head + b"/"):
        raise BadPath("not under the cluster's dashboard")
    parts = raw[len(head) + 1:].split(b"/") if len(raw) > len(head) + 1 else []
    link = None
    mount = prefix
    if len(parts) >= 2 and parts[0] == b"t":
        link = unquote(parts[1].decode("ascii", "replace"))
        mount = f"{prefix}/t/{quote(link, safe=_SEGMENT_SAFE)}"
        parts = parts[2:]
    segments = [_segment(p) for p in parts]
    return Target(link=link, upstream="/".join([prefix, *segments]), mount=mount,
                  root=not any(segments))


#: Characters a query part keeps as they came (escapes included); any other byte is escaped.
_QUERY_SAFE = "!$'()*+,;=:@/?%~-._"


def split_query(query: bytes) -> tuple[str | None, str]:
    """A link token given as ``?token=``, and the rest of the query as it came (bytes that
    may not stand in a URL escaped)."""
    if len(query) > MAX_QUERY:
        raise BadPath("query too long")
    token = None
    kept = []
    for part in query.split(b"&"):
        if not part:
            continue
        name, _, value = part.decode("latin-1").partition("=")
        if unquote_plus(name) == "token":
            token = token if token is not None else unquote_plus(value)
            continue
        kept.append(quote_from_bytes(part, safe=_QUERY_SAFE))
    return token, "&".join(kept)


_DOT = re.compile(r"%2e", re.IGNORECASE)


def location_inside(location: str, upstream_path: str, cluster_id: str) -> bool:
    """Whether a redirect the scheduler sent stays inside its dashboard, resolved as a
    browser would (relative to the request, ``%2e`` as a dot): it is passed on unchanged
    when it does; otherwise the proxy refuses it (no open redirect from the service)."""
    if len(location) > MAX_PATH or any(c <= " " or c in "\\\x7f" for c in location):
        return False
    parts = urlsplit(location)
    if parts.scheme or parts.netloc or location.startswith("//"):
        return False
    resolved = urljoin(upstream_path, _DOT.sub(".", parts.path))
    prefix = dashboard_prefix(cluster_id)
    return resolved == prefix or resolved.startswith(prefix + "/")
