"""``guardstream redrive``: send dead letters of chosen error codes back to the posts topic.

For what an outage or a since-fixed bug dead-lettered (``s3_unavailable``, ``engine_failed``,
``image_not_found`` after the object was restored...). Each dead letter's original key and bytes are
produced to the posts topic unchanged, with headers naming where they came from, and the worker judges
them again like any post.

Idempotent: a ledger topic (``<dlq>-redriven``, keyed ``partition:offset`` of the dead letter) records
what was redriven; a run skips those. The posts are acknowledged before the ledger entries are written,
so a crash between the two can redrive a batch twice (the second copy carries the same content hash:
a cache hit, the same decision) — never zero times. ``dry_run`` reads and counts, writes nothing.
"""

from __future__ import annotations

import base64
import json
import time
from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

import structlog
from confluent_kafka import Producer

from workers.kafka.admin import create_topics
from workers.kafka.config import writer_config
from workers.kafka.topics import read_records

log = structlog.get_logger(__name__)

HEADER_OF = "guardstream-redrive-of"  # "<dlq topic>:<partition>:<offset>" of the dead letter
HEADER_SOURCE = "guardstream-redrive-source"  # "<topic>:<partition>:<offset>" the post was first read at


def ledger_topic(dlq_topic: str) -> str:
    return f"{dlq_topic}-redriven"


@dataclass
class RedriveReport:
    matched: int = 0  # dead letters with a chosen error code
    already: int = 0  # of those, redriven by an earlier run
    redriven: int = 0  # produced to the posts topic by this run (0 on a dry run)
    unrecoverable: int = 0  # the original bytes are not in the dead letter (bounded prefix only)
    by_code: Counter[str] = field(default_factory=Counter)
    dry_run: bool = False


def redrive(
    bootstrap: str,
    *,
    dlq_topic: str,
    posts_topic: str,
    codes: Collection[str],
    dry_run: bool = False,
    limit: int | None = None,
    kafka_extra: Mapping[str, str] | None = None,
    timeout_s: float = 30.0,
) -> RedriveReport:
    if not codes:
        raise ValueError("choose the error codes to redrive (--code), e.g. --code s3_unavailable")
    report = RedriveReport(dry_run=dry_run)
    ledger = ledger_topic(dlq_topic)
    if not dry_run:
        create_topics(bootstrap, {ledger: 1}, extra=kafka_extra)
    done = {r.key.decode() for r in read_records(bootstrap, ledger, extra=kafka_extra) if r.key}
    todo: list[tuple[str, bytes | None, bytes, list[tuple[str, str | bytes | None]]]] = []
    for r in read_records(bootstrap, dlq_topic, extra=kafka_extra):
        try:
            dl = json.loads(r.value or b"")
        except ValueError:
            continue
        if not isinstance(dl, dict) or dl.get("error_code") not in codes:
            continue
        report.matched += 1
        mark = f"{r.partition}:{r.offset}"
        if mark in done:
            report.already += 1
            continue
        value = base64.b64decode(dl.get("original_value_b64") or "")
        # dead letters that keep only a prefix say so (schemas.events.DeadLetterEvent)
        size = dl.get("original_value_size") or len(value)
        if dl.get("original_value_truncated") or size != len(value):
            report.unrecoverable += 1
            continue
        key_b64 = dl.get("original_key_b64")
        key = base64.b64decode(key_b64) if key_b64 else None
        source = f"{dl.get('source_topic')}:{dl.get('source_partition')}:{dl.get('source_offset')}"
        headers: list[tuple[str, str | bytes | None]] = [
            (HEADER_OF, f"{dlq_topic}:{mark}".encode()),
            (HEADER_SOURCE, source.encode()),
        ]
        todo.append((mark, key, value, headers))
        report.by_code[str(dl["error_code"])] += 1
        if limit is not None and len(todo) >= limit:
            break
    if dry_run or not todo:
        log.info("redrive_planned" if dry_run else "redrive_nothing_to_do", **_summary(report, len(todo)))
        report.redriven = 0
        return report
    producer = Producer(writer_config(bootstrap, kafka_extra))
    errors: list[str] = []

    def on_delivery(err: object, _msg: object) -> None:
        if err is not None:
            errors.append(str(err))

    for _, key, value, headers in todo:
        producer.produce(posts_topic, value, key, headers=headers, on_delivery=on_delivery)
        producer.poll(0)
    if producer.flush(timeout_s) or errors:
        raise RuntimeError(f"redrive to {posts_topic} not acknowledged: {errors[:3]} (none recorded; rerun)")
    now = time.time()
    for mark, _, _, _ in todo:  # only after the posts are acknowledged
        producer.produce(ledger, json.dumps({"redriven_at": now, "posts_topic": posts_topic}).encode(), mark)
        producer.poll(0)
    if producer.flush(timeout_s) or errors:
        raise RuntimeError(
            f"posts redriven but the ledger {ledger} was not acknowledged: {errors[:3]} "
            "(a rerun may redrive them once more)"
        )
    report.redriven = len(todo)
    log.info("redrive_done", **_summary(report, len(todo)))
    return report


def _summary(report: RedriveReport, planned: int) -> dict[str, object]:
    return {
        "matched": report.matched,
        "already_redriven": report.already,
        "planned": planned,
        "unrecoverable": report.unrecoverable,
        "by_code": dict(report.by_code),
    }
