"""The SQS consumer: S3 event notifications in, jobs out.

A message is deleted only once every good record in it is enqueued (malformed records are logged and
skipped); one that cannot be handled now comes back after the visibility timeout and maps to the same jobs.
A full queue (`max_queue_depth`) makes the message visible again after `queue_full_retry_after` s and
pauses receiving until there is room, since every receive counts towards the redrive policy."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from common.state.limits import QueueFull
from producer.intake import CountingIntake, Intake
from producer.notifications import MalformedEvent, parse_notification

log = logging.getLogger(__name__)


class SqsConsumer:
    def __init__(
        self,
        sqs_client,
        queue_url: str,
        intake: Intake | CountingIntake,
        *,
        wait_seconds: int = 10,
        has_room: Callable[[str], bool] | None = None,
    ):
        self.sqs = sqs_client
        self.queue_url = queue_url
        self.intake = intake
        self.wait_seconds = wait_seconds
        self.has_room = has_room  # variant -> whether its queue is under its cap
        self.full: dict[str, int] = {}  # variants found full -> seconds to wait before looking again

    def paused(self) -> float:
        """Seconds to wait before the next receive: some variant's queue is still full (0: go on)."""
        for variant, retry_after in list(self.full.items()):
            if self.has_room is None or self.has_room(variant):
                del self.full[variant]
            else:
                return retry_after
        return 0.0

    def poll_once(self) -> int:
        """Receive one batch and handle it; returns the number of messages deleted."""
        response = self.sqs.receive_message(
            QueueUrl=self.queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=self.wait_seconds
        )
        deleted = 0
        for message in response.get("Messages", []):
            try:
                done = self.handle_message(message.get("Body") or "", message.get("MessageId", "?"))
            except QueueFull as full:
                self.full[full.variant] = full.retry_after
                self.sqs.change_message_visibility(
                    QueueUrl=self.queue_url,
                    ReceiptHandle=message["ReceiptHandle"],
                    VisibilityTimeout=full.retry_after,
                )
                continue
            except Exception:  # never let one message take the batch down
                log.exception(
                    "message %s: unexpected failure; it will be redelivered", message.get("MessageId")
                )
                done = False
            if done:
                self.sqs.delete_message(QueueUrl=self.queue_url, ReceiptHandle=message["ReceiptHandle"])
                deleted += 1
        return deleted

    def handle_message(self, body: str, message_id: str = "?") -> bool:
        """True when the message is done with: every good record is enqueued (or needs nothing)."""
        where = f"SQS message {message_id}"
        try:
            note = parse_notification(body)
        except MalformedEvent as exc:
            log.error("%s dropped: not an event notification (%s): %.200s", where, exc, body)
            return True
        for rejected in note.rejected:
            log.error("%s: record %d skipped: %s", where, rejected.index, rejected.reason)
        complete = True
        for event in note.events:
            try:
                self.intake.handle(event)
            except QueueFull as full:
                log.info("%s: %s; the message waits in SQS", where, full)
                raise
            except Exception:
                log.exception(
                    "%s: could not enqueue s3://%s/%s; the message will be redelivered",
                    where,
                    event.bucket,
                    event.key,
                )
                complete = False
        return complete

    def run(self, stop: threading.Event) -> None:
        log.info("consuming S3 events from %s", self.queue_url)
        while not stop.is_set():
            try:
                wait = self.paused()
                if wait:
                    stop.wait(wait)
                    continue
                self.poll_once()
            except Exception:
                log.exception("SQS receive failed; retrying")
                stop.wait(2.0)
