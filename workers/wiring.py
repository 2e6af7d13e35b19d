"""Wiring: settings → engine, media fetcher, cache → ``Moderator`` → ``KafkaWorker``."""

from __future__ import annotations

from typing import Any

import structlog

from guard.engines import build_engine
from guard.engines import build_streaming_engine as guard_build_streaming_engine
from guard.streaming import MicroBatcher
from guard.types import GuardEngine, StreamingEngine
from workers.cache import VerdictCache
from workers.kafka.worker import KafkaWorker
from workers.media import ImageFetcher, MediaFetcher, make_s3_client
from workers.observability.sensors import Sensor, default_sensor
from workers.pipeline.moderator import Moderator
from workers.settings import Settings

log = structlog.get_logger(__name__)


def build_fetcher(settings: Settings) -> MediaFetcher:
    m = settings.media
    return MediaFetcher(
        make_s3_client(m.s3_endpoint_url, m.s3_region, m.s3_max_attempts),
        m.allowed_buckets,
        m.max_image_bytes,
        m.max_image_pixels,
        m.fetch_concurrency,
        target_pixels=settings.target_pixels,  # the engine's own pixel bound: decode no more than it uses
        decode_budget_bytes=m.decode_budget_bytes,
    )


def build_moderator(
    settings: Settings,
    engine: GuardEngine | StreamingEngine | None = None,
    *,
    sensor: Sensor | None = None,
    fetcher: ImageFetcher | None = None,
) -> Moderator:
    """The batch-path moderator (replay, training export, benchmarks) or, given a streaming engine, the
    worker's (it then only prepares records and builds events; the engine is awaited by the worker).
    ``sensor`` (default: the process-wide Prometheus sensor) observes the moderator and its cache;
    ``fetcher``: the image fetcher to use instead of the S3 one built from the settings (a test seam)."""
    engine = engine or build_engine(settings.engine_config)
    sensor = sensor if sensor is not None else default_sensor()
    cache = VerdictCache(settings.cache.url, settings.cache.ttl_s, settings.cache.enabled, sensor=sensor)
    fetcher = fetcher if fetcher is not None else build_fetcher(settings)
    return Moderator(settings, engine, fetcher, cache, sensor=sensor)


def streaming(settings: Settings, engine: GuardEngine | StreamingEngine) -> StreamingEngine:
    """A streaming engine as is; a batch-native one behind a ``MicroBatcher`` (MAX_BATCH_SIZE/MAX_WAIT_MS)."""
    if isinstance(engine, GuardEngine):
        return MicroBatcher(engine, settings.max_batch_size, settings.max_wait_ms / 1000.0)
    return engine


def build_streaming_engine(settings: Settings) -> StreamingEngine:
    """The configured engine on the per-request seam (``guard.engines.build_streaming_engine``)."""
    return guard_build_streaming_engine(
        settings.engine_config,
        max_batch_size=settings.max_batch_size,
        max_wait_s=settings.max_wait_ms / 1000.0,
    )


def build_worker(
    settings: Settings,
    engine: GuardEngine | StreamingEngine | None = None,
    *,
    sensor: Sensor | None = None,
    fetcher: ImageFetcher | None = None,
    **kw: Any,
) -> KafkaWorker:
    """The streaming worker. ``engine``: a streaming engine, or a batch one (wrapped in a MicroBatcher);
    default: the configured engine. ``sensor``: one for the cache, the moderator, the engine loop and the
    Kafka loop (default: the process-wide Prometheus sensor). ``fetcher``: instead of the S3 fetcher
    built from the settings (a test seam). ``kw`` goes to ``KafkaWorker`` (``on_event``, ``observers``)."""
    eng = streaming(settings, engine) if engine is not None else build_streaming_engine(settings)
    sensor = sensor if sensor is not None else default_sensor()
    moderator = build_moderator(settings, eng, sensor=sensor, fetcher=fetcher)
    return KafkaWorker(settings, moderator, eng, sensor=sensor, **kw)
