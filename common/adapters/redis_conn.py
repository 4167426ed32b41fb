"""The one place Redis connections are made (plain, TLS, ACL users, Sentinel): every Redis user, the
Celery broker included, gets its client or broker options here, so a managed Redis is configured once."""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit

import kombu.transport.redis as kombu_redis
import redis
import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.sentinel import Sentinel

from common.settings import RedisSettings
from common.state import keys

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RedisTarget:
    """Where Redis is and how to talk to it, from the settings (nothing read from the environment)."""

    host: str
    port: int
    db: int
    username: str | None
    password: str | None
    tls: bool
    ca_file: str | None
    cert_file: str | None
    key_file: str | None
    sentinels: tuple[tuple[str, int], ...]
    master: str
    sentinel_username: str | None
    sentinel_password: str | None

    @classmethod
    def from_settings(cls, settings: RedisSettings) -> RedisTarget:
        url = urlsplit(settings.redis_url)
        if url.scheme not in ("redis", "rediss"):
            raise ValueError(f"redis_url must be redis:// or rediss://, not {url.scheme}://")
        path = url.path.strip("/")
        return cls(
            host=url.hostname or "127.0.0.1",
            port=url.port or 6379,
            db=int(path) if path else 0,
            username=settings.redis_username or (unquote(url.username) if url.username else None),
            password=settings.redis_password or (unquote(url.password) if url.password else None),
            tls=url.scheme == "rediss",
            ca_file=settings.redis_tls_ca_file or None,
            cert_file=settings.redis_tls_cert_file or None,
            key_file=settings.redis_tls_key_file or None,
            sentinels=tuple(_host_port(item) for item in settings.redis_sentinels),
            master=settings.redis_sentinel_master,
            sentinel_username=settings.redis_sentinel_username or None,
            sentinel_password=settings.redis_sentinel_password or None,
        )

    def tls_kwargs(self) -> dict:
        """redis-py's TLS arguments (sync and asyncio clients take the same)."""
        if not self.tls:
            return {}
        return {
            "ssl": True,
            "ssl_cert_reqs": "required",
            "ssl_ca_certs": self.ca_file,
            "ssl_certfile": self.cert_file,
            "ssl_keyfile": self.key_file,
        }

    def auth_kwargs(self) -> dict:
        return {"username": self.username, "password": self.password}

    def sentinel_kwargs(self) -> dict:
        """How to reach the sentinels themselves: their own credentials, TLS like the master."""
        return {"username": self.sentinel_username, "password": self.sentinel_password, **self.tls_kwargs()}


def _host_port(item: str) -> tuple[str, int]:
    host, _, port = item.strip().rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"redis_sentinels entries are host:port, not {item!r}")
    return host.strip("[]"), int(port)


def _client(
    settings: RedisSettings, client_class: type, sentinel_class: type, decode_responses: bool, options: dict
):
    target = RedisTarget.from_settings(settings)
    kwargs = {
        "db": target.db,
        "decode_responses": decode_responses,
        **target.auth_kwargs(),
        **target.tls_kwargs(),
        **options,
    }
    if target.sentinels:
        sentinel = sentinel_class(
            list(target.sentinels),
            sentinel_kwargs=target.sentinel_kwargs(),
            socket_timeout=options.get("socket_timeout", 5),
        )
        return sentinel.master_for(target.master, redis_class=client_class, **kwargs)
    return client_class(host=target.host, port=target.port, **kwargs)


def redis_client(settings: RedisSettings, *, decode_responses: bool = True, **options) -> redis.Redis:
    """A redis-py client for the configured Redis (the current master, with Sentinel)."""
    return _client(settings, redis.Redis, Sentinel, decode_responses, options)


def async_redis_client(
    settings: RedisSettings, *, decode_responses: bool = True, **options
) -> aioredis.Redis:
    """The asyncio twin of `redis_client` (the gateway's hot read paths)."""
    return _client(settings, aioredis.Redis, AsyncSentinel, decode_responses, options)


class SentinelChannel(kombu_redis.SentinelChannel):
    """kombu's Sentinel channel, keeping its connection pool for the close after a lost connection: after
    a failover kombu puts a worker's unstarted messages back through a fresh pool built from connection
    details that are gone by then (AttributeError, which Celery takes as fatal). The kept Sentinel-managed
    pool asks the sentinels for the master at every new connection, so it serves the restore there."""

    def _get_pool(self, asynchronous: bool = False):
        kept = self.__dict__.setdefault("_kept_pools", {})
        if self.connection.client is None and asynchronous in kept:
            return kept[asynchronous]
        pool = super()._get_pool(asynchronous)
        kept[asynchronous] = pool
        return pool


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel


SENTINEL_TRANSPORT = f"{__name__}:SentinelTransport"


@dataclass(frozen=True)
class BrokerOptions:
    """What Celery needs: `broker_url`, extra `broker_transport_options`, `broker_use_ssl`, and the kombu
    transport (None: kombu's Redis transport, named by the URL; ours for Sentinel)."""

    url: str
    transport_options: dict
    use_ssl: dict | None
    transport: str | None = None


def celery_broker(settings: RedisSettings) -> BrokerOptions:
    target = RedisTarget.from_settings(settings)
    userinfo = ""
    if target.username or target.password:
        userinfo = f"{quote(target.username or '', safe='')}:{quote(target.password or '', safe='')}@"
    use_ssl = None
    if target.tls:
        use_ssl = {
            "ssl_cert_reqs": ssl.CERT_REQUIRED,
            "ssl_ca_certs": target.ca_file,
            "ssl_certfile": target.cert_file,
            "ssl_keyfile": target.key_file,
        }
    if target.sentinels:
        # kombu: `sentinel://[user:password@]host:port/db;sentinel://...`; the credentials are the master's.
        url = ";".join(f"sentinel://{userinfo}{host}:{port}/{target.db}" for host, port in target.sentinels)
        sentinel_kwargs = {k: v for k, v in target.sentinel_kwargs().items() if v is not None}
        return BrokerOptions(
            url,
            {"master_name": target.master, "sentinel_kwargs": sentinel_kwargs},
            use_ssl,
            SENTINEL_TRANSPORT,
        )
    scheme = "rediss" if target.tls else "redis"
    host = f"[{target.host}]" if ":" in target.host else target.host
    return BrokerOptions(f"{scheme}://{userinfo}{host}:{target.port}/{target.db}", {}, use_ssl)


def wait_for_replicas(client: redis.Redis, settings: RedisSettings) -> None:
    """Block until `redis_wait_replicas` replicas have every write made so far, by any connection (Redis
    WAIT), so a Sentinel failover right after does not forget it.

    WAIT covers the replication offset of its own connection's last write, and pooled clients (and the
    Celery broker) write on other connections: so one connection writes a marker, whose offset is past
    every earlier write, and waits for it. A short count is logged, not raised: the write is on the
    master, and refusing now would make a client send the same job twice."""
    wanted = settings.redis_wait_replicas
    if wanted <= 0:
        return
    try:
        pipe = client.pipeline(transaction=False)
        pipe.set(keys.REPLICATED_MARKER, "1", px=60_000)
        pipe.wait(wanted, settings.redis_wait_timeout_ms)
        acked = pipe.execute()[-1]
    except redis.RedisError as exc:
        log.warning("WAIT for %d replica(s) failed: %s", wanted, exc)
        return
    if acked < wanted:
        log.warning(
            "only %d of %d replica(s) acknowledged within %d ms",
            acked,
            wanted,
            settings.redis_wait_timeout_ms,
        )
