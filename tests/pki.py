"""A throw-away X.509 PKI for tests that talk to a real broker over mutual TLS.

:func:`make_pki` writes, into one directory:

* ``ca.pem`` / ``ca.key``: the test CA (EC P-256, self-signed, may sign certificates and CRLs);
* ``server.pem`` / ``server.key``: the broker, for ``127.0.0.1`` and ``localhost`` (SAN IP + DNS);
* one ``<name>.pem`` / ``<name>.key`` pair per client in :data:`GOOD_CLIENTS`
  (``dev-001``, ``dev-002``, ``fleet-svc``, ``app-viewer``), each with its name as the CN;
* ``dev-expired``: signed by the CA, but ``not_valid_after`` is a day in the past;
* ``dev-revoked``: signed by the CA and valid, but its serial is listed in ``crl.pem``;
* ``rogue``: issued by a *different* CA (``rogue-ca.pem``) with the CN :data:`ROGUE_CN`, i.e. an
  attacker who minted a certificate claiming to be a real device.

>>> pki = make_pki(tmp_path)                      # doctest: +SKIP
>>> cert, key = pki.client("dev-001")             # doctest: +SKIP
>>> cert, key = issue_client(pki, "dev-042")      # doctest: +SKIP

File permissions: private keys are 0600 and owned by the user running the tests; nothing is made
world-readable. The broker fixture makes mosquitto run as that same user (``user <current user>``
in its config: when started by root mosquitto would otherwise drop privileges to the
``mosquitto`` user, which cannot enter pytest's 0700 temporary directories or read the keys).

Keys are EC P-256: generating the whole PKI takes a few milliseconds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "GOOD_CLIENTS",
    "ROGUE_CN",
    "Pki",
    "issue_client",
    "make_pki",
]

GOOD_CLIENTS = ("dev-001", "dev-002", "fleet-svc", "app-viewer")
ROGUE_CN = "dev-001"
"""The CN of the ``rogue`` certificate: a real device's name, signed by the wrong CA."""

_ONE_DAY = timedelta(days=1)


@dataclass(frozen=True)
class Pki:
    """Paths of the files :func:`make_pki` wrote."""

    directory: Path
    ca_cert: Path
    ca_key: Path
    crl: Path
    server_cert: Path
    server_key: Path
    rogue_ca_cert: Path
    clients: dict[str, tuple[Path, Path]] = field(default_factory=dict)

    def client(self, name: str) -> tuple[Path, Path]:
        """The (certificate, key) paths of client ``name``."""
        try:
            return self.clients[name]
        except KeyError:
            raise KeyError(f"no client certificate {name!r}; have {sorted(self.clients)}") from None


def make_pki(directory: Path) -> Pki:
    """Write the CA, server and client certificates, their keys and the CRL into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _ca_certificate(ca_key, "edgefleet test CA", now)
    _write_cert(directory / "ca.pem", ca_cert)
    _write_key(directory / "ca.key", ca_key)

    rogue_ca_key = ec.generate_private_key(ec.SECP256R1())
    rogue_ca_cert = _ca_certificate(rogue_ca_key, "rogue CA", now)
    _write_cert(directory / "rogue-ca.pem", rogue_ca_cert)

    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = _leaf(
        subject_cn="localhost",
        public_key=server_key.public_key(),
        issuer_cert=ca_cert,
        issuer_key=ca_key,
        not_before=now - _ONE_DAY,
        not_after=now + _ONE_DAY * 30,
        server=True,
    )
    _write_cert(directory / "server.pem", server_cert)
    _write_key(directory / "server.key", server_key)

    clients: dict[str, tuple[Path, Path]] = {}
    for name in (*GOOD_CLIENTS, "dev-revoked"):
        clients[name] = _issue(directory, name, ca_cert, ca_key, not_after=now + _ONE_DAY * 30)
    clients["dev-expired"] = _issue(
        directory,
        "dev-expired",
        ca_cert,
        ca_key,
        not_before=now - _ONE_DAY * 10,
        not_after=now - _ONE_DAY,
    )
    clients["rogue"] = _issue(
        directory, "rogue", rogue_ca_cert, rogue_ca_key, cn=ROGUE_CN, not_after=now + _ONE_DAY
    )

    revoked = x509.load_pem_x509_certificate(clients["dev-revoked"][0].read_bytes())
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - timedelta(minutes=5))
        .next_update(now + _ONE_DAY * 30)
        .add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(revoked.serial_number)
            .revocation_date(now - timedelta(minutes=5))
            .build()
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .add_extension(x509.CRLNumber(1), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    crl_path = directory / "crl.pem"
    crl_path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))

    return Pki(
        directory=directory,
        ca_cert=directory / "ca.pem",
        ca_key=directory / "ca.key",
        crl=crl_path,
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        rogue_ca_cert=directory / "rogue-ca.pem",
        clients=clients,
    )


def issue_client(pki: Pki, name: str, *, valid_for: timedelta = _ONE_DAY) -> tuple[Path, Path]:
    """Issue one more client certificate (CN ``name``) from the test CA and register it in ``pki``.

    For tests that need device identities beyond :data:`GOOD_CLIENTS`.
    """
    ca_cert = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise TypeError(f"{pki.ca_key} is not an EC private key")
    paths = _issue(pki.directory, name, ca_cert, ca_key, not_after=datetime.now(UTC) + valid_for)
    pki.clients[name] = paths
    return paths


def _issue(
    directory: Path,
    name: str,
    issuer_cert: x509.Certificate,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    not_after: datetime,
    not_before: datetime | None = None,
    cn: str | None = None,
) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _leaf(
        subject_cn=cn or name,
        public_key=key.public_key(),
        issuer_cert=issuer_cert,
        issuer_key=issuer_key,
        not_before=not_before or datetime.now(UTC) - _ONE_DAY,
        not_after=not_after,
        server=False,
    )
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    _write_cert(cert_path, cert)
    _write_key(key_path, key)
    return cert_path, key_path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca_certificate(key: ec.EllipticCurvePrivateKey, cn: str, now: datetime) -> x509.Certificate:
    public_key = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _ONE_DAY)
        .not_valid_after(now + _ONE_DAY * 365)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .sign(key, hashes.SHA256())
    )


def _leaf(
    *,
    subject_cn: str,
    public_key: ec.EllipticCurvePublicKey,
    issuer_cert: x509.Certificate,
    issuer_key: ec.EllipticCurvePrivateKey,
    not_before: datetime,
    not_after: datetime,
    server: bool,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject_cn))
        .issuer_name(issuer_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(IPv4Address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.chmod(0o644)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Created 0600 from the start, so the key is never readable by others, even briefly.
    path.unlink(missing_ok=True)
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
        f.write(data)
