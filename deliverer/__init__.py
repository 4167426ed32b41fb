"""The webhook deliverer (`python -m deliverer`): a slim Celery worker on the `webhooks` queue."""
