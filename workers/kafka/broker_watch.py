"""Times a broker outage. librdkafka reconnects by itself; this module only decides when to give up.

The clients report "cannot reach the cluster" through their ``error_cb`` (``on_error``, served on the
main thread from consume/poll/flush). From then on ``check`` probes the broker at most once a second,
and raises ``BrokerUnavailable`` (exit 3) once no probe has answered for ``GUARDSTREAM_BROKER_DEADLINE_S``.
A positive probe is needed to end the outage because an idle consumer gets no other sign of recovery.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog
from confluent_kafka import KafkaError, KafkaException

from workers.kafka.errors import UNREACHABLE, BrokerUnavailable
from workers.observability.sensors import Sensor

log = structlog.get_logger(__name__)

PROBE_EVERY_S = 1.0


class BrokerWatch:
    def __init__(
        self,
        bootstrap: str,
        deadline_s: float,
        sensor: Sensor,
        *,
        on_down: Callable[[], None] | None = None,
    ) -> None:
        """``on_down`` is called once when an outage starts (the worker's ``on_event("broker_down")``)."""
        self.bootstrap = bootstrap
        self.deadline_s = deadline_s
        self.sensor = sensor
        self._on_down = on_down
        self.down_since: float | None = None
        self._next_probe = 0.0

    @property
    def is_down(self) -> bool:
        return self.down_since is not None

    def on_error(self, err: KafkaError) -> None:
        """librdkafka's client-level errors: the ``error_cb`` of the consumer and the producer."""
        if err.code() not in UNREACHABLE:
            log.warning("kafka_client_error", error=err.str(), code=err.code())
            return
        if self.down_since is None:
            self.down_since = time.monotonic()
            log.warning(
                "broker_unreachable_retrying",
                error=err.str(),
                deadline_s=self.deadline_s,
                bootstrap=self.bootstrap,
            )
            if self._on_down is not None:
                self._on_down()

    def check(self, probe: Callable[[], object]) -> None:
        """While the broker is marked unreachable, ``probe`` it (at most once a second; a probe raises
        ``KafkaException`` when nothing answers); give up past the deadline."""
        since = self.down_since
        now = time.monotonic()
        if since is None or now < self._next_probe:
            return
        self._next_probe = now + PROBE_EVERY_S
        try:
            probe()
        except KafkaException as exc:
            down_for = time.monotonic() - since
            self.sensor.on_broker_down(down_for)
            if down_for > self.deadline_s:
                log.error(
                    "broker_unavailable_giving_up",
                    down_for_s=round(down_for, 1),
                    deadline_s=self.deadline_s,
                    bootstrap=self.bootstrap,
                    error=str(exc),
                )
                raise BrokerUnavailable(
                    f"no broker at {self.bootstrap} answered for {down_for:.0f}s "
                    f"(deadline {self.deadline_s:g}s, GUARDSTREAM_BROKER_DEADLINE_S)"
                ) from None
            return
        log.info("broker_reachable_again", down_for_s=round(time.monotonic() - since, 1))
        self.sensor.on_broker_down(0)
        self.down_since = None

    def confirm_up(self, probe: Callable[[], object]) -> bool:
        """Probe now (not waiting for the next second) if the broker is marked down; True when it is up.
        Something else just got an answer from it: the outage may be over without a probe saying so."""
        if self.down_since is not None:
            self._next_probe = 0.0
            self.check(probe)
        return self.down_since is None
