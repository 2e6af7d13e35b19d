"""What the Kafka side of the worker raises, and the librdkafka error codes it tells apart.

Every error here is worker-fatal (``schemas.errors.FatalError``, exit code 3): nothing past the failing
record was committed, so whoever consumes the partitions next re-reads it. None of them is a post's
fault; a post's own problem is a dead letter (``schemas.events.ErrorCode``), never one of these.
"""

from __future__ import annotations

from confluent_kafka import KafkaError, KafkaException

from schemas.errors import EXIT_OUTAGE, FatalError


class PublishError(FatalError):
    """The broker did not acknowledge an output: nothing at or past that record is committed (exit 3)."""

    exit_code = EXIT_OUTAGE


class Unavailable(FatalError):
    """A dependency stayed unavailable past its deadline: the worker exits (code 3). Nothing is lost:
    uncommitted posts are re-delivered to whoever consumes the partitions next."""

    exit_code = EXIT_OUTAGE


class BrokerUnavailable(Unavailable):
    """No broker answered for longer than ``broker_deadline_s``."""


class EngineUnavailable(Unavailable):
    """The engine was dead (``EngineDeadError``) for longer than ``engine_deadline_s``."""


class MediaOutage(Unavailable):
    """S3 was unavailable (``MediaUnavailable``) for longer than ``media_deadline_s``."""


# librdkafka errors that mean "cannot reach the cluster" (it reconnects by itself; we only time it)
UNREACHABLE = frozenset({KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT, KafkaError._RESOLVE})
# a commit refused by these is retried until the broker deadline (restart, failover)
COORDINATOR_AWAY = UNREACHABLE | {
    KafkaError._WAIT_COORD,
    KafkaError._TIMED_OUT,
    KafkaError.REQUEST_TIMED_OUT,
    KafkaError.COORDINATOR_NOT_AVAILABLE,
    KafkaError.NOT_COORDINATOR,
    KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
}
# the group moved on (rebalance) under a commit: the partitions may be someone else's now
GENERATION_LOST = frozenset(
    {
        KafkaError.REBALANCE_IN_PROGRESS,
        KafkaError.ILLEGAL_GENERATION,
        KafkaError.UNKNOWN_MEMBER_ID,
        KafkaError._ASSIGNMENT_LOST,
    }
)
TOO_LARGE = frozenset({KafkaError.MSG_SIZE_TOO_LARGE})


def kafka_error(exc: KafkaException) -> KafkaError | None:
    """The ``KafkaError`` a ``KafkaException`` carries, if it carries one."""
    err = exc.args[0] if exc.args else None
    return err if isinstance(err, KafkaError) else None
