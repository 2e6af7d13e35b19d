"""The error taxonomy (``schemas.errors``): every error says what the worker does with it.

* every exception of ours that carries an ``ErrorCode`` is a ``RecordError`` (a dead letter with that code);
* every ``FatalError`` subclass names an exit code, 2 or 3;
* the worker command returns a ``FatalError``'s own ``exit_code`` (``run_worker``'s argument is the seam);
* the moderator dead-letters a ``RecordError`` with the error's own code, wherever it is raised.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import typing
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from PIL import Image
from structlog.testing import capture_logs

from guard.errors import EngineDeadError, EngineError, EngineRequestError
from guard.types import ModerationItem, Verdict
from schemas.codec import DecodeError, decode_post
from schemas.errors import EXIT_CONFIG, EXIT_OUTAGE, FatalError, InfrastructureError, RecordError
from schemas.events import ErrorCode, ImageRef
from workers.cli.worker import run_worker
from workers.demo.sample_feed import post
from workers.kafka.admin import TopicCreationError, TopicCreationTimeout, creation_error
from workers.kafka.worker import BrokerUnavailable, EngineUnavailable, MediaOutage, PublishError
from workers.media import FetchedImage, MediaError, MediaUnavailable, decode_image
from workers.pipeline.moderator import Moderator
from workers.pipeline.records import OutcomeKind, Record
from workers.preflight import CheckResult, PreflightError
from workers.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("schemas", "guard", "workers", "infra", "training")


def our_modules() -> list[ModuleType]:
    """Every module of ours, imported (an import that fails fails the test: nothing may hide)."""
    mods = []
    for pkg in PACKAGES:
        root = importlib.import_module(pkg)
        mods.append(root)
        for info in pkgutil.walk_packages(root.__path__, f"{pkg}."):
            if info.name.rsplit(".", 1)[-1] == "__main__":  # runs the command line
                continue
            mods.append(importlib.import_module(info.name))
    return mods


MODULES = our_modules()


def our_exceptions() -> list[type[BaseException]]:
    return [
        obj
        for m in MODULES
        for obj in vars(m).values()
        if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == m.__name__
    ]


def mentions_error_code(cls: type) -> bool:
    """The class or a base, or an ``__init__`` of theirs, annotates something as an ``ErrorCode``."""
    found: list[object] = []
    for klass in cls.__mro__:
        found += inspect.get_annotations(klass).values()
        init = vars(klass).get("__init__")
        if inspect.isfunction(init):
            found += inspect.get_annotations(init).values()
    return any("ErrorCode" in str(a) for a in found)


def all_subclasses(cls: type) -> set[type]:
    out = set()
    for sub in cls.__subclasses__():
        out |= {sub, *all_subclasses(sub)}
    return out


# ------------------------------------------------------------------------------------------ RecordError


def test_every_error_code_carrying_exception_is_a_record_error() -> None:
    carriers = [c for c in our_exceptions() if mentions_error_code(c)]
    assert {DecodeError, MediaError, RecordError} <= set(carriers)
    assert [c for c in carriers if not issubclass(c, RecordError)] == []
    for c in all_subclasses(RecordError) | {RecordError}:
        assert typing.get_type_hints(c)["code"] is ErrorCode, c


def test_every_exception_constructed_with_an_error_code_is_a_record_error() -> None:
    """Read every call ``X(ErrorCode.Y, ...)`` in the code base: where ``X`` is an exception, it is a
    ``RecordError`` (a code on an exception that is not one would never reach a dead letter)."""
    seen: set[str] = set()
    wrong: list[str] = []
    for m in MODULES:
        if m.__file__ is None:
            continue
        tree = ast.parse(Path(m.__file__).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and node.args):
                continue
            first = node.args[0]
            if not (
                isinstance(first, ast.Attribute)
                and isinstance(first.value, ast.Name)
                and first.value.id == "ErrorCode"
            ):
                continue
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
            target = getattr(m, name, None)
            if inspect.isclass(target) and issubclass(target, BaseException):
                seen.add(target.__name__)
                if not issubclass(target, RecordError):
                    wrong.append(f"{m.__name__}:{node.lineno} {name}")
    assert {"DecodeError", "MediaError"} <= seen
    assert wrong == []


@pytest.mark.parametrize(
    "make",
    [
        lambda: decode_post(b""),
        lambda: decode_post(b"{"),
        lambda: decode_post(post("p", "a", None)),  # neither text nor images
        lambda: decode_image(b"", 1024 * 1024),
        lambda: decode_image(b"GIF89a not really", 1024 * 1024),
    ],
)
def test_raised_record_errors_carry_a_stable_code(make: Any) -> None:
    with pytest.raises(RecordError) as info:
        make()
    assert isinstance(info.value.code, ErrorCode) and info.value.message
    assert str(info.value).startswith(f"{info.value.code}: ")


def test_outages_and_engine_errors_are_not_record_errors() -> None:
    assert issubclass(MediaUnavailable, InfrastructureError)
    assert issubclass(EngineDeadError, InfrastructureError) and issubclass(EngineDeadError, EngineError)
    assert not issubclass(EngineRequestError, InfrastructureError | RecordError | FatalError)
    for kind in (RecordError, InfrastructureError, FatalError):  # one kind each, never two
        others = {RecordError, InfrastructureError, FatalError} - {kind}
        assert [c for c in all_subclasses(kind) if issubclass(c, tuple(others))] == []


# ------------------------------------------------------------------------------------------- FatalError


def test_every_fatal_error_names_exit_code_2_or_3() -> None:
    subclasses = all_subclasses(FatalError)
    expected = {PublishError, BrokerUnavailable, EngineUnavailable, MediaOutage}
    assert expected | {PreflightError, TopicCreationError} <= subclasses
    assert {c.__name__: c.exit_code for c in subclasses if c.exit_code not in (2, 3)} == {}
    assert {c.exit_code for c in expected} == {EXIT_OUTAGE}
    assert PreflightError.exit_code == TopicCreationError.exit_code == EXIT_CONFIG
    assert TopicCreationTimeout.exit_code == EXIT_OUTAGE


def test_a_topic_creation_that_only_timed_out_is_an_outage_not_a_configuration_error() -> None:
    import concurrent.futures

    from confluent_kafka import KafkaError, KafkaException

    for slow in (
        concurrent.futures.TimeoutError(),
        KafkaException(KafkaError(KafkaError.REQUEST_TIMED_OUT, "timed out", retriable=True)),
    ):
        err = creation_error("posts", slow, 15.0)
        assert isinstance(err, TopicCreationTimeout) and err.exit_code == EXIT_OUTAGE, slow
        assert "posts" in str(err) and "run the command again" in str(err)
    refused = creation_error(
        "posts", KafkaException(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED, "denied")), 15.0
    )
    assert isinstance(refused, TopicCreationError) and refused.exit_code == EXIT_CONFIG
    assert "TOPIC_AUTHORIZATION_FAILED" in str(refused) or "denied" in str(refused)


def test_a_fatal_error_without_an_exit_code_cannot_be_defined() -> None:
    with pytest.raises(TypeError, match="exit_code"):

        class Forgetful(FatalError):
            pass


# ---------------------------------------------------------------------------------- the worker command


@dataclass
class _Stats:
    consumed: int = 4
    verdicts: int = 3
    dead_letters: int = 1
    batches: int = 2


class FakeWorker:
    """What ``run_worker`` runs: ``run`` raises ``error`` (or returns stats)."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error
        self.calls: list[bool] = []

    def run(self, *, until_drained: bool = False) -> _Stats:
        self.calls.append(until_drained)
        if self.error is not None:
            raise self.error
        return _Stats()


FATAL = [
    BrokerUnavailable("no broker at b:9092 answered for 31s"),
    EngineUnavailable("engine unavailable for 301s"),
    MediaOutage("media unavailable for 301s"),
    PublishError("2 output(s) unacknowledged after 30s"),
    PreflightError([CheckResult("topics", False, "posts missing", "create it")]),
    TopicCreationError("cannot create topic audit: TOPIC_AUTHORIZATION_FAILED"),
    TopicCreationTimeout("topic audit was not created within 15s"),
]


@pytest.mark.parametrize("exc", FATAL, ids=lambda e: type(e).__name__)
def test_the_worker_command_exits_with_the_fatal_errors_own_code(exc: FatalError) -> None:
    w = FakeWorker(exc)
    with capture_logs() as logs:
        rc = run_worker(w, until_drained=True)
    assert rc == exc.exit_code and w.calls == [True]
    (failed,) = [e for e in logs if e["event"] == "worker_failed"]
    assert failed["exit_code"] == exc.exit_code and failed["error_class"] == type(exc).__name__
    assert failed["error"] == str(exc) and failed["log_level"] == "error"


def test_the_worker_command_exits_3_for_an_outage_that_reaches_it_and_0_at_the_end() -> None:
    with capture_logs() as logs:
        assert run_worker(FakeWorker(MediaUnavailable("S3 unreachable for s3://b/k"))) == 3
        assert run_worker(FakeWorker()) == 0
    events = [(e["event"], e.get("exit_code")) for e in logs]
    assert events == [("worker_failed", 3), ("worker_stopped", None)]
    with pytest.raises(ValueError):  # a bug is not an exit code: it propagates (traceback)
        run_worker(FakeWorker(ValueError("bug")))


def test_guardstream_worker_returns_the_exit_code_through_main(monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole command line: ``guardstream worker`` (its worker built by ``workers.wiring``) returns
    the FatalError's code from ``main``."""
    from workers.cli import main

    w = FakeWorker(BrokerUnavailable("no broker"))
    w.install_signal_handlers = lambda: None  # type: ignore[attr-defined]
    monkeypatch.setattr("workers.wiring.build_worker", lambda s: w)
    assert main(["worker", "--skip-preflight", "--until-drained"]) == EXIT_OUTAGE
    assert w.calls == [True]


# ------------------------------------------------------------------------------------------- moderator


class QuarantinedImage(RecordError):
    """A RecordError nobody in workers.media raises: the moderator must still use its code."""


class FakeFetcher:
    """Raises ``QuarantinedImage`` (or ``other``) for refs whose key starts with ``bad``; decodes the rest
    to a small image."""

    def __init__(self, other: Exception | None = None) -> None:
        self.other = other

    def fetch_posts(self, posts: list[list[ImageRef]]) -> list[list[FetchedImage] | MediaError]:
        if any(r.key.startswith("bad") for refs in posts for r in refs):
            raise self.other or QuarantinedImage(ErrorCode.IMAGE_NOT_AN_IMAGE, "quarantined by policy")
        return [[FetchedImage(r, r.key * 4, 64, Image.new("RGB", (8, 8))) for r in refs] for refs in posts]

    def close(self) -> None:
        pass


class SafeEngine:
    name, model_version, policy_version = "fake", "v0", "p0"

    def moderate(self, batch: list[ModerationItem]) -> list[Verdict]:
        return [Verdict(safe=True) for _ in batch]

    def close(self) -> None:
        pass


def _moderate(fetcher: FakeFetcher) -> dict[str, Any]:
    values = [
        post("good", "a", None, ["s3://bucket/good.png"]),
        post("bad", "a", "look", ["s3://bucket/bad.png"]),
        post("text", "a", "hello there"),
        b"{not json",
    ]
    m = Moderator(Settings(allowed_buckets=["bucket"]), SafeEngine(), fetcher, None)  # type: ignore[arg-type]
    outs = m.process([Record("posts", 0, i, None, v) for i, v in enumerate(values)])
    return {o.post_id or "?": o for o in outs}


def test_the_moderator_dead_letters_a_fetchers_record_error_with_its_own_code() -> None:
    by_id = _moderate(FakeFetcher())
    assert by_id["good"].kind is OutcomeKind.VERDICT and by_id["text"].kind is OutcomeKind.VERDICT
    dl = by_id["bad"].dead_letter
    assert by_id["bad"].kind is OutcomeKind.DEAD_LETTER and dl is not None
    assert (dl.error_code, dl.error_class) == (ErrorCode.IMAGE_NOT_AN_IMAGE, "QuarantinedImage")
    assert dl.message == "quarantined by policy"
    bad_json = by_id["?"].dead_letter  # a DecodeError: the same path, its own code
    assert bad_json is not None and (bad_json.error_code, bad_json.error_class) == (
        ErrorCode.INVALID_JSON,
        "DecodeError",
    )


def test_an_unplanned_exception_is_still_internal_error() -> None:
    """The last line of defence stays: an exception that is no RecordError is ``internal_error``."""
    dl = _moderate(FakeFetcher(other=KeyError("surprise")))["bad"].dead_letter
    assert dl is not None and (dl.error_code, dl.error_class) == (ErrorCode.INTERNAL_ERROR, "KeyError")
