"""S3 access through boto3, and the output key layout (docs/architecture.md: uploads/, requests/, files/ in
`output_prefix`). An upload's `fingerprint` hashes the input object's version and the job parameters, so
a re-delivered event or an identical re-upload finds the finished result and is not recomputed."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from common.domain.errors import FileDownloadError, ImageTooLargeError
from common.domain.signed_urls import object_url
from common.settings import OutputUrlSettings, ProducerSettings, StorageSettings

MAX_PRESIGN_SECONDS = 7 * 24 * 3600  # SigV4 limit

RESULT_DOCUMENT = "result.json"
# Mask reuse (worker.masks): what a job keeps beside its outputs so compose can render without the network.
KEPT_MASK = "kept/mask.png"  # 8-bit mask, input size
KEPT_INPUT = "kept/input"  # the input bytes (API requests)
KEPT_MANIFEST = "kept/manifest.json"  # owner, variant, input and mask locations (API requests)


def boto_config() -> Config:
    # Checksums only where S3 requires them: botocore's default CRC32 of every body costs client CPU on each
    # request (HTTPS and SigV4 already protect the bytes in transit).
    return Config(
        signature_version="s3v4",
        retries={"max_attempts": 4, "mode": "standard"},
        connect_timeout=5,
        read_timeout=30,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )


def make_s3_client(settings: StorageSettings):
    return boto3.client(
        "s3", region_name=settings.aws_region, endpoint_url=settings.s3_endpoint_url, config=boto_config()
    )


def make_sqs_client(settings: ProducerSettings):
    return boto3.client(
        "sqs", region_name=settings.aws_region, endpoint_url=settings.sqs_endpoint_url, config=boto_config()
    )


def parse_s3_url(url: str) -> tuple[str, str]:
    """'s3://bucket/key/with/slashes' -> ('bucket', 'key/with/slashes')."""
    if not url.startswith("s3://"):
        raise ValueError(f"not an s3:// URL: {url!r}")
    bucket, _, key = url[5:].partition("/")
    if not bucket or not key:
        raise ValueError(f"s3 URL needs a bucket and a key: {url!r}")
    return bucket, key


def s3_url(bucket: str, key: str, version_id: str | None = None) -> str:
    """`s3://bucket/key`, with `?versionId=V` when it names one version (jobs from versioned-bucket uploads;
    the version also travels in the job spec, so a key that itself holds '?versionId=' is never misread)."""
    return f"s3://{bucket}/{key}" + (f"?versionId={version_id}" if version_id else "")


class SupersededError(FileDownloadError):
    """The object named by an upload event was overwritten before its job read it."""


def fingerprint(bucket: str, key: str, version: str, params: dict) -> str:
    canonical = json.dumps({"b": bucket, "k": key, "v": version, "p": params}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:20]


def upload_output_prefix(settings: StorageSettings, key: str, fp: str) -> str:
    return f"{settings.output_prefix}uploads/{key}/{fp}/"


def request_output_prefix(settings: StorageSettings, request_id: str) -> str:
    return f"{settings.output_prefix}requests/{request_id}/"


def uploads_prefix(settings: StorageSettings, owner: str) -> str:
    """Where one API key's uploads live (hashed: key ids stay out of URLs)."""
    return f"{settings.output_prefix}files/{hashlib.sha256(owner.encode()).hexdigest()[:16]}/"


@dataclass(frozen=True)
class ObjectInfo:
    bucket: str
    key: str
    size: int
    version: str  # VersionId when versioning is on, else the ETag
    content_type: str
    metadata: dict[str, str]
    etag: str = ""
    version_id: str | None = None  # None on unversioned buckets


def _version_args(version_id: str | None, if_match: str | None) -> dict[str, str]:
    extra = {"VersionId": version_id} if version_id else {}
    if if_match:
        extra["IfMatch"] = f'"{if_match.strip(chr(34))}"'
    return extra


@dataclass(frozen=True)
class StoredObject:
    """An object opened for streaming: its stored Content-Type (empty if none), size and body."""

    content_type: str
    size: int
    body: Any  # botocore's StreamingBody: read(), iter_chunks(), close()


class ObjectStore:
    """The few S3 operations the system needs, with errors turned into job errors where they are the
    caller's."""

    def __init__(self, settings: OutputUrlSettings, client=None):
        self.settings = settings
        self.client = client or make_s3_client(settings)

    def head(
        self, bucket: str, key: str, *, version_id: str | None = None, if_match: str | None = None
    ) -> ObjectInfo:
        """An object's metadata; `version_id` names one version, `if_match` (an ETag) fails with HTTP 412
        (ClientError) unless the current object still has it."""
        meta = self.client.head_object(Bucket=bucket, Key=key, **_version_args(version_id, if_match))
        version = meta.get("VersionId") or meta.get("ETag", "").strip('"')
        if version == "null":  # the null version of a suspended bucket is replaced by the next write
            version = meta.get("ETag", "").strip('"')
        return ObjectInfo(
            bucket,
            key,
            meta.get("ContentLength", 0),
            version,
            meta.get("ContentType", ""),
            {k.lower(): v for k, v in meta.get("Metadata", {}).items()},
            etag=meta.get("ETag", "").strip('"'),
            version_id=meta.get("VersionId") if meta.get("VersionId") not in (None, "null") else None,
        )

    def find(self, bucket: str, key: str) -> ObjectInfo | None:
        """An object's metadata, or None when there is no such object (or it cannot be read)."""
        try:
            return self.head(bucket, key)
        except ClientError:
            return None

    def exists(self, bucket: str, key: str) -> bool:
        return self.find(bucket, key) is not None

    def open(self, bucket: str, key: str) -> StoredObject:
        """An object as a stream, for serving it; ClientError when it cannot be read."""
        obj = self.client.get_object(Bucket=bucket, Key=key)
        return StoredObject(obj.get("ContentType") or "", int(obj.get("ContentLength", 0)), obj["Body"])

    def delete(self, bucket: str, key: str) -> None:
        self.client.delete_object(Bucket=bucket, Key=key)

    def read(
        self,
        bucket: str,
        key: str,
        *,
        max_bytes: int,
        version_id: str | None = None,
        if_match: str | None = None,
    ) -> bytes:
        """An input object (one version of it with `version_id`; only while its ETag is `if_match`, else
        SupersededError), refused when larger than max_bytes."""
        named = s3_url(bucket, key, version_id)
        try:
            obj = self.client.get_object(Bucket=bucket, Key=key, **_version_args(version_id, if_match))
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "412") or status == 412:
                raise SupersededError(
                    f"superseded by a newer upload: {named} was overwritten before this job read it (the "
                    f"upload it was made for had ETag {if_match}); the newer upload has a job of its own"
                ) from exc
            if code in ("NoSuchVersion", "InvalidArgument") and version_id:
                raise FileDownloadError(
                    f"cannot read {named}: that version no longer exists ({code})"
                ) from exc
            if code in ("NoSuchKey", "404", "NoSuchBucket", "AccessDenied", "403"):
                raise FileDownloadError(f"cannot read {named}: {code}") from exc
            raise
        size = obj.get("ContentLength", 0)
        if size > max_bytes:
            obj["Body"].close()
            raise ImageTooLargeError(f"input is {size} bytes; the limit is {max_bytes} bytes")
        return obj["Body"].read()

    def write(
        self, bucket: str, key: str, data: bytes, content_type: str, metadata: dict[str, str] | None = None
    ) -> None:
        self.client.put_object(
            Bucket=bucket, Key=key, Body=data, ContentType=content_type, Metadata=metadata or {}
        )

    def write_json(
        self, bucket: str, key: str, document: dict, metadata: dict[str, str] | None = None
    ) -> None:
        self.write(
            bucket, key, json.dumps(document, separators=(",", ":")).encode(), "application/json", metadata
        )

    def read_json(self, bucket: str, key: str) -> dict | None:
        """A JSON document, or None when it does not exist."""
        try:
            body = self.client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        return json.loads(body)

    def url_for(self, bucket: str, key: str, *, ttl: float | None = None, api: bool = False) -> str:
        """The URL put into result documents: `result_url_style` for bucket uploads, `gateway_output_urls`
        for API requests (whose callers cannot use s3:// URLs); `ttl` is the file's retention."""
        style = self.settings.gateway_output_urls if api else self.settings.result_url_style
        ttl = ttl or (self.settings.gateway_output_retention if api else self.settings.presigned_url_ttl)
        if style == "s3":
            return f"s3://{bucket}/{key}"
        if style == "public":
            return f"{self.settings.public_base_url.rstrip('/')}/{quote(key)}"
        if style == "gateway":
            return object_url(
                self.settings.gateway_public_url, self.settings.gateway_signing_secret, key, ttl
            )
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=int(min(ttl, MAX_PRESIGN_SECONDS))
        )

    def presigned_put(self, bucket: str, key: str, content_type: str, ttl: int = 3600) -> str:
        return self.client.generate_presigned_url(
            "put_object", Params={"Bucket": bucket, "Key": key, "ContentType": content_type}, ExpiresIn=ttl
        )

    def delete_prefix(self, bucket: str, prefix: str) -> int:
        """Delete every object under a prefix; returns how many."""
        deleted = 0
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            if keys:
                self.client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
                deleted += len(keys)
        return deleted
