"""SSRF guard (common.adapters.netguard) through fetch_input, against real local HTTP(S) servers.

Layout of the tests' little internet, all on loopback:
- `allowed`: the image server on 127.0.0.1, the only network the test policy allow-lists (as an operator
  would with BIREFNET_FETCH_ALLOW_NETWORKS). It also redirects wherever a test asks.
- `forbidden`: a real server on 127.0.0.2 standing in for internal services; every attack aimed at it
  must leave its connection count at zero.
- names come from an injected resolver (no /etc/hosts): images.example.test -> 127.0.0.1,
  internal.example.test -> 127.0.0.2, rebind.example.test -> one public and one private address ...
- `dialled` records every socket connect the guard makes, so addresses without a server (metadata,
  [::1]) are proven unreached too.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpcore
import pytest

from common.adapters.fetch import fetch_input
from common.adapters.netguard import (
    NetPolicy,
    UrlNotAllowedError,
    blocked_reason,
    check_url,
    parse_ipv4_literal,
)
from common.domain.errors import JobError
from common.settings import Settings
from tests.helpers.servers import PNG, LocalServer

MAX_BYTES = 1_000_000


# --- local servers ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def allowed() -> Iterator[LocalServer]:
    server = LocalServer("127.0.0.1")
    yield server.start()
    server.stop()


@pytest.fixture(scope="module")
def forbidden() -> Iterator[LocalServer]:
    server = LocalServer("127.0.0.2")
    server.files["/secret"] = (b"internal credentials", "text/plain")
    yield server.start()
    server.stop()


class Resolver:
    """Injected DNS: name -> addresses, with a log of lookups. A list of answers per name is served in
    turn (last one repeats), which is how a rebinding name behaves."""

    def __init__(self, names: dict[str, list[list[str]]]):
        self.names, self.lookups = names, []

    def __call__(self, host: str, port: int) -> list[str]:
        self.lookups.append(host)
        answers = self.names.get(host)
        if not answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return answers.pop(0) if len(answers) > 1 else answers[0]


def name_table() -> dict[str, list[list[str]]]:
    return {
        "images.example.test": [["127.0.0.1"]],
        "wrong-cert.example.test": [["127.0.0.1"]],
        "internal.example.test": [["127.0.0.2"]],
        "metadata.example.test": [["169.254.169.254"]],
        "rebind.example.test": [["93.184.216.34", "127.0.0.2"]],
        "public.example.test": [["93.184.216.34"]],
    }


@pytest.fixture
def resolver() -> Resolver:
    return Resolver(name_table())


@pytest.fixture
def policy(resolver: Resolver) -> NetPolicy:
    # What a test deployment sets: BIREFNET_FETCH_ALLOW_NETWORKS=127.0.0.1/32, BIREFNET_FETCH_ALLOWED_PORTS=*.
    return NetPolicy(
        allow_networks=(ipaddress.ip_network("127.0.0.1/32"),), allowed_ports=None, resolver=resolver
    )


@pytest.fixture
def dialled(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every TCP connect the guard makes (host is always the address actually dialled)."""
    calls: list[tuple[str, int]] = []
    original = httpcore.SyncBackend.connect_tcp

    def spy(self, host: str, port: int, *args, **kwargs):
        calls.append((host, port))
        return original(self, host, port, *args, **kwargs)

    monkeypatch.setattr(httpcore.SyncBackend, "connect_tcp", spy)
    return calls


def fetch(url: str, policy: NetPolicy, timeout: float = 5.0, max_bytes: int = MAX_BYTES) -> bytes:
    return fetch_input(url, objects=None, max_bytes=max_bytes, timeout=timeout, policy=policy)  # type: ignore[arg-type]


def refused(url: str, policy: NetPolicy, error_type: str = "file_download_error", **kwargs) -> JobError:
    with pytest.raises(JobError) as info:
        fetch(url, policy, **kwargs)
    assert info.value.error_type == error_type, info.value.message
    assert info.value.detail()[0]["loc"] == ["body", "image_url"]
    return info.value


# --- attack URLs -----------------------------------------------------------------------------------

# (id, URL template, fragments the error message must contain). {a}: the allowed server's base URL,
# {f}: the forbidden server's port.
ATTACKS: list[tuple[str, str, tuple[str, ...]]] = [
    ("loopback-literal", "http://127.0.0.2:{f}/secret", ("127.0.0.2", "loopback")),
    ("decimal-ipv4", "http://2130706434:{f}/secret", ("'2130706434' is 127.0.0.2", "loopback")),
    ("hex-dotted-ipv4", "http://0x7f.2:{f}/secret", ("127.0.0.2", "loopback")),
    ("hex-ipv4", "http://0x7f000002:{f}/secret", ("127.0.0.2", "loopback")),
    ("octal-ipv4", "http://0177.0.0.2:{f}/secret", ("127.0.0.2", "loopback")),
    ("short-ipv4", "http://127.2:{f}/secret", ("127.0.0.2", "loopback")),
    ("trailing-dot", "http://127.0.0.2.:{f}/secret", ("127.0.0.2", "loopback")),
    ("unspecified", "http://0.0.0.0:{f}/secret", ("0.0.0.0", "unspecified")),
    ("ipv6-loopback", "http://[::1]:{f}/secret", ("::1", "loopback")),
    ("ipv4-mapped-ipv6", "http://[::ffff:127.0.0.2]:{f}/secret", ("IPv4-mapped", "127.0.0.2", "loopback")),
    ("ipv4-compatible-ipv6", "http://[::127.0.0.2]:{f}/secret", ("IPv4-compatible", "127.0.0.2")),
    ("6to4-private", "http://[2002:7f00:2::1]:{f}/secret", ("6to4", "127.0.0.2", "loopback")),
    ("nat64-private", "http://[64:ff9b::10.0.0.1]/", ("NAT64", "10.0.0.1", "private")),
    ("teredo", "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/", ("Teredo",)),
    (
        "aws-metadata",
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        ("cloud metadata",),
    ),
    ("aws-metadata-ipv6", "http://[fd00:ec2::254]/latest/meta-data/", ("cloud metadata",)),
    ("ecs-credentials", "http://169.254.170.2/v2/credentials", ("cloud metadata",)),
    ("alibaba-metadata", "http://100.100.100.200/latest/meta-data/", ("cloud metadata",)),
    ("decimal-metadata", "http://2852039166/latest/meta-data/", ("169.254.169.254", "cloud metadata")),
    ("mapped-metadata", "http://[::ffff:a9fe:a9fe]/latest/meta-data/", ("cloud metadata",)),
    ("private-10", "http://10.0.0.1/", ("private",)),
    ("private-172", "http://172.16.5.4/", ("private",)),
    ("private-192", "http://192.168.1.1/admin", ("private",)),
    ("shared-cgnat", "http://100.64.0.1/", ("shared",)),
    ("link-local", "http://169.254.1.1/", ("link-local",)),
    ("benchmarking", "http://198.18.0.1/", ("benchmarking",)),
    ("documentation", "http://203.0.113.7/", ("documentation",)),
    ("multicast", "http://224.0.0.1/", ("multicast",)),
    ("reserved", "http://240.0.0.1/", ("reserved",)),
    ("broadcast", "http://255.255.255.255/", ("reserved",)),
    ("ipv6-unique-local", "http://[fd12:3456::1]/", ("unique-local",)),
    ("ipv6-link-local", "http://[fe80::1]/", ("link-local",)),
    ("ipv6-multicast", "http://[ff02::1]/", ("multicast",)),
    (
        "name-to-loopback",
        "http://internal.example.test:{f}/secret",
        ("'internal.example.test' resolves to 127.0.0.2", "loopback"),
    ),
    (
        "name-to-metadata",
        "http://metadata.example.test/latest/meta-data/",
        ("169.254.169.254", "cloud metadata"),
    ),
    (
        "dns-rebinding-public-and-private",
        "http://rebind.example.test:{f}/secret",
        ("'rebind.example.test' resolves to 127.0.0.2",),
    ),
    ("unresolvable-name", "http://no-such-host.example.test/", ("cannot resolve",)),
    ("userinfo", "http://user:secret@images.example.test:{ap}/img.png", ("credentials",)),
    ("backslash-confusion", "http://images.example.test\\@127.0.0.2:{f}/secret", ("credentials",)),
    ("percent-encoded-host", "http://127.0.0.%32:{f}/secret", ("invalid host",)),
    ("ipv6-zone-id", "http://[fe80::1%25lo]:{f}/secret", ("invalid host",)),
    ("file-scheme", "file:///etc/passwd", ("unsupported URL scheme 'file'",)),
    ("gopher-to-redis", "gopher://127.0.0.2:{f}/_FLUSHALL", ("unsupported URL scheme 'gopher'",)),
    ("dict-scheme", "dict://127.0.0.2:{f}/stats", ("unsupported URL scheme 'dict'",)),
    ("ftp-scheme", "ftp://127.0.0.2:{f}/secret", ("unsupported URL scheme 'ftp'",)),
    (
        "redirect-to-metadata",
        "{a}/redirect?to=http://169.254.169.254/latest/meta-data/",
        ("redirected to http://169.254.169.254/latest/meta-data/", "cloud metadata"),
    ),
    ("redirect-to-loopback", "{a}/redirect?to=http://127.0.0.2:{f}/secret", ("redirected to", "loopback")),
    (
        "redirect-to-decimal-ip",
        "{a}/redirect?to=http://2130706434:{f}/secret",
        ("redirected to", "127.0.0.2"),
    ),
    (
        "redirect-to-private-name",
        "{a}/redirect?to=http://internal.example.test:{f}/secret",
        ("redirected to", "resolves to 127.0.0.2"),
    ),
    ("redirect-to-mapped-ipv6", "{a}/redirect?to=http://[::ffff:127.0.0.2]:{f}/secret", ("IPv4-mapped",)),
    (
        "redirect-to-s3",
        "{a}/redirect?to=s3://birefnet-output/results/other-tenant/result.json",
        ("redirected to s3://", "unsupported URL scheme 's3'"),
    ),
    ("redirect-to-data", "{a}/redirect?to=data:image/png;base64,AAAA", ("unsupported URL scheme 'data'",)),
    ("redirect-to-file", "{a}/redirect?to=file:///etc/passwd", ("unsupported URL scheme 'file'",)),
    ("redirect-loop", "{a}/loop", ("too many redirects",)),
]


def expand(template: str, allowed: LocalServer, forbidden: LocalServer) -> str:
    if "/redirect?to=" in template:
        base, target = template.split("/redirect?to=", 1)
        target = target.format(f=forbidden.port)
        return f"{base.format(a=allowed.url(''))}/redirect?to={quote(target, safe='')}"
    return template.format(a=allowed.url(""), f=forbidden.port, ap=allowed.port)


@pytest.mark.parametrize(("name", "template", "fragments"), ATTACKS, ids=[a[0] for a in ATTACKS])
def test_attack_url_is_refused(name, template, fragments, allowed, forbidden, policy, dialled):
    url = expand(template, allowed, forbidden)
    before = forbidden.connections
    error = refused(url, policy)
    for fragment in fragments:
        assert fragment in error.message, (url, error.message)
    assert forbidden.connections == before, f"{url} reached the forbidden server"
    assert forbidden.requests == []
    # The only socket ever opened is to the allow-listed image server (redirect cases).
    assert all(host == "127.0.0.1" and port == allowed.port for host, port in dialled), dialled


def test_metadata_stays_refused_inside_an_allow_listed_network(resolver, dialled):
    wide = NetPolicy(
        allow_networks=(ipaddress.ip_network("169.254.0.0/16"), ipaddress.ip_network("::/0")),
        allowed_ports=None,
        resolver=resolver,
    )
    for url in (
        "http://169.254.169.254/latest/",
        "http://[fd00:ec2::254]/",
        "http://[::ffff:169.254.169.254]/",
    ):
        assert "cloud metadata" in refused(url, wide).message
    assert dialled == []


def test_ports_are_restricted_by_default(allowed, resolver, dialled):
    strict = NetPolicy(allow_networks=(ipaddress.ip_network("127.0.0.1/32"),), resolver=resolver)
    before = allowed.connections
    error = refused(allowed.url("/img.png", host="images.example.test"), strict)
    assert f"port {allowed.port} is not allowed" in error.message and "80, 443" in error.message
    assert allowed.connections == before and dialled == []
    assert "port 6379" in refused("http://public.example.test:6379/", strict).message


def test_production_policy_refuses_loopback_while_a_server_listens(allowed, monkeypatch, dialled):
    """Without the documented setting nothing local is reachable, whatever the URL form."""
    for key in ("BIREFNET_FETCH_ALLOW_NETWORKS", "BIREFNET_FETCH_ALLOWED_PORTS"):
        monkeypatch.delenv(key, raising=False)
    production = NetPolicy.from_settings(Settings(), allowed_ports=None)  # ports aside, the real defaults
    before = allowed.connections
    for host in ("127.0.0.1", "2130706433", "0x7f.1", "127.1", "[::ffff:127.0.0.1]", "localhost"):
        assert "loopback" in refused(allowed.url("/img.png", host=host), production).message
    assert allowed.connections == before and dialled == []
    # The setting, and only the setting, opens it (as the test deployment does).
    monkeypatch.setenv("BIREFNET_FETCH_ALLOW_NETWORKS", "127.0.0.1/32")
    monkeypatch.setenv("BIREFNET_FETCH_ALLOWED_PORTS", "*")
    assert fetch(allowed.url(), NetPolicy.from_settings(Settings())) == PNG


# --- what is allowed, and how ---------------------------------------------------------------------


def test_name_is_resolved_once_and_dialled_by_address_with_its_host_header(
    allowed, policy, resolver, dialled
):
    assert fetch(allowed.url("/img.png", host="images.example.test"), policy) == PNG
    assert resolver.lookups == ["images.example.test"]
    assert dialled == [("127.0.0.1", allowed.port)]
    path, headers = allowed.requests[-1]
    assert path == "/img.png" and headers["host"] == f"images.example.test:{allowed.port}"
    assert headers["accept-encoding"] == "identity"


def test_rebinding_between_submit_check_and_download_is_caught(forbidden, resolver, policy, dialled):
    resolver.names["flip.example.test"] = [["93.184.216.34"], ["127.0.0.2"]]
    url = f"http://flip.example.test:{forbidden.port}/secret"
    check_url(url, policy=policy)  # at submit time the name looks public
    error = refused(url, policy)  # the worker resolves again, once, and checks what it will dial
    assert "resolves to 127.0.0.2" in error.message
    assert resolver.lookups == ["flip.example.test", "flip.example.test"]
    assert forbidden.connections == 0 and dialled == []


def test_redirects_are_followed_within_the_bound(allowed, policy, dialled):
    assert fetch(allowed.url("/chain/3"), policy) == PNG
    bounded = NetPolicy(
        allow_networks=policy.allow_networks, allowed_ports=None, max_redirects=2, resolver=policy.resolver
    )
    assert "too many redirects (more than 2)" in refused(allowed.url("/chain/3"), bounded).message


def test_check_url_for_the_gateway(policy):
    for ok in (
        "http://public.example.test/cat.jpg",
        "https://public.example.test/cat.jpg",
        "data:image/png;base64,AAAA",
        "s3://bucket/key.png",
    ):
        check_url(ok, policy=policy)
    for bad, fragment in (
        ("http://169.254.169.254/", "cloud metadata"),
        ("gopher://x/", "scheme"),
        ("s3://bucket-only", "bucket and a key"),
        ("http://internal.example.test/", "loopback"),
        ("https://a:b@public.example.test/", "credentials"),
    ):
        with pytest.raises(JobError) as info:
            check_url(bad, policy=policy)
        assert info.value.error_type == "file_download_error" and fragment in info.value.message


@pytest.mark.parametrize(
    "host",
    [
        "127.1",
        "0x7f.1",
        "0177.0.0.1",
        "2130706433",
        "0x7f000001",
        "10.1.2",
        "0xa.0x1.0x2.0x3",
        "017700000001",
        "1.2.3.4",
        "0",
    ],
)
def test_numeric_hosts_read_like_inet_aton(host):
    assert parse_ipv4_literal(host) == ipaddress.IPv4Address(socket.inet_aton(host))


@pytest.mark.parametrize("host", ["1.2.3.999", "08.1.1.1", "1.2.3.4.5", "256.1", "1.0x100.1"])
def test_malformed_numeric_hosts_are_refused_not_guessed(host):
    with pytest.raises(OSError):
        socket.inet_aton(host)
    with pytest.raises(UrlNotAllowedError, match="malformed numeric host"):
        parse_ipv4_literal(host)


@pytest.mark.parametrize(
    "address",
    ["8.8.8.8", "93.184.216.34", "2606:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1"],
)
def test_public_addresses_pass(address):
    assert blocked_reason(ipaddress.ip_address(address)) is None


# --- HTTPS: the certificate is checked against the name, not the address ------------------------------


def _tls_material(directory: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def certificate(subject: str, key, issuer_name, issuer_key, ca: bool, names: list[str]):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if names:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
            )
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = certificate("test CA", ca_key, ca_name, ca_key, True, [])
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = certificate("images.example.test", leaf_key, ca_name, ca_key, False, ["images.example.test"])
    pem = serialization.Encoding.PEM
    (directory / "leaf.pem").write_bytes(leaf.public_bytes(pem) + ca.public_bytes(pem))
    (directory / "leaf.key").write_bytes(
        leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(directory / "leaf.pem", directory / "leaf.key")
    client = ssl.create_default_context(cadata=ca.public_bytes(pem).decode())
    return server, client


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory) -> Iterator[tuple[LocalServer, ssl.SSLContext, list[str]]]:
    server_context, client_context = _tls_material(tmp_path_factory.mktemp("tls"))
    seen_sni: list[str] = []
    server_context.sni_callback = lambda sock, name, ctx: seen_sni.append(name)
    server = LocalServer("127.0.0.1", tls=server_context)
    yield server.start(), client_context, seen_sni
    server.stop()


def test_https_verifies_the_certificate_against_the_hostname(tls_server, policy, dialled):
    server, client_context, seen_sni = tls_server
    https = NetPolicy(
        allow_networks=policy.allow_networks,
        allowed_ports=None,
        resolver=policy.resolver,
        ssl_context=client_context,
    )
    assert fetch(server.url("/img.png", host="images.example.test"), https) == PNG
    assert seen_sni[-1] == "images.example.test" and dialled == [("127.0.0.1", server.port)]
    # Same address, another name: the certificate does not match, so no bytes are accepted.
    error = refused(server.url("/img.png", host="wrong-cert.example.test"), https)
    assert "could not connect" in error.message and "certificate" in error.message.lower()
    # And by bare address the name check fails too (the cert names no IP).
    assert "certificate" in refused(server.url("/img.png"), https).message.lower()


# --- limits: time and size ------------------------------------------------------------------------


def test_total_timeout_stops_a_slow_drip(allowed, policy):
    started = time.monotonic()
    error = refused(allowed.url("/drip"), policy, timeout=1.0)
    assert "timed out" in error.message
    assert time.monotonic() - started < 2.0


def test_dns_that_hangs_is_cut_by_the_connect_timeout(policy):
    def slow(host: str, port: int) -> list[str]:
        time.sleep(3)
        return ["93.184.216.34"]

    hanging = NetPolicy(allowed_ports=None, connect_timeout=0.3, resolver=slow)
    started = time.monotonic()
    assert "timed out" in refused("http://slow.example.test/", hanging).message
    assert time.monotonic() - started < 1.5


@pytest.mark.parametrize(
    ("path", "fragment"),
    [
        ("/huge-declared", "1000000000 bytes; the limit is 1000000 bytes"),
        ("/stream", "exceeds the limit of 1000000 bytes"),
        ("/gzip-bomb", "after decompression"),
    ],
)
def test_size_cap_while_streaming(allowed, policy, path, fragment):
    started = time.monotonic()
    error = refused(allowed.url(path), policy, error_type="image_too_large")
    assert fragment in error.message
    assert time.monotonic() - started < 3.0  # the declared size is refused before any body is read


@pytest.mark.parametrize(
    ("path", "fragment"),
    [
        ("/status/404", "HTTP 404"),
        ("/status/500", "HTTP 500"),
        ("/empty", "empty (0 bytes)"),
        ("/truncated", "malformed or incomplete"),
    ],
)
def test_http_failures_are_download_errors(allowed, policy, path, fragment):
    assert fragment in refused(allowed.url(path), policy).message


def test_an_attack_url_costs_no_time(policy, dialled):
    """Refusals happen before any connect: a burst of attack URLs stays fast."""
    started = time.monotonic()
    for _ in range(50):
        refused("http://169.254.169.254/latest/meta-data/", policy)
    assert time.monotonic() - started < 1.0 and dialled == []
