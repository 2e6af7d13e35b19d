"""Shared fixtures: the real local services (Tansu broker, moto S3 server, Redis) and the CPU engine.

Services are started once per test session on free loopback ports; each test gets its own topic names
and consumer group so tests never see each other's data.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
import redis

from guard.engines.cpu.engine import CpuEngine
from guard.prompts import PromptSet
from guard.taxonomy import Taxonomy
from infra.stack import Broker, RedisServer, S3Server, create_topics, ensure_bucket, free_port
from workers.settings import Settings

BUCKET = "guardstream-media"


@dataclass
class Services:
    broker: Broker
    s3: S3Server
    redis_url: str

    def s3_client(self) -> Any:
        return boto3.client("s3", endpoint_url=self.s3.endpoint, region_name="us-east-1")


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    # Our own redis-server on a free port: tests empty its database between tests, which is only
    # acceptable on a server nobody else uses.
    redis_server = RedisServer().start()
    broker = Broker(port=free_port(), log_path=tmp_path_factory.mktemp("broker") / "tansu.log").start()
    s3 = S3Server(port=free_port()).start()
    ensure_bucket(boto3.client("s3", endpoint_url=s3.endpoint, region_name="us-east-1"), BUCKET)
    yield Services(broker, s3, redis_server.url)
    s3.stop()
    broker.stop()
    redis_server.stop()


@pytest.fixture(scope="session")
def prompts() -> PromptSet:
    return PromptSet(Taxonomy.load())


@pytest.fixture(scope="session")
def cpu_engine(prompts: PromptSet) -> CpuEngine:
    return CpuEngine(prompts)


# Addresses nothing listens on (the discard port): a unit test that reaches for a service by mistake gets
# a refused connection at once, never someone's broker, bucket or Redis.
UNREACHABLE = "127.0.0.1:9"


@pytest.fixture
def settings() -> Settings:
    """Settings with topics and group unique to this test, and no service behind them: nothing is started
    or contacted (unit tests). A test that needs the broker, S3 or Redis asks for ``kafka_settings``."""
    sfx = uuid.uuid4().hex[:8]
    return Settings(
        bootstrap_servers=UNREACHABLE,
        group_id=f"gs-test-{sfx}",
        posts_topic=f"posts-{sfx}",
        verdicts_topic=f"verdicts-{sfx}",
        novel_risk_topic=f"novel-{sfx}",
        dlq_topic=f"dlq-{sfx}",
        s3_endpoint_url=f"http://{UNREACHABLE}",
        allowed_buckets=[BUCKET],
        redis_url=f"redis://{UNREACHABLE}/0",
        session_timeout_ms=6000,
        max_batch_size=8,
        max_wait_ms=50,
        produce_timeout_s=10,
    )


@pytest.fixture
def kafka_settings(settings: Settings, services: Services) -> Settings:
    """``settings`` pointed at the real local services (broker, S3 server, Redis); the topics already
    exist. The verdict cache starts empty (a test that moderated the same content earlier would otherwise
    turn misses into hits)."""
    redis.Redis.from_url(services.redis_url).flushdb()
    s = settings.model_copy(
        update={
            "bootstrap_servers": services.broker.bootstrap,
            "s3_endpoint_url": services.s3.endpoint,
            "redis_url": services.redis_url,
        }
    )
    create_topics(
        s.bootstrap_servers, {s.posts_topic: 3, s.verdicts_topic: 3, s.novel_risk_topic: 1, s.dlq_topic: 1}
    )
    return s


# fixtures that start or contact the real services; a unit test must not depend on one, even indirectly
SERVICE_FIXTURES = frozenset({"services", "kafka_settings"})
UNIT_DIR = Path(__file__).parent / "unit"


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Fail (not skip) a unit test that requests a service fixture, directly or through another fixture,
    before any fixture is set up: unit tests run with fakes (``workers.testing``), the services are for
    ``integration`` and ``chaos``."""
    if not item.path.is_relative_to(UNIT_DIR):
        return
    wanted = sorted(SERVICE_FIXTURES.intersection(getattr(item, "fixturenames", ())))
    if wanted:
        pytest.fail(
            f"{item.nodeid} is a unit test but requests {wanted}: use the fakes in workers.testing, "
            "or move it to tests/integration",
            pytrace=False,
        )
