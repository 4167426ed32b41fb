"""Per-key limits and queue caps count a video by its duration: real redis-server, moto, gateway and a
worker process, on tiny generated clips. A unit is 0.5 s here, so a 1 s clip costs 2 units and a 2 s clip 4;
segments are 0.4 s, so a 1 s clip runs as 3 segment jobs."""

from __future__ import annotations

import base64
import json
import time

import pytest
import redis

from common.domain.auth import hash_secret
from common.state import keys
from tests.forward_hook import Rule, hook_setting
from tests.helpers.gateway import GatewayStack, start_gateway_stack
from tests.helpers.images import data_uri as image_data_uri
from tests.helpers.images import png_bytes
from tests.helpers.stack import wait_for
from tests.helpers.video import make_clip

VIDEO = "/queue/fal-ai/birefnet/v2/video"
IMAGE = "/queue/fal-ai/birefnet/v2"
REQUESTS = "/queue/fal-ai/birefnet/requests"
SECRETS = {"rate": "r-secret", "concurrent": "c-secret", "free": "f-secret"}
SLOW_WIDTH = 122  # frames of this width take 0.3 s a forward (tests/forward_hook.py)


def cred(key_id: str) -> str:
    return f"{key_id}:{SECRETS[key_id]}"


@pytest.fixture(scope="module")
def gs(redis_server, moto_endpoint, tmp_path_factory) -> GatewayStack:
    tmp = tmp_path_factory.mktemp("video-limits")
    stack = start_gateway_stack(
        redis_server.port,
        moto_endpoint,
        tmp,
        webhooks=False,
        extra={
            "BIREFNET_GATEWAY_API_KEYS": json.dumps(
                [
                    {"id": "rate", "hash": hash_secret(SECRETS["rate"], "sha256"), "requests_per_minute": 5},
                    {
                        "id": "concurrent",
                        "hash": hash_secret(SECRETS["concurrent"], "sha256"),
                        "max_concurrent": 3,
                    },
                    {"id": "free", "hash": hash_secret(SECRETS["free"], "sha256")},
                ]
            ),
            "BIREFNET_VIDEO_LIMIT_UNIT_SECONDS": "0.5",
            "BIREFNET_VIDEO_SEGMENT_SECONDS": "0.4",
            "BIREFNET_VIDEO_MAX_SECONDS": "5",
            "BIREFNET_MAX_QUEUE_DEPTH_PER_VARIANT": json.dumps({"general-light": 1}),
            "BIREFNET_TEST_FORWARD_HOOK": hook_setting(tmp / "hook", Rule(width=SLOW_WIDTH, seconds=0.3)),
        },
    )
    yield stack
    stack.close()


def clip_uri(path, **kwargs) -> str:
    make_clip(str(path), audio=False, **kwargs)
    return f"data:video/mp4;base64,{base64.b64encode(path.read_bytes()).decode()}"


def image() -> dict:
    return {"image_url": image_data_uri(png_bytes())}


def result(gs: GatewayStack, key: str, rid: str) -> tuple[int, dict, list[str]]:
    gs.wait_status(rid, credential=cred(key), timeout=120)
    with gs.client(cred(key)) as client:
        r = client.get(f"{REQUESTS}/{rid}")
        logs = client.get(f"{REQUESTS}/{rid}/status", params={"logs": 1}).json()["logs"] or []
    return r.status_code, r.json(), [entry["message"] for entry in logs]


def submit(gs: GatewayStack, key: str, path: str, body: dict) -> str:
    with gs.client(cred(key)) as client:
        r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()["request_id"]


def age_rate_log(gs: GatewayStack, key: str) -> None:
    """Move a key's rate-log entries a minute back: what the sliding window's clock would do."""
    r = redis.Redis.from_url(gs.settings.redis_url, decode_responses=True)
    name = keys.rate_limit(key)
    for member, score in r.zrange(name, 0, -1, withscores=True):
        r.zadd(name, {member: score - 61})


def upload(gs: GatewayStack, key: str, path) -> str:
    """The clip uploaded through the gateway: a URL the gateway does not read at submit (as any http(s) or
    s3:// input), so the worker counts the video when it opens it."""
    with gs.client(cred(key)) as client:
        r = client.post("/files/upload", content=path.read_bytes(), headers={"content-type": "video/mp4"})
    assert r.status_code == 200, r.text
    return r.json()["access_url"]


def refused_at_submit(gs: GatewayStack, key: str, path: str, body: dict) -> dict:
    with gs.client(cred(key)) as client:
        r = client.post(path, json=body)
    assert r.status_code == 429, r.text
    assert r.headers["x-fal-error-type"] == r.json()["error_type"] and int(r.headers["retry-after"]) >= 1
    return r.json()


@pytest.mark.timeout(300)
def test_a_key_budget_counts_images_once_and_videos_by_duration(gs, tmp_path):
    r = redis.Redis.from_url(gs.settings.redis_url, decode_responses=True)
    # 5 units a minute: five images, then a 429 at submit.
    for _ in range(5):
        rid = submit(gs, "rate", IMAGE, image())
        assert result(gs, "rate", rid)[0] == 200
    assert refused_at_submit(gs, "rate", IMAGE, image())["error_type"] == "rate_limited"
    age_rate_log(gs, "rate")

    # The same budget holds two 1 s videos (2 units each), all of whose segments run, though the variant's
    # queue is capped at 1 and the 3 segments wait there together: they were paid for by the video.
    one_second = clip_uri(tmp_path / "one.mp4", seconds=1.0, fps=12)
    for _ in range(2):
        code, body, logs = result(gs, "rate", submit(gs, "rate", VIDEO, {"video_url": one_second}))
        assert code == 200 and body["video"]["num_frames"] == 12, body
        assert "counted as 2 units against the key's limits" in logs
        assert "joined 3 segments" in logs and any("(3/3 segments)" in line for line in logs)
    # The gateway never parses a video: the third is admitted as one unit (5 of 5) and refused when a worker
    # opens it, with fal's 429 body as its result, no frame run.
    code, body, logs = result(gs, "rate", submit(gs, "rate", VIDEO, {"video_url": one_second}))
    assert code == 429 and body["error_type"] == "rate_limited", body
    assert "costs 2 units" in body["detail"] and "requests_per_minute is 5" in body["detail"]
    assert not any(line.startswith(("frames", "split")) for line in logs), logs
    # Nothing else was lost: the key still has its fifth unit (one image), then none.
    assert result(gs, "rate", submit(gs, "rate", IMAGE, image()))[0] == 200
    assert refused_at_submit(gs, "rate", IMAGE, image())["error_type"] == "rate_limited"
    assert r.zcard(keys.rate_limit("rate")) == 5  # 2 + 2 + 1: the refused video left nothing behind
    age_rate_log(gs, "rate")

    # By URL (an upload) the same: admitted as one unit, charged the rest when opened.
    url = upload(gs, "rate", tmp_path / "one.mp4")
    for _ in range(2):
        code, body, logs = result(gs, "rate", submit(gs, "rate", VIDEO, {"video_url": url}))
        assert code == 200 and body["video"]["num_frames"] == 12, body
        assert "counted as 2 units against the key's limits" in logs and "joined 3 segments" in logs
    # The third is admitted (one unit, 5 of 5) but refused when opened: fal's 429 body as its result, no
    # frame run, and it no longer counts.
    code, body, logs = result(gs, "rate", submit(gs, "rate", VIDEO, {"video_url": url}))
    assert code == 429 and body["error_type"] == "rate_limited", body
    assert "costs 2 units" in body["detail"] and "requests_per_minute is 5" in body["detail"]
    assert not any(line.startswith(("frames", "split")) for line in logs), logs
    assert result(gs, "rate", submit(gs, "rate", IMAGE, image()))[0] == 200
    assert refused_at_submit(gs, "rate", IMAGE, image())["error_type"] == "rate_limited"
    assert r.zcard(keys.rate_limit("rate")) == 5


@pytest.mark.timeout(300)
def test_max_concurrent_counts_video_units_and_a_video_that_can_never_fit_says_so(gs, tmp_path):
    two_seconds = clip_uri(tmp_path / "two.mp4", seconds=2.0, fps=6)  # 4 units; the key has 3
    code, body, logs = result(gs, "concurrent", submit(gs, "concurrent", VIDEO, {"video_url": two_seconds}))
    assert code == 429 and body["error_type"] == "concurrency_limit", body
    assert "costs 4 units" in body["detail"] and "never fit" in body["detail"]
    code, body, logs = result(
        gs,
        "concurrent",
        submit(gs, "concurrent", VIDEO, {"video_url": upload(gs, "concurrent", tmp_path / "two.mp4")}),
    )
    assert code == 429 and body["error_type"] == "concurrency_limit", body
    assert "costs 4 units" in body["detail"] and "never fit" in body["detail"]
    # A 1 s video (2 of 3 units) runs; its slots are free again once it completes.
    one_second = clip_uri(tmp_path / "one.mp4", seconds=1.0, fps=12)
    for _ in range(2):
        code, body, logs = result(
            gs, "concurrent", submit(gs, "concurrent", VIDEO, {"video_url": one_second})
        )
        assert code == 200 and body["video"]["num_frames"] == 12, body
    r = redis.Redis.from_url(gs.settings.redis_url, decode_responses=True)
    with gs.client(cred("concurrent")) as client:
        assert client.post(IMAGE, json=image()).status_code == 200  # the pruning frees the videos' units
    assert all("#" not in member for member in r.zrange(keys.active_limit("concurrent"), 0, -1))


@pytest.mark.timeout(300)
def test_waiting_segments_fill_the_queue_cap_for_other_requests(gs, tmp_path):
    """Segments pass no admission but are not free: while they wait, they count in the variant's queue."""
    slow = clip_uri(tmp_path / "slow.mp4", width=SLOW_WIDTH, height=64, seconds=1.0, fps=12)
    rid = submit(gs, "free", VIDEO, {"video_url": slow})
    r = redis.Redis.from_url(gs.settings.redis_url, decode_responses=True)
    wait_for(
        lambda: r.zcard(keys.pending("general-light")) >= 2,
        60,
        "segments waiting in the queue",
        interval=0.02,
    )
    with gs.client(cred("free")) as client:
        refused = client.post(IMAGE, json=image())
    assert refused.status_code == 429 and refused.json()["error_type"] == "queue_full", refused.text
    code, body, logs = result(gs, "free", rid)
    assert code == 200 and body["video"]["num_frames"] == 12 and "joined 3 segments" in logs
    time.sleep(0.1)
    assert submit(gs, "free", IMAGE, image())


def test_units_in_the_limiter_itself(redis_server):
    """The Lua scripts on their own: units admitted at once, the retry-after of the units that must leave
    the window, a charge made once however often a rerun asks, and a refused charge taking back its unit."""
    from common.settings import Settings
    from common.state.limits import Limiter

    client = redis.Redis(port=redis_server.port, db=13, decode_responses=True)
    client.flushdb()
    limiter = Limiter(client, Settings(redis_url=f"redis://127.0.0.1:{redis_server.port}/13"))
    rate = {"key_id": "k", "variant": "general-light", "requests_per_minute": 5}
    assert limiter.admit(request_id="a", units=3, **rate) is None
    refused = limiter.admit(request_id="b", units=3, **rate)
    assert refused is not None and refused.reason == "rate_limited" and 1 <= refused.retry_after <= 60
    assert "costs 3 units" in refused.message and "retry later" in refused.message
    never = limiter.admit(request_id="c", units=6, **rate)
    assert never is not None and "never fit" in never.message
    assert limiter.admit(request_id="d", units=2, **rate) is None
    assert sorted(client.zrange(keys.rate_limit("k"), 0, -1)) == ["a", "a#2", "a#3", "d", "d#2"]

    client.delete(keys.rate_limit("k"))
    charge = {"key_id": "k", "requests_per_minute": 5}
    assert limiter.admit(request_id="v", **rate) is None  # a video by URL: one unit at submit
    client.hset(keys.job("v"), "status", "IN_PROGRESS")
    assert limiter.charge(request_id="v", units=4, **charge) is None
    assert limiter.charge(request_id="v", units=4, **charge) is None  # a rerun: not charged again
    assert client.zcard(keys.rate_limit("k")) == 4
    assert limiter.admit(request_id="w", **rate) is None  # 5 of 5
    client.hset(keys.job("w"), "status", "IN_PROGRESS")
    refused = limiter.charge(request_id="w", units=2, **charge)
    assert refused is not None and refused.reason == "rate_limited"
    assert sorted(client.zrange(keys.rate_limit("k"), 0, -1)) == ["v", "v#2", "v#3", "v#4"]  # w's unit: back
