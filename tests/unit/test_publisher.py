"""``workers.kafka.publisher.Publisher`` against a producer double that serves delivery reports from
``poll``/``flush`` the way confluent-kafka does (no broker: the reports are what is under test).

An output the broker refuses as too large is trimmed and produced again; ``flush_acks`` must not return
before that second copy was acknowledged too — shutdown commits right after it, and a record whose
trimmed copy is still unacknowledged would stay below the watermark and be published twice."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from confluent_kafka import KafkaError

from schemas.events import ErrorCode
from workers.kafka.errors import PublishError
from workers.kafka.jobs import Job
from workers.kafka.publisher import Publisher
from workers.observability.sensors import RecordingSensor
from workers.pipeline.outcomes import OutcomeBuilder
from workers.pipeline.records import Outcome, OutcomeKind, Output, Prepared, Record

LIMIT = 1000  # the "broker's" message size limit


class ReportingProducer:
    """Queues each produce; ``poll``/``flush`` hand out the delivery reports, refusing values over LIMIT."""

    def __init__(self) -> None:
        self.pending: list[tuple[bytes, Callable[..., None]]] = []
        self.delivered: list[bytes] = []

    def produce(self, topic: str, value: bytes, key: bytes | None, on_delivery: Callable[..., None]) -> None:
        self.pending.append((value, on_delivery))

    def _serve(self) -> None:
        batch, self.pending = self.pending, []
        for value, cb in batch:
            if len(value) > LIMIT:
                cb(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE), None)
            else:
                self.delivered.append(value)
                cb(None, None)

    def poll(self, _timeout: float = 0.0) -> int:
        self._serve()
        return 0

    def flush(self, _timeout: float = 0.0) -> int:
        self._serve()  # what was produced before this call; anything produced from a report waits
        return len(self.pending)


def _job_with_a_large_dead_letter() -> tuple[Job, Output]:
    raw = b"x" * 5000
    rec = Record("posts", 0, 7, b"k", raw)
    p = Prepared(record=rec, started=0.0, error=(ErrorCode.INVALID_JSON, "DecodeError", "not JSON"))
    builder = OutcomeBuilder(
        verdicts_topic="v",
        novel_risk_topic="n",
        dlq_topic="dlq",
        publish_reasoning=False,
        dlq_max_original_bytes=64 * 1024,
        engine="e",
        model_version="m",
        policy_version="p",
        taxonomy=None,
    )
    outcome: Outcome = builder.dead_letter(p)
    assert outcome.kind is OutcomeKind.DEAD_LETTER and len(outcome.outputs[0].value) > LIMIT
    job = Job(p, epoch=0, outcome=outcome, remaining=1)
    return job, outcome.outputs[0]


def test_flush_acks_waits_for_the_trimmed_copy_of_a_too_large_output() -> None:
    producer = ReportingProducer()
    completed: list[Job] = []
    sensor = RecordingSensor()
    pub = Publisher(producer, timeout_s=1.0, sensor=sensor, on_complete=completed.append)  # type: ignore[arg-type]
    job, out = _job_with_a_large_dead_letter()
    pub.produce(job, out)
    pub.flush_acks()
    assert completed == [job], "flush_acks returned before the trimmed copy was acknowledged"
    assert job.remaining == 0 and sensor.outputs_trimmed == 1
    (value,) = producer.delivered
    assert len(value) <= LIMIT and b'"original_value_truncated":true' in value


def test_an_output_that_cannot_be_trimmed_enough_is_a_publish_error() -> None:
    producer = ReportingProducer()
    pub = Publisher(producer, timeout_s=1.0, sensor=RecordingSensor(), on_complete=None)  # type: ignore[arg-type]
    job, _ = _job_with_a_large_dead_letter()
    huge = Output("verdicts", b"k", b"y" * 5000)  # a verdict without reasoning: nothing left to cut
    job.outcome = Outcome(job.prepared.record, OutcomeKind.VERDICT, "p", [huge])
    pub.produce(job, huge)
    with pytest.raises(PublishError, match="nothing left to trim"):
        pub.flush_acks()
