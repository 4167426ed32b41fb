"""A stand-in for Amazon SNS on loopback: HTTPS server (certificate from a CA made for the test) that
serves an RSA signing certificate and answers ConfirmSubscription, plus signing of SNS messages the way
SNS signs them (versions 1 and 2). The producer checks them with an SnsVerifier built for this host."""

from __future__ import annotations

import base64
import datetime
import ipaddress
import re
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from common.adapters.netguard import NetPolicy
from devstack.tls import make_tls
from producer.sns import SnsVerifier, string_to_sign


def signing_cert(key: rsa.RSAPrivateKey) -> bytes:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sns.test.amazonaws.com")])
    cert = x509.CertificateBuilder(
        subject_name=name,
        issuer_name=name,
        public_key=key.public_key(),
        serial_number=x509.random_serial_number(),
        not_valid_before=now - datetime.timedelta(minutes=5),
        not_valid_after=now + datetime.timedelta(days=1),
    ).sign(key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM)


class FakeSns:
    def __init__(self, directory: Path):
        self.tls = make_tls(directory)
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.cert_pem = signing_cert(self.key)
        self.confirmed: list[dict[str, list[str]]] = []
        self.cert_fetches = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                parts = urlsplit(self.path)
                if parts.path.endswith(".pem"):
                    fake.cert_fetches += 1
                    body, kind = fake.cert_pem, "application/x-pem-file"
                else:
                    fake.confirmed.append(parse_qs(parts.query))
                    body, kind = b"<ConfirmSubscriptionResponse/>", "text/xml"
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.tls.cert, self.tls.key)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base(self) -> str:
        return f"https://127.0.0.1:{self.server.server_address[1]}"

    @property
    def cert_url(self) -> str:
        return f"{self.base}/SimpleNotificationService-01d088a6f77103d0fe307c0069e40ed6.pem"

    def start(self) -> FakeSns:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def sign(self, message: dict, version: str = "2") -> dict:
        signed = {**message, "SignatureVersion": version, "SigningCertURL": self.cert_url}
        digest = hashes.SHA256() if version == "2" else hashes.SHA1()
        signature = self.key.sign(string_to_sign(signed), padding.PKCS1v15(), digest)
        signed["Signature"] = base64.b64encode(signature).decode()
        return signed

    def verifier(self, topic_arns: tuple[str, ...]) -> SnsVerifier:
        """A verifier that takes this loopback server for SNS (only tests can build one)."""
        context = ssl.create_default_context(cafile=str(self.tls.ca))
        policy = NetPolicy(
            allow_networks=(ipaddress.ip_network("127.0.0.1/32"),), allowed_ports=None, ssl_context=context
        )
        return SnsVerifier(topic_arns, policy, timeout=5, host_pattern=re.compile(r"^127\.0\.0\.1$"))
