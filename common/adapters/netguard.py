"""Outbound request guard against server-side request forgery (SSRF): a worker must never be made to read
from our own network (Redis, the cloud metadata service, an admin port on localhost). The rules:

* only http, https, data and s3 URLs; no credentials in URLs; http(s) ports from `fetch_allowed_ports`;
* a host name is resolved once per connection and refused if ANY of its addresses is not public unicast;
* the connection goes to one of those checked addresses: the check lives in the httpcore network backend
  (`GuardedBackend`), so it covers every redirect hop and every parser quirk that produced the host name;
* numeric hosts (`2130706433`, `0x7f.1`, `127.1`) are read as inet_aton does, and IPv6 forms embedding an
  IPv4 address (mapped, translated, compatible, 6to4, Teredo, NAT64) are judged by it;
* only `fetch_allow_networks` opens non-public addresses; cloud metadata addresses stay refused even then.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
import ssl
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpcore
import httpx

from common.domain.errors import FileDownloadError

if TYPE_CHECKING:
    from common.settings import FetchSettings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# host, port -> the addresses the name resolves to (strings, as getaddrinfo gives them)
Resolver = Callable[[str, int], Sequence[str]]

SCHEMES = ("http", "https", "data", "s3")
DEFAULT_PORTS = {"http": 80, "https": 443}


class UrlNotAllowedError(FileDownloadError):
    """The URL or an address it resolves to is off limits. Reported as `file_download_error`."""


# --- addresses -----------------------------------------------------------------------------------

# Instance metadata services (credentials live there). Refused even inside an allow-listed network.
METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean, Oracle
        "169.254.170.2",  # AWS ECS task metadata and credentials
        "169.254.170.23",  # AWS EKS pod identity agent
        "100.100.100.200",  # Alibaba Cloud
        "192.0.0.192",  # Oracle Cloud (legacy)
        "fd00:ec2::254",  # AWS IMDS over IPv6
        "fd00:ec2::23",  # AWS EKS pod identity agent over IPv6
    )
)


def _nets(*pairs: tuple[str, str]) -> tuple[tuple[IPNetwork, str], ...]:
    return tuple((ipaddress.ip_network(net), reason) for net, reason in pairs)


# Explicit, because `ipaddress.is_global` misses some of these on Python 3.11 (e.g. 192.0.0.192).
_BLOCKED_V4 = _nets(
    ("0.0.0.0/8", "an unspecified ('this network') address"),
    ("10.0.0.0/8", "a private address"),
    ("100.64.0.0/10", "a shared (carrier-grade NAT) address"),
    ("127.0.0.0/8", "a loopback address"),
    ("169.254.0.0/16", "a link-local address"),
    ("172.16.0.0/12", "a private address"),
    ("192.0.0.0/24", "an IETF protocol assignment address"),
    ("192.0.2.0/24", "a documentation address"),
    ("192.88.99.0/24", "a 6to4 relay anycast address"),
    ("192.168.0.0/16", "a private address"),
    ("198.18.0.0/15", "a benchmarking address"),
    ("198.51.100.0/24", "a documentation address"),
    ("203.0.113.0/24", "a documentation address"),
    ("224.0.0.0/4", "a multicast address"),
    ("240.0.0.0/4", "a reserved address"),  # includes 255.255.255.255
)
_BLOCKED_V6 = _nets(
    ("::/128", "an unspecified address"),
    ("::1/128", "a loopback address"),
    ("::/96", "a deprecated IPv4-compatible address"),
    ("64:ff9b:1::/48", "a local-use NAT64 address"),
    ("100::/64", "a discard-only address"),
    ("2001::/32", "a Teredo address"),
    ("2001:2::/48", "a benchmarking address"),
    ("2001:db8::/32", "a documentation address"),
    ("3fff::/20", "a documentation address"),
    ("fc00::/7", "a unique-local (private) address"),
    ("fe80::/10", "a link-local address"),
    ("fec0::/10", "a site-local address"),
    ("ff00::/8", "a multicast address"),
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # local-use NAT64 (RFC 8215): IPv4 in the last 32 bits
_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")  # IPv4-translated (SIIT, RFC 2765): ::ffff:0:a.b.c.d


def embedded_ipv4(address: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, str] | None:
    """The IPv4 address an IPv6 address carries and how, for forms that reach it over IPv4."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped, "IPv4-mapped"
    if address.sixtofour is not None:
        return address.sixtofour, "6to4"
    if address.teredo is not None:
        return address.teredo[1], "Teredo"
    if address in _NAT64 or address in _NAT64_LOCAL:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF), "NAT64"
    if address in _TRANSLATED:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF), "IPv4-translated"
    if int(address) >> 32 == 0 and int(address) > 1:
        return ipaddress.IPv4Address(int(address)), "IPv4-compatible"
    return None


def _is_metadata(address: IPAddress) -> bool:
    if address in METADATA_ADDRESSES:
        return True
    embedded = embedded_ipv4(address) if isinstance(address, ipaddress.IPv6Address) else None
    return embedded is not None and embedded[0] in METADATA_ADDRESSES


def blocked_reason(address: IPAddress, allow: Sequence[IPNetwork] = ()) -> str | None:
    """Why `address` may not be fetched from, or None when it may."""
    if address.version == 6 and address.scope_id:
        address = ipaddress.IPv6Address(str(address).split("%", 1)[0])
    if _is_metadata(address):
        return "a cloud metadata address"
    embedded = embedded_ipv4(address) if isinstance(address, ipaddress.IPv6Address) else None
    if any(address in net for net in allow) or (embedded and any(embedded[0] in net for net in allow)):
        return None
    if embedded is not None:
        inner = blocked_reason(embedded[0])
        if inner:
            return f"{embedded[1]} IPv6 embedding {embedded[0]}, {inner}"
    for net, reason in _BLOCKED_V4 if address.version == 4 else _BLOCKED_V6:
        if address in net:
            return reason
    if not address.is_global or address.is_multicast:  # backstop for ranges not listed above
        return "not a public address"
    return None


# --- hosts and URLs ------------------------------------------------------------------------------

_NUMERIC_PART = re.compile(r"^(0[xX][0-9a-fA-F]+|[0-9]+)$")
_HOSTNAME = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9_-]{1,63}(?<!-))*$")


def parse_ipv4_literal(host: str) -> ipaddress.IPv4Address | None:
    """inet_aton's reading of a numeric host (`127.1`, `0x7f.1`, `0177.0.0.1`, `2130706433`), or None
    for a host name. Raises UrlNotAllowedError for something numeric that is no valid address, e.g.
    `1.2.3.999`: resolvers disagree on those, so we do not guess."""
    parts = host.split(".")
    if not parts[-1] or not _NUMERIC_PART.match(parts[-1]):
        return None  # like WHATWG URL: a host whose last label is not a number is a name
    if len(parts) > 4 or not all(_NUMERIC_PART.match(p) for p in parts):
        raise UrlNotAllowedError(f"malformed numeric host {host!r}")
    values = []
    for part in parts:
        if part[:2].lower() == "0x":
            values.append(int(part[2:], 16))
        elif len(part) > 1 and part[0] == "0":
            if not set(part) <= set("01234567"):
                raise UrlNotAllowedError(f"malformed numeric host {host!r} (invalid octal)")
            values.append(int(part, 8))
        else:
            values.append(int(part))
    # The last part fills the remaining bytes: a.b.c.d, a.b.(16 bits), a.(24 bits), (32 bits).
    *head, last = values
    if any(v > 255 for v in head) or last >= 1 << (8 * (4 - len(head))):
        raise UrlNotAllowedError(f"malformed numeric host {host!r} (a part is out of range)")
    number = last
    for index, value in enumerate(head):
        number |= value << (8 * (3 - index))
    return ipaddress.IPv4Address(number)


def literal_address(host: str) -> IPAddress | None:
    """The address a host names literally (IPv6, or any inet_aton IPv4 form), or None for a name."""
    if ":" in host:
        try:
            return ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            raise UrlNotAllowedError(f"malformed IPv6 host {host!r}") from None
    return parse_ipv4_literal(host)


def normalise_host(host: str) -> str:
    """ASCII host without brackets or the FQDN trailing dot; refuses anything that is not a host."""
    host = host.strip("[]")
    if host.endswith(".") and not host.endswith(".."):
        host = host[:-1]
    if not host:
        raise UrlNotAllowedError("the URL has no host")
    if ":" not in host and not _HOSTNAME.match(host):
        raise UrlNotAllowedError(f"invalid host name {host!r}")
    return host.lower()


@dataclass(frozen=True)
class HttpTarget:
    """An http(s) URL taken apart once, by one parser; what is checked is what is requested."""

    url: str
    scheme: str
    host: str  # normalised: ASCII (IDNA), lower case, no brackets or trailing dot
    port: int
    target: bytes  # path and query

    @property
    def host_header(self) -> bytes:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.port != DEFAULT_PORTS[self.scheme]:
            host = f"{host}:{self.port}"
        return host.encode("ascii")

    def core_url(self) -> httpcore.URL:
        return httpcore.URL(
            scheme=self.scheme.encode(), host=self.host.encode("ascii"), port=self.port, target=self.target
        )


def scheme_of(url: str) -> str:
    return url.split(":", 1)[0].strip().lower() if ":" in url else ""


def parse_http_url(url: str, policy: NetPolicy) -> HttpTarget:
    """Syntax, scheme, credentials and port of an http(s) URL (no DNS)."""
    scheme = scheme_of(url)
    if scheme not in ("http", "https"):
        raise UrlNotAllowedError(
            f"unsupported URL scheme {scheme!r} here; only http and https can be downloaded"
        )
    try:
        parsed = httpx.URL(url)
        raw_host = parsed.raw_host.decode("ascii")  # IDNA-encoded
    except (httpx.InvalidURL, UnicodeError, ValueError) as exc:
        _explain_numeric_host(url, policy)
        raise UrlNotAllowedError(f"malformed URL: {exc}") from None
    if parsed.userinfo:
        raise UrlNotAllowedError("URLs with credentials (user:password@host) are not accepted")
    if any(c in raw_host for c in "%\\@ "):  # escapes, IPv6 zone ids, parser confusion
        raise UrlNotAllowedError(f"invalid host {raw_host!r}")
    host = normalise_host(raw_host)
    port = parsed.port or DEFAULT_PORTS[scheme]
    policy.check_port(port)
    return HttpTarget(url=url, scheme=scheme, host=host, port=port, target=parsed.raw_path or b"/")


def _explain_numeric_host(url: str, policy: NetPolicy) -> None:
    """httpx refuses some inet_aton forms (`0177.0.0.1`); say where they point when that is the problem.
    Only ever raises: such a URL is refused either way."""
    try:
        host = urlsplit(url).hostname or ""
        address = parse_ipv4_literal(host.rstrip("."))
    except (UrlNotAllowedError, ValueError):
        return
    if address is not None:
        policy.check_address(address, host, literal=True)


# --- policy --------------------------------------------------------------------------------------


def system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return [str(info[4][0]) for info in infos]  # an IPv4 or IPv6 address (str)


_dns_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="netguard-dns")  # threads start on first use


def _resolve_with_timeout(resolver: Resolver, host: str, port: int, timeout: float) -> Sequence[str]:
    """getaddrinfo has no timeout of its own; a lookup that hangs must not hang the job."""
    future = _dns_pool.submit(resolver, host, port)
    try:
        return future.result(timeout=max(timeout, 0.001))
    except FutureTimeout:
        raise FileDownloadError(f"resolving {host!r} timed out after {timeout:.1f}s") from None
    except (OSError, UnicodeError) as exc:
        raise FileDownloadError(f"cannot resolve host {host!r}: {exc}") from None


@dataclass(frozen=True)
class NetPolicy:
    """What outbound fetches may reach. Defaults are the production rules."""

    allow_networks: tuple[IPNetwork, ...] = ()
    allowed_ports: frozenset[int] | None = frozenset({80, 443})  # None: any port
    max_redirects: int = 5
    connect_timeout: float = 5.0
    resolver: Resolver = system_resolver
    ssl_context: ssl.SSLContext | None = field(default=None, compare=False)  # None: system CAs (certifi)
    purpose: str = "image URLs"  # what the refusals speak of ("webhook URLs" for webhook deliveries)

    @classmethod
    def from_settings(cls, settings: FetchSettings, **overrides: Any) -> NetPolicy:
        ports = frozenset(settings.fetch_allowed_ports)
        values: dict[str, Any] = {
            "allow_networks": tuple(
                ipaddress.ip_network(n, strict=False) for n in settings.fetch_allow_networks
            ),
            "allowed_ports": None if 0 in ports else ports,
            "max_redirects": settings.fetch_max_redirects,
            "connect_timeout": settings.fetch_connect_timeout,
        }
        return cls(**{**values, **overrides})

    def check_port(self, port: int) -> None:
        if not 0 < port < 65536:
            raise UrlNotAllowedError(f"invalid port {port}")
        if self.allowed_ports is not None and port not in self.allowed_ports:
            allowed = ", ".join(str(p) for p in sorted(self.allowed_ports))
            raise UrlNotAllowedError(f"port {port} is not allowed for {self.purpose} (allowed: {allowed})")

    def check_address(self, address: IPAddress, host: str, *, literal: bool = False) -> None:
        reason = blocked_reason(address, self.allow_networks)
        if reason:
            if literal:
                named = f"{host!r} is {address}, which" if host != str(address) else str(address)
            else:
                named = f"{host!r} resolves to {address}, which"
            raise UrlNotAllowedError(
                f"{named} is {reason}; {self.purpose} must point to public internet addresses"
            )

    def resolve(self, host: str, port: int, timeout: float | None = None) -> list[IPAddress]:
        """Resolve once and check every address; all must pass. The one DNS lookup per connection."""
        host = normalise_host(host)
        self.check_port(port)
        literal = literal_address(host)
        if literal is not None:
            self.check_address(literal, host, literal=True)
            return [literal]
        answers = _resolve_with_timeout(self.resolver, host, port, timeout or self.connect_timeout)
        try:
            addresses = list(dict.fromkeys(ipaddress.ip_address(a.split("%", 1)[0]) for a in answers))
        except ValueError as exc:
            raise FileDownloadError(f"cannot resolve host {host!r}: {exc}") from None
        if not addresses:
            raise FileDownloadError(f"cannot resolve host {host!r}: no addresses")
        for address in addresses:
            self.check_address(address, host)
        return addresses


def check_url(url: str, *, policy: NetPolicy, resolve: bool = True) -> None:
    """Submit-time check of an image URL (the gateway calls this). Raises UrlNotAllowedError or
    FileDownloadError (both `file_download_error`). The worker checks again when it connects, so a
    name that changes its answer later (DNS rebinding) gains nothing."""
    scheme = scheme_of(url)
    if scheme not in SCHEMES:
        raise UrlNotAllowedError(f"unsupported URL scheme {scheme!r}; use http, https, data or s3")
    if scheme == "s3":
        from common.adapters.storage import parse_s3_url

        try:
            parse_s3_url(url)
        except ValueError as exc:
            raise UrlNotAllowedError(str(exc)) from None
        return
    if scheme == "data":
        return  # decoded (and size-checked) by common.adapters.fetch.decode_data_uri
    target = parse_http_url(url, policy)
    literal = literal_address(target.host)
    if literal is not None:
        policy.check_address(literal, target.host, literal=True)
    elif resolve:
        policy.resolve(target.host, target.port)


# --- connect-time enforcement ---------------------------------------------------------------------


class _DeadlineStream(httpcore.NetworkStream):
    """Clamps every socket wait to the download's overall deadline (slow-drip servers end on time)."""

    def __init__(self, stream: httpcore.NetworkStream, deadline: float):
        self._stream, self._deadline = stream, deadline

    def _timeout(self, timeout: float | None, error: type[Exception]) -> float:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise error("the download took longer than its total time limit")
        return remaining if timeout is None else min(timeout, remaining)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, self._timeout(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, self._timeout(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        # server_hostname is the URL's host (httpcore passes it), so SNI and certificate checks
        # use the real name although we connected to an address.
        stream = self._stream.start_tls(
            ssl_context, server_hostname, self._timeout(timeout, httpcore.ConnectTimeout)
        )
        return _DeadlineStream(stream, self._deadline)

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class GuardedBackend(httpcore.NetworkBackend):
    """httpcore network backend: resolve once, check every address, connect to a checked address."""

    def __init__(self, policy: NetPolicy, deadline: float):
        self.policy, self.deadline = policy, deadline
        self.connections: list[tuple[str, IPAddress, int]] = []  # (host, address, port) actually dialled
        self._sync = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise httpcore.ConnectTimeout("the download took longer than its total time limit")
        budget = min(self.policy.connect_timeout, remaining, timeout if timeout is not None else remaining)
        started = time.monotonic()
        addresses = self.policy.resolve(host, port, timeout=budget)
        last_error: Exception | None = None
        for address in addresses:
            left = budget - (time.monotonic() - started)
            if left <= 0:
                break
            try:
                stream = self._sync.connect_tcp(
                    str(address),
                    port,
                    timeout=left,
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last_error = exc
                continue
            self.connections.append((host, address, port))
            return _DeadlineStream(stream, self.deadline)
        raise last_error or httpcore.ConnectTimeout(f"connecting to {host!r} timed out")

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        raise UrlNotAllowedError(f"unix sockets are not reachable from {self.policy.purpose}")


@functools.cache
def _default_ssl_context() -> ssl.SSLContext:
    """Certificate verification on, against certifi's CAs (as httpx does); built once, it is slow."""
    return httpx.create_ssl_context()


@contextmanager
def guarded_pool(
    policy: NetPolicy, timeout: float
) -> Iterator[tuple[httpcore.ConnectionPool, GuardedBackend]]:
    """An httpcore pool whose every connection passes `policy`, all done within `timeout` seconds.
    No proxies (environment proxies would resolve names for us) and no automatic redirects."""
    backend = GuardedBackend(policy, time.monotonic() + timeout)
    with httpcore.ConnectionPool(
        ssl_context=policy.ssl_context or _default_ssl_context(),
        network_backend=backend,
        retries=0,
        max_connections=4,
        http1=True,
        http2=False,
    ) as pool:
        yield pool, backend
