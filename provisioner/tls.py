"""Per-cluster TLS: a fresh CA for every cluster, a certificate for its processes, one for clients.

The CA's private key is thrown away once both certificates are signed, so nothing can ever
issue another certificate that this cluster trusts; credentials of one cluster are worthless
against any other. EC P-256 keys keep generation to a few milliseconds (run off the loop).
"""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = datetime.timedelta(days=3650)


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def _pem_cert(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _issue(ca_key: ec.EllipticCurvePrivateKey, ca_name: x509.Name, common: str,
           now: datetime.datetime) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(common)]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return _pem_cert(cert), _pem_key(key)


def cluster_credentials(cluster_id: str) -> dict[str, str]:
    """``ca``, ``cert``/``key`` for the cluster's processes, ``client_cert``/``client_key``."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name(f"dask-provisioner CA {cluster_id}")
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    cert, key = _issue(ca_key, ca_name, f"{cluster_id}.cluster", now)
    client_cert, client_key = _issue(ca_key, ca_name, f"{cluster_id}.client", now)
    return {"ca": _pem_cert(ca), "cert": cert, "key": key,
            "client_cert": client_cert, "client_key": client_key}


def process_credentials(credentials: dict[str, str]) -> dict[str, str]:
    """What the cluster's own processes get (never the client's key)."""
    return {k: credentials[k] for k in ("ca", "cert", "key")} if credentials else {}


def client_credentials(credentials: dict[str, str]) -> dict[str, str]:
    """What a client (the service's watcher, a tenant's notebook) uses to connect."""
    if not credentials:
        return {}
    return {"ca": credentials["ca"], "cert": credentials["client_cert"],
            "key": credentials["client_key"]}
