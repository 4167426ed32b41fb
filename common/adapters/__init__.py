"""Talking to the outside: Redis connections, S3, input fetching (SSRF-guarded), the Celery sender."""
