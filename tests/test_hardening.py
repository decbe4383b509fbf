"""What a hostile local user or client tries next: reading the service's files, a copy of its
database, its metrics and health, and holding its sockets with slow requests."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa
from cryptography.fernet import Fernet
from distributed import Client

from provisioner.files import SecretFileError, keep_secret, private_data_dir
from provisioner.secrets import Keyring
from provisioner.settings import Settings
from provisioner.store import clusters_table
from provisioner.tls import cluster_credentials
from tests.service import ServiceProcess, tenant

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
                idle_timeout=60.0, no_client_timeout=60.0, env={}, stop_requested=False,
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
