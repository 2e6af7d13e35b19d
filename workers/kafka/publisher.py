"""Producing outputs and reading their delivery reports.

A record completes when the broker acknowledged every one of its outputs (``Job.remaining`` reaches 0:
``on_complete``). An output the broker refuses as too large is trimmed (``shrink_output``: the dead
letter's original value, then the reasoning) and produced again; anything else the broker does not
acknowledge is a ``PublishError``: the worker exits and nothing at or past the record is committed.
Delivery reports are served on the main thread, from ``poll``/``flush``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import structlog
from confluent_kafka import KafkaError, KafkaException, Message, Producer

from workers.kafka.errors import TOO_LARGE, PublishError, kafka_error
from workers.kafka.jobs import Job
from workers.observability.sensors import Sensor
from workers.pipeline.outcomes import shrink_output
from workers.pipeline.records import Output

log = structlog.get_logger(__name__)


class Publisher:
    def __init__(
        self,
        producer: Producer,
        *,
        timeout_s: float,
        sensor: Sensor,
        on_complete: Callable[[Job], None] | None,
    ) -> None:
        """``timeout_s``: how long ``flush_acks`` waits (GUARDSTREAM_PRODUCE_TIMEOUT_S). ``on_complete``: a
        record's last output was acknowledged (None under exactly-once: the transaction completes it)."""
        self.producer = producer
        self.timeout_s = timeout_s
        self.sensor = sensor
        self._on_complete = on_complete
        self._failures: list[str] = []  # delivery errors
        self._too_large: list[tuple[Job, Output]] = []  # refused as too large: trimmed and produced again

    def produce(self, job: Job, out: Output) -> None:
        cb = functools.partial(self._delivered, job, out)
        while True:
            try:
                self.producer.produce(out.topic, out.value, out.key, on_delivery=cb)
                return
            except BufferError:  # the local queue is full: serve delivery reports, then try again
                self.producer.poll(0.1)
            except KafkaException as exc:
                err = kafka_error(exc)
                if err is not None and err.code() in TOO_LARGE:
                    out = self._shrink(job, out, err)
                    cb = functools.partial(self._delivered, job, out)
                    continue
                raise PublishError(f"produce to {out.topic} failed: {exc}") from exc

    def poll(self, timeout_s: float = 0.0) -> None:
        """Serve delivery reports, then raise what they reported."""
        self.producer.poll(timeout_s)
        self.raise_failures()

    def raise_failures(self) -> None:
        while self._too_large:
            job, out = self._too_large.pop()
            self.produce(job, self._shrink(job, out, KafkaError(KafkaError.MSG_SIZE_TOO_LARGE)))
        if self._failures:
            raise PublishError(
                f"{len(self._failures)} output(s) not acknowledged (first: {self._failures[0]}); "
                "nothing at or past those records is committed"
            )

    def flush_acks(self) -> None:
        """Wait (bounded by ``timeout_s``) for the acks of everything produced so far."""
        remaining = self.producer.flush(self.timeout_s)
        while self._too_large:  # produced again, trimmed (each round smaller, or a PublishError)
            self.raise_failures()
            remaining = self.producer.flush(self.timeout_s)
        self.raise_failures()
        if remaining:
            raise PublishError(f"{remaining} output(s) unacknowledged after {self.timeout_s:g}s")

    def _shrink(self, job: Job, out: Output, err: KafkaError) -> Output:
        assert job.outcome is not None
        smaller = shrink_output(out, job.outcome)
        if smaller is None or len(smaller.value) >= len(out.value):
            raise PublishError(f"{out.topic}: {err.str()} and nothing left to trim ({len(out.value)} bytes)")
        self.sensor.on_output_trimmed()
        log.warning(
            "output_too_large_trimmed",
            topic=out.topic,
            post_id=job.outcome.post_id,
            size=len(out.value),
            trimmed_size=len(smaller.value),
        )
        return smaller

    def _delivered(self, job: Job, out: Output, err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            if err.code() in TOO_LARGE:
                self._too_large.append((job, out))
            else:
                self._failures.append(f"{out.topic}: {err.str()}")
            return
        job.remaining -= 1
        if job.remaining == 0 and self._on_complete is not None:
            self._on_complete(job)
