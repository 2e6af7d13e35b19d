"""Replay reports people read: cumulative per replay id, as Markdown and as one self-contained HTML file.

A replay's audit records are its checkpoint (``workers/audit/replay.py``), so the report is built from *all*
audit records of the replay id on the audit topic, not from the counters of the run that just ended: a
resumed run, or a re-run of a finished replay (which writes nothing), still reports every post of the
replay instead of zeros or only the resumed part. The run's own counts (posts scanned, skipped as already
done, written now) are shown beside the cumulative ones.

The HTML file has no external references (inline CSS, no scripts); every value that came from a topic
(post text, ids, novel-risk descriptions) is HTML-escaped.
"""

from __future__ import annotations

import html
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from confluent_kafka import Consumer, TopicPartition

from guard.taxonomy import Taxonomy
from schemas.codec import DecodeError, decode_post
from schemas.events import AuditRecord, DecisionSummary
from workers.audit.replay import Bound, ReplayReport, render_markdown
from workers.kafka.config import reader_config
from workers.kafka.topics import read_records

EXAMPLES_PER_KIND = 5
TEXT_CHARS = 600


def audit_records(
    bootstrap: str, audit_topic: str, replay_id: str, extra: Mapping[str, str] | None = None
) -> list[AuditRecord]:
    """Every audit record of ``replay_id``, one per source position (a re-written position counts once)."""
    prefix = f"{replay_id}:".encode()
    by_key: dict[bytes, AuditRecord] = {}
    for r in read_records(bootstrap, audit_topic, extra=extra):
        if r.key and r.key.startswith(prefix):
            try:
                by_key[r.key] = AuditRecord.model_validate_json(r.value or b"")
            except ValueError:
                continue
    return sorted(by_key.values(), key=lambda a: (a.source_partition, a.source_offset))


def cumulative(records: Iterable[AuditRecord], run: ReplayReport) -> ReplayReport:
    """A ``ReplayReport`` over every audit record of the replay; ``total``/``skipped_done`` stay the run's."""
    out = ReplayReport(run.replay_id, total=run.total, skipped_done=run.skipped_done)
    for rec in records:
        out.written += 1
        out.changed += rec.changed
        out.missing_original += rec.original is None
        for c in rec.changes:
            out.change_kinds[c] += 1
            if len(out.examples[c]) < EXAMPLES_PER_KIND:
                out.examples[c].append(rec)
        out.flips[(rec.original.label if rec.original else "none", rec.replayed.label)] += 1
    return out


def post_texts(
    bootstrap: str,
    topic: str,
    positions: Iterable[tuple[int, int]],
    extra: Mapping[str, str] | None = None,
) -> dict[tuple[int, int], str]:
    """The text of the posts at these (partition, offset) positions of ``topic`` (examples only: a seek
    and one read each)."""
    out: dict[tuple[int, int], str] = {}
    wanted = sorted(set(positions))
    if not wanted:
        return out
    c = Consumer(reader_config(bootstrap, extra, group_id="guardstream-replay-report"))
    try:
        for p, off in wanted:
            c.assign([TopicPartition(topic, p, off)])
            for m in c.consume(1, 5.0):
                if m.error() or m.offset() != off:
                    continue
                try:
                    post = decode_post(m.value())
                except DecodeError:
                    out[(p, off)] = (
                        "(not a valid post: " + (m.value() or b"")[:200].decode("utf-8", "replace") + ")"
                    )
                    continue
                text = post.text or ""
                if post.images:
                    text += ("\n" if text else "") + " ".join(f"[image {u}]" for u in post.images)
                out[(p, off)] = text
    finally:
        c.close()
    return out


def _true_end(c: Consumer, topic: str, partition: int, high: int) -> int:
    """The partition's real next offset. Tansu reports the high watermark as the base offset of the last
    record batch + 1 (see ``workers.kafka.topics.read_records``), so read from there to the end: one record on
    Apache Kafka, at most one batch on Tansu."""
    if high <= 0:
        return high
    c.assign([TopicPartition(topic, partition, high - 1)])
    end, seen = high, False
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        msgs = c.consume(500, 0.2)
        # done when the record at high - 1 arrived (the first fetch after an assign can take a while)
        # and a further consume returned nothing (the rest of its batch was delivered with it)
        if not msgs and seen:
            break
        for m in msgs:
            off = m.offset()
            if not m.error() and off is not None:
                end, seen = max(end, off + 1), True
    return end


def estimate_total(
    bootstrap: str,
    topic: str,
    start: Bound,
    end: Bound,
    partitions: list[int] | None,
    extra: Mapping[str, str] | None = None,
) -> int | None:
    """Records in the range, for the progress bar: exact for offset bounds and no bounds; for time bounds
    from the broker's time index (a broker without one, like Tansu, answers 0: then an upper bound)."""
    c = Consumer(reader_config(bootstrap, extra, group_id="guardstream-replay-report"))
    try:
        md = c.list_topics(topic, timeout=15).topics.get(topic)
        if md is None or md.error is not None:
            return None
        parts = sorted(partitions if partitions is not None else md.partitions)
        total = 0
        for p in parts:
            lo, hi_w = c.get_watermark_offsets(TopicPartition(topic, p), timeout=15, cached=False)
            hi = _true_end(c, topic, p, hi_w)
            if isinstance(start, int):
                lo = max(lo, start)
            elif isinstance(start, datetime):
                (tp,) = c.offsets_for_times([TopicPartition(topic, p, _ms(start))], timeout=15)
                lo = max(lo, tp.offset) if tp.offset >= 0 else hi
            if isinstance(end, int):
                hi = min(hi, end + 1)
            elif isinstance(end, datetime):
                (tp,) = c.offsets_for_times([TopicPartition(topic, p, _ms(end) + 1)], timeout=15)
                hi = min(hi, tp.offset) if tp.offset > 0 else hi  # 0: no time index (Tansu)
            total += max(0, hi - lo)
        return total
    finally:
        c.close()


def _ms(t: datetime) -> int:
    return int(t.timestamp() * 1000)


# ---------------------------------------------------------------------------------------------- HTML
@dataclass(frozen=True)
class ReportContext:
    topic: str
    engine: str
    model: str
    policy: str
    taxonomy: Taxonomy


def label_name(label: str, tax: Taxonomy) -> str:
    """``C9S1`` → ``C9S1 Self-harm guidance`` (ids alone mean nothing to a reader)."""
    name = tax.subcategory_name(label) or tax.category_name(label)
    return f"{label} {name}" if name else label


def _decision(d: DecisionSummary | None, tax: Taxonomy) -> str:
    if d is None:
        return "<em>none</em>"
    parts = [html.escape(label_name(d.label, tax))]
    if d.p_unsafe is not None:
        parts.append(f"p_unsafe {d.p_unsafe:.2f}")
    if d.novel_risk:
        parts.append(f"novel risk: {html.escape(d.novel_risk)}")
    parts.append(f'<span class="v">{html.escape(d.engine)} · {html.escape(d.policy_version)}</span>')
    return "<br>".join(parts)


CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:1100px}
h1{font-size:1.5rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #dde}
table{border-collapse:collapse;margin:.5rem 0}
td,th{border:1px solid #d5d9e0;padding:.3rem .6rem;vertical-align:top}
th{background:#f3f5f8;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}
td.same{background:#eef7ee}td.diff{background:#fdecec;font-weight:600}td.zero{color:#aab}
.v{color:#667;font-size:12px}.text{white-space:pre-wrap;max-width:480px}.meta{color:#556}
"""


def render_html(
    report: ReplayReport, run: ReplayReport, ctx: ReportContext, texts: dict[tuple[int, int], str]
) -> str:
    e = html.escape
    tax = ctx.taxonomy
    rows = [
        ("posts replayed (all runs of this replay id)", report.written),
        ("decisions changed", report.changed),
        ("no original verdict", report.missing_original),
        ("this run: posts in range", run.total),
        ("this run: already done (skipped)", run.skipped_done),
        ("this run: audit records written", run.written),
    ]
    out = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Replay {e(report.replay_id)}</title><style>{CSS}</style></head><body>",
        f"<h1>Replay <code>{e(report.replay_id)}</code></h1>",
        f'<p class="meta">topic <code>{e(ctx.topic)}</code> · engine <code>{e(ctx.engine)}</code> · model '
        f"<code>{e(ctx.model)}</code> · policy <code>{e(ctx.policy)}</code> · generated "
        f"{datetime.now(UTC).isoformat(timespec='seconds')}</p>",
        "<h2>Counts</h2><table>",
        *(f'<tr><th>{e(k)}</th><td class="n">{v}</td></tr>' for k, v in rows),
        "</table>",
    ]
    if report.change_kinds:
        out += ["<h2>Changes</h2><table><tr><th>change</th><th>posts</th></tr>"]
        out += [
            f'<tr><td>{e(k)}</td><td class="n">{n}</td></tr>' for k, n in report.change_kinds.most_common()
        ]
        out.append("</table>")
    olds = sorted({a for a, _ in report.flips})
    news = sorted({b for _, b in report.flips})
    if olds:
        out += [
            "<h2>Confusion matrix</h2>",
            "<p>Rows: the original (live) decision; columns: the replayed one. Off-diagonal: changed.</p>",
            "<table><tr><th>original \\ replayed</th>"
            + "".join(f"<th>{e(label_name(b, tax))}</th>" for b in news)
            + "</tr>",
        ]
        for a in olds:
            cells = []
            for b in news:
                n = report.flips.get((a, b), 0)
                cls = "zero" if not n else ("same" if a == b else "diff")
                cells.append(f'<td class="n {cls}">{n}</td>')
            out.append(f"<tr><th>{e(label_name(a, tax))}</th>{''.join(cells)}</tr>")
        out.append("</table>")
    if report.examples:
        out.append("<h2>Examples</h2>")
        for kind, recs in report.examples.items():
            out += [
                f"<h3>{e(kind)} ({report.change_kinds[kind]})</h3>",
                "<table><tr><th>post</th><th>text</th><th>original</th><th>replayed</th></tr>",
            ]
            for r in recs:
                text = texts.get((r.source_partition, r.source_offset))
                shown = (
                    "<em>(not found on the topic)</em>"
                    if text is None
                    else e(text[:TEXT_CHARS]) + ("…" if len(text) > TEXT_CHARS else "")
                )
                out.append(
                    f"<tr><td><code>{e(r.post_id or '?')}</code><br><span class='v'>"
                    f"{e(r.source_topic)}/{r.source_partition}@{r.source_offset}</span></td>"
                    f'<td class="text">{shown}</td><td>{_decision(r.original, tax)}</td>'
                    f"<td>{_decision(r.replayed, tax)}</td></tr>"
                )
            out.append("</table>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_reports(
    bootstrap: str,
    audit_topic: str,
    run: ReplayReport,
    ctx: ReportContext,
    markdown_path: Path,
    extra: Mapping[str, str] | None = None,
) -> tuple[ReplayReport, Path]:
    """Write the cumulative Markdown report to ``markdown_path`` and the HTML one beside it (``.html``).
    Returns the cumulative report and the HTML path."""
    report = cumulative(audit_records(bootstrap, audit_topic, run.replay_id, extra), run)
    positions = [(r.source_partition, r.source_offset) for recs in report.examples.values() for r in recs]
    texts = post_texts(bootstrap, ctx.topic, positions, extra)
    markdown_path.write_text(
        render_markdown(report, topic=ctx.topic, engine=ctx.engine, model=ctx.model, policy=ctx.policy),
        encoding="utf-8",
    )
    html_path = markdown_path.with_suffix(".html")
    html_path.write_text(render_html(report, run, ctx, texts), encoding="utf-8")
    return report, html_path
