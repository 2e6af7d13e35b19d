"""What a prepared record becomes: its ``Outcome``, the exact messages to publish.

A verdict goes to the verdicts topic, and a copy to the novel-risk topic when it names a risk outside
the taxonomy (or is unsafe with no category); anything else is a dead letter with its stable
``ErrorCode`` and as much of the original as fits. ``shrink_output`` makes an output smaller when the
broker refuses it as too large, so that a dead letter always fits.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime

import structlog

from guard.taxonomy import Taxonomy
from guard.types import Verdict
from schemas.events import DeadLetterEvent, ErrorCode
from schemas.wire import CachedVerdict, ScoresWire, VerdictWire, encode
from workers.pipeline.records import Outcome, OutcomeKind, Output, Prepared
from workers.settings import Settings

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class OutcomeBuilder:
    verdicts_topic: str
    novel_risk_topic: str
    dlq_topic: str
    publish_reasoning: bool  # GUARDSTREAM_PUBLISH_REASONING: the model's reasoning and raw output on verdicts
    dlq_max_original_bytes: int  # GUARDSTREAM_DLQ_MAX_ORIGINAL_BYTES: of the original kept in a dead letter
    engine: str
    model_version: str
    policy_version: str
    taxonomy: Taxonomy | None  # names the verdict's category ids, when the engine has one

    @classmethod
    def from_settings(
        cls, s: Settings, *, engine: str, model_version: str, policy_version: str, taxonomy: Taxonomy | None
    ) -> OutcomeBuilder:
        return cls(
            verdicts_topic=s.kafka.verdicts_topic,
            novel_risk_topic=s.kafka.novel_risk_topic,
            dlq_topic=s.kafka.dlq_topic,
            publish_reasoning=s.publish_reasoning,
            dlq_max_original_bytes=s.dlq_max_original_bytes,
            engine=engine,
            model_version=model_version,
            policy_version=policy_version,
            taxonomy=taxonomy,
        )

    def build(self, p: Prepared, now: float, decided_at: datetime) -> Outcome:
        """``p``'s outcome: its verdict, or its dead letter when it failed anywhere on the way."""
        if p.error is not None or p.post is None:
            return self.dead_letter(p)
        r, post = p.record, p.post
        v: Verdict | CachedVerdict | None = p.cached if p.cached is not None else p.verdict
        assert v is not None and p.key is not None
        tax = self.taxonomy
        reasoning = self.publish_reasoning
        ev = VerdictWire(
            post_id=post.post_id,
            author_id=post.author_id,
            modality=post.modality,
            safe=v.safe,
            category=v.category,
            category_name=tax.category_name(v.category) if tax else None,
            subcategory=v.subcategory,
            subcategory_name=tax.subcategory_name(v.subcategory) if tax else None,
            novel_risk=v.novel_risk,
            abstained_reason=v.abstained_reason,
            parse_error=False,  # an unparseable output is dead-lettered (Moderator.finish), never published
            reasoning=v.reasoning if reasoning else None,
            raw_output=v.raw_output if reasoning else None,
            scores=ScoresWire(p_unsafe=v.p_unsafe, category_similarity=v.category_similarity),
            engine=self.engine,
            model_version=self.model_version,
            policy_version=self.policy_version,
            content_hash=p.key,
            cache_hit=p.cached is not None,
            latency_ms=round((now - p.started) * 1000.0, 3),
            source_topic=r.topic,
            source_partition=r.partition,
            source_offset=r.offset,
            post_created_at=post.created_at,
            decided_at=decided_at,
        )
        key = post.post_id.encode()
        outputs = [Output(self.verdicts_topic, key, encode(ev))]
        if ev.novel_risk or (ev.safe is False and ev.category is None):
            outputs.append(Output(self.novel_risk_topic, key, outputs[0].value))
        return Outcome(r, OutcomeKind.VERDICT, post.post_id, outputs, verdict=ev)

    def dead_letter(self, p: Prepared) -> Outcome:
        r = p.record
        code, cls, msg = p.error or (ErrorCode.INVALID_EVENT, "Unknown", "no post")
        raw = r.value or b""
        keep = self.dlq_max_original_bytes
        dl = DeadLetterEvent(
            post_id=p.post.post_id if p.post else post_id_hint(r.value),
            error_code=code,
            error_class=cls,
            message=msg,
            source_topic=r.topic,
            source_partition=r.partition,
            source_offset=r.offset,
            original_key_b64=DeadLetterEvent.encode_bytes(r.key[:keep] if r.key else r.key),
            original_value_b64=DeadLetterEvent.encode_bytes(raw[:keep]) or "",
            original_value_size=len(raw),
            original_value_sha256=hashlib.sha256(raw).hexdigest(),
            original_value_truncated=len(raw) > keep,
        )
        log.info(
            "post_dead_lettered",
            post_id=dl.post_id,
            topic=r.topic,
            partition=r.partition,
            offset=r.offset,
            error_code=code.value,
            reason=msg[:200],
        )
        value = dl.__pydantic_serializer__.to_json(dl)
        outputs = [Output(self.dlq_topic, r.key, value)]
        return Outcome(r, OutcomeKind.DEAD_LETTER, dl.post_id, outputs, dead_letter=dl)


def to_cache(v: Verdict) -> CachedVerdict:
    """What the verdict cache keeps of a verdict (the decision, not the post's identity)."""
    return CachedVerdict(
        safe=v.safe,
        category=v.category,
        subcategory=v.subcategory,
        novel_risk=v.novel_risk,
        p_unsafe=v.p_unsafe,
        category_similarity=v.category_similarity,
        reasoning=v.reasoning,
        raw_output=v.raw_output,
        abstained_reason=v.abstained_reason,
    )


def post_id_hint(raw: bytes | None) -> str | None:
    """Best effort post_id from an invalid event, for the dead letter (never raises)."""
    try:
        obj = json.loads(raw or b"")
    except Exception:
        return None
    pid = obj.get("post_id") if isinstance(obj, dict) else None
    # a lone surrogate ("\ud800") would make the dead letter itself unserialisable: replace it
    return pid[:256].encode("utf-8", "replace").decode("utf-8") if isinstance(pid, str) else None


def shrink_output(out: Output, outcome: Outcome) -> Output | None:
    """A smaller version of an output the broker refused as too large (``MSG_SIZE_TOO_LARGE``): a dead
    letter loses the original bytes (size and sha256 stay) and most of its message; a verdict loses its
    reasoning and raw output. None when there is nothing left to cut."""
    dl = outcome.dead_letter
    if dl is not None:
        if not dl.original_value_b64 and len(dl.message) <= 200 and not dl.original_key_b64:
            return None
        small = dl.model_copy(
            update={
                "original_value_b64": "",
                "original_key_b64": None,
                "original_value_truncated": True,
                "message": dl.message[:200],
            }
        )
        outcome.dead_letter = small
        return Output(out.topic, out.key, small.__pydantic_serializer__.to_json(small))
    v = outcome.verdict
    if v is not None and (v.reasoning or v.raw_output):
        v.reasoning = None
        v.raw_output = None
        return Output(out.topic, out.key, encode(v))
    return None
