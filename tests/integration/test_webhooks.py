"""Webhook signing (fal's scheme), JWKS, delivery attempts and the retry schedule, against real Redis and a
real HTTP receiver (the Celery transport around it is covered by the gateway tests)."""

from __future__ import annotations

import base64
import hashlib
import json
import time

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.domain.schemas import JobSpec
from common.domain.signing import WebhookSigner, load_private_key, message, verify
from common.settings import Settings
from common.state import keys
from common.state.jobs import JobStore
from common.state.webhooks import (
    Handoff,
    WebhookSender,
    attempt_seconds,
    first_attempt_due,
    list_attempts,
    retry_delay,
)
from devstack.receiver import WebhookReceiver
from devstack.services import RedisServer
from tests.helpers.fal_verify import fal_documented_verify
from tests.helpers.specs import job_spec


def seed() -> str:
    return (
        Ed25519PrivateKey.generate()
        .private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        .hex()
    )


def test_signature_is_fals_scheme_and_rotation_publishes_every_key():
    old, new = seed(), seed()
    signer = WebhookSigner([load_private_key(new), load_private_key(old)])
    body = b'{"request_id":"r","status":"OK"}'
    headers = signer.headers("r", "user-1", body)
    assert set(headers) == {
        "X-Fal-Webhook-Request-Id",
        "X-Fal-Webhook-User-Id",
        "X-Fal-Webhook-Timestamp",
        "X-Fal-Webhook-Signature",
    }
    assert len(bytes.fromhex(headers["X-Fal-Webhook-Signature"])) == 64
    jwks = signer.jwks()
    assert [k["kty"] for k in jwks["keys"]] == ["OKP", "OKP"] and all(
        k["crv"] == "Ed25519" for k in jwks["keys"]
    )
    assert fal_documented_verify(headers, body, jwks) and verify(headers, body, jwks)
    # As fal's own JWKS: x is base64url of the 32-byte key *with* padding (44 characters, one '=').
    assert all(
        len(k["x"]) == 44 and k["x"].endswith("=") and "+" not in k["x"] and "/" not in k["x"]
        for k in jwks["keys"]
    )
    unpadded = {"keys": [{**k, "x": k["x"].rstrip("=")} for k in jwks["keys"]]}
    assert not fal_documented_verify(headers, body, unpadded), "the docs' decoder rejects unpadded keys"
    assert verify(headers, body, unpadded), "our own verifier accepts both forms"
    # Receivers that still hold only the old key's JWKS fail; the first key signs.
    only_old = WebhookSigner([load_private_key(old)]).jwks()
    assert not fal_documented_verify(headers, body, only_old)
    assert not verify(headers, body + b" ", jwks), "the body is hashed exactly"
    assert not verify({**headers, "X-Fal-Webhook-User-Id": "someone"}, body, jwks)
    stale = signer.headers("r", "user-1", body, now=time.time() - 301)
    assert not verify(stale, body, jwks) and not fal_documented_verify(stale, body, jwks)
    assert message("r", "u", "1", b"x") == f"r\nu\n1\n{hashlib.sha256(b'x').hexdigest()}".encode()


def test_private_keys_load_from_pem_hex_and_base64():
    key = Ed25519PrivateKey.generate()
    raw = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    for text in (
        pem,
        raw.hex(),
        base64.b64encode(raw).decode(),
        base64.urlsafe_b64encode(raw).decode().rstrip("="),
    ):
        loaded = load_private_key(text).public_key()
        assert loaded.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw) == public
    with pytest.raises(ValueError):
        load_private_key("not a key")


def test_default_retry_schedule_is_ten_retries_over_about_two_hours():
    # The schedule's ceilings: each actual delay is jittered between half of its ceiling and all of it.
    delays = [retry_delay(Settings(), n, jitter=False) for n in range(Settings().webhook_max_retries)]
    assert len(delays) == 10 and delays[0] == 15 and max(delays) == 1800
    assert 1.5 * 3600 <= sum(delays) <= 2.5 * 3600


@pytest.fixture
def store(redis_server: RedisServer) -> JobStore:
    job_store = JobStore.from_url(f"redis://127.0.0.1:{redis_server.port}/0")
    job_store.redis.flushdb()
    return job_store


@pytest.fixture
def receiver():
    hooks = WebhookReceiver().start()
    yield hooks
    hooks.stop()


def alice_job(url: str) -> JobSpec:
    """A job of alice's (user id user-alice) with a webhook to `url`."""
    return job_spec(webhook_url=url, owner="alice", extra={"user_id": "user-alice"})


def completed_job(store: JobStore, url: str) -> str:
    spec = alice_job(url)
    rid = spec.request_id
    store.create(spec)
    store.complete(rid, result={"image": {"url": "https://x/y.png"}, "mask_image": None}, inference_time=0.1)
    return rid


def sender(store: JobStore, **settings) -> WebhookSender:
    values = {
        "webhook_retry_base": 0.05,
        "webhook_retry_max_delay": 0.1,
        "webhook_max_retries": 2,
        "webhook_timeout": 5,
        "fetch_allow_networks": ("127.0.0.0/8",),
        "fetch_allowed_ports": (0,),
        **settings,
    }
    return WebhookSender(Settings(**values), store, WebhookSigner([load_private_key(seed())]))


def test_attempts_are_recorded_and_retries_booked_until_delivered(store, receiver):
    hooks = sender(store)
    rid = completed_job(store, receiver.url)
    receiver.status_codes = [500]
    first = hooks.deliver(rid, 0)
    assert first is not None and not first.ok and first.status_code == 500
    assert store.redis.zscore(keys.WEBHOOK_DUE, f"{rid}|1") is not None, "the retry is booked"
    assert hooks.deliver(rid, 0) is None, "one run per attempt number, even if the task is redelivered"
    time.sleep(0.1)
    assert hooks.claim_due() == [(rid, 1)], "the pump picks the booked retry up when it falls due"
    second = hooks.deliver(rid, 1)
    assert second.ok and store.redis.zscore(keys.WEBHOOK_DUE, f"{rid}|2") is None, (
        "success cancels the next one"
    )
    assert [a["ok"] for a in list_attempts(store, rid)] == [False, True]
    assert hooks.deliver(rid, 2) is None, "delivered: nothing more"
    body = receiver.received[-1]
    assert json.loads(body.body) == {
        "request_id": rid,
        "gateway_request_id": rid,
        "status": "OK",
        "payload": {"image": {"url": "https://x/y.png"}, "mask_image": None},
        "error": None,
    }
    assert body.headers["X-Fal-Webhook-User-Id"] == "user-alice"
    assert verify(body.headers, body.body, hooks.signer.jwks())


def test_exhausted_retries_are_listed_as_failed(store):
    hooks = sender(store)
    rid = completed_job(store, "http://127.0.0.1:9/unreachable")
    for attempt in range(3):
        result = hooks.deliver(rid, attempt)
        assert result is not None and not result.ok and result.status_code is None
    assert store.redis.zscore(keys.WEBHOOK_FAILED, rid) is not None
    (failed,) = hooks.failed()
    assert failed["request_id"] == rid and len(failed["attempts"]) == 3 and failed["owner"] == "alice"
    assert not store.redis.zrangebyscore(keys.WEBHOOK_DUE, "-inf", "+inf"), "no retry after the last"


@pytest.mark.parametrize(
    "url, reason",
    [
        ("http://127.0.0.1:9/hook", "loopback"),
        ("http://10.1.2.3/hook", "private"),
        ("http://169.254.169.254/latest/meta-data/", "metadata"),
    ],
)
def test_a_receiver_refused_by_the_network_policy_fails_finally_on_the_first_attempt(store, url, reason):
    hooks = sender(store, fetch_allow_networks=(), webhook_max_retries=10)
    rid = completed_job(store, url)
    result = hooks.deliver(rid, 0)
    assert not result.ok and result.final and reason in result.error
    assert "webhook URL" in result.error and "image URL" not in result.error, result.error
    assert not store.redis.zrangebyscore(keys.WEBHOOK_DUE, "-inf", "+inf"), (
        "no retry is booked: it cannot succeed"
    )
    (failed,) = hooks.failed()
    assert failed["request_id"] == rid and [a["final"] for a in failed["attempts"]] == [True]


def test_an_attempt_whose_deliverer_died_is_made_once_its_lock_expires(store, receiver):
    hooks = sender(store)
    rid = completed_job(store, receiver.url)
    store.redis.zadd(keys.WEBHOOK_DUE, {f"{rid}|0": time.time()})  # booked, as the completion books it
    store.redis.set(keys.webhook_try(rid, 0), "1", ex=1)  # taken by a deliverer that then died
    assert hooks.deliver(rid, 0) is None, "locked: another copy may be under way"
    assert store.redis.zscore(keys.WEBHOOK_DUE, f"{rid}|0") is not None, "the booking stays for the pump"
    time.sleep(1.1)
    assert hooks.deliver(rid, 0).ok and store.redis.zscore(keys.WEBHOOK_DUE, f"{rid}|0") is None
    assert [a["ok"] for a in list_attempts(store, rid)] == [True]


def test_a_delivered_attempt_is_kept_in_the_record_in_four_commands_without_reading_the_spec(store, receiver):
    hooks = sender(store)
    rid = completed_job(store, receiver.url)
    hooks.deliver(completed_job(store, receiver.url), 0)  # connections open
    before = {name: int(stats["calls"]) for name, stats in store.redis.info("commandstats").items()}
    assert hooks.deliver(rid, 0).ok
    after = {name: int(stats["calls"]) for name, stats in store.redis.info("commandstats").items()}
    used = {name.removeprefix("cmdstat_"): after[name] - before.get(name, 0) for name in after}
    used = {name: n for name, n in used.items() if n and name != "info"}
    # The record's delivery fields (HMGET), the attempt's lock (SET NX), the outcome with the delivered mark
    # (one HSET) and the booking taken back (ZREM).
    assert used == {"hmget": 1, "set": 1, "hset": 1, "zrem": 1}, used
    assert [a["ok"] for a in list_attempts(store, rid)] == [True] and store.get(rid).webhook_delivered
    assert store.redis.keys(f"birefnet:webhook:{rid}*") == [keys.webhook_try(rid, 0)], (
        "no key of its own beside the lock"
    )
    assert 0 < store.redis.ttl(keys.job(rid)) <= store.record_ttl, "the record's TTL covers the attempts"


def handed_job(store: JobStore, url: str, hooks: WebhookSender) -> Handoff:
    """A job completed by its worker, as the completion hands its webhook to the deliverers."""
    spec = alice_job(url)
    rid = spec.request_id
    store.create(spec)
    store.claim(rid, spec.variant, "t", lease_seconds=30, max_attempts=3, worker="w")
    result = {"image": {"url": "https://x/y.png"}, "mask_image": None}
    store.complete(rid, token="t", result=result, webhook_due=first_attempt_due(hooks.settings))
    entries = [Handoff.parse(entry) for entry in store.redis.lrange(keys.WEBHOOK_READY, 0, -1)]
    (handoff,) = [entry for entry in entries if entry is not None and entry.request_id == rid]
    return handoff


def test_a_hand_off_taken_in_time_is_posted_without_a_read_or_a_lock(store, receiver):
    hooks = sender(store)
    hooks.deliver_handed(handed_job(store, receiver.url, hooks))  # connections open
    handoff = handed_job(store, receiver.url, hooks)
    assert handoff.due >= time.time() + attempt_seconds(hooks.settings), "due only once an attempt has ended"
    before = {name: int(stats["calls"]) for name, stats in store.redis.info("commandstats").items()}
    assert hooks.deliver_handed(handoff).ok
    after = {name: int(stats["calls"]) for name, stats in store.redis.info("commandstats").items()}
    used = {name.removeprefix("cmdstat_"): after[name] - before.get(name, 0) for name in after}
    # The outcome with the delivered mark (HSET) and the booking taken back (ZREM), in one round trip.
    assert {name: n for name, n in used.items() if n and name != "info"} == {"hset": 1, "zrem": 1}, used
    posted = receiver.received[-1]
    assert posted.json() == {
        "request_id": handoff.request_id,
        "gateway_request_id": handoff.request_id,
        "status": "OK",
        "payload": {"image": {"url": "https://x/y.png"}, "mask_image": None},
        "error": None,
    }
    assert posted.headers["X-Fal-Webhook-User-Id"] == "user-alice"
    assert store.get(handoff.request_id).webhook_delivered
    assert store.redis.zscore(keys.WEBHOOK_DUE, f"{handoff.request_id}|0") is None


def test_a_hand_off_taken_late_reads_the_record_and_takes_the_lock(store, receiver):
    hooks = sender(store)
    handoff = handed_job(store, receiver.url, hooks)
    late = Handoff(handoff.request_id, 0, time.time() + 1, handoff.delivery)  # the pump may hand it out soon
    store.redis.set(keys.webhook_try(handoff.request_id, 0), "1", ex=30)  # a copy from the pump is under way
    assert hooks.deliver_handed(late) is None, "the copy under way posts; this one does not"
    assert receiver.received == []
    store.redis.delete(keys.webhook_try(handoff.request_id, 0))
    assert hooks.deliver_handed(late).ok
    assert hooks.deliver_handed(late) is None, "delivered: a later copy finds it so in the record"
    assert len(receiver.received) == 1


def test_a_cancel_honoured_at_completion_hands_fals_cancelled_payload(store, receiver):
    hooks = sender(store)
    spec = alice_job(receiver.url)
    rid = spec.request_id
    store.create(spec)
    store.claim(rid, spec.variant, "t", lease_seconds=30, max_attempts=3, worker="w")
    assert store.cancel(rid) == "requested"
    store.complete(rid, token="t", result={"image": {}}, webhook_due=first_attempt_due(hooks.settings))
    (handoff,) = [Handoff.parse(e) for e in store.redis.lrange(keys.WEBHOOK_READY, 0, -1)]
    assert handoff is not None and hooks.deliver_handed(handoff).ok
    body = receiver.received[-1].json()
    assert body["status"] == "ERROR" and body["payload"] == store.get(rid).result
    assert body["payload"]["error_type"] == "client_cancelled" and body["error"] == "Invalid status code: 499"


def test_a_record_written_before_the_webhook_fields_existed_is_still_delivered(store, receiver):
    hooks = sender(store)
    rid = completed_job(store, receiver.url)
    store.redis.hdel(keys.job(rid), "webhook_url", "webhook_user")  # as an older release recorded it
    assert hooks.deliver(rid, 0).ok
    assert receiver.received[-1].headers["X-Fal-Webhook-User-Id"] == "user-alice"


def test_a_restarted_job_starts_its_webhook_afresh(store, receiver):
    hooks = sender(store, webhook_max_retries=1)
    rid = completed_job(store, receiver.url)
    receiver.status_codes = [500, 500]
    assert [hooks.deliver(rid, n).ok for n in range(2)] == [False, False]
    assert len(list_attempts(store, rid)) == 2 and store.redis.zscore(keys.WEBHOOK_FAILED, rid) is not None
    store.redis.hset(keys.job(rid), "error", "runner died")  # a failed outcome: ops may restart it
    assert store.restart_failed(rid, webhook_attempts=3).spec is not None
    assert list_attempts(store, rid) == [] and store.redis.zscore(keys.WEBHOOK_FAILED, rid) is None
    record = store.get(rid)
    assert record is not None and not record.webhook_delivered and record.webhook_next == 0
    assert store.complete(rid, result={"image": {"url": "https://x/z.png"}}, webhook_due=time.time())
    assert hooks.deliver(rid, 0).ok
    assert [(a["attempt"], a["ok"]) for a in list_attempts(store, rid)] == [(0, True)]
    assert json.loads(receiver.received[-1].body)["payload"] == {"image": {"url": "https://x/z.png"}}
