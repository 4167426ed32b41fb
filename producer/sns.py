"""Amazon SNS over HTTP(S): signature checks and subscription confirmation, as described in
https://docs.aws.amazon.com/sns/latest/dg/sns-verify-signature-of-message.html.

Signing certificates and SubscribeURLs are fetched from SNS hosts only (through the SSRF-guarded fetcher),
for the topics in `sns_topic_arns` only. The host pattern and network policy are constructor arguments and
nothing else: no setting widens them; tests pass their own."""

from __future__ import annotations

import base64
import binascii
import datetime
import logging
import re
import threading
from dataclasses import dataclass
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from common.adapters.fetch import download_http
from common.adapters.netguard import NetPolicy, UrlNotAllowedError
from common.domain.errors import JobError

log = logging.getLogger(__name__)

# SNS's own endpoint per region and partition, exactly: `sns.<region>.amazonaws.com` (commercial and GovCloud
# regions), `.amazonaws.com.cn` (China regions only) and the isolated partitions' domains. A region looks like
# `us-west-2`/`us-gov-east-1`: a looser label would also take `sns.s3.amazonaws.com`, i.e. the S3 bucket
# "sns".
_REGION = r"[a-z]{2}(?:-[a-z]+)+-[0-9]{1,2}"
SNS_HOST = re.compile(
    r"\Asns\.(?:"
    rf"(?!cn-){_REGION}\.amazonaws\.com"
    r"|cn-[a-z]+-[0-9]{1,2}\.amazonaws\.com\.cn"
    r"|us-iso-[a-z]+-[0-9]{1,2}\.c2s\.ic\.gov"
    r"|us-isob-[a-z]+-[0-9]{1,2}\.sc2s\.sgov\.gov"
    r")\Z"
)
MAX_CERT_BYTES = 64 * 1024
_NOTIFICATION_FIELDS = ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type")
_CONFIRMATION_FIELDS = ("Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type")
_HASHES = {"1": hashes.SHA1, "2": hashes.SHA256}


class SnsRefused(ValueError):
    """The message is not a genuine SNS message of an accepted topic (answered 403)."""


class SnsUnavailable(RuntimeError):
    """Checking or confirming needs SNS, and SNS could not be reached now (answered 503: SNS retries)."""


def string_to_sign(message: dict) -> bytes:
    fields = _NOTIFICATION_FIELDS if message.get("Type") == "Notification" else _CONFIRMATION_FIELDS
    lines = []
    for name in fields:
        value = message.get(name)
        if value is None:
            if name == "Subject":
                continue  # Subject is signed only when present
            raise SnsRefused(f"SNS message without {name}")
        if not isinstance(value, str):
            raise SnsRefused(f"SNS message field {name} is not a string")
        lines.append(f"{name}\n{value}\n")
    return "".join(lines).encode()


@dataclass
class SnsVerifier:
    topic_arns: tuple[str, ...]
    policy: NetPolicy
    timeout: float = 10.0
    host_pattern: re.Pattern[str] = SNS_HOST

    def __post_init__(self) -> None:
        self._certs: dict[str, rsa.RSAPublicKey] = {}
        self._lock = threading.Lock()
        if self.host_pattern is not SNS_HOST:
            log.warning(
                "SNS verifier trusts hosts matching %r, not only SNS's: tests only", self.host_pattern.pattern
            )

    def _check_sns_url(self, url: object, what: str) -> str:
        if not isinstance(url, str):
            raise SnsRefused(f"SNS message without a {what}")
        parts = urlsplit(url)
        if parts.scheme != "https" or parts.username or parts.password or not parts.hostname:
            raise SnsRefused(f"{what} {url[:200]!r} is not a plain https:// URL")
        if not self.host_pattern.fullmatch(parts.hostname):
            raise SnsRefused(f"{what} host {parts.hostname!r} is not an SNS host")
        return url

    def _public_key(self, url: str) -> rsa.RSAPublicKey:
        with self._lock:
            cached = self._certs.get(url)
        if cached is not None:
            return cached
        if not urlsplit(url).path.endswith(".pem"):
            raise SnsRefused(f"SigningCertURL {url[:200]!r} does not name a .pem certificate")
        try:
            pem = download_http(url, max_bytes=MAX_CERT_BYTES, timeout=self.timeout, policy=self.policy)
        except UrlNotAllowedError as exc:
            raise SnsRefused(f"SigningCertURL {url[:200]!r} is not reachable: {exc.message}") from exc
        except JobError as exc:
            raise SnsUnavailable(f"cannot fetch the SNS signing certificate {url}: {exc.message}") from exc
        try:
            cert = x509.load_pem_x509_certificate(pem)
        except ValueError as exc:
            raise SnsRefused(f"SigningCertURL {url} does not hold a PEM certificate") from exc
        now = datetime.datetime.now(datetime.UTC)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise SnsRefused(f"the SNS signing certificate {url} is expired or not yet valid")
        key = cert.public_key()
        if not isinstance(key, rsa.RSAPublicKey):
            raise SnsRefused("the SNS signing certificate does not hold an RSA key")
        with self._lock:
            if len(self._certs) > 32:
                self._certs.clear()
            self._certs[url] = key
        return key

    def verify(self, message: dict) -> None:
        """Raises SnsRefused unless the message is signed by SNS for an accepted topic."""
        topic = message.get("TopicArn")
        if not self.topic_arns:
            raise SnsRefused(
                "SNS over HTTP is not enabled (set BIREFNET_SNS_TOPIC_ARNS to the topics to accept)"
            )
        if topic not in self.topic_arns:
            raise SnsRefused(f"topic {str(topic)[:200]!r} is not in BIREFNET_SNS_TOPIC_ARNS")
        version = message.get("SignatureVersion")
        if version not in _HASHES:
            raise SnsRefused(f"unsigned or unknown SignatureVersion {str(version)[:20]!r} (SNS uses 1 or 2)")
        signature = message.get("Signature")
        if not isinstance(signature, str) or not signature:
            raise SnsRefused("SNS message without a Signature")
        try:
            raw = base64.b64decode(signature, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise SnsRefused("SNS Signature is not base64") from exc
        key = self._public_key(self._check_sns_url(message.get("SigningCertURL"), "SigningCertURL"))
        try:
            key.verify(raw, string_to_sign(message), padding.PKCS1v15(), _HASHES[version]())
        except InvalidSignature as exc:
            raise SnsRefused("the SNS signature does not match the message (forged or altered)") from exc

    def confirm(self, message: dict) -> None:
        """Confirm a (verified) SubscriptionConfirmation by visiting its SubscribeURL."""
        url = self._check_sns_url(message.get("SubscribeURL"), "SubscribeURL")
        try:
            download_http(url, max_bytes=MAX_CERT_BYTES, timeout=self.timeout, policy=self.policy)
        except UrlNotAllowedError as exc:
            raise SnsRefused(f"SubscribeURL {url[:200]!r} is not reachable: {exc.message}") from exc
        except JobError as exc:
            raise SnsUnavailable(f"confirming the subscription failed: {exc.message}") from exc
        log.info("confirmed the SNS subscription of topic %s", message.get("TopicArn"))
