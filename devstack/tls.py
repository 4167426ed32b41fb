"""A private CA for local stacks and tests: server certificates (a stack's HTTPS gateway, TLS Redis) and
client certificates (mutual TLS), all signed by it; clients trust ca.pem."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOCAL_HOSTS = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _alt_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


class LocalCA:
    """A CA whose certificate is written to `directory`/ca.pem; `issue` writes a leaf signed by it."""

    def __init__(self, directory: Path, common_name: str = "birefnet local CA", days: int = 30):
        now = datetime.datetime.now(datetime.UTC)
        self.directory = directory
        self.not_before, self.not_after = (
            now - datetime.timedelta(minutes=5),
            now + datetime.timedelta(days=days),
        )
        self.key = ec.generate_private_key(ec.SECP256R1())
        usage = x509.KeyUsage(
            digital_signature=True,
            key_cert_sign=True,
            crl_sign=True,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            encipher_only=False,
            decipher_only=False,
        )
        self.cert = (
            self._builder(_name(common_name), _name(common_name), self.key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(usage, critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self.path = directory / "ca.pem"
        self.path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def _builder(self, subject: x509.Name, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
        return x509.CertificateBuilder(
            subject_name=subject,
            issuer_name=issuer,
            public_key=public_key,
            serial_number=x509.random_serial_number(),
            not_valid_before=self.not_before,
            not_valid_after=self.not_after,
        )

    def issue(
        self, stem: str, common_name: str, hosts: tuple[str, ...] = (), *, client: bool = False
    ) -> TlsFiles:
        """`stem`.pem and `stem`.key: a server certificate for `hosts` (or a client certificate)."""
        key = ec.generate_private_key(ec.SECP256R1())
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (
            self._builder(_name(common_name), self.cert.subject, key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
        )
        if hosts:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([_alt_name(h) for h in hosts]), critical=False
            )
        cert = builder.sign(self.key, hashes.SHA256())
        files = TlsFiles(self.path, self.directory / f"{stem}.pem", self.directory / f"{stem}.key")
        files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files.key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        files.key.chmod(0o600)
        return files


def make_tls(directory: Path, hosts: tuple[str, ...] = LOCAL_HOSTS) -> TlsFiles:
    """A private CA and a server certificate for `hosts` signed by it (clients trust ca.pem)."""
    return LocalCA(directory).issue("gateway", hosts[0], hosts)
