"""Console settings: the worker's ``Settings`` (same ``GUARDSTREAM_`` environment) plus the console's own."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from workers.settings import Settings


class ConsoleSettings(Settings):
    # Loopback unless told otherwise: the console shows unmoderated user content.
    console_host: str = "127.0.0.1"
    console_port: int = Field(8080, ge=0, le=65535)
    # Reviewer identity: a header set by an authenticating proxy in front of the console (only honoured
    # when configured), and/or per-reviewer tokens ("alice:TOKEN,bob:TOKEN").
    console_reviewer_header: str | None = None
    console_tokens: str = ""  # "alice:TOKEN,bob:TOKEN" (a plain string: env values are not JSON)
    console_secret: str | None = None  # signs session cookies; random per process when unset
    # The queue store. Defaults to ``redis_url``; in production give it a Redis with AOF persistence and
    # ``maxmemory-policy noeviction`` (a cache instance may evict queue items under memory pressure).
    console_redis_url: str | None = None
    console_prefix: str = "gs:console:"
    console_group_id: str = "guardstream-console"
    console_lease_s: int = Field(300, ge=5, le=24 * 3600)  # a claim expires after this long
    # p_unsafe inside [low, high] queues a post as "uncertain"
    console_band_low: float = Field(0.35, ge=0.0, le=1.0)
    console_band_high: float = Field(0.65, ge=0.0, le=1.0)
    audit_topic: str = "audit"

    @field_validator("console_tokens")
    @classmethod
    def _tokens_well_formed(cls, v: str) -> str:
        parse_tokens(v)
        return v

    @model_validator(mode="after")
    def _band_ordered(self) -> ConsoleSettings:
        if self.console_band_low > self.console_band_high:
            raise ValueError(
                f"GUARDSTREAM_CONSOLE_BAND_LOW ({self.console_band_low}) is above "
                f"GUARDSTREAM_CONSOLE_BAND_HIGH ({self.console_band_high})"
            )
        return self

    @property
    def store_url(self) -> str:
        return self.console_redis_url or self.cache.url

    @property
    def tokens(self) -> dict[str, str]:
        """token -> reviewer"""
        return {tok: name for name, tok in parse_tokens(self.console_tokens).items()}


def parse_tokens(text: str) -> dict[str, str]:
    """``"alice:TOKEN,bob:TOKEN"`` → ``{reviewer: token}``."""
    out: dict[str, str] = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        name, sep, token = pair.partition(":")
        if not sep or not name.strip() or len(token.strip()) < 16:
            raise ValueError(
                "GUARDSTREAM_CONSOLE_TOKENS must be 'reviewer:token,...' with tokens of 16+ characters"
            )
        out[name.strip()] = token.strip()
    return out
