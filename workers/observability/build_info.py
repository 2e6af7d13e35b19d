"""``guardstream_build_info`` and the readiness/liveness gauges, registered on import.

Kept out of ``workers/observability/metrics.py`` so the dashboard and alert rules (``infra/grafana/``,
``infra/prometheus/``) can rely on them without touching the hot-path metrics module:

- ``guardstream_build_info{version, engine, python}`` = 1: which release and engine a scrape target runs
  (join it onto other series with ``* on(instance) group_left(version, engine)``). The engine label is
  the configured one (``GUARDSTREAM_ENGINE``) at import and is replaced by ``record_build_info`` when the
  worker has built its engine.
- ``guardstream_ready`` / ``guardstream_alive``: ``/readyz`` and ``/healthz`` as series, read from
  ``workers.observability.metrics.HEALTH`` at scrape time, so "worker not ready" can be alerted on (an
  unanswered ``/readyz`` is invisible to Prometheus otherwise).
"""

from __future__ import annotations

import os
import platform
import threading
from collections.abc import Iterator
from importlib import metadata

from prometheus_client import REGISTRY, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from workers.observability.metrics import HEALTH


def package_version() -> str:
    try:
        return metadata.version("guardstream")
    except metadata.PackageNotFoundError:  # run from a source tree that was never pip-installed
        return "0+unknown"


BUILD_INFO = Gauge(
    "guardstream_build_info",
    "Build of this process (value 1): release, engine, Python",
    ["version", "engine", "python"],
)
_lock = threading.Lock()


def record_build_info(engine: str) -> None:
    """Replace the series with one for ``engine`` (one series per process, never one per engine seen)."""
    with _lock:
        BUILD_INFO.clear()
        BUILD_INFO.labels(package_version(), engine, platform.python_version()).set(1)


class _HealthCollector(Collector):
    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "guardstream_ready",
            "1 when the engine is loaded and partitions are assigned (/readyz), else 0",
            value=1.0 if HEALTH.ready else 0.0,
        )
        yield GaugeMetricFamily(
            "guardstream_alive", "1 while the main loop turns (/healthz), else 0", value=float(HEALTH.alive())
        )


HEALTH_COLLECTOR = _HealthCollector()
REGISTRY.register(HEALTH_COLLECTOR)
record_build_info(os.environ.get("GUARDSTREAM_ENGINE", "cpu"))
