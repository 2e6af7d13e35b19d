"""What flows into and out of an engine: one ``ModerationItem`` in, one ``Verdict`` out, per post."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from PIL import Image

from schemas.events import Modality, modality_of


@dataclass(frozen=True, slots=True)
class ModerationItem:
    """A post ready for an engine: text and decoded, size-bounded RGB images (already fetched)."""

    post_id: str
    text: str | None
    images: tuple[Image.Image, ...] = ()

    @property
    def modality(self) -> Modality:
        return modality_of(self.text, bool(self.images))


@dataclass(slots=True)
class Verdict:
    """An engine's decision for one item. ``safe=None`` is an abstention (the engine cannot judge)."""

    safe: bool | None
    category: str | None = None  # taxonomy id of the main category, e.g. "C9"
    subcategory: str | None = None  # taxonomy id of the subcategory, e.g. "C9S1"
    novel_risk: str | None = None  # free-text description of an out-of-taxonomy risk
    p_unsafe: float | None = None
    category_similarity: float | None = None
    reasoning: str | None = None
    raw_output: str | None = None
    parse_error: bool = False
    abstained_reason: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


@runtime_checkable
class GuardEngine(Protocol):
    """A batched moderation backend.

    ``moderate`` takes a whole micro-batch (mixed modalities) and returns one verdict per item, in
    order. Backends that generate (vLLM, transformers, an OpenAI-compatible server) submit the batch in
    one call so the GPU sees full batches; the CPU baseline embeds the batch in one forward pass.
    """

    name: str
    model_version: str
    policy_version: str

    def moderate(self, batch: list[ModerationItem]) -> list[Verdict]: ...

    def close(self) -> None: ...


@runtime_checkable
class StreamingEngine(Protocol):
    """The worker's engine seam: one request per post, completing out of order.

    ``judge`` is awaited once per post on the worker's engine event loop; many are outstanding at once
    (up to ``max_in_flight``), so a generative backend with continuous batching (vLLM's ``AsyncLLM``,
    a vLLM server) keeps its running batch full and returns each verdict the moment it is done.
    Batch-native backends (the CPU engine, transformers) sit behind ``guard.streaming.MicroBatcher``.

    Errors (``guard.errors``): ``EngineRequestError`` (or any other exception) fails that one post;
    ``EngineDeadError`` says the engine is gone and no post should be blamed for it.
    """

    name: str
    model_version: str
    policy_version: str
    max_in_flight: int

    async def judge(self, item: ModerationItem) -> Verdict: ...

    async def aclose(self) -> None: ...
