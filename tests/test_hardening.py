"""What a hostile local user or client tries next: reading the service's files, a copy of its
database, its metrics and health, and holding its sockets with slow requests."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from cryptography.fernet import Fernet
from distributed import Client

from provisioner.files import SecretFileError, keep_secret, private_data_dir
from provisioner.secrets import Keyring
from provisioner.settings import Settings
from provisioner.store import clusters_table
from provisioner.tls import cluster_credentials
from tests.service import ServiceProcess, tenant, wait_until

MakeService = Callable[..., ServiceProcess]


def raw_request(port: int, method: bytes, path: bytes, headers: list[bytes],
                body: bytes = b"") -> tuple[int, bytes]:
    """One request on a socket of its own, bytes exactly as given (no client tidies them);
    the status and the body of the answer."""
    head = [method + b" " + path + b" HTTP/1.1", b"Host: test", b"Connection: close", *headers]
    if body:
        head.append(b"Content-Length: %d" % len(body))
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"\r\n".join(head) + b"\r\n\r\n" + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


# --------------------------------------------------------------------------------------------
# Secrets at rest
# --------------------------------------------------------------------------------------------


def _private(path: Path) -> bool:
    return stat.S_IMODE(path.lstat().st_mode) & 0o077 == 0


def test_data_folder_and_every_file_the_service_makes_are_its_users_alone(
    make_service: MakeService,
) -> None:
    """Before: the SQLite -wal and -shm files were 0644 in a 0755 folder, so any local user
    could read every cluster's client key."""
    svc = make_service([tenant("acme")], sqlite=True).start()
    cluster = svc.create("acme", workers=1)
    try:
        assert svc.security("acme", cluster["id"]) is not None  # a read of the credentials
        assert _private(svc.data_dir) and stat.S_IMODE(svc.data_dir.stat().st_mode) == 0o700
        made: list[Path] = []
        for root, dirs, files in os.walk(svc.data_dir):
            here = Path(root)
            if here == svc.data_dir / "clusters":
                dirs.clear()  # the cluster processes' own folders: theirs, not the service's
            made += [here / d for d in dirs] + [here / f for f in files]
        names = {p.name for p in made}
        assert {"provisioner.db", "provisioner.db-wal", "provisioner.db-shm", "secret.key",
                "metrics-token", "clusters"} <= names, names
        assert [str(p) for p in made if not _private(p)] == []
    finally:
        with svc.client("acme") as http:
            http.delete(f"/clusters/{cluster['id']}")


def test_a_data_folder_left_open_by_an_earlier_release_is_closed(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    os.chmod(data, 0o755)
    old = data / "provisioner.db-wal"
    old.write_text("old")
    os.chmod(old, 0o644)
    private_data_dir(data)
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert stat.S_IMODE(old.stat().st_mode) == 0o600


def test_kept_secrets_are_made_once_0600_and_an_empty_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "token"
    first = keep_secret(path, lambda: "s3cret")
    assert first == "s3cret" and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert keep_secret(path, lambda: "other") == "s3cret"  # never overwritten
    assert sorted(p.name for p in path.parent.iterdir()) == ["token"]  # nothing left aside
    path.write_text("\n")
    # An empty metrics token would let "Authorization: Bearer " in.
    with pytest.raises(SecretFileError, match="token is empty"):
        keep_secret(path, lambda: "never")


def test_derived_keys_are_per_label_and_per_secret() -> None:
    key = Fernet.generate_key()
    ring = Keyring(key)
    links = ring.derive("dashboard-links")
    assert len(links) == 32 and links == Keyring(key).derive("dashboard-links")
    assert links != ring.derive("other-purpose")
    assert links != Keyring(Fernet.generate_key()).derive("dashboard-links")
    assert links not in (key, Fernet(key)._signing_key, Fernet(key)._encryption_key)
    with pytest.raises(ValueError):
        ring.derive("")
    sealed = ring.encrypt_json({"a": "PRIVATE KEY"})
    assert "PRIVATE" not in sealed and ring.decrypt_json(sealed) == {"a": "PRIVATE KEY"}


def test_a_copy_of_the_database_holds_no_credentials(service: ServiceProcess) -> None:
    cluster = service.create("alpha", workers=1)
    try:
        ((raw,),) = service.sql("select credentials from clusters where id = :id", id=cluster["id"])
        text = raw if isinstance(raw, str) else repr(raw)
        assert "PRIVATE KEY" not in text and "BEGIN" not in text, text[:200]
        if service.state.startswith("sqlite:///"):  # the files themselves, WAL included
            db = Path(service.state.removeprefix("sqlite:///"))
            for path in db.parent.glob(db.name + "*"):
                assert b"PRIVATE KEY" not in path.read_bytes(), path
        # Nor does anyone without a token learn of it from /healthz.
        with service.client(None) as http:
            assert http.get("/healthz").json() == {"status": "ok", "backend": "local"}
        # Yet the owner still gets them, and they work.
        with service.client("alpha") as http:
            creds = http.get(f"/clusters/{cluster['id']}/credentials").json()
        assert "PRIVATE KEY" in creds["tls_key"] and creds["tls_ca"].startswith("-----BEGIN")
        with Client(cluster["scheduler_address"], security=service.security("alpha", cluster["id"]),
                    timeout=30) as client:
            assert client.submit(sum, [1, 2, 3]).result(timeout=30) == 6
    finally:
        with service.client("alpha") as http:
            http.delete(f"/clusters/{cluster['id']}")


def _insert_in_clear(svc: ServiceProcess, cluster_id: str, tenant_name: str) -> dict[str, str]:
    """A stopped cluster's row exactly as the previous release wrote it: credentials in clear."""
    creds = cluster_credentials(cluster_id)
    engine = sa.create_engine(svc.state)
    try:
        with engine.begin() as conn:
            conn.execute(clusters_table.insert().values(
                id=cluster_id, tenant=tenant_name, project="old", status="stopped",
                worker_cores=1.0, worker_memory=2**29, scheduler_cores=0.5,
                scheduler_memory=2**28, workers_requested=0, workers_running=0,
                idle_timeout=60.0, no_client_timeout=60.0, env={}, wanted="running",
                stop_reason="user", created_at=1.0, stopped_at=2.0, backend_state={},
                credentials=creds))
    finally:
        engine.dispose()
    return creds


def test_credentials_of_an_earlier_release_are_sealed_at_start(make_service: MakeService) -> None:
    svc = make_service([tenant("acme")]).start()
    assert svc.signal(15) == 0
    creds = _insert_in_clear(svc, "c-0123456789ab", "acme")
    svc.start()
    ((raw,),) = svc.sql("select credentials from clusters where id = 'c-0123456789ab'")
    assert isinstance(raw, str) and "PRIVATE KEY" not in raw and "BEGIN" not in raw
    with svc.client("acme") as http:
        got = http.get("/clusters/c-0123456789ab/credentials")
        assert got.status_code == 200, got.text
        assert got.json()["tls_key"] == creds["client_key"]
        assert got.json()["tls_ca"] == creds["ca"]
    assert "encrypted the credentials of 1 cluster(s)" in svc.log.read_text()


def _serve_once(svc: ServiceProcess, **env: str) -> subprocess.CompletedProcess[str]:
    """Start ``svc``'s command expecting a start-up error (bounded: it must not serve)."""
    return subprocess.run(svc.command(), capture_output=True, text=True, timeout=60,
                          env={**os.environ, **svc.env, **env})


def test_a_wrong_or_missing_key_stops_start_up_naming_the_setting(
    make_service: MakeService,
) -> None:
    svc = make_service([tenant("acme")]).start()
    cluster = svc.create("acme", workers=0)
    assert svc.signal(15) == 0
    key_file = svc.data_dir / "secret.key"
    key = key_file.read_text().strip()

    def refused(result: subprocess.CompletedProcess[str], *expected: str) -> None:
        assert result.returncode == 2, result.stderr[-2000:]
        assert "Traceback" not in result.stderr, result.stderr[-2000:]
        for text in expected:
            assert text in result.stderr, result.stderr[-2000:]

    refused(_serve_once(svc, PROVISIONER_SECRET_KEY=Fernet.generate_key().decode()),
            "PROVISIONER_SECRET_KEY", "cannot be decrypted", cluster["id"])
    refused(_serve_once(svc, PROVISIONER_SECRET_KEY="not-a-key"),
            "PROVISIONER_SECRET_KEY: not a Fernet key")
    key_file.unlink()
    refused(_serve_once(svc), "secret_key_file", "did not exist", "cannot be decrypted")
    assert not key_file.exists()  # no new key left behind to mislead the next start
    key_file.write_text("")
    refused(_serve_once(svc), "secret.key is empty")
    other = svc.workdir / "elsewhere.key"
    other.write_text(Fernet.generate_key().decode())
    refused(_serve_once(svc, PROVISIONER_SECRET_KEY_FILE=str(other)),
            f"secret_key_file {other}", "cannot be decrypted")

    # The right key from the environment: serving, with the credentials readable.
    key_file.unlink()
    svc.env["PROVISIONER_SECRET_KEY"] = key
    svc.start()
    with svc.client("acme") as http:
        r = http.get(f"/clusters/{cluster['id']}/credentials")
        assert r.status_code == 200 and "PRIVATE KEY" in r.json()["tls_key"], r.text
    assert not key_file.exists()  # the environment's key is used; no file is made


# --------------------------------------------------------------------------------------------
# /metrics and /healthz
# --------------------------------------------------------------------------------------------


@pytest.mark.state_agnostic
def test_metrics_need_a_token_even_when_none_was_set(service: ServiceProcess) -> None:
    """No PROVISIONER_METRICS_TOKEN: the service made one (0600 in its data folder)."""
    token_file = service.data_dir / "metrics-token"
    token = token_file.read_text().strip()
    assert len(token) >= 40 and _private(token_file)
    wrong = [b"", b"Bearer", b"Bearer ", b"Bearer token-alpha", b"Bearer " + token[:-1].encode(),
             b"Bearer " + token.encode() + b"x", b"Basic " + token.encode(),
             b"Bearer  " + token.encode(), b"Bearer \xe9\xff" + token.encode()]
    for value in [None, *wrong]:
        headers = [] if value is None else [b"Authorization: " + value]
        status, body = raw_request(service.port, b"GET", b"/metrics", headers)
        assert status == 401, (value, status, body)
        assert b"provisioner_" not in body and b"alpha" not in body
    status, body = raw_request(service.port, b"GET", b"/metrics",
                               [b"Authorization: Bearer " + token.encode()])
    assert status == 200 and b"provisioner_cores" in body


@pytest.mark.parametrize("value", ["", "  ", "\n"])
def test_a_blank_metrics_token_means_none_given(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    """A blank variable must not become the empty token that "Bearer " would match."""
    monkeypatch.setenv("PROVISIONER_METRICS_TOKEN", value)
    monkeypatch.setenv("PROVISIONER_SECRET_KEY", value)
    settings = Settings()
    assert settings.metrics_token is None and settings.secret_key is None


# --------------------------------------------------------------------------------------------
# Slow and numerous clients
# --------------------------------------------------------------------------------------------

HEADER_TIMEOUT = 2.0
BODY_TIMEOUT = 3.0
#: How late a cut may come on a busy 2-core machine.
SLACK = 2.0


@pytest.fixture(scope="module", params=["h11", "httptools"])
def slow_service(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                 state_db: Callable[[], str | None]) -> Iterator[ServiceProcess]:
    """A service with short header and body limits, set by environment, per HTTP parser."""
    env = {"PROVISIONER_HEADER_TIMEOUT": str(HEADER_TIMEOUT),
           "PROVISIONER_BODY_TIMEOUT": str(BODY_TIMEOUT),
           "PROVISIONER_KEEP_ALIVE_TIMEOUT": "30", "PROVISIONER_HTTP_PARSER": request.param}
    svc = ServiceProcess(tmp_path_factory.mktemp(f"slow-{request.param}"), [tenant("acme")],
                         env=env, state=state_db())
    try:
        yield svc.start()
    finally:
        svc.cleanup()


def until_closed(sock: socket.socket, trickle: bytes = b"", every: float = 0.25,
                 give_up: float = 30) -> tuple[float, bytes]:
    """Send ``trickle`` one byte every ``every`` seconds (round and round) until the service
    closes the connection; how long that took and what it said meanwhile."""
    start = time.monotonic()
    said = b""
    sock.settimeout(every)
    sent = 0
    while time.monotonic() - start < give_up:
        try:
            if trickle:
                sock.send(trickle[sent % len(trickle):][:1])
                sent += 1
            chunk = sock.recv(65536)
            if not chunk:
                break
            said += chunk
        except TimeoutError:
            continue
        except OSError:  # reset: closed while we were still sending
            break
    else:
        raise AssertionError(f"still open after {give_up}s; it said {said!r}")
    return time.monotonic() - start, said


def connect(svc: ServiceProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", svc.port), timeout=30)


@pytest.mark.state_agnostic
def test_a_silent_connection_is_closed_after_the_header_timeout(slow_service: ServiceProcess) -> None:
    with connect(slow_service) as sock:
        took, said = until_closed(sock)
    assert HEADER_TIMEOUT - 0.3 < took < HEADER_TIMEOUT + SLACK and said == b""


@pytest.mark.state_agnostic
def test_headers_sent_a_byte_at_a_time_are_cut_off(slow_service: ServiceProcess) -> None:
    """A slowloris: a request line, then header bytes that never end."""
    with connect(slow_service) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        took, said = until_closed(sock, b"X-Padding: aaaaaaaaaaaaaaaaaaaa\r\n")
    assert HEADER_TIMEOUT - 0.3 < took < HEADER_TIMEOUT + SLACK, took
    assert said.startswith(b"HTTP/1.1 408 "), said


@pytest.mark.state_agnostic
def test_many_slow_clients_are_all_cut_off_while_others_are_served(
    slow_service: ServiceProcess,
) -> None:
    """What used to hold the service's sockets for ever: 100 half-sent requests at once."""
    held = [connect(slow_service) for _ in range(100)]
    try:
        for sock in held:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-Padding: a")
        start = time.monotonic()
        with slow_service.client(None) as http:
            assert http.get("/healthz").status_code == 200  # served meanwhile
        for sock in held:
            sock.settimeout(max(0.1, start + HEADER_TIMEOUT + SLACK - time.monotonic()))
            answer = sock.recv(65536)  # the 408, then the end of the connection
            while answer and (more := sock.recv(65536)):
                answer += more
            assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert time.monotonic() - start < HEADER_TIMEOUT + SLACK
    finally:
        for sock in held:
            sock.close()


@pytest.mark.state_agnostic
def test_a_kept_alive_connection_trickling_its_next_request_is_cut_off(
    slow_service: ServiceProcess,
) -> None:
    """The first request is quick and answered; the next one's headers must be quick too,
    although each byte of them resets the keep-alive timer."""
    with connect(slow_service) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200 "), first
        took, _ = until_closed(sock, b"GET /healthz HTTP/1.1\r\nX-Padding: bbbbbbbbbbbbb\r\n")
    assert HEADER_TIMEOUT - 0.3 < took < HEADER_TIMEOUT + SLACK, took


def _post_head(length: int) -> bytes:
    return (b"POST /clusters HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer token-acme\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % length)


@pytest.mark.state_agnostic
@pytest.mark.parametrize("trickle", [b"", b" "], ids=["no body", "a byte at a time"])
def test_a_body_sent_slowly_is_cut_within_the_body_timeout(
    slow_service: ServiceProcess, trickle: bytes,
) -> None:
    with connect(slow_service) as sock:
        sock.sendall(_post_head(1000) + b'{"workers": 0, "project": "slow"')
        took, said = until_closed(sock, trickle)
    assert BODY_TIMEOUT - 0.3 < took < BODY_TIMEOUT + SLACK, took
    head, _, body = said.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ") and b"connection: close" in head.lower(), said
    assert json.loads(body)["detail"] == f"body: not all sent within {BODY_TIMEOUT:g}s"
    with slow_service.client("acme") as http:  # nothing was made of it
        assert http.get("/clusters", params={"project": "slow"}).json()["clusters"] == []


@pytest.mark.state_agnostic
def test_a_body_too_big_without_a_length_is_refused_naming_the_body(
    slow_service: ServiceProcess,
) -> None:
    """Chunked, so the Content-Length check cannot see it: counted as it is read."""
    body = b'{"project": "' + b"a" * 70_000 + b'"}'
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 8192]), body[i:i + 8192])
                      for i in range(0, len(body), 8192)) + b"0\r\n\r\n"
    head = _post_head(0).replace(b"Content-Length: 0", b"Transfer-Encoding: chunked")
    with connect(slow_service) as sock:
        sock.sendall(head + chunks)
        _, said = until_closed(sock)
    status, _, rest = said.partition(b"\r\n")
    assert status.startswith(b"HTTP/1.1 422 "), said[:300]
    assert json.loads(rest.partition(b"\r\n\r\n")[2])["detail"] == \
        "body: request body larger than 65536 bytes"


@pytest.mark.state_agnostic
def test_a_long_poll_outlives_the_header_timeout(slow_service: ServiceProcess) -> None:
    """Its headers are in: however long ``?wait=`` holds it, the header limit is not its.
    The fork server is frozen meanwhile, so the cluster cannot start before it is thawed."""
    wait_until(lambda: slow_service.zygotes(), what="the fork server")
    zygote = slow_service.zygotes()[0]
    os.kill(zygote, signal.SIGSTOP)
    thaw = threading.Timer(HEADER_TIMEOUT + 1.5, os.kill, (zygote, signal.SIGCONT))
    try:
        with slow_service.client("acme") as http:
            r = http.post("/clusters", json={"workers": 0})
            assert r.status_code == 201 and r.json()["status"] in ("pending", "starting"), r.text
            cluster_id = r.json()["id"]
            try:
                thaw.start()
                start = time.monotonic()
                r = http.get(f"/clusters/{cluster_id}", params={"wait": 600})
                took = time.monotonic() - start
                assert r.status_code == 200 and r.json()["status"] == "running", r.text
                assert took > HEADER_TIMEOUT + 1, took
            finally:
                http.delete(f"/clusters/{cluster_id}")
    finally:
        thaw.cancel()
        os.kill(zygote, signal.SIGCONT)


@pytest.mark.state_agnostic
def test_past_max_connections_requests_are_answered_503(make_service: MakeService) -> None:
    svc = make_service([tenant("acme")], args=["--max-connections", "3"],
                       env={"PROVISIONER_HEADER_TIMEOUT": "120"}).start()

    def status() -> int:
        return httpx.get(svc.url + "/healthz", timeout=30).status_code

    held = [connect(svc) for _ in range(2)]
    try:
        assert status() == 200  # two held and this one: three
        held.append(connect(svc))
        assert status() == 503  # a fourth
    finally:
        for sock in held:
            sock.close()
    wait_until(lambda: status() == 200, timeout=30, what="served again once they are gone")
