"""Topic replay for audits: re-moderate a range of the posts topic and compare with the live decisions.

``Replayer`` reads with ``assign`` (never subscribing, never committing, so the live consumer group is
untouched), re-moderates the posts through the same ``Moderator`` as the worker with the chosen engine,
and writes one ``AuditRecord`` per post to the audit topic: original decision (from the verdicts/DLQ
topics), replayed decision, versions of both, and what changed.

Idempotent and resumable: the audit topic is the checkpoint. A replay has an id; on start the audit
topic is scanned for records of that id and their source offsets are skipped, so an interrupted
replay resumes and a finished one writes nothing new. Audit records are keyed ``replay_id:p:offset``.
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from confluent_kafka import Consumer, Producer, TopicPartition

from schemas.events import AuditRecord, DeadLetterEvent, DecisionSummary, VerdictEvent
from workers.kafka.config import reader_config, writer_config
from workers.kafka.topics import read_records
from workers.pipeline.moderator import Moderator
from workers.pipeline.records import Outcome, Record

Bound = int | datetime | None


class ReplayInterrupted(Exception):
    """The replay stopped at a batch boundary because ``stop()`` said so (Ctrl-C in the CLI).

    Every audit record written before it was acknowledged; the batch being gathered was dropped, so a
    resumed run with the same replay id picks up exactly where the audit topic ends."""

    def __init__(self, report: ReplayReport) -> None:
        super().__init__(f"replay {report.replay_id} interrupted after {report.written} audit records")
        self.report = report


def parse_bound(text: str | None) -> Bound:
    """``123`` is an offset; anything else must be an ISO-8601 time (UTC if no zone is given)."""
    if text is None or text == "":
        return None
    if text.isdigit():
        return int(text)
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"not an offset or ISO-8601 time: {text!r}") from None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _past(next_offset: int, end: int | None) -> bool:
    return end is not None and next_offset > end


def _ms(t: datetime) -> int:
    return int(t.timestamp() * 1000)


@dataclass
class ReplayReport:
    replay_id: str
    total: int = 0
    skipped_done: int = 0
    written: int = 0
    changed: int = 0
    missing_original: int = 0
    change_kinds: Counter[str] = field(default_factory=Counter)
    flips: Counter[tuple[str, str]] = field(default_factory=Counter)
    examples: dict[str, list[AuditRecord]] = field(default_factory=lambda: defaultdict(list))


def summarize(event: VerdictEvent | DeadLetterEvent, engine: str, model: str, policy: str) -> DecisionSummary:
    if isinstance(event, DeadLetterEvent):
        return DecisionSummary(
            safe=None,
            engine=engine,
            model_version=model,
            policy_version=policy,
            decided_at=event.failed_at,
            dead_letter_code=event.error_code,
        )
    return DecisionSummary(
        safe=event.safe,
        category=event.category,
        subcategory=event.subcategory,
        novel_risk=event.novel_risk,
        p_unsafe=event.scores.p_unsafe,
        engine=event.engine,
        model_version=event.model_version,
        policy_version=event.policy_version,
        decided_at=event.decided_at,
    )


def diff(old: DecisionSummary | None, new: DecisionSummary) -> list[str]:
    if old is None:
        return ["no_original"]
    out: list[str] = []
    if (old.dead_letter_code is None) != (new.dead_letter_code is None):
        out.append("now_dead_letter" if new.dead_letter_code else "no_longer_dead_letter")
    if old.safe is not None and new.safe is not None and old.safe != new.safe:
        out.append("safe_to_unsafe" if old.safe else "unsafe_to_safe")
    elif (old.safe is None) != (new.safe is None) and not out:
        out.append("now_abstain" if new.safe is None else "no_longer_abstain")
    if (
        old.safe is False
        and new.safe is False
        and (old.subcategory or old.category) != (new.subcategory or new.category)
    ):
        out.append("category_changed")
    if bool(old.novel_risk) != bool(new.novel_risk):
        out.append("novel_risk_added" if new.novel_risk else "novel_risk_removed")
    return out


class Replayer:
    def __init__(
        self,
        moderator: Moderator,
        bootstrap: str,
        *,
        verdicts_topic: str,
        dlq_topic: str,
        audit_topic: str,
        batch_size: int = 64,
        kafka_extra: Mapping[str, str] | None = None,
    ) -> None:
        self.m = moderator
        self.bootstrap = bootstrap
        self.extra = dict(kafka_extra or {})
        self.verdicts_topic = verdicts_topic
        self.dlq_topic = dlq_topic
        self.audit_topic = audit_topic
        self.batch_size = batch_size

    # ------------------------------------------------------------------ inputs
    def originals(self) -> dict[str, DecisionSummary]:
        """The latest live decision per post_id, from the verdicts and dead-letter topics."""
        out: dict[str, DecisionSummary] = {}
        for r in read_records(self.bootstrap, self.verdicts_topic, extra=self.extra):
            try:
                v = VerdictEvent.model_validate_json(r.value or b"")
            except ValueError:
                continue
            prev = out.get(v.post_id)
            if prev is None or (prev.decided_at or v.decided_at) <= v.decided_at:
                out[v.post_id] = summarize(v, v.engine, v.model_version, v.policy_version)
        for r in read_records(self.bootstrap, self.dlq_topic, extra=self.extra):
            try:
                d = DeadLetterEvent.model_validate_json(r.value or b"")
            except ValueError:
                continue
            if d.post_id and d.post_id not in out:
                out[d.post_id] = summarize(d, "worker", "-", "-")
        return out

    def done(self, replay_id: str) -> set[tuple[int, int]]:
        prefix = f"{replay_id}:".encode()
        return {
            (int(p), int(o))
            for r in read_records(self.bootstrap, self.audit_topic, extra=self.extra)
            if r.key and r.key.startswith(prefix)
            for _, p, o in [r.key.decode().rsplit(":", 2)]
        }

    def _records(
        self, topic: str, start: Bound, end: Bound, partitions: list[int] | None
    ) -> Iterator[Record]:
        """Records of ``topic`` within [start, end] (offsets or times, inclusive), read by assignment."""
        c = Consumer(reader_config(self.bootstrap, self.extra, group_id="guardstream-replay-reader"))
        try:
            md = c.list_topics(topic, timeout=15).topics[topic]
            parts = sorted(partitions if partitions is not None else md.partitions)
            lo_ms = _ms(start) if isinstance(start, datetime) else None
            hi_ms = _ms(end) if isinstance(end, datetime) else None
            assign = []
            for p in parts:
                first = start if isinstance(start, int) else 0
                if lo_ms is not None:  # a lower bound on any broker; exact on Apache Kafka
                    (tp,) = c.offsets_for_times([TopicPartition(topic, p, lo_ms)], timeout=15)
                    first = max(tp.offset, 0)
                assign.append(TopicPartition(topic, p, first))
            c.assign(assign)
            his = {
                p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=15, cached=False)[1]
                for p in parts
            }
            ends = {p: end if isinstance(end, int) else None for p in parts}
            nxt = {tp.partition: tp.offset for tp in assign}
            while True:
                msgs = c.consume(500, 0.2)
                # Finished when every partition passed its (Tansu: under-counted) watermark or its end
                # offset, and a consume came back empty (the rest of the last batch was delivered too).
                if not msgs and all(nxt[p] >= his[p] or _past(nxt[p], ends[p]) for p in parts):
                    break
                for m in msgs:
                    if m.error():
                        continue
                    p, off = m.partition(), m.offset()
                    assert p is not None and off is not None
                    nxt[p] = off + 1
                    stop = ends[p]
                    if stop is not None and off > stop:
                        continue
                    ts_type, ts = m.timestamp()
                    ts_ms = ts if ts_type else None
                    if ts_ms is not None and (
                        (lo_ms is not None and ts_ms < lo_ms) or (hi_ms is not None and ts_ms > hi_ms)
                    ):
                        continue
                    yield Record(topic, p, off, m.key(), m.value(), ts_ms)
        finally:
            c.close()

    # ------------------------------------------------------------------ run
    def run(
        self,
        replay_id: str,
        topic: str,
        start: Bound = None,
        end: Bound = None,
        partitions: list[int] | None = None,
        on_progress: Callable[[int], None] | None = None,
        stop: Callable[[], bool] | None = None,
    ) -> ReplayReport:
        """Replay ``[start, end]`` of ``topic``. ``stop`` is polled between records: once it returns true
        the run ends at the next batch boundary with ``ReplayInterrupted`` (nothing half-written)."""
        report = ReplayReport(replay_id)
        originals = self.originals()
        done = self.done(replay_id)
        producer = Producer(writer_config(self.bootstrap, self.extra))
        batch: list[Record] = []

        def flush_batch() -> None:
            if not batch:
                return
            outcomes = self.m.process(batch)
            errors: list[str] = []
            for o in outcomes:
                rec = self._audit(replay_id, o, originals, report)
                key = f"{replay_id}:{o.record.partition}:{o.record.offset}".encode()
                producer.produce(
                    self.audit_topic,
                    rec.model_dump_json().encode(),
                    key,
                    on_delivery=lambda err, _m: errors.append(str(err)) if err else None,
                )
            if producer.flush(30) or errors:
                raise RuntimeError(f"audit records not acknowledged: {errors[:3]}")
            report.written += len(outcomes)
            if on_progress:
                on_progress(len(outcomes))
            batch.clear()

        for rec in self._records(topic, start, end, partitions):
            if stop is not None and stop():
                raise ReplayInterrupted(report)
            report.total += 1
            if (rec.partition, rec.offset) in done:
                report.skipped_done += 1
                if on_progress:
                    on_progress(1)
                continue
            batch.append(rec)
            if len(batch) >= self.batch_size:
                flush_batch()
        flush_batch()
        return report

    def _audit(
        self, replay_id: str, o: Outcome, originals: dict[str, DecisionSummary], report: ReplayReport
    ) -> AuditRecord:
        eng = self.m.engine
        event = o.event  # validated from the published bytes: once
        new = summarize(event, eng.name, eng.model_version, eng.policy_version)
        old = originals.get(o.post_id or "")
        if old is None:
            report.missing_original += 1
        changes = diff(old, new)
        author = event.author_id if isinstance(event, VerdictEvent) else None
        rec = AuditRecord(
            replay_id=replay_id,
            post_id=o.post_id,
            author_id=author,
            source_topic=o.record.topic,
            source_partition=o.record.partition,
            source_offset=o.record.offset,
            source_timestamp_ms=o.record.timestamp_ms,
            original=old,
            replayed=new,
            changed=bool(changes) and changes != ["no_original"],
            changes=changes,
        )
        if rec.changed:
            report.changed += 1
        for c in changes:
            report.change_kinds[c] += 1
            if len(report.examples[c]) < 3:
                report.examples[c].append(rec)
        report.flips[(old.label if old else "none", new.label)] += 1
        return rec


def render_markdown(report: ReplayReport, *, topic: str, engine: str, model: str, policy: str) -> str:
    lines = [
        f"# Replay `{report.replay_id}`",
        "",
        f"- topic: `{topic}`",
        f"- engine: `{engine}` model `{model}` policy `{policy}`",
        f"- generated: {datetime.now(UTC).isoformat()}",
        "",
        "| count | value |",
        "| --- | --- |",
        f"| posts in range | {report.total} |",
        f"| already done (resumed) | {report.skipped_done} |",
        f"| audit records written | {report.written} |",
        f"| decisions changed | {report.changed} |",
        f"| no original verdict | {report.missing_original} |",
        "",
    ]
    if report.change_kinds:
        lines += ["## Changes", "", "| change | posts |", "| --- | --- |"]
        lines += [f"| {k} | {n} |" for k, n in report.change_kinds.most_common()] + [""]
    olds = sorted({a for a, _ in report.flips})
    news = sorted({b for _, b in report.flips})
    if olds:
        lines += [
            "## Flip matrix (rows: original, columns: replayed)",
            "",
            "| original \\ replayed | " + " | ".join(news) + " |",
            "| --- |" + " --- |" * len(news),
        ]
        lines += [
            f"| {a} | " + " | ".join(str(report.flips.get((a, b), 0)) for b in news) + " |" for a in olds
        ]
        lines.append("")
    if report.examples:
        lines += ["## Examples", ""]
        for kind, recs in report.examples.items():
            lines.append(f"### {kind}")
            for r in recs:
                old = r.original.label if r.original else "none"
                lines.append(
                    f"- `{r.post_id}` ({r.source_topic}/{r.source_partition}@{r.source_offset}): "
                    f"{old} → {r.replayed.label}"
                )
            lines.append("")
    return "\n".join(lines)


def export_decisions(
    bootstrap: str,
    verdicts_topic: str,
    out: Path,
    *,
    start: datetime | None = None,
    end: datetime | None = None,
    author: str | None = None,
    kafka_extra: Mapping[str, str] | None = None,
) -> int:
    """Write every decision in [start, end] (decision time), optionally for one author, as JSONL."""
    n = 0
    with out.open("w", encoding="utf-8") as f:
        for r in read_records(bootstrap, verdicts_topic, extra=kafka_extra):
            try:
                v = VerdictEvent.model_validate_json(r.value or b"")
            except ValueError:
                continue
            if (start and v.decided_at < start) or (end and v.decided_at > end):
                continue
            if author and v.author_id != author:
                continue
            f.write(json.dumps(json.loads(r.value or b"{}"), sort_keys=True) + "\n")
            n += 1
    return n


def new_replay_id() -> str:
    return time.strftime("replay-%Y%m%dT%H%M%SZ", time.gmtime())
