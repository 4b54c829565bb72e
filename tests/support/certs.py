"""Test certificates: a CA, a server certificate for 127.0.0.1 / localhost and
client certificates, made once per test session with the ``cryptography``
package (installed with the test dependencies).  Files are PEM, keys mode 0600."""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Certs:
    dir: Path
    ca: Path  # the CA certificate (cafile)
    server_cert: Path
    server_key: Path
    client_cert: Path  # CN=alice, O=raftmq tests
    client_key: Path
    other_ca: Path  # a CA nobody's certificate is signed by
    rogue_cert: Path  # CN=mallory, signed by other_ca
    rogue_key: Path
    nocn_cert: Path  # subject without CN (O=raftmq tests only), signed by the CA
    nocn_key: Path

    def client(self, name: str) -> tuple[Path, Path]:
        """(cert, key) of a client certificate with CN=name (made on first use)."""
        cert, key = self.dir / f"client-{name}.crt", self.dir / f"client-{name}.key"
        if not cert.exists():
            _issue(self.dir, f"client-{name}", _name(name), self.ca, self.dir / "ca.key",
                   server=False)
        return cert, key


def _name(cn: str | None, org: str = "raftmq tests") -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COUNTRY_NAME, "DE"),
             x509.NameAttribute(NameOID.ORGANIZATION_NAME, org)]
    if cn is not None:
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    return x509.Name(attrs)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    os.chmod(path, 0o600)


def _ca(directory: Path, stem: str, cn: str) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    name = _name(cn)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    (directory / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(directory / f"{stem}.key", key)


def _issue(directory: Path, stem: str, subject: x509.Name, ca_cert: Path, ca_key: Path,
           server: bool) -> None:
    issuer = x509.load_pem_x509_certificate(ca_cert.read_bytes())
    signer = serialization.load_pem_private_key(ca_key.read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(days=1))
               .not_valid_after(now + datetime.timedelta(days=30))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   issuer.public_key()), critical=False)  # type: ignore[arg-type]
               .add_extension(x509.ExtendedKeyUsage(
                   [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
                   critical=False))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False)
    cert = builder.sign(signer, hashes.SHA256())  # type: ignore[arg-type]
    (directory / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(directory / f"{stem}.key", key)


def make_certs(directory: Path) -> Certs:
    directory.mkdir(parents=True, exist_ok=True)
    _ca(directory, "ca", "raftmq test CA")
    _ca(directory, "other-ca", "someone else's CA")
    ca, ca_key = directory / "ca.crt", directory / "ca.key"
    _issue(directory, "server", _name("127.0.0.1"), ca, ca_key, server=True)
    _issue(directory, "client", _name("alice"), ca, ca_key, server=False)
    _issue(directory, "nocn", _name(None), ca, ca_key, server=False)
    _issue(directory, "rogue", _name("mallory"), directory / "other-ca.crt",
           directory / "other-ca.key", server=False)
    d = directory
    return Certs(d, ca, d / "server.crt", d / "server.key", d / "client.crt", d / "client.key",
                 d / "other-ca.crt", d / "rogue.crt", d / "rogue.key", d / "nocn.crt",
                 d / "nocn.key")
