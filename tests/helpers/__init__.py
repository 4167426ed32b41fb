"""Shared test helpers (no tests here).

stack: the one stack builder (settings, environment, service processes) and `wait_for`; gateway: API keys
and the gateway stack; chaos_tools: the chaos/load stack and its audits; images: every picture the tests
make; servers: loopback HTTP servers; pipeline: S3 uploads, the event queue and Celery queues; metrics:
Prometheus text; fal_verify and fal_client: fal's documented receiver and its official Python client;
event_payloads, sns_fixture, redis_topologies: providers' payloads, a fake SNS, Redis Sentinel/TLS setups.
"""
