"""Shared test helpers (no tests here), built on devstack's one stack builder (devstack/builder.py).

stack: the tests' settings for a private stack and `build_stack` over devstack's; gateway: API keys, the
gateway in a thread and the gateway stack; faults: the chaos stack (crashable Redis, cuttable S3, killable
workers) and other fault injection; proxies: the cuttable TCP proxy; audit: what became of every job after a
chaos run; images: every picture the tests make; servers: loopback HTTP servers; pipeline: S3 uploads, the
event queue and Celery queues; metrics: Prometheus text; fal_verify and fal_client: fal's documented receiver
and its official Python client; event_payloads, sns_fixture, redis_topologies: providers' payloads, a fake
SNS, Redis Sentinel/TLS setups.
"""
