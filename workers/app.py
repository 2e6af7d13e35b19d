"""Wiring: settings → engine, media fetcher, cache → ``Moderator`` → ``KafkaWorker``."""

from __future__ import annotations

from guard.engines import build_engine
from guard.types import GuardEngine
from workers.cache import VerdictCache
from workers.core import Moderator
from workers.media import MediaFetcher, make_s3_client
from workers.runner import KafkaWorker
from workers.settings import Settings


def build_fetcher(settings: Settings) -> MediaFetcher:
    return MediaFetcher(
        make_s3_client(settings.s3_endpoint_url, settings.s3_region, settings.s3_max_attempts),
        settings.allowed_buckets,
        settings.max_image_bytes,
        settings.max_image_pixels,
        settings.fetch_concurrency,
        target_pixels=settings.vllm_max_pixels,  # the engine's own pixel bound: decode no more than it uses
        decode_budget_bytes=settings.decode_budget_bytes,
    )


def build_moderator(settings: Settings, engine: GuardEngine | None = None) -> Moderator:
    engine = engine or build_engine(settings.engine, settings.engine_options())
    cache = VerdictCache(settings.redis_url, settings.cache_ttl_s, settings.cache_enabled)
    return Moderator(settings, engine, build_fetcher(settings), cache)


def build_worker(settings: Settings, engine: GuardEngine | None = None) -> KafkaWorker:
    return KafkaWorker(settings, build_moderator(settings, engine))
