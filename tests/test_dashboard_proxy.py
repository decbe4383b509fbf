"""Dashboards only through the service: its authenticated proxy, signed links, websockets, and
a real browser; the scheduler's own HTTPS port refuses everyone without the cluster's client
certificate, and no path through the proxy reaches the service's control routes."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect

from api.dashboard_auth import LINK, SESSION, sign, verify
from api.dashboard_paths import BadPath, location_inside, target
from api.dashboard_proxy import MAX_SOCKETS_PER_TENANT, TooManySockets, Upstreams
from provisioner.watch import client_context
from tests.intrusion import tls_without_client_certificate_refused
from tests.service import ServiceProcess, tenant, wait_until

#: Nothing here depends on the database: the SQLite pass covers it.
pytestmark = pytest.mark.state_agnostic

COOKIE = "provisioner-dashboard"
#: Debian's Chromium: the browser test drives it and never downloads a browser of its own.
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def clusters(service: ServiceProcess) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """A running cluster of alpha (one worker) and one of beta (none), shared by the module."""
    a = service.create("alpha", workers=1, project="dashboards")
    try:
        b = service.create("beta", workers=0, project="dashboards")
        try:
            yield a, b
        finally:
            with service.client("beta") as http:
                http.delete(f"/clusters/{b['id']}")
    finally:
        with service.client("alpha") as http:
            http.delete(f"/clusters/{a['id']}")


def prefix(service: ServiceProcess, cluster_id: str) -> str:
    return f"{service.url}/clusters/{cluster_id}/dashboard"


def link(service: ServiceProcess, name: str, cluster_id: str, **params: Any) -> dict[str, Any]:
    with service.client(name) as http:
        r = http.get(f"/clusters/{cluster_id}/dashboard-link", params=params)
    assert r.status_code == 200, r.text
    return r.json()


def browser(service: ServiceProcess) -> httpx.Client:
    """An HTTP client with no token, that keeps cookies and shows each redirect."""
    return httpx.Client(base_url=service.url, timeout=30, follow_redirects=False)


def session(service: ServiceProcess, name: str, cluster_id: str) -> str:
    """A browser session cookie's value on ``cluster_id``'s dashboard, from a signed link."""
    with browser(service) as b:
        assert b.get(link(service, name, cluster_id)["url"]).status_code == 303
        return b.cookies[COOKIE]


def bokeh_token(page: str) -> str:
    """The session token a Bokeh page gives its websocket (as a subprotocol)."""
    match = re.search(r'"token":"([A-Za-z0-9_.-]+)"', page)
    assert match, page[:500]
    return match[1]


def raw_get(service: ServiceProcess, path: str | bytes,
            token: str | None = "token-alpha") -> tuple[int, bytes]:
    """GET exactly ``path``, byte for byte: no client-side normalisation of dots or escapes."""
    target_bytes = path.encode() if isinstance(path, str) else path
    auth = f"Authorization: Bearer {token}\r\n".encode() if token else b""
    with socket.create_connection(("127.0.0.1", service.port), timeout=30) as conn:
        conn.sendall(b"GET " + target_bytes + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n" + auth
                     + b"Connection: close\r\n\r\n")
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


# -- the pieces, without a service -----------------------------------------------------------


def test_tokens_bind_purpose_tenant_cluster_and_expiry() -> None:
    key, now = b"k" * 32, time.time()
    token = sign(key, LINK, "alpha", "c-abc", int(now) + 60)
    assert verify(key, LINK, token, "c-abc", now) == "alpha"
    assert verify(key, LINK, token, "c-abd", now) is None          # another cluster
    assert verify(key, SESSION, token, "c-abc", now) is None       # a link is no session
    assert verify(b"x" * 32, LINK, token, "c-abc", now) is None    # another key (a restart)
    assert verify(key, LINK, token, "c-abc", now + 61) is None     # expired
    tenant, expiry, mac = token.split(".")
    assert verify(key, LINK, f"beta.{expiry}.{mac}", "c-abc", now) is None
    assert verify(key, LINK, f"{tenant}.{int(expiry) + 3600}.{mac}", "c-abc", now) is None
    flipped = mac[:-1] + ("A" if mac[-1] != "A" else "B")
    assert verify(key, LINK, f"{tenant}.{expiry}.{flipped}", "c-abc", now) is None
    for junk in ("", "alpha", "alpha.1.2", "..", "A" * 1000, token + ".", token.replace(".", "%2E")):
        assert verify(key, LINK, junk, "c-abc", now) is None


@pytest.mark.parametrize("raw", [
    b"/clusters/c-abc/dashboard/../../dask-provisioner/report",
    b"/clusters/c-abc/dashboard/%2e%2e/%2E%2E/dask-provisioner/report",
    b"/clusters/c-abc/dashboard/.%2e/dask-provisioner/report",
    b"/clusters/c-abc/dashboard/..%2f..%2fdask-provisioner/report",
    b"/clusters/c-abc/dashboard/status%2F..%2F..%2F..%2Fdask-provisioner%2Freport",
    b"/clusters/c-abc/dashboard/..%5c..%5cdask-provisioner/report",
    b"/clusters/c-abc/dashboard/t/token/../../../dask-provisioner/report",
    b"/clusters/c-abc/dashboard%2f..%2f..%2fdask-provisioner/report",
    b"/clusters/c-abc/dashboardx/status",
    b"/clusters/c-abd/dashboard/status",
    b"/dask-provisioner/report",
    b"/clusters/c-abc/dashboard/a%00b",
])
def test_refused_paths(raw: bytes) -> None:
    with pytest.raises(BadPath):
        target(raw, "c-abc")


@pytest.mark.parametrize(("raw", "upstream"), [
    (b"/clusters/c-abc/dashboard/status", "/clusters/c-abc/dashboard/status"),
    (b"/clusters/c-abc/dashboard/t/tok/status/ws", "/clusters/c-abc/dashboard/status/ws"),
    # A worker's page: its address, slashes encoded, stays one segment.
    (b"/clusters/c-abc/dashboard/info/worker/tls%3A%2F%2F127.0.0.1%3A1.html",
     "/clusters/c-abc/dashboard/info/worker/tls:%2F%2F127.0.0.1:1.html"),
    # Encoded twice: decoded once, encoded again, so the scheduler sees a literal "%2e".
    (b"/clusters/c-abc/dashboard/%252e%252e/x", "/clusters/c-abc/dashboard/%252e%252e/x"),
    (b"/clusters/c-abc/dashboard/a b/%7e", "/clusters/c-abc/dashboard/a%20b/~"),
])
def test_upstream_paths_stay_under_the_prefix(raw: bytes, upstream: str) -> None:
    assert target(raw, "c-abc").upstream == upstream


def test_redirects_pass_only_inside_the_dashboard() -> None:
    here = "/clusters/c-abc/dashboard/info/main/workers.html"
    for inside in ("status", "../../status", "/clusters/c-abc/dashboard/status", "?x=1"):
        assert location_inside(inside, here, "c-abc"), inside
    for outside in ("https://evil.example/", "//evil.example/x", "/\\evil.example", "/clusters/c-abd/",
                    "../../../../dask-provisioner/report", "%2e%2e/%2e%2e/%2e%2e/x", "/tenants/me",
                    "javascript:alert(1)", " /x"):
        assert not location_inside(outside, here, "c-abc"), outside


def test_websockets_are_bounded_per_tenant() -> None:
    pool = Upstreams(records=None)  # type: ignore[arg-type]
    with contextlib.ExitStack() as held:
        for _ in range(MAX_SOCKETS_PER_TENANT):
            held.enter_context(pool.socket_slot("alpha"))
        with pytest.raises(TooManySockets):
            held.enter_context(pool.socket_slot("alpha"))
        with pool.socket_slot("beta"):  # another tenant is not held back
            pass
    with pool.socket_slot("alpha"):  # all given back
        pass


# -- through the service ---------------------------------------------------------------------


def test_the_tenants_token_reaches_the_dashboard_and_its_assets(
    service: ServiceProcess, clusters: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    a, _ = clusters
    base = prefix(service, a["id"])
    assert a["dashboard_url"] == f"{base}/status"
    with service.client("alpha") as http:
        page = http.get(a["dashboard_url"])
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "Dask" in page.text and "set-cookie" not in page.headers  # a bearer needs no session
        assert page.headers["referrer-policy"] == "same-origin"
        # Bokeh's own script, by the path the page names (the scheduler serves it under the
        # same prefix, so nothing was rewritten).
        (script,) = re.findall(r'src="(/clusters/[^"]+/static/js/bokeh\.min\.js\?v=[0-9a-f]+)"',
                               page.text)
        js = http.get(script)
        assert js.status_code == 200 and "javascript" in js.headers["content-type"]
        assert len(js.content) > 100_000
        head = http.head(script)
        assert head.status_code == 200 and head.content == b""
        assert int(head.headers["content-length"]) == len(js.content)
        plots = http.get(f"{base}/individual-plots.json")
        assert plots.status_code == 200 and "Individual Task Stream" in plots.json()
        # The scheduler answers for itself, e.g. a page it does not have, or a POST it refuses.
        assert http.get(f"{base}/no-such-page").status_code == 404
        post = http.post(f"{base}/status", content=b"x" * 100)
        assert post.status_code == 405 and "<html>" in post.text
        assert http.put(f"{base}/status").status_code == 405  # not forwarded at all
        # The bare prefix sends a browser to the landing page.
        for root in (base, f"{base}/"):
            r = http.get(root)
            assert r.status_code == 307 and r.headers["location"] == urlsplit(f"{base}/status").path


def test_another_tenant_or_no_credentials_are_refused(
    service: ServiceProcess, clusters: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    a, _ = clusters
    url = a["dashboard_url"]
    nowhere = url.replace(a["id"], "c-000000000000")
    with service.client("beta") as beta:
        theirs, missing = beta.get(url), beta.get(nowhere)
        assert theirs.status_code == missing.status_code == 404
        # Exactly as for a cluster that does not exist.
        assert theirs.json()["detail"].replace(a["id"], "X") == \
            missing.json()["detail"].replace("c-000000000000", "X")
        assert beta.get(f"/clusters/{a['id']}/dashboard-link").status_code == 404
    with service.client(None) as anonymous:
        for target_url in (url, nowhere, f"{prefix(service, a['id'])}/static/js/bokeh.min.js"):
            r = anonymous.get(target_url)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", r.text
        assert anonymous.get(f"/clusters/{a['id']}/dashboard-link").status_code == 401
    with service.client(None, token="not-a-token") as wrong:
        assert wrong.get(url).status_code == 401


def test_a_signed_link_opens_a_browser_session(
    service: ServiceProcess, clusters: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    a, b = clusters
    base = prefix(service, a["id"])
    signed = link(service, "alpha", a["id"])
    assert signed["url"].startswith(f"{base}/status?token=alpha.")
    assert signed["path_url"].startswith(f"{base}/t/alpha.")
    assert 0 < signed["expires_at"] - time.time() <= 900 + 5
    with browser(service) as b1:
        r = b1.get(signed["url"])
        # The token is traded for a session and dropped from the address.
        assert r.status_code == 303 and r.headers["location"] == urlsplit(f"{base}/status").path
        cookie = r.headers["set-cookie"]
        assert cookie.startswith(f"{COOKIE}=alpha.")
        attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")[1:]}
        assert {"httponly", "samesite", "path", "max-age"} <= attributes
        assert "SameSite=Lax" in cookie and f"Path=/clusters/{a['id']}/dashboard/" in cookie
        value = b1.cookies[COOKIE]
        assert "token-alpha" not in cookie and signed["url"].split("token=")[1] not in cookie
        page = b1.get(r.headers["location"])
        assert page.status_code == 200 and "Dask" in page.text
        (script,) = re.findall(r'src="(/clusters/[^"]+/static/js/bokeh\.min\.js\?v=[0-9a-f]+)"',
                               page.text)
        assert b1.get(script).status_code == 200
        assert b1.get(f"{base}/individual-plots.json").status_code == 200
        assert "set-cookie" not in page.headers  # a session is not renewed on every asset
        # The session is for this cluster's dashboard only: not the API, not another cluster.
        assert b1.get(f"{service.url}/clusters/{a['id']}").status_code == 401
    with browser(service) as b2:
        sent = {"Cookie": f"{COOKIE}={value}"}
        assert b2.get(f"{service.url}/clusters/{a['id']}", headers=sent).status_code == 401
        other = b2.get(prefix(service, b["id"]) + "/status", headers=sent)
        assert other.status_code == 401
        # A session is no link either.
        assert b2.get(f"{base}/status?token={value}").status_code == 401
        # A page of the same origin can add cookies of the same name; the valid one still counts.
        r = b2.get(f"{base}/status", headers={"Cookie": f"{COOKIE}=junk; {COOKIE}={value}"})
        assert r.status_code == 200


def test_a_link_in_the_path_serves_tools_that_append_pages(
    service: ServiceProcess, clusters: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    """The JupyterLab Dask extension checks ``<url>/individual-plots.json`` from the server,
    without cookies, and its iframes load ``<url>/individual-...`` in the browser."""
    a, _ = clusters
    path_url = link(service, "alpha", a["id"])["path_url"]
    with browser(service) as b:
        plots = b.get(f"{path_url}/individual-plots.json")
        assert plots.status_code == 200 and "Individual Task Stream" in plots.json()
        assert plots.headers["set-cookie"].startswith(f"{COOKIE}=alpha.")
    with browser(service) as b:
        page = b.get(f"{path_url}/individual-task-stream")
        assert page.status_code == 200 and "bokeh" in page.text.lower()
        r = b.get(path_url)
        assert r.status_code == 307 and r.headers["location"] == urlsplit(f"{path_url}/status").path


def test_tampered_foreign_and_expired_links_are_refused(
    service: ServiceProcess, clusters: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    a, b = clusters
    short = link(service, "alpha", a["id"], ttl=10)
    token = short["url"].split("token=")[1]
    tenant, expiry, mac = token.split(".")
    base = prefix(service, a["id"])
    forged = [
        f"{tenant}.{expiry}.{mac[:-1]}{'A' if mac[-1] != 'A' else 'B'}",  # tampered MAC
        f"beta.{expiry}.{mac}",                                           # another tenant
        f"{tenant}.{int(expiry) + 86400}.{mac}",                          # a later expiry
        link(service, "beta", b["id"])["url"].split("token=")[1],         # beta's, for its own
        "garbage", "", "x" * 5000,
    ]
    refusals = set()
    with browser(service) as anonymous:
        for bad in forged:
            for url in (f"{base}/status?token={bad}", f"{base}/t/{bad}/individual-plots.json"):
                r = anonymous.get(url)
                assert "set-cookie" not in r.headers
                if len(bad) > 1000:  # past the bounds of a path or a query: not a page at all
                    assert r.status_code == 404, (url, r.status_code, r.text)
                    continue
                assert r.status_code == 401, (url, r.status_code, r.text)
                refusals.add(r.text.replace(a["id"], "X"))
        # alpha's valid link on beta's cluster, and on one that does not exist: refused the
        # same way, saying nothing of either cluster.
        for cluster_id in (b["id"], "c-000000000000"):
            r = anonymous.get(f"{prefix(service, cluster_id)}/status?token={token}")
            assert r.status_code == 401
            refusals.add(r.text.replace(cluster_id, "X"))
        assert anonymous.get(short["url"]).status_code == 303  # the real one works, until ...
    assert len(refusals) == 1, refusals  # one answer for every bad link, whoever's cluster
    time.sleep(max(0.0, short["expires_at"] - time.time()) + 1.0)
    with browser(service) as late:
        for url in (short["url"], f"{short['path_url']}/individual-plots.json"):
            r = late.get(url)
            assert r.status_code == 401 and "expired" in r.json()["detail"], r.text
    with service.client("alpha") as http:
        for ttl in (0, 5, 86401, "soon"):
            r = http.get(f"/clusters/{a['id']}/dashboard-link", params={"ttl": ttl})
            assert r.status_code == 422 and "ttl" in r.json()["detail"], r.text


def _bokeh_pull(ws: ClientConnection) -> dict[str, Any]:
    """Bokeh's protocol: the server's ACK, then a document asked for and its reply header."""
    ack = json.loads(ws.recv(timeout=30))
    assert ack["msgtype"] == "ACK", ack
    ws.recv(timeout=10), ws.recv(timeout=10)  # its metadata and content
    ws.send(json.dumps({"msgid": "pull-1", "msgtype": "PULL-DOC-REQ"}))
    ws.send("{}")
    ws.send("{}")
    for _ in range(50):
        frame = ws.recv(timeout=30)
        if isinstance(frame, str) and '"reqid"' in frame:
            return json.loads(frame)
    raise AssertionError("no reply to PULL-DOC-REQ")


def test_the_dashboards_websocket_through_the_proxy(
    service: ServiceProcess, clusters: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    a, _ = clusters
    value = session(service, "alpha", a["id"])
    ws_base = prefix(service, a["id"]).replace("http://", "ws://")
    with browser(service) as b:
        page = b.get(f"{prefix(service, a['id'])}/status", headers={"Cookie": f"{COOKIE}={value}"})
        assert page.status_code == 200
    token = bokeh_token(page.text)
    headers = {"Cookie": f"{COOKIE}={value}"}
    with ws_connect(f"{ws_base}/status/ws", additional_headers=headers, origin=service.url,  # type: ignore[arg-type]
                    subprotocols=["bokeh", token], open_timeout=30) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == "bokeh"
        reply = _bokeh_pull(ws)
        assert reply["msgtype"] == "PULL-DOC-REPLY" and reply["reqid"] == "pull-1"
    # API clients use their token; another tenant, no credentials, or a page of another site
    # (which a session cookie must not let in) are refused at the handshake.
    with ws_connect(f"{ws_base}/status/ws", subprotocols=["bokeh", token],  # type: ignore[list-item]
                    additional_headers={"Authorization": "Bearer token-alpha"}) as ws:
        assert json.loads(ws.recv(timeout=30))["msgtype"] == "ACK"
    refused = [
        ({"Authorization": "Bearer token-beta"}, None, 404),
        ({}, None, 401),
        (headers, "http://evil.example", 403),
        ({"Cookie": f"{COOKIE}={value}x"}, None, 401),
    ]
    for extra, origin, status in refused:
        with pytest.raises(InvalidStatus) as info:
            ws_connect(f"{ws_base}/status/ws", additional_headers=extra, origin=origin,  # type: ignore[arg-type]
                       open_timeout=30)
        assert info.value.response.status_code == status, (extra, origin)
    with pytest.raises(InvalidStatus) as info:
        ws_connect(f"{ws_base}/%2e%2e/%2e%2e/dask-provisioner/report",
                   additional_headers={"Authorization": "Bearer token-alpha"}, open_timeout=30)
    assert info.value.response.status_code == 404


def test_the_schedulers_https_port_wants_the_clusters_own_client_certificate(
    service: ServiceProcess, clusters: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    a, b = clusters
    upstream = service.upstream(a["id"])
    host, port = urlsplit(upstream).hostname, urlsplit(upstream).port
    with service.client("alpha") as http:
        mine = http.get(f"/clusters/{a['id']}/credentials").json()
    with service.client("beta") as http:
        theirs = http.get(f"/clusters/{b['id']}/credentials").json()
    # The cluster's own client certificate is let in (what the service uses): the test can tell.
    own = client_context({"ca": mine["tls_ca"], "cert": mine["tls_cert"], "key": mine["tls_key"]})
    with httpx.Client(verify=own, timeout=30, trust_env=False) as direct:
        assert direct.get(f"{upstream}/clusters/{a['id']}/dashboard/status").status_code == 200
    # No client certificate: the TLS handshake is refused.
    tls_without_client_certificate_refused(f"tls://{host}:{port}", mine["tls_ca"])
    # Another cluster's client certificate (trusting this cluster's CA): refused as well.
    foreign = client_context({"ca": mine["tls_ca"], "cert": theirs["tls_cert"], "key": theirs["tls_key"]})
    with httpx.Client(verify=foreign, timeout=30, trust_env=False) as direct, \
            pytest.raises(httpx.TransportError):
        direct.get(f"{upstream}/clusters/{a['id']}/dashboard/status")
    # Plain HTTP on that port gets nothing either.
    with httpx.Client(timeout=30, trust_env=False) as plain, pytest.raises(httpx.TransportError):
        plain.get(f"http://{host}:{port}/clusters/{a['id']}/dashboard/status")


TRAVERSALS = [
    "/clusters/{id}/dashboard/../../dask-provisioner/report",
    "/clusters/{id}/dashboard/status/../../../../dask-provisioner/report",
    "/clusters/{id}/dashboard/%2e%2e/%2e%2e/dask-provisioner/report",
    "/clusters/{id}/dashboard/.%2E/.%2E/dask-provisioner/report",
    "/clusters/{id}/dashboard/..%2f..%2fdask-provisioner%2freport",
    "/clusters/{id}/dashboard/..%2F..%2F..%2Fdask-provisioner/report",
    "/clusters/{id}/dashboard%2f..%2f..%2fdask-provisioner/report",
    "/clusters/{id}/dashboard/%252e%252e/%252e%252e/dask-provisioner/report",
    "/clusters/{id}/dashboard/..\\..\\dask-provisioner/report",
    "/clusters/{id}/dashboard/..%5c..%5cdask-provisioner/report",
    "/clusters/{id}/dashboard//../../dask-provisioner/report",
    "/clusters/{id}/dashboard/t/x/../../../dask-provisioner/report",
    "/clusters/{id}/dashboard/%2e%2e%2f%2e%2e%2fdask-provisioner%2freport?version=0&timeout=0",
    "/clusters/{id}/dashboard/../dashboard/../../dask-provisioner/workers-to-close?n=1",
    "/dask-provisioner/report",
]


def test_no_path_through_the_proxy_reaches_the_control_routes(
    service: ServiceProcess, clusters: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    a, _ = clusters
    # The control routes are there on the scheduler (for the service's own certificate), so
    # a path that reached them would show it.
    with service.client("alpha") as http:
        mine = http.get(f"/clusters/{a['id']}/credentials").json()
    own = client_context({"ca": mine["tls_ca"], "cert": mine["tls_cert"], "key": mine["tls_key"]})
    with httpx.Client(verify=own, timeout=30, trust_env=False) as direct:
        report = direct.get(f"{service.upstream(a['id'])}/dask-provisioner/report",
                            params={"version": -1, "timeout": 0})
        assert report.status_code == 200 and "adaptive_target" in report.text
    for path in TRAVERSALS:
        status, body = raw_get(service, path.format(id=a["id"]))
        assert status in (400, 404), (path, status, body[:300])
        assert b"adaptive_target" not in body and b'"names"' not in body, (path, body[:300])


def test_odd_bytes_get_a_clear_answer_never_a_500(
    service: ServiceProcess, clusters: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    a, _ = clusters
    base = f"/clusters/{a['id']}/dashboard".encode()
    # Raw bytes a URL may not hold: the HTTP server itself may refuse them (400) first.
    cases = [
        (base + b"/status?x=%E9&y=%00&z=%3C%3E", {200}),   # passed on as they came
        (base + b"/status?x=\xe9&z=<>", {200, 400}),        # escaped on the way, or refused
        (base + b"/st%E9tus", {404}),                       # the scheduler's own 404
        (base + b"/st\xe9tus", {400, 404}),
        (base + b"/status?" + b"a" * 5000, {404}),          # query past its bound
        (base + b"/" + b"a/" * 2100, {404}),                # path past its bound
    ]
    for path, statuses in cases:
        got, body = raw_get(service, path)
        assert got in statuses, (path[:80], got, body[:300])
    # A link that is no token at all, and nothing else to go by.
    for path, statuses in ((base + b"/t/%FF%FE/status", {401}),
                           (base + b"/t/\xff\xfe/status", {400, 401})):
        got, body = raw_get(service, path, token=None)
        assert got in statuses, (path[:80], got, body[:300])


def test_unreachable_then_stopped_dashboards(service: ServiceProcess) -> None:
    """A scheduler that does not answer is a 502 with a clear message; a websocket is closed
    when the cluster stops; a stopped cluster's dashboard is a 409."""
    c = service.create("alpha", workers=0, project="dashboards-stop")
    cid = c["id"]
    ws_url = prefix(service, cid).replace("http://", "ws://") + "/status/ws"
    bearer = {"Authorization": "Bearer token-alpha"}
    try:
        scheduler = service.processes_of(cid)[0]  # the scheduler comes first
        os.kill(scheduler.pid, signal.SIGSTOP)  # accepts connections, answers nothing
        try:
            with service.client("alpha") as http:
                r = http.get(c["dashboard_url"])
            assert r.status_code == 502, r.text
            assert r.json()["detail"].startswith(f"the dashboard of cluster {cid} cannot be reached")
            with pytest.raises(InvalidStatus) as info:
                ws_connect(ws_url, additional_headers=bearer, open_timeout=60)
            assert info.value.response.status_code == 502
        finally:
            os.kill(scheduler.pid, signal.SIGCONT)
        with service.client("alpha") as http:
            wait_until(lambda: http.get(c["dashboard_url"]).status_code == 200, timeout=60,
                       what="the dashboard back")
            page = http.get(c["dashboard_url"]).text
        with ws_connect(ws_url, additional_headers=bearer, open_timeout=30,
                        subprotocols=["bokeh", bokeh_token(page)]) as ws:  # type: ignore[list-item]
            assert json.loads(ws.recv(timeout=30))["msgtype"] == "ACK"
            with service.client("alpha") as http:
                http.delete(f"/clusters/{cid}")
            with pytest.raises(ConnectionClosed):  # the scheduler went away: so does the socket
                for _ in range(10_000):
                    ws.recv(timeout=60)
    finally:
        with service.client("alpha") as http:
            http.delete(f"/clusters/{cid}")
    with service.client("alpha") as http:
        wait_until(lambda: http.get(f"/clusters/{cid}").json()["status"] == "stopped", timeout=60,
                   what="stopped")
        assert http.get(f"/clusters/{cid}").json()["dashboard_url"] is None
        r = http.get(c["dashboard_url"])
        assert r.status_code == 409 and "stopped" in r.json()["detail"], r.text
        r = http.get(f"/clusters/{cid}/dashboard-link")
        assert r.status_code == 409 and "stopped" in r.json()["detail"], r.text


def test_public_url_and_a_plain_http_scheduler(make_service: Callable[..., ServiceProcess]) -> None:
    """Behind a proxy the service is reached at PROVISIONER_PUBLIC_URL: links are built on it,
    its HTTPS makes the session cookie Secure, and only its pages may open websockets. With
    --no-tls the scheduler serves plain HTTP, proxied the same way."""
    public = "https://dask.example.com"
    svc = make_service([tenant("alpha")], args=["--no-tls"],
                       env={"PROVISIONER_PUBLIC_URL": public}).start()
    c = svc.create("alpha", workers=0)
    try:
        assert c["tls"] is False and svc.upstream(c["id"]).startswith("http://127.0.0.1:")
        assert c["dashboard_url"] == f"{public}/clusters/{c['id']}/dashboard/status"
        signed = link(svc, "alpha", c["id"])
        assert signed["url"].startswith(f"{public}/clusters/{c['id']}/dashboard/status?token=")
        with browser(svc) as b:
            r = b.get(signed["url"].removeprefix(public))  # as the proxy in front passes it on
            assert r.status_code == 303 and "; Secure" in r.headers["set-cookie"]
            page = b.get(r.headers["location"], headers={"Cookie": f"{COOKIE}={b.cookies[COOKIE]}"})
            assert page.status_code == 200 and "Dask" in page.text
        ws_url = prefix(svc, c["id"]).replace("http://", "ws://") + "/status/ws"
        bearer = {"Authorization": "Bearer token-alpha"}
        with ws_connect(ws_url, additional_headers=bearer, origin=public, open_timeout=30,  # type: ignore[arg-type]
                        subprotocols=["bokeh", bokeh_token(page.text)]) as ws:  # type: ignore[list-item]
            assert json.loads(ws.recv(timeout=30))["msgtype"] == "ACK"
        with pytest.raises(InvalidStatus) as info:
            ws_connect(ws_url, additional_headers=bearer, origin=svc.url, open_timeout=30)  # type: ignore[arg-type]
        assert info.value.response.status_code == 403
    finally:
        with svc.client("alpha") as http:
            http.delete(f"/clusters/{c['id']}")


# -- a real browser ----------------------------------------------------------------------------


def _not_blank(path: Path) -> tuple[int, float]:
    """How many colours the screenshot has, and which share of it is not the background."""
    from PIL import Image

    with Image.open(path) as image:
        rgb = image.convert("RGB")
        colours = rgb.getcolors(maxcolors=1 << 20) or []
    background = max(colours)[1] if colours else None
    total = rgb.width * rgb.height
    other = sum(n for n, colour in colours if colour != background)
    return len(colours), other / total


def test_a_browser_renders_the_dashboard_from_a_signed_link(
    service: ServiceProcess, clusters: tuple[dict[str, Any], dict[str, Any]], tmp_path: Path
) -> None:
    """Headless Chromium opens the link a tenant would click: the session is set, the Bokeh
    dashboard renders on canvases, its websocket stays open and receives data."""
    assert os.access(CHROMIUM, os.X_OK), (
        f"{CHROMIUM} is missing: the browser test needs Debian's 'chromium' package "
        "(bash scripts/test installs it when run as root)")
    from playwright.sync_api import sync_playwright

    a, _ = clusters
    signed = link(service, "alpha", a["id"])
    failures: list[str] = []
    sockets: list[dict[str, Any]] = []

    def on_socket(ws: Any) -> None:
        seen: dict[str, Any] = {"url": ws.url, "frames": 0, "closed": False}
        sockets.append(seen)
        ws.on("framereceived", lambda _: seen.__setitem__("frames", seen["frames"] + 1))
        ws.on("socketerror", lambda error: failures.append(f"websocket error: {error}"))
        ws.on("close", lambda _: seen.__setitem__("closed", True))

    def on_response(response: Any) -> None:
        if response.url.startswith(service.url) and response.status >= 400:
            failures.append(f"{response.status} {response.url}")

    def on_failed(request: Any) -> None:
        if request.url.startswith(service.url):
            failures.append(f"failed {request.url}: {request.failure}")

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_ARGS, timeout=120_000, viewport={"width": 1280, "height": 900})
        try:
            page = context.new_page()
            page.on("websocket", on_socket)
            page.on("response", on_response)
            page.on("requestfailed", on_failed)
            page.goto(signed["url"], wait_until="load", timeout=120_000)
            # Redirected to the page without the token, with a session cookie.
            assert page.url == a["dashboard_url"], page.url
            (cookie,) = [c for c in context.cookies() if c["name"] == COOKIE]
            assert cookie["httpOnly"] and cookie["sameSite"] == "Lax"
            assert cookie["path"] == f"/clusters/{a['id']}/dashboard/"
            # Bokeh has built its document and drawn its plots on canvases.
            page.wait_for_function(
                "() => window.Bokeh && Bokeh.documents.length > 0"
                " && Bokeh.documents[0].roots().length > 0", timeout=120_000)
            page.wait_for_selector("canvas", state="attached", timeout=120_000)
            wait_until(lambda: any(s["frames"] > 0 for s in sockets), timeout=60,
                       what="data on the dashboard's websocket")
            page.wait_for_timeout(1500)  # let the periodic updates draw
            shot = tmp_path / "dashboard.png"
            page.screenshot(path=str(shot))
            canvases = page.locator("canvas").count()
            seen = [dict(s) for s in sockets]  # before closing the browser closes them
        finally:
            context.close()
    (ws,) = [s for s in seen if s["url"].endswith(f"/clusters/{a['id']}/dashboard/status/ws")]
    assert ws["frames"] > 0 and not ws["closed"], ws
    assert not failures, failures
    assert canvases >= 3, canvases
    colours, drawn = _not_blank(shot)
    assert colours >= 16 and drawn >= 0.05, (colours, drawn, shot)
