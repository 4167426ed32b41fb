"""Redis shards: routing by variant, request ids that name their shard and stay UUIDs."""

from __future__ import annotations

import uuid

import pytest

from common.settings import Settings
from common.state.shards import ShardMap, request_id_on, settings_for, shard_index

TWO = [
    {"url": "redis://127.0.0.1:7001/0", "variants": ["general-heavy", "portrait"]},
    {"url": "redis://127.0.0.1:7002/0", "variants": ["matting"], "sentinel_master": "m2"},
]


def test_variants_route_to_their_shard_and_the_rest_to_redis_url():
    shards = ShardMap.from_settings(Settings(redis_url="redis://127.0.0.1:7000/0", redis_shards=TWO))
    assert shards.for_variant("portrait").url == "redis://127.0.0.1:7001/0"
    assert shards.for_variant("matting").sentinel_master == "m2"
    assert shards.for_variant("general-light").url == "redis://127.0.0.1:7000/0"


def test_a_request_id_names_its_shard_and_is_a_uuid():
    shards = ShardMap.from_settings(Settings(redis_url="redis://127.0.0.1:7000/0", redis_shards=TWO))
    for variant, url in (
        ("matting", "redis://127.0.0.1:7002/0"),
        ("general-light", "redis://127.0.0.1:7000/0"),
    ):
        rid = shards.new_request_id(variant)
        assert str(uuid.UUID(rid)) == rid  # fal clients see a plain UUID string
        assert shards.for_request(rid).url == url
    assert uuid.UUID(request_id_on(0)).version == 4  # unsharded ids are unchanged
    assert shard_index(str(uuid.uuid4())) == 0 and shard_index("not-a-uuid") == 0
    assert len({request_id_on(2) for _ in range(1000)}) == 1000


def test_a_worker_serves_one_shard_and_gets_its_redis():
    settings = Settings(redis_url="redis://127.0.0.1:7000/0", redis_shards=TWO)
    shards = ShardMap.from_settings(settings)
    assert settings_for(settings, shards.for_variants(["general-heavy", "portrait"])).redis_url.endswith(
        ":7001/0"
    )
    with pytest.raises(ValueError, match="different Redis shards"):
        shards.for_variants(["general-heavy", "matting"])


def test_a_variant_in_two_shards_is_refused():
    with pytest.raises(ValueError, match="two Redis shards"):
        ShardMap.from_settings(
            Settings(redis_shards=[*TWO, {"url": "redis://127.0.0.1:7003/0", "variants": ["matting"]}])
        )


def test_ops_commands_go_to_the_shard_of_their_variant_or_request():
    from ops.cli import _on_shard, _parser

    settings = Settings(redis_url="redis://127.0.0.1:7000/0", redis_shards=TWO)
    shards = ShardMap.from_settings(settings)
    assert _on_shard(settings, _parser().parse_args(["pause", "matting"])).redis_url.endswith(":7002/0")
    rid = shards.new_request_id("portrait")
    assert _on_shard(settings, _parser().parse_args(["requeue", rid])).redis_url.endswith(":7001/0")
    assert _on_shard(settings, _parser().parse_args(["status"])).redis_url.endswith(":7000/0")
    assert _on_shard(settings, _parser().parse_args(["status", "--shard", "2"])).redis_url.endswith(":7002/0")
    with pytest.raises(SystemExit):
        _on_shard(settings, _parser().parse_args(["requeue", rid, shards.new_request_id("matting")]))


def test_the_gateway_and_the_producer_route_to_every_shard():
    from gateway.context import Gateway
    from producer.intake import build_intake

    seed = "11" * 32  # configured signing keys: building reads nothing from Redis
    settings = Settings(redis_url="redis://127.0.0.1:7000/0", redis_shards=TWO, webhook_signing_keys=seed)
    gw = Gateway.build(settings)
    assert [s.settings.redis_url for s in gw.shards] == [
        "redis://127.0.0.1:7000/0",
        "redis://127.0.0.1:7001/0",
        "redis://127.0.0.1:7002/0",
    ]
    rid = gw.new_request_id("matting")
    assert gw.on_request(rid) is gw.on_variant("matting") is gw.shards[2]
    assert gw.on_request(str(uuid.uuid4())) is gw.shards[0]  # ids from before sharding
    intake = build_intake(settings)
    assert intake.on_variant("portrait").store.redis.connection_pool.connection_kwargs["port"] == 7001
    assert intake.store.redis.connection_pool.connection_kwargs["port"] == 7000  # per-object state: shard 0
