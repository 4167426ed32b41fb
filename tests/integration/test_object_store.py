"""ObjectStore's look-ups beyond read and write (moto over HTTP): what the worker and the gateway use instead
of calling boto3 themselves."""

from __future__ import annotations

from common.adapters.storage import ObjectStore
from tests.helpers.stack import Stack


def test_find_exists_open_and_delete(stack: Stack):
    objects = ObjectStore(stack.settings)
    bucket = stack.settings.output_bucket
    objects.write(bucket, "t/result.json", b'{"ok": true}', "application/json", metadata={"Status": "OK"})
    found = objects.find(bucket, "t/result.json")
    assert found is not None and found.metadata["status"] == "OK" and found.size == 12
    assert objects.find(bucket, "t/missing.json") is None
    assert objects.exists(bucket, "t/result.json") and not objects.exists(bucket, "t/missing.json")
    opened = objects.open(bucket, "t/result.json")
    assert (opened.content_type, opened.size, b"".join(opened.body.iter_chunks(4))) == (
        "application/json",
        12,
        b'{"ok": true}',
    )
    objects.delete(bucket, "t/result.json")
    assert not objects.exists(bucket, "t/result.json")
