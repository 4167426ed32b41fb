"""All configuration, from environment variables prefixed BIREFNET_ (or a .env file).

Options are grouped by concern (RedisSettings, StorageSettings, GatewayOptions, ...); each process has one
class made of the groups it reads (GatewaySettings, ProducerSettings, DelivererSettings, WorkerSettings,
OpsSettings), built once by its entry point. The reference in docs/configuration.md is generated from the
groups and the fields' descriptions (`python -m common.settings --docs`)."""

from __future__ import annotations

import ipaddress
import json
import os
import re
from collections.abc import Mapping
from functools import cached_property
from typing import Annotated, Literal, Self
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from common.domain.auth import ApiKeyConfig
from common.domain.variants import VariantRegistry


def parse_list(value: object) -> object:
    """A list from the environment, comma-separated ("a,b") or JSON ("[...]"), as a tuple; other values
    (already parsed, e.g. passed in code) unchanged."""
    if isinstance(value, str):
        text = value.strip()
        return (
            tuple(json.loads(text))
            if text.startswith("[")
            else tuple(p.strip() for p in text.split(",") if p.strip())
        )
    return value


class RedisShard(BaseModel):
    """One extra Redis deployment (common.state.shards): the variants whose queues and records it holds."""

    url: str
    variants: list[str]
    sentinel_master: str = ""  # with redis_sentinels: this shard's master name (empty: redis_sentinel_master)


class _Env(BaseSettings):
    """Every group reads the same environment: BIREFNET_<field> (or .env). The parsers below apply to
    whichever of the named fields a group has."""

    model_config = SettingsConfigDict(env_prefix="BIREFNET_", env_file=".env", extra="ignore")

    @field_validator("fetch_allow_networks", "gateway_trusted_proxies", mode="before", check_fields=False)
    @classmethod
    def _networks(cls, value: object) -> object:
        items = parse_list(value)
        return tuple(str(ipaddress.ip_network(str(n), strict=False)) for n in items)  # type: ignore[attr-defined]

    @field_validator(
        "worker_variants",
        "image_suffixes",
        "gateway_cors_origins",
        "webhook_signing_keys",
        "input_buckets",
        "sns_topic_arns",
        "redis_sentinels",
        "patch_order_check_photos",
        mode="before",
        check_fields=False,
    )
    @classmethod
    def _list(cls, value: object) -> object:
        return parse_list(value)


# --- Groups: the options of one concern. A group that needs another's fields derives from it. ---


class RedisSettings(_Env):
    """The Redis connection (TLS, ACL, Sentinel, shards): Celery broker, job records, every piece of state."""

    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis for Celery queues and job records.")
    redis_username: str = Field(
        "",
        description="ACL user name for Redis (and the master behind Sentinel); overrides the one in "
        "redis_url. Empty: the URL's, else the default user.",
    )
    redis_password: str = Field(
        "",
        description="Password for Redis (ACL user's, or requirepass); overrides the one in redis_url, so "
        "the secret can come from its own variable.",
    )
    redis_tls_ca_file: str = Field(
        "",
        description="CA bundle (PEM) that verifies the Redis server's certificate when redis_url is "
        "rediss:// (TLS). Empty: the system's trust store. The host name is checked too.",
    )
    redis_tls_cert_file: str = Field(
        "",
        description="Client certificate (PEM) for Redis servers that require one (tls-auth-clients); "
        "with redis_tls_key_file.",
    )
    redis_tls_key_file: str = Field("", description="Private key (PEM) of redis_tls_cert_file.")
    redis_sentinels: Annotated[tuple[str, ...], NoDecode] = Field(
        (),
        description="Redis Sentinel addresses host:port (comma-separated or JSON list). Set: the master "
        "of redis_sentinel_master is discovered through them and followed across failovers; redis_url then "
        "only gives the scheme (rediss:// = TLS to master and sentinels), database and credentials.",
    )
    redis_sentinel_master: str = Field("mymaster", description="Name of the Sentinel-monitored master.")
    redis_shards: list[RedisShard] = Field(
        default_factory=list,
        description='JSON [{"url": ..., "variants": [...]}]: further Redis deployments '
        "(shards 1, 2, ...), each holding the queues and job records of its variants; every other variant "
        "stays on "
        "redis_url (shard 0). Request ids name their shard. Append only: a shard's place is stored in its "
        "ids.",
    )
    redis_sentinel_username: str = Field(
        "", description="ACL user name for the sentinels themselves (if they require auth)."
    )
    redis_sentinel_password: str = Field(
        "", description="Password for the sentinels themselves (if they require auth)."
    )
    redis_wait_replicas: int = Field(
        0,
        ge=0,
        description="Replicas that must acknowledge an accepted job and a completion (Redis WAIT) "
        "before the gateway answers or the webhook is sent: with Sentinel, a failover right after then does "
        "not forget them. 0: no wait (a single Redis with AOF).",
    )
    redis_wait_timeout_ms: int = Field(
        1000,
        ge=1,
        description="Longest wait (ms) for redis_wait_replicas; past it the call proceeds (logged).",
    )


class BrokerSettings(RedisSettings):
    """Celery on Redis: how messages are sent."""

    celery_task_events: bool = Field(
        False,
        description="Send Celery task events (task-sent, -received, -started, -succeeded: one Redis "
        "PUBLISH each) for an events consumer such as Flower. Off: nothing reads them otherwise, and they "
        "are "
        "most of the pub/sub traffic a job makes.",
    )


class JobSettings(RedisSettings):
    """Job records in Redis."""

    job_record_ttl: int = Field(
        7 * 24 * 3600,
        description="Seconds job records (status, logs, result) are kept once their job ended (a waiting or "
        "running job's record does not expire).",
    )


class VariantSettings(_Env):
    """The model variants: fal's model names, weights, resolutions, queues."""

    variant_overrides: dict[str, dict] = Field(
        default_factory=dict,
        description="JSON {variant_id: {field: value}} adding or changing variants, "
        'e.g. {"general-light": {"weights": "/models/BiRefNet.safetensors"}}.',
    )

    @cached_property
    def variants(self) -> VariantRegistry:
        return VariantRegistry.with_overrides(self.variant_overrides)


class SecretSettings(RedisSettings):
    """The deployment's secrets: every process that checks them at start (check_secrets) reads them all."""

    allow_dev_secrets: bool = Field(
        False,
        description="Development only: let processes start without gateway_signing_secret and "
        "webhook_signing_keys (generated once and kept in Redis, where any process that reaches Redis can "
        "read "
        "them) and with placeholder secrets (e.g. 'CHANGE-ME'). Off: such settings stop the process at start "
        "with an error naming them. The local stacks (devstack, tests) set it.",
    )
    gateway_signing_secret: str = Field(
        "",
        description="HMAC secret for gateway-served file URLs and upload tokens. Empty: generated once "
        "and kept in Redis (development; gateway_output_urls='gateway' requires it set).",
    )
    webhook_signing_keys: Annotated[tuple[str, ...], NoDecode] = Field(
        (),
        description="Ed25519 private keys (PEM, or 32-byte seeds in hex/base64; JSON list or "
        "comma-separated) signing webhooks. The first signs; all are published at /.well-known/jwks.json "
        "(rotation). Empty: a key is generated and kept in Redis (development).",
    )
    producer_http_token: str = Field(
        "",
        description="Shared secret the event endpoint requires as `Authorization: Bearer <token>` "
        "(MinIO's webhook auth_token). Empty: no check (keep the endpoint internal).",
    )


class StorageSettings(_Env):
    """S3: where outputs go."""

    aws_region: str = Field("us-east-1", description="AWS region for S3 and SQS.")
    s3_endpoint_url: str | None = Field(
        None, description="S3 endpoint (unset for AWS; MinIO or moto URL otherwise)."
    )
    output_bucket: str = Field(
        "birefnet-output", description="Bucket for cut-outs, masks and result documents."
    )
    output_prefix: str = Field(
        "results/", description="Key prefix of everything written to the output bucket."
    )

    @field_validator("output_prefix")
    @classmethod
    def _prefix_slash(cls, value: str) -> str:
        return value if not value or value.endswith("/") else value + "/"


class OutputUrlSettings(StorageSettings, SecretSettings):
    """How result documents and API answers name output files."""

    result_url_style: Literal["presigned", "s3", "public"] = Field(
        "presigned",
        description="How result documents name output files: presigned HTTPS URLs, s3:// URIs, "
        "or public_base_url + key.",
    )
    presigned_url_ttl: int = Field(
        7 * 24 * 3600, description="Lifetime (s) of presigned output URLs (SigV4 max: 7 days)."
    )
    public_base_url: str = Field(
        "", description="Base URL of the output bucket when result_url_style is 'public'."
    )
    gateway_public_url: str = Field(
        "",
        description="Public base URL of the gateway (e.g. https://api.example). Submit answers "
        "{this}/queue/... as status_url/response_url/cancel_url, and gateway-served files use it. Empty: "
        "built from each request's Host (and X-Forwarded-* when trusted).",
    )
    gateway_output_urls: Literal["presigned", "gateway", "public"] = Field(
        "presigned",
        description="URLs of API outputs and uploads: presigned S3 URLs, 'gateway' (signed, "
        "expiring {gateway_public_url}/objects/... URLs the gateway streams from S3; needs "
        "gateway_public_url and gateway_signing_secret) or 'public' (public_base_url + key).",
    )
    gateway_output_retention: int = Field(
        7 * 24 * 3600,
        description="Default lifetime (s) of API output files and their URLs; a request's "
        "x-fal-object-lifecycle-preference expiration_duration_seconds overrides it. Presigned URLs are "
        "capped at 7 days; files are deleted when it ends.",
    )

    @model_validator(mode="after")
    def _gateway_urls_need_a_base(self) -> Self:
        if self.gateway_output_urls == "gateway" and not (
            self.gateway_public_url and self.gateway_signing_secret
        ):
            raise ValueError(
                "gateway_output_urls='gateway' needs gateway_public_url and gateway_signing_secret"
            )
        return self


class AdmissionSettings(JobSettings):
    """Queue caps and per-key limits (common.state.limits): what may still enter a variant's queue, and what a
    video costs in a key's budgets (the worker charges a video when it opens it)."""

    max_queue_depth: int = Field(
        0,
        ge=0,
        description="Most requests waiting (IN_QUEUE) per variant: submits and sync runs beyond it "
        "get 429 queue_full; bucket uploads' S3 events stay in SQS (or MinIO's queue) until there is room. "
        "0: no cap. Requests' fal_max_queue_length can only lower it.",
    )
    max_queue_depth_per_variant: dict[str, int] = Field(
        default_factory=dict,
        description="JSON {variant_id: depth} overriding max_queue_depth per variant "
        '(0: no cap for that variant), e.g. {"general-heavy": 200}.',
    )
    queue_full_retry_after: int = Field(
        5,
        ge=1,
        description="Retry-After (s) of a queue_full 429, and how long a deferred S3 event stays "
        "invisible in SQS before it is tried again.",
    )
    video_limit_unit_seconds: float = Field(
        10.0,
        gt=0,
        description="A video counts ceil(duration / this) units against an API key's "
        "requests_per_minute and max_concurrent (an image counts one): at submit for an inline (data URI) "
        "video, "
        "else when a worker opens it; its segments are covered by that charge.",
    )


class FetchSettings(_Env):
    """Outbound HTTP (image URLs, webhooks, SNS certificates): the SSRF guard and timeouts."""

    fetch_allow_networks: Annotated[tuple[str, ...], NoDecode] = Field(
        (),
        description="CIDR networks (comma-separated or JSON list) that http(s) image URLs may reach although "
        "they are private, loopback or otherwise not public, e.g. 10.20.0.0/16 for an intranet image server "
        "(tests: 127.0.0.0/8). Empty: public addresses only. Cloud metadata addresses stay refused "
        "regardless.",
    )
    fetch_allowed_ports: Annotated[tuple[int, ...], NoDecode] = Field(
        (80, 443), description="Ports http(s) image URLs may use (comma-separated); `*` allows any port."
    )
    fetch_max_redirects: int = Field(
        5, ge=0, description="Redirects followed when downloading an image URL; each hop is checked again."
    )
    fetch_connect_timeout: float = Field(
        5.0,
        gt=0,
        description="Timeout (s) for resolving and connecting to an image URL's host (per hop); "
        "http_timeout bounds the whole download, redirects included.",
    )
    http_timeout: float = Field(20.0, description="Timeout (s) for downloading image URLs.")

    @field_validator("fetch_allowed_ports", mode="before")
    @classmethod
    def _ports(cls, value: object) -> object:
        if isinstance(value, str) and value.strip() == "*":
            return (0,)  # 0: any port
        items = parse_list(value)
        if not items:
            raise ValueError("fetch_allowed_ports may not be empty; use * to allow any port")
        return tuple(items)  # type: ignore[arg-type]


class InputLimitSettings(_Env):
    """The largest input image accepted."""

    max_input_bytes: int = Field(50 * 1024 * 1024, description="Largest input image accepted, in bytes.")
    max_input_pixels: int = Field(64_000_000, description="Largest decoded input image, in pixels.")
    max_input_side: int = Field(
        16383,
        ge=8,
        description="Largest input width or height, in pixels (16383 is the most a WebP output holds).",
    )


class WebhookTimingSettings(_Env):
    """When webhook attempts fall due: whichever process ends a job books its first attempt with the
    completion (common.state.results), the deliverer the retries."""

    webhook_timeout: float = Field(15.0, description="Timeout (s) of one webhook delivery attempt.")
    webhook_retry_base: float = Field(
        15.0,
        description="First webhook retry delay (s); doubles per retry up to webhook_retry_max_delay "
        "(defaults: 10 retries over at most about 2 hours). Each delay is jittered between half and all of "
        "that, so the webhooks of one receiver's outage do not all retry at once.",
    )
    webhook_retry_max_delay: float = Field(1800.0, description="Longest delay (s) between webhook retries.")


class WebhookRetrySettings(_Env):
    """How many times a webhook is retried (the deliverer retries; ops tells retrying from failed)."""

    webhook_max_retries: int = Field(
        10, ge=0, description="Webhook retries after the first failed attempt (fal: 10)."
    )


class MetricsSettings(_Env):
    """Prometheus /metrics and health ports."""

    metrics_host: str = Field(
        "127.0.0.1",
        description="Address the metrics ports (worker, producer, deliverer, gateway_metrics_port) "
        "bind, with the worker's /healthz and /readyz. They have no authentication: loopback by default; a "
        "deployment whose Prometheus or kubelet probes reach the pod sets 0.0.0.0 and keeps the ports off "
        "public networks (e.g. a NetworkPolicy).",
    )


class ServedVariantSettings(_Env):
    """The variants a worker serves; the S3-event producer records the jobs of uploads it rejects (invalid
    metadata, superseded) under the first."""

    worker_variants: Annotated[tuple[str, ...], NoDecode] = Field(
        ("general-light",), description="Variant ids this worker serves."
    )


class GatewayOptions(_Env):
    """The fal-compatible HTTP gateway (`python -m gateway`)."""

    gateway_host: str = Field(
        "0.0.0.0", description="Address the fal-compatible HTTP gateway (`python -m gateway`) binds."
    )
    gateway_port: int = Field(8080, description="Port of the gateway.")
    gateway_workers: int = Field(1, ge=1, description="uvicorn worker processes of the gateway.")
    gateway_tls_cert: str = Field(
        "",
        description="PEM certificate chain for HTTPS (fal's clients only speak https); with "
        "gateway_tls_key. Empty: plain HTTP, e.g. behind a TLS-terminating load balancer.",
    )
    gateway_tls_key: str = Field("", description="PEM private key of gateway_tls_cert.")
    gateway_trust_forwarded: bool = Field(
        False,
        description="Believe X-Forwarded-For (the caller's address, for failed-auth throttling) and "
        "X-Forwarded-Proto/X-Forwarded-Host (public URLs) from the proxies in gateway_trusted_proxies; from "
        "any "
        "other peer they are ignored. Set true behind a load balancer or ingress, with its addresses.",
    )
    gateway_trusted_proxies: Annotated[tuple[str, ...], NoDecode] = Field(
        ("127.0.0.1/32", "::1/128"),
        description="Addresses or CIDR networks of the proxies in front of the "
        "gateway (comma-separated or JSON list), e.g. the load balancer's subnet or the cluster's pod "
        "network; "
        "their X-Forwarded-* headers count when gateway_trust_forwarded is true.",
    )
    gateway_cors_origins: Annotated[tuple[str, ...], NoDecode] = Field(
        ("*",), description="Origins allowed by CORS (comma-separated or JSON list; * = any)."
    )
    gateway_auth: Literal["keys", "off"] = Field(
        "keys",
        description="'keys': every API call needs `Authorization: Key <id:secret>` matching "
        "gateway_api_keys. 'off': development only, no auth; all callers share one namespace.",
    )
    gateway_api_keys: list[ApiKeyConfig] = Field(
        default_factory=list,
        description='JSON list of API keys, secrets hashed: [{"id": "team-a", "hash": '
        '"scrypt$...", "user_id": "u1", "admin": false, "s3_read": ["bucket/prefix/"]}]. `python -m '
        "ops new-key --id team-a` makes a FAL_KEY and its entry. s3_read lists what an s3:// "
        "image_url of that key may name.",
    )
    gateway_result_retention: int = Field(
        3600, description="Seconds a completed request's status and result stay readable; then 404."
    )
    gateway_max_body_bytes: int = Field(
        40 * 1024 * 1024, description="Largest request body (JSON with data URIs, uploads); larger is 413."
    )
    gateway_body_budget_bytes: int = Field(
        128 * 1024 * 1024,
        ge=0,
        description="Most bytes of large request bodies (over 1 MiB) one gateway process "
        "handles at once: each is parsed and decoded in memory at a few times its size, so this bounds the "
        "memory they take. A body that does not fit is a 429 server_busy with Retry-After, before it is read "
        "(one body alone always fits). 0: no bound. Size it with bench/bench_body_memory.py against the "
        "process's memory limit.",
    )
    gateway_sse_ping_interval: float = Field(
        10.0, description="Seconds between `: ping` comments on status streams."
    )
    gateway_push_recheck: float = Field(
        60.0,
        gt=0,
        description="A waiting sync run or status stream learns of changes by Redis pub/sub; it "
        "re-reads the record anyway after this many seconds without a message (a safety net, not a poll).",
    )
    gateway_queue_position_poll: float = Field(
        1.0,
        gt=0,
        description="A status stream of a queued request re-reads its queue position this often (the "
        "other jobs' transitions publish no change notice unless a caller watches them).",
    )
    gateway_push_fallback_poll: float = Field(
        0.5,
        gt=0,
        description="While the gateway's pub/sub subscription is down, waiting callers re-read "
        "their job this often instead.",
    )
    gateway_sweep_interval: float = Field(
        1.0,
        description="How often (s) the gateway expires queued requests past their X-Fal-Request-Timeout "
        "and deletes output files past their retention.",
    )
    gateway_auth_fail_limit: int = Field(
        20,
        ge=0,
        description="Failed authentications allowed per client address, and per key id, within "
        "gateway_auth_fail_window; beyond it the gateway answers 429 with Retry-After without checking the "
        "credential (0: no throttling).",
    )
    gateway_auth_fail_window: int = Field(
        60, ge=1, description="Seconds over which gateway_auth_fail_limit counts failed authentications."
    )
    gateway_metrics_port: int = Field(
        0,
        ge=0,
        description="Port serving the gateway's Prometheus /metrics without a key (for in-cluster "
        "scraping; keep it off the public network). 0: off. On the API port /metrics needs an admin key when "
        "gateway_auth is 'keys'.",
    )

    @property  # not cached: model_copy(update=...) would keep a stale value
    def trusted_proxy_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(ipaddress.ip_network(net) for net in self.gateway_trusted_proxies)


class ProducerOptions(_Env):
    """The S3-event producer (`python -m producer sqs|http`): which events become jobs."""

    input_bucket: str = Field("birefnet-input", description="Bucket whose uploads become jobs.")
    input_buckets: Annotated[tuple[str, ...], NoDecode] = Field(
        (),
        description="Buckets whose upload events become jobs (comma-separated or JSON list). Empty: "
        "input_bucket only. Events for any other bucket are ignored, with a log line that says so.",
    )
    input_prefixes: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Per input bucket, the key prefixes whose uploads become jobs, "
        'JSON, e.g. {"photos": ["incoming/", "shop/"]}. A bucket not named here takes every key.',
    )
    image_suffixes: Annotated[tuple[str, ...], NoDecode] = Field(
        (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"),
        description="Object key suffixes (case-insensitive) treated as images; other keys are ignored.",
    )
    prefix_defaults: dict[str, dict[str, object]] = Field(
        default_factory=dict,
        description='Per key-prefix job defaults, JSON, e.g. {"portraits/": {"model": '
        '"Portrait"}}. The longest matching prefix wins; object metadata overrides.',
    )
    default_endpoint: Literal["v1", "v2"] = Field(
        "v2", description="fal endpoint whose schema S3-event jobs follow."
    )
    mask_cache_uploads_scope: Literal["uploads", "shared"] = Field(
        "uploads",
        description="Cache scope of bucket-upload jobs: 'uploads' (among uploads only) or 'shared' (with "
        'API keys whose entry says "mask_cache": "shared"; keys default to their own scope).',
    )
    sqs_endpoint_url: str | None = Field(None, description="SQS endpoint (unset for AWS).")
    sqs_queue_url: str | None = Field(
        None, description="SQS queue receiving the input bucket's event notifications."
    )
    sqs_wait_seconds: int = Field(10, description="SQS long-poll wait per receive call.")
    sns_topic_arns: Annotated[tuple[str, ...], NoDecode] = Field(
        (),
        description="SNS topics whose HTTP(S) deliveries the event endpoint accepts (comma-separated). "
        "Messages must carry a valid SNS signature (versions 1 and 2, certificate fetched from an SNS host); "
        "subscriptions of these topics are confirmed automatically. Empty: SNS over HTTP is refused.",
    )
    producer_http_host: str = Field(
        "0.0.0.0",
        description="Address `python -m producer http` (S3-style event notifications, e.g. MinIO "
        "webhooks, at POST /s3-events) binds.",
    )
    producer_http_port: int = Field(8081, description="Port of `python -m producer http`.")
    producer_metrics_port: int = Field(
        9101,
        description="Port of the SQS producer's Prometheus /metrics (0: off); `producer http` serves "
        "/metrics on its own port.",
    )

    @property
    def accepted_input_buckets(self) -> tuple[str, ...]:
        return self.input_buckets or (self.input_bucket,)


class DelivererOptions(_Env):
    """The webhook deliverer (`python -m deliverer`)."""

    webhooks_metrics_port: int = Field(
        9102, description="Port of the webhook deliverer's Prometheus /metrics (0: off)."
    )


class OpsOptions(VariantSettings):
    """What ops status shows: `python -m ops status` and the gateway's /admin/ops/status (the playground's
    ops page)."""

    ops_window_seconds: int = Field(
        900, description="Default window (s) of the ops command's throughput and latency figures."
    )


class WorkerOptions(VariantSettings):
    """The GPU worker (`python -m worker`): jobs, leases, attempts, time limits."""

    worker_concurrency: int = Field(
        1,
        ge=1,
        description="Jobs a worker holds at once (one thread each). Their forward passes are "
        "batched (up to max_batch_size) when their operating resolutions match: dynamic batching.",
    )
    batch_wait_ms: float = Field(
        10.0, description="How long the batcher waits for more jobs to fill a batch."
    )
    ready_file: str = Field(
        "/tmp/birefnet-worker-ready", description="Written once models are loaded (readiness probe)."
    )
    job_lease_seconds: int = Field(
        30,
        description="Lease a worker holds on a running job, renewed every third of it while it runs. A "
        "killed worker's job is sent again once its lease has expired: within this plus a sixth of it "
        "(workers look for such jobs every job_lease_seconds / 6 s).",
    )
    max_job_attempts: int = Field(
        3, description="Deliveries of one job before it is ended as failed (poison job)."
    )
    job_time_limit: float = Field(
        300.0,
        gt=0,
        description="Most seconds one run of a job may take on a worker (download to stored "
        "result), sized for the largest allowed image at the slowest variant on a GPU; a variant's "
        "`time_limit` (variant_overrides) overrides it. A run past it ends that attempt (counted, retried on "
        "another worker; after max_job_attempts: 504 request_timeout, dead-lettered), and a worker whose "
        "inference thread is stuck that long hands its jobs back and exits for its supervisor to replace.",
    )
    cancel_check_interval: float = Field(
        1.0,
        ge=0,
        description="Seconds after which a running image job reads its cancel flag again before rendering "
        "(one Redis command). A cancel requested more recently is still honoured: the completion records "
        "fal's cancelled outcome instead of the result; only the render and upload are not saved. "
        "0: read it before every render.",
    )
    worker_metrics_port: int = Field(
        9100, description="Port of a worker's Prometheus /metrics (0: off). A busy port is logged, not fatal."
    )
    ops_completions_kept: int = Field(
        100_000,
        description="Completed jobs kept (approximately) in the Redis stream birefnet:completions "
        "that ops throughput and latency are computed from.",
    )

    def time_limit(self, variant_id: str) -> float:
        """The run-time limit of one run of a job of this variant (job_time_limit unless the variant sets
        one)."""
        return self.variants.get(variant_id).time_limit or self.job_time_limit


class ModelSettings(_Env):
    """The worker's models: device, weights, engine, warm-up, patch-order self-check."""

    device: str = Field("auto", description="'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1'...")
    weights_cache_dir: str = Field("~/.cache/birefnet", description="Where downloaded checkpoints are kept.")
    weights_fallback: Literal["none", "recipe"] = Field(
        "none",
        description="If a variant's checkpoint cannot be loaded: fail ('none') or run with untrained "
        "recipe weights ('recipe', demos only; every log line and result says so).",
    )
    torch_threads: int = Field(
        0,
        description="CPU threads for torch (0: 1 on CUDA and for the null model, "
        "where torch only does tiny host-side work; torch's default on CPU).",
    )
    retain_freed_memory: bool = Field(
        True,
        description="Workers tell glibc's malloc to keep freed memory (no mmap for big blocks, no heap "
        "trim), so each forward reuses its activation buffers instead of page-faulting them in afresh (CPU, "
        "1024²: Swin-L 19.4 -> 13.8 s, Swin-T 5.4 -> 4.5 s). A worker then keeps its peak memory between "
        "jobs. No effect off glibc.",
    )
    worker_share_networks: bool = Field(
        True,
        description="A worker serving several variants loads a network once for variants that name the "
        "same checkpoint, backbone and patch order (v1 and v2 Portrait), and once per backbone and patch "
        "order for variants that fall back to recipe weights. false: one network per variant.",
    )
    patch_order_check: Literal["adopt", "pin", "off"] = Field(
        "adopt",
        description="When a worker loads trained weights it runs sample photos through both decoder "
        "patch orders and compares mask confidence. 'adopt': if the configured order is clearly worse, use "
        "the "
        "better one (logged loudly); 'pin': keep the configured order whatever the check says; 'off': no "
        "check.",
    )
    patch_order_check_margin: float = Field(
        0.02,
        ge=0,
        description="How much higher (mean distance of the mask from 0.5, 0..0.5) the other order's "
        "confidence must "
        "be, and on most photos, to count as clearly better; closer than this keeps the configured order.",
    )
    patch_order_check_resolution: str = Field(
        "512x512", description="Operating resolution (WxH) of the patch-order check's forward passes."
    )
    patch_order_check_photos: Annotated[tuple[str, ...], NoDecode] = Field(
        (),
        description="Image files for the patch-order check (comma-separated); empty: the photos shipped "
        "in worker/samples/.",
    )
    inference_dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16",
        description="Dtype of the network's weights and compute on CUDA (float16/bfloat16: the "
        "weights are converted at load, no autocast); the CPU always runs float32.",
    )
    channels_last: bool = Field(
        True, description="Use the channels_last memory layout on CUDA (faster convolutions)."
    )
    compile_model: bool = Field(
        False,
        description="Wrap the network in torch.compile (mainly for CUDA). If compiling fails at the "
        "warm-up, the worker logs it and runs eagerly.",
    )
    warmup_forward: bool = Field(
        True,
        description="Run one forward pass when a model loads (CUDA: at the variant's default resolution, "
        "so kernels are tuned before the first job; CPU: a small one that proves the model runs).",
    )
    max_batch_size: int = Field(4, ge=1, description="Most images the engine puts through one forward pass.")
    warmup_all_shapes: bool = Field(
        True,
        description="CUDA: the warm-up runs every allowed operating resolution of the variant at every "
        "batch size up to max_batch_size, so no job pays for kernel tuning or compilation.",
    )
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = Field(
        "default",
        description="torch.compile mode when compile_model is on; 'reduce-overhead' captures CUDA "
        "graphs (fixed shapes: with warmup_all_shapes every shape is captured at load).",
    )
    benchmark_null_model: bool = Field(
        False,
        description="BENCHMARK ONLY: replace every variant's network by a constant mask (no weights, "
        "no forward) to measure the rest of the system. Every log line and result says NULL MODEL.",
    )
    fused_inference: bool = Field(
        True,
        description="Use the native model's fused inference path (BatchNorm folded into convs, faster "
        "deformable conv; same results up to float32 rounding). Off: the reference path.",
    )
    trust_remote_code: bool = Field(
        False,
        description="Let Hugging Face repos whose weights do not fit the native BiRefNet load through "
        "transformers' AutoModelForImageSegmentation with trust_remote_code=True (runs Python from the "
        "repo).",
    )


class OutputEncodingSettings(_Env):
    """How the worker encodes output images."""

    png_compress_level: int = Field(
        1,
        ge=0,
        le=9,
        description="Deflate level for PNG outputs (rows up-filtered). 1: zlib-ng's fastest "
        "(a 1 MP photo's cut-out ~1.0 MB, a quarter of raw RGBA); 2-9: libdeflate at that level, ~30 % "
        "smaller at about 2x the CPU (0 is taken as 1). Masks always go through zlib-ng.",
    )
    webp_quality: int = Field(
        90, ge=1, le=100, description="Quality of lossy WebP cut-outs (alpha and masks are always lossless)."
    )
    jpeg_quality: int = Field(
        90, ge=1, le=95, description="Quality of JPEG outputs (opaque backgrounds only)."
    )
    avif_quality: int = Field(80, ge=1, le=100, description="Quality of AVIF outputs (colour and alpha).")


class MaskCacheSettings(_Env):
    """The worker's content cache of masks."""

    mask_cache_seconds: int = Field(
        24 * 3600,
        ge=0,
        description="Lifetime (s) of the content cache: a job whose image bytes, variant, "
        "weights and operating resolution match an earlier job's (in the same cache scope) reuses that mask "
        "instead of running the network. 0: off.",
    )
    mask_cache_wait_seconds: float = Field(
        60.0,
        ge=0,
        description="How long a job waits for an identical job already running the network (same "
        "cache key) to store its mask, before running the network itself.",
    )


class VideoSettings(_Env):
    """Video jobs (fal-ai/birefnet/v2/video)."""

    video_max_seconds: float = Field(
        600.0, gt=0, description="Longest input video accepted, in seconds (longer: a 422 video_too_large)."
    )
    video_max_bytes: int = Field(
        1024 * 1024 * 1024, gt=0, description="Largest input video file accepted, in bytes."
    )
    video_max_pixels: int = Field(
        4096 * 2304, gt=0, description="Largest video frame accepted, in pixels (width x height)."
    )
    video_time_limit_per_second: float = Field(
        30.0,
        ge=0,
        description="Seconds added to a video job's run-time limit (job_time_limit or the variant's) "
        "per second of video, so that the limit scales with duration.",
    )
    video_segment_seconds: float = Field(
        10.0,
        ge=0,
        description="Videos longer than this are split into segments of about this length, queued "
        "as jobs of their own on the variant's queue so that several workers share one video; a worker lost "
        "mid-video costs only its segment. 0: never split.",
    )


# --- One class per process: the groups it reads, and nothing else (mypy holds each function to its type). ---
# Each lists all its groups (a derived group before its base) in the one order of the groups above, so that
# the union of them all has a consistent MRO.


class GatewaySettings(
    GatewayOptions,
    OpsOptions,
    OutputUrlSettings,
    StorageSettings,
    SecretSettings,
    AdmissionSettings,
    JobSettings,
    VariantSettings,
    BrokerSettings,
    RedisSettings,
    FetchSettings,
    InputLimitSettings,
    WebhookTimingSettings,
    MetricsSettings,
):
    """`python -m gateway`."""


class ProducerSettings(
    ProducerOptions,
    ServedVariantSettings,
    OutputUrlSettings,
    StorageSettings,
    SecretSettings,
    AdmissionSettings,
    JobSettings,
    VariantSettings,
    BrokerSettings,
    RedisSettings,
    FetchSettings,
    WebhookTimingSettings,
    MetricsSettings,
):
    """`python -m producer sqs|http`."""


class DelivererSettings(
    DelivererOptions,
    SecretSettings,
    JobSettings,
    RedisSettings,
    FetchSettings,
    WebhookTimingSettings,
    WebhookRetrySettings,
    MetricsSettings,
):
    """`python -m deliverer`."""


class WorkerSettings(
    WorkerOptions,
    ModelSettings,
    OutputEncodingSettings,
    MaskCacheSettings,
    VideoSettings,
    ServedVariantSettings,
    OutputUrlSettings,
    StorageSettings,
    SecretSettings,
    AdmissionSettings,
    JobSettings,
    VariantSettings,
    BrokerSettings,
    RedisSettings,
    FetchSettings,
    InputLimitSettings,
    WebhookTimingSettings,
    MetricsSettings,
):
    """`python -m worker`."""


class OpsSettings(
    OpsOptions, JobSettings, VariantSettings, BrokerSettings, RedisSettings, WebhookRetrySettings
):
    """`python -m ops`."""


# The pydantic mypy plugin gives each process class its own model_construct signature; only this union of them
# sees them clash.
class Settings(GatewaySettings, ProducerSettings, DelivererSettings, WorkerSettings, OpsSettings):  # type: ignore[misc]
    """Every option: for the local stacks (devstack, tests, benchmarks) that run all processes from one
    configuration. A process builds its own class above."""


PROCESSES: dict[str, type[_Env]] = {
    "gateway": GatewaySettings,
    "producer": ProducerSettings,
    "deliverer": DelivererSettings,
    "worker": WorkerSettings,
    "ops": OpsSettings,
}

# The reference's sections (docs/configuration.md), in this order: shared groups first, then each process's
# own.
REFERENCE_GROUPS: dict[str, type[_Env]] = {
    "Redis": RedisSettings,
    "Celery broker": BrokerSettings,
    "Job records": JobSettings,
    "Model variants": VariantSettings,
    "Secrets": SecretSettings,
    "Outbound HTTP and the SSRF guard": FetchSettings,
    "Metrics": MetricsSettings,
    "S3": StorageSettings,
    "Output URLs": OutputUrlSettings,
    "Queue caps and per-key limits": AdmissionSettings,
    "Input limits": InputLimitSettings,
    "Webhook timing": WebhookTimingSettings,
    "Webhook retries": WebhookRetrySettings,
    "Served variants": ServedVariantSettings,
    "Gateway": GatewayOptions,
    "Producer": ProducerOptions,
    "Webhook deliverer": DelivererOptions,
    "Ops": OpsOptions,
    "Worker": WorkerOptions,
    "Models and engine": ModelSettings,
    "Output encoding": OutputEncodingSettings,
    "Mask cache": MaskCacheSettings,
    "Video": VideoSettings,
}


def own_fields(group: type[_Env]) -> list[str]:
    """The fields a group defines itself (not those of the groups it derives from)."""
    return [name for name in group.model_fields if name in vars(group).get("__annotations__", {})]


def readers(group: type[_Env]) -> list[str]:
    """The processes whose settings include this group."""
    return [process for process, settings_class in PROCESSES.items() if issubclass(settings_class, group)]


class InsecureSettings(RuntimeError):
    """Settings a deployment must not run with (see `secret_problems`)."""


# Values that stand for a secret someone forgot to set: CHANGE-ME, birefnet-change-me, <placeholder>, ...
_PLACEHOLDER = re.compile(
    r"change[-_ ]?me|placeholder|replace[-_ ]?me|^<.*>$|^(secret|password|changeit|xxx+|todo)$", re.IGNORECASE
)


def is_placeholder(value: str) -> bool:
    return bool(_PLACEHOLDER.search(value.strip()))


def secret_problems(settings: SecretSettings, environ: Mapping[str, str]) -> list[str]:
    """What makes these settings unfit outside development: keys that would be generated into Redis, and
    secrets left at a placeholder (settings, the Redis URL's password, the S3 secret key in the
    environment)."""
    problems = []
    if not settings.gateway_signing_secret:
        problems.append("BIREFNET_GATEWAY_SIGNING_SECRET is empty (it would be generated and kept in Redis)")
    if not settings.webhook_signing_keys:
        problems.append("BIREFNET_WEBHOOK_SIGNING_KEYS is empty (a key would be generated and kept in Redis)")
    secrets = {
        "BIREFNET_GATEWAY_SIGNING_SECRET": settings.gateway_signing_secret,
        "BIREFNET_REDIS_PASSWORD": settings.redis_password,
        "BIREFNET_REDIS_SENTINEL_PASSWORD": settings.redis_sentinel_password,
        "BIREFNET_PRODUCER_HTTP_TOKEN": settings.producer_http_token,
        "the password in BIREFNET_REDIS_URL": urlsplit(settings.redis_url).password or "",
        "AWS_SECRET_ACCESS_KEY": environ.get("AWS_SECRET_ACCESS_KEY", ""),
        **{f"BIREFNET_WEBHOOK_SIGNING_KEYS[{i}]": key for i, key in enumerate(settings.webhook_signing_keys)},
    }
    problems += [
        f"{name} is a placeholder" for name, value in secrets.items() if value and is_placeholder(value)
    ]
    return problems


def check_secrets(settings: SecretSettings, environ: Mapping[str, str] | None = None) -> None:
    """Stop a process at start when its secrets are unfit for production, unless allow_dev_secrets is set."""
    if settings.allow_dev_secrets:
        return
    problems = secret_problems(settings, os.environ if environ is None else environ)
    if problems:
        raise InsecureSettings(
            "refusing to start with development secrets: " + "; ".join(problems) + ". Configure real secrets "
            "(e.g. from a secret store), or set BIREFNET_ALLOW_DEV_SECRETS=true on a development stack."
        )


def settings_table() -> str:
    """The settings reference, one section per group (which processes read it, then its table), made from the
    groups' docstrings and the fields' descriptions. Each option is listed once."""
    listed = [name for group in REFERENCE_GROUPS.values() for name in own_fields(group)]
    if sorted(listed) != sorted(Settings.model_fields):
        raise ValueError(
            f"options not listed exactly once: {sorted(set(Settings.model_fields) ^ set(listed))}"
        )
    sections = []
    for title, group in REFERENCE_GROUPS.items():
        rows = [
            f"### {title}",
            "",
            f"Read by: {', '.join(readers(group))}. {' '.join((group.__doc__ or '').split())}",
            "",
            "| variable | default | meaning |",
            "| --- | --- | --- |",
        ]
        for name in own_fields(group):
            info = Settings.model_fields[name]
            default = info.get_default(call_default_factory=True)
            shown = json.dumps(default) if isinstance(default, dict | list | tuple) else default
            rows.append(f"| `BIREFNET_{name.upper()}` | `{shown}` | {info.description or ''} |")
        sections.append("\n".join(rows))
    return "\n\n".join(sections)


def update_docs(path: str = "docs/configuration.md") -> None:
    """Rewrite the table between the settings markers of the configuration page."""
    import re
    from pathlib import Path

    pattern = re.compile(r"(<!-- settings:start[^>]*-->\n).*?(\n<!-- settings:end -->)", re.S)
    text = Path(path).read_text()
    Path(path).write_text(pattern.sub(lambda m: m.group(1) + settings_table() + m.group(2), text))


if __name__ == "__main__":
    import sys

    if {"--docs", "--readme"} & set(sys.argv):
        update_docs()
    elif "--current" in sys.argv:  # this environment's effective settings, secrets masked
        from common.observability.redact import redact_settings

        print(json.dumps(redact_settings(Settings().model_dump(mode="json")), indent=2, default=str))
    else:
        print(settings_table())
